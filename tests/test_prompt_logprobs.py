"""Prompt logprobs (``SamplingParams.prompt_logprobs``, behind completions' ``echo``) in the real engine on
a tiny checkpoint, against transformers' forward of the same checkpoint: across prefill passes of a
long prompt, and when the prompt's prefix is cached (the request computes it again: cached
positions have no logits)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from replicas.engine import ReplicaEngine
from replicas.engine_config import EngineConfig
from replicas.engine_types import RequestOutput
from replicas.sampling_params import SamplingParams
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request

transformers = pytest.importorskip("transformers")
K = 3


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_factory) -> str:
    return str(tiny_checkpoint_factory("qwen2", seed=9, num_layers=2))


def _prompt(seed: int, n: int, vocab: int = 256) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _reference(model_dir: str, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax at every position of ``ids`` [len, vocab] (float64)."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), dim=1)


def _run(engine: ReplicaEngine, rid: str, ids: list[int], params: SamplingParams) -> list[RequestOutput]:
    request = Request(rid, ids, arrival_s=engine.clock(), ttft_slo_s=60.0, max_tokens=params.max_tokens)

    async def run() -> list[RequestOutput]:
        return [out async for out in engine.generate(request, params)]
    return asyncio.run(run())


def _check(entries, ids: list[int], logp: torch.Tensor) -> None:
    assert len(entries) == len(ids) and entries[0].token_id == ids[0] and entries[0].logprob is None
    for pos in range(1, len(ids)):
        e = entries[pos]
        assert e.token_id == ids[pos]
        assert e.logprob == pytest.approx(float(logp[pos - 1, ids[pos]]), abs=1e-4)
        values, top = logp[pos - 1].topk(K)
        assert [t for t, _ in e.top] == top.tolist()
        assert [v for _, v in e.top] == pytest.approx(values.tolist(), abs=1e-4)


def _engine(model_dir: str, **settings: object) -> ReplicaEngine:
    cost = CostModel.from_coefficients(1e-3, 1e-4, max_profiled_tokens=8192)
    engine = ReplicaEngine(EngineConfig(model=model_dir, cpu_threads=1, block_size=8, **settings), cost_model=cost)
    engine.start()
    return engine


def test_prompt_logprobs_across_prefill_passes_equal_transformers(model_dir):
    ids = _prompt(1, 45)
    engine = _engine(model_dir, chunk_tokens=16)  # three passes, each one's rows scored as it completes
    try:
        outs = _run(engine, "p", ids, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=K))
    finally:
        engine.shutdown()
    assert outs[0].prompt_logprobs is not None and all(o.prompt_logprobs is None for o in outs[1:])
    _check(outs[0].prompt_logprobs, ids, _reference(model_dir, ids))


def test_a_cached_prompt_is_computed_again_for_its_logprobs(model_dir):
    ids = _prompt(2, 40)
    engine = _engine(model_dir)
    try:
        _run(engine, "warm", ids, SamplingParams(max_tokens=2, temperature=0.0))
        before = engine.stats().counters["prefill_tokens"]
        outs = _run(engine, "p", ids, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=K, n=2))
        assert engine.stats().counters["prefill_tokens"] - before == len(ids)
        again = _run(engine, "hit", ids, SamplingParams(max_tokens=2, temperature=0.0))
        assert engine.stats().counters["prefill_tokens"] - before == len(ids) + 8  # the hit skips 4 blocks
    finally:
        engine.shutdown()
    _check(outs[0].prompt_logprobs, ids, _reference(model_dir, ids))
    assert [o.token_ids for o in again] == [o.token_ids for o in outs if o.index == 0]
