"""Penalties, logit_bias, min_tokens, min_p and logprobs: against torch references written by hand.

The end-to-end cases run the replica engine (prefill and batched decode steps) on a tiny checkpoint
and compare every generated token with a reference loop that runs transformers' forward over the
whole sequence at each step and applies the processing as a plain hand computation.
"""

from __future__ import annotations

import threading

import pytest
import torch

from replicas.engine import ReplicaEngine
from replicas.engine_config import EngineConfig
from replicas.engine_types import RequestOutput
from replicas.errors import InvalidRequestError
from replicas.logits_processing import TokenHistory, process_logits, token_logprobs
from replicas.sampling import RequestSampler, sample_batch, sample_next_tokens
from replicas.sampling_params import SamplingParams
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request

transformers = pytest.importorskip("transformers")

BAD_VALUES = [
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", "1"), ("presence_penalty", True),
    ("frequency_penalty", 3.0), ("frequency_penalty", float("nan")),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", float("inf")),
    ("min_p", -0.1), ("min_p", 1.5), ("min_p", None),
    ("logit_bias", {"5": 101}), ("logit_bias", {"5": -100.5}), ("logit_bias", {"x": 1}), ("logit_bias", {"-3": 1}),
    ("logit_bias", [1, 2]), ("logit_bias", {"5": "1"}),
    ("min_tokens", -1), ("min_tokens", 17), ("min_tokens", 1.0),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", True),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{field: value})
    assert err.value.field == field and field in str(err.value)


def test_normalisation_roundtrip_and_vocab_check():
    p = SamplingParams(logit_bias={"7": 1, 3: -2.5}, presence_penalty=1, min_tokens=4, logprobs=0)
    assert p.logit_bias == ((3, -2.5), (7, 1.0)) and p.presence_penalty == 1.0
    assert p.processes_logits and p.has_penalties
    assert SamplingParams.from_dict(p.to_dict()) == p
    assert not SamplingParams().processes_logits and not SamplingParams(min_p=0.5).processes_logits
    p.check_vocab(8)
    with pytest.raises(InvalidRequestError, match="logit_bias key 7") as err:
        p.check_vocab(7)
    assert err.value.field == "logit_bias"


def _hand_process(logits, prompt, out, p: SamplingParams, stop_ids):
    """The reference: vLLM's processing as plain per-token arithmetic."""
    row = logits.clone().float()
    if p.allowed_token_ids:
        row = torch.where(torch.isin(torch.arange(row.shape[0]), torch.tensor(p.allowed_token_ids)), row,
                          torch.tensor(float("-inf")))
    for t, b in p.logit_bias:
        row[t] += b
    if len(out) < p.min_tokens:
        for t in stop_ids:
            row[t] = float("-inf")
    for t in set(prompt) | set(out):
        v = float(row[t])
        row[t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
    for t in set(out):
        row[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
    return row


def test_process_logits_matches_a_hand_computation_per_row():
    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(4, vocab) * 3
    cases = [
        (SamplingParams(presence_penalty=1.5, frequency_penalty=-0.5), [1, 2, 3], [4, 4, 5, 1]),
        (SamplingParams(repetition_penalty=1.7, logit_bias={"9": 5, "10": -100}), [9, 10, 11], [12, 11]),
        (SamplingParams(), [1], [2]),  # untouched row in a processed batch
        (SamplingParams(min_tokens=3, repetition_penalty=0.6, frequency_penalty=2), [0, 7], [7, 8]),
    ]
    stop_ids = (0, 1)
    histories = []
    for p, prompt, out in cases:
        h = TokenHistory(p, prompt, stop_ids)
        for t in out:
            h.record(t)
        histories.append(h)
    got = process_logits(logits, histories)
    for row, (p, prompt, out) in enumerate(cases):
        torch.testing.assert_close(got[row], _hand_process(logits[row], prompt, out, p, stop_ids))
    assert torch.isinf(got[3, [0, 1]]).all()
    assert process_logits(logits, [TokenHistory(SamplingParams())] * 4) is logits  # no copy when unused


def test_allowed_token_ids_mask_every_other_token_before_bias_and_penalties():
    torch.manual_seed(1)
    logits = torch.randn(3, 40) * 3
    cases = [(SamplingParams(allowed_token_ids=[3, 5, 39], logit_bias={"5": 2, "6": 50}, presence_penalty=1.0), [5]),
             (SamplingParams(), []), (SamplingParams(allowed_token_ids=[0]), [])]
    histories = []
    for p, out in cases:
        h = TokenHistory(p, [1, 2])
        for t in out:
            h.record(t)
        histories.append(h)
    got = process_logits(logits, histories)
    for row, (p, out) in enumerate(cases):
        torch.testing.assert_close(got[row], _hand_process(logits[row], [1, 2], out, p, ()))
    assert torch.isfinite(got[0]).sum() == 3 and int(got[2].argmax()) == 0 and torch.isfinite(got[2]).sum() == 1
    with pytest.raises(InvalidRequestError, match="allowed_token_ids entry 39") as err:
        cases[0][0].check_vocab(39)
    assert err.value.field == "allowed_token_ids"
    assert SamplingParams.from_dict(cases[0][0].to_dict()) == cases[0][0]


def test_counts_are_updated_incrementally_after_first_use():
    p = SamplingParams(frequency_penalty=1.0)
    h = TokenHistory(p)
    h.record(3)
    assert h.counts(10, torch.device("cpu"))[3] == 1
    h.record(3)
    h.record(4)
    assert h.counts(10, torch.device("cpu")).tolist() == [0, 0, 0, 2, 1, 0, 0, 0, 0, 0]


def test_min_p_drops_tokens_below_its_share_of_the_top_probability():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4000, 1)
    params = [SamplingParams(min_p=0.35, seed=None)] * 4000  # keeps p >= 0.175: tokens 0 and 1
    torch.manual_seed(1)
    tokens = sample_next_tokens(logits, params, [None] * 4000)
    assert set(tokens.tolist()) == {0, 1}
    share = (tokens == 0).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.03
    # with temperature: min_p applies to the scaled distribution (vLLM's order)
    hot = [SamplingParams(min_p=0.35, temperature=2.0)] * 4000
    scaled = torch.softmax(probs.log() / 2.0, dim=0)
    keep = {i for i in range(4) if scaled[i] >= 0.35 * scaled.max()}
    assert set(sample_next_tokens(logits, hot, [None] * 4000).tolist()) == keep
    # min_p 1 keeps only the most likely token; greedy rows ignore min_p
    assert set(sample_next_tokens(logits[:50], [SamplingParams(min_p=1.0)] * 50, [None] * 50).tolist()) == {0}


def test_token_logprobs_are_the_raw_log_softmax():
    torch.manual_seed(2)
    logits = torch.randn(3, 30)
    tokens = torch.tensor([4, 5, 6])
    params = [SamplingParams(logprobs=3), SamplingParams(), SamplingParams(logprobs=0)]
    got = token_logprobs(logits, tokens, params)
    ref = torch.log_softmax(logits, dim=1)
    assert got[1] is None
    assert got[0].token_id == 4 and got[0].logprob == pytest.approx(ref[0, 4].item(), abs=1e-6)
    values, ids = ref[0].topk(3)
    assert [t for t, _ in got[0].top] == ids.tolist()
    assert [v for _, v in got[0].top] == pytest.approx(values.tolist(), abs=1e-6)
    assert got[2].top == () and got[2].logprob == pytest.approx(ref[2, 6].item(), abs=1e-6)


def test_sample_batch_records_tokens_and_logit_bias_forces_a_token():
    s = RequestSampler(SamplingParams(temperature=0.0, logit_bias={"7": 100}, logprobs=1))
    (token, lp), = sample_batch(torch.zeros(1, 10), [s])
    assert token == 7 and s.history.output_ids == [7]
    assert lp is not None and lp.logprob == pytest.approx(-torch.tensor(10.0).log().item())  # raw, unbiased


# ---------------------------------------------------------------- end to end on the engine
class _Collect:
    def __init__(self) -> None:
        self.outputs: dict[str, list[RequestOutput]] = {}
        self.done: dict[str, threading.Event] = {}

    def sink(self, rid: str):
        self.outputs[rid], self.done[rid] = [], threading.Event()

        def push(out: RequestOutput) -> None:
            self.outputs[rid].append(out)
            if out.finish_reason is not None:
                self.done[rid].set()

        return push


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama", seed=7, num_layers=2, hidden_size=64)


@pytest.fixture(scope="module")
def reference(model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()

    def last_logits(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, -1].float()

    return last_logits


def _run_engine(model_dir, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[RequestOutput]]:
    """All requests submitted together, so their decode steps run as one batch."""
    config = EngineConfig(model=str(model_dir), kv_cache_bytes=8 << 20)
    engine = ReplicaEngine(config, cost_model=CostModel.from_coefficients(1e-3, 2e-5, max_profiled_tokens=8192))
    engine.start()
    got = _Collect()
    try:
        now = engine.clock()
        for rid, (prompt, params) in requests.items():
            engine.add_request(Request(rid, prompt, arrival_s=now, ttft_slo_s=30.0), params, got.sink(rid))
        for rid in requests:
            assert got.done[rid].wait(120), f"{rid} did not finish"
        eos = engine.eos_token_ids
    finally:
        engine.shutdown()
    got.outputs["__eos__"] = [RequestOutput("", tuple(eos), "")]
    return got.outputs


def _tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def _reference_greedy(last_logits, prompt, p: SamplingParams, stop_ids) -> tuple[list[int], list[torch.Tensor]]:
    out: list[int] = []
    raw: list[torch.Tensor] = []
    while len(out) < p.max_tokens:
        logits = last_logits(prompt + out)
        raw.append(logits)
        token = int(_hand_process(logits, prompt, out, p, stop_ids).argmax())
        out.append(token)
        if token in stop_ids and len(out) >= p.min_tokens:
            break
    return out, raw


PROMPT_A = [5, 9, 12, 40, 41, 42, 9, 9, 77, 5]
PROMPT_B = [100, 101, 102, 103, 104, 105]


def test_penalties_and_bias_on_the_decode_path_match_the_reference(model_dir, reference):
    g = dict(temperature=0.0, max_tokens=10, ignore_eos=True)
    cases = {
        "plain": (PROMPT_A, SamplingParams(**g)),
        "presence": (PROMPT_A, SamplingParams(presence_penalty=2.0, **g)),
        "frequency": (PROMPT_B, SamplingParams(frequency_penalty=1.5, **g)),
        "repetition": (PROMPT_A, SamplingParams(repetition_penalty=3.0, **g)),
        "bias": (PROMPT_B, SamplingParams(logit_bias={"33": 3.0, "34": -100}, presence_penalty=0.5, **g)),
        "allowed": (PROMPT_A, SamplingParams(allowed_token_ids=[7, 33, 90], presence_penalty=0.5, **g)),
    }
    outs = _run_engine(model_dir, cases)
    for rid, (prompt, p) in cases.items():
        ref, _ = _reference_greedy(reference, prompt, p, ())
        assert _tokens(outs[rid]) == ref, rid
    plain = _tokens(outs["plain"])
    assert _tokens(outs["presence"]) != plain and _tokens(outs["repetition"]) != plain  # the test bites
    assert len(set(_tokens(outs["presence"]))) == len(_tokens(outs["presence"]))  # presence 2: no repeats here
    assert set(_tokens(outs["allowed"])) <= {7, 33, 90}


def test_min_tokens_masks_eos_until_reached(model_dir, reference):
    probe = _run_engine(model_dir, {"probe": (PROMPT_B, SamplingParams(max_tokens=1))})
    eos = list(probe["__eos__"][0].token_ids)
    force_eos = {str(eos[0]): 100}
    cases = {
        "early": (PROMPT_B, SamplingParams(temperature=0.0, max_tokens=10, logit_bias=force_eos)),
        "min4": (PROMPT_B, SamplingParams(temperature=0.0, max_tokens=10, logit_bias=force_eos, min_tokens=4)),
        "stop_ids": (PROMPT_A, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, min_tokens=3,
                                              stop_token_ids=[50], logit_bias={"50": 100})),
    }
    outs = _run_engine(model_dir, cases)
    assert _tokens(outs["early"]) == [eos[0]] and outs["early"][-1].finish_reason == "stop"
    min4 = _tokens(outs["min4"])
    assert len(min4) == 5 and min4[-1] == eos[0] and eos[0] not in min4[:4]
    assert outs["min4"][-1].finish_reason == "stop"
    ref, _ = _reference_greedy(reference, PROMPT_B, cases["min4"][1], eos)
    assert min4 == ref
    stop = _tokens(outs["stop_ids"])
    assert len(stop) == 4 and stop[-1] == 50 and 50 not in stop[:3]


def test_logprobs_equal_log_softmax_of_a_direct_forward(model_dir, reference):
    cases = {
        "top5": (PROMPT_A, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=5)),
        "chosen": (PROMPT_B, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)),
        "none": (PROMPT_B, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)),
        "penalised": (PROMPT_A, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2,
                                               frequency_penalty=2.0)),
    }
    outs = _run_engine(model_dir, cases)
    assert all(o.logprobs is None for o in outs["none"])
    for rid in ("top5", "chosen", "penalised"):
        prompt, p = cases[rid]
        tokens, raw = _reference_greedy(reference, prompt, p, ())
        lps = [lp for o in outs[rid] if o.token_ids for lp in o.logprobs]
        assert [lp.token_id for lp in lps] == tokens == _tokens(outs[rid])
        for lp, logits in zip(lps, raw):
            ref = torch.log_softmax(logits, dim=0)  # raw logprobs: before the penalty (vLLM's default)
            assert lp.logprob == pytest.approx(ref[lp.token_id].item(), abs=1e-4)
            values, ids = ref.topk(p.logprobs)
            assert [t for t, _ in lp.top] == ids.tolist()
            assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)


def test_offline_engine_applies_the_same_processing(model_dir, reference):
    from replicas.llm import OfflineEngine

    engine = OfflineEngine(model_dir, kv_cache_bytes=8 << 20)
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, repetition_penalty=2.5),
              SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, frequency_penalty=1.0, min_tokens=2)]
    results = engine.generate([PROMPT_A, PROMPT_B], params)
    for result, prompt, p in zip(results, [PROMPT_A, PROMPT_B], params):
        assert result.token_ids == _reference_greedy(reference, prompt, p, ())[0]
