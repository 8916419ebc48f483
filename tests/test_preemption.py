"""Operator-level preemption is exact: suspend anywhere, run other work, resume, same bits.

Each test runs on the CPU and, under ``scripts/gpu_check``, in float32 on CUDA at K = 1, 2 and 4
operators launched ahead (``DEVICE_K``): there the executor does not synchronise at every point,
so a suspension leaves up to K operators running, and the results must still be bitwise equal.
"""

import copy

import pytest
import torch

from replicas.executor import Granularity, PreemptibleExecutor
from replicas.kv_cache import PagedKVCache
from replicas.model.decoder import DecoderModel
from replicas.model.tiny import build_tiny_checkpoint
from replicas.programs import PrefillItem, decode_program, prefill_program
from tests.devices import DEVICE_K


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=3, num_layers=3)


@pytest.fixture(scope="module", params=DEVICE_K)
def target(request) -> tuple[str, int]:
    """``(device, K)``: where the model runs and how many operators the executor launches ahead."""
    return request.param


@pytest.fixture(scope="module")
def model(checkpoint, target) -> DecoderModel:
    return DecoderModel.load(checkpoint, device=target[0])


def _executor(model: DecoderModel, granularity, k: int = 2) -> PreemptibleExecutor:
    return PreemptibleExecutor(granularity, max_inflight=k, device=model.device)


def _host(kv: PagedKVCache) -> PagedKVCache:
    """The same cache with its tensors copied to the CPU (block tables shared), to read KV back."""
    host = copy.copy(kv)
    host.keys, host.values = [t.cpu() for t in kv.keys], [t.cpu() for t in kv.values]
    return host


def _prompt(seed: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def _kv_of(kv: PagedKVCache, seq_id: int, n: int) -> list[torch.Tensor]:
    slots = kv.slots(seq_id, 0, n)
    return [torch.cat(kv.gather(layer, slots)) for layer in range(kv.spec.num_layers)]


def _fresh_kv(model: DecoderModel) -> PagedKVCache:
    return PagedKVCache(model.kv_spec(block_size=8), num_blocks=256, device=model.device)


def _reference(model: DecoderModel, items: list[PrefillItem], chunk: int):
    kv = _fresh_kv(model)
    for it in items:
        kv.allocator.ensure_capacity(it.seq_id, len(it.token_ids))
    logits = _executor(model, "none").run_to_completion(prefill_program(model, kv, items, chunk))
    return logits, {it.seq_id: _kv_of(_host(kv), it.seq_id, len(it.token_ids)) for it in items}


def _count_points(model: DecoderModel, items: list[PrefillItem], chunk: int, granularity: str) -> int:
    kv = _fresh_kv(model)
    for it in items:
        kv.allocator.ensure_capacity(it.seq_id, len(it.token_ids))
    ex = _executor(model, granularity)
    task = ex.start(prefill_program(model, kv, items, chunk))
    ex.run(task)
    return task.points_passed


@pytest.mark.parametrize("granularity", ["layer", "block", "op"])
def test_suspend_at_every_point_then_resume_is_bitwise_exact(model, target, granularity):
    vocab = model.config.vocab_size
    # Two prompts in one batch, the long one split into chunks, so points fall in every pass.
    items = [PrefillItem(1, _prompt(1, 45, vocab)), PrefillItem(2, _prompt(2, 13, vocab))]
    chunk = 24
    ref_logits, ref_kv = _reference(model, items, chunk)
    points = _count_points(model, items, chunk, granularity)
    # 3 passes (24 + 24 + 10 tokens) of 3 layers; `op` also stops after each pass's embedding.
    per_pass = {"layer": 3, "block": 2 * 3, "op": 1 + 5 * 3}[granularity]
    assert points == 3 * per_pass
    for stop_at in range(1, points + 1):
        kv = _fresh_kv(model)
        for it in items:
            kv.allocator.ensure_capacity(it.seq_id, len(it.token_ids))
        ex = _executor(model, granularity, target[1])
        task = ex.start(prefill_program(model, kv, items, chunk))
        suspended = ex.run(task, should_stop=lambda t=task, k=stop_at: t.points_passed >= k) is False
        assert len(ex._events) <= target[1]  # suspended with at most K operators still in flight
        assert suspended or stop_at == points
        # Something else in between: another prefill and a decode step on the same cache.
        other = PrefillItem(9, _prompt(9, 30, vocab))
        kv.allocator.ensure_capacity(9, 31)
        ex.run_to_completion(prefill_program(model, kv, [other], 16))
        ex.run_to_completion(decode_program(model, kv, [(9, 5, 30)]))
        assert ex.run(task) is True
        for seq_id in (1, 2):
            assert torch.equal(task.result[seq_id], ref_logits[seq_id]), f"logits differ after stop {stop_at}"
            n = len(items[seq_id - 1].token_ids)
            for layer, ref in enumerate(ref_kv[seq_id]):
                assert torch.equal(_kv_of(_host(kv), seq_id, n)[layer], ref), f"KV layer {layer} differs"


def test_interleaving_two_prefills_and_a_decode_matches_running_each_alone(model, target):
    vocab = model.config.vocab_size
    a = [PrefillItem(1, _prompt(11, 37, vocab)), PrefillItem(2, _prompt(12, 5, vocab))]
    b = [PrefillItem(3, _prompt(13, 52, vocab))]
    ctx = PrefillItem(4, _prompt(14, 20, vocab))

    def setup() -> PagedKVCache:
        kv = _fresh_kv(model)
        for it in [*a, *b, ctx]:
            kv.allocator.ensure_capacity(it.seq_id, len(it.token_ids) + 1)
        _executor(model, "none").run_to_completion(prefill_program(model, kv, [ctx]))
        return kv

    kv = setup()
    ex = _executor(model, "none")
    alone = {
        "a": ex.run_to_completion(prefill_program(model, kv, a, 16)),
        "b": ex.run_to_completion(prefill_program(model, kv, b, 64)),
        "d": ex.run_to_completion(decode_program(model, kv, [(4, 7, 20)])),
    }
    kv = setup()
    ex = _executor(model, Granularity.OP, target[1])
    tasks = {
        "a": ex.start(prefill_program(model, kv, a, 16)),
        "b": ex.start(prefill_program(model, kv, b, 64)),
        "d": ex.start(decode_program(model, kv, [(4, 7, 20)])),
    }
    pending = list(tasks)
    while pending:  # one operator of each in turn
        for name in list(pending):
            task = tasks[name]
            if ex.run(task, should_stop=lambda: True):
                pending.remove(name)
    for name, task in tasks.items():
        assert task.suspensions > 0
        for seq_id, logits in alone[name].items():
            assert torch.equal(task.result[seq_id], logits), f"{name} differs when interleaved"


def test_granularity_none_never_stops(model):
    kv = _fresh_kv(model)
    kv.allocator.ensure_capacity(1, 40)
    ex = _executor(model, "none")
    task = ex.start(prefill_program(model, kv, [PrefillItem(1, _prompt(3, 40, model.config.vocab_size))]))
    assert ex.run(task, should_stop=lambda: True) is True
    assert task.points_passed == 0 and task.suspensions == 0


def test_task_busy_time_counts_only_time_inside_run():
    """``Task.busy_s`` is what the calibration learns from: the time the executor spent on the
    program, not the time it sat suspended between runs."""
    import time

    from replicas.model.decoder import Boundary

    def program():
        for _ in range(4):
            time.sleep(0.01)  # the "operator"
            yield Boundary.BLOCK
        return "done"

    executor = PreemptibleExecutor("block")
    task = executor.start(program())
    assert executor.run(task, lambda: True) is False  # suspended at the first point
    time.sleep(0.2)  # suspended: not counted
    assert executor.run(task) is True and task.result == "done"
    assert 0.04 <= task.busy_s < 0.15
