"""Sampling parameters validation and next-token sampling behaviour."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from replicas.errors import InvalidRequestError
from replicas.sampling import RequestSampler, sample_next_tokens
from replicas.sampling_params import SamplingParams

NAN, INF = float("nan"), float("inf")

BAD_VALUES = [
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", True), ("max_tokens", 2.0), ("max_tokens", "8"),
    ("temperature", -0.1), ("temperature", NAN), ("temperature", INF), ("temperature", True), ("temperature", "1"),
    ("temperature", None),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.2), ("top_p", NAN), ("top_p", True), ("top_p", "0.9"),
    ("top_k", -2), ("top_k", 1.5), ("top_k", True), ("top_k", "5"),
    ("seed", -1), ("seed", 2**63), ("seed", True), ("seed", 1.0), ("seed", "7"),
    ("stop", ""), ("stop", [""]), ("stop", ["x"] * 17), ("stop", [1]), ("stop", 5), ("stop", None),
    ("stop_token_ids", [-1]), ("stop_token_ids", [True]), ("stop_token_ids", [1.5]), ("stop_token_ids", 3),
    ("ignore_eos", 1), ("ignore_eos", "yes"),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{field: value})
    assert err.value.field == field
    assert field in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, v in BAD_VALUES if v is not None])
def test_from_dict_validates_too(field, value):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams.from_dict({field: value})
    assert err.value.field == field


def test_top_p_message():
    with pytest.raises(InvalidRequestError, match=r"top_p must be in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5)


def test_unknown_keys_are_named():
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams.from_dict({"top_p": 0.5, "temprature": 0.3, "best_of": 2})
    assert err.value.field == "best_of"
    assert "temprature" in str(err.value) and "best_of" in str(err.value)
    with pytest.raises(InvalidRequestError):
        SamplingParams.from_dict([("top_p", 0.5)])


def test_normalisation_and_defaults():
    p = SamplingParams.from_dict({"stop": "###", "top_k": -1, "temperature": 1, "seed": None, "top_p": None})
    assert p.stop == ("###",) and p.top_k == 0 and p.seed is None and p.top_p == 1.0
    assert isinstance(p.temperature, float)
    p = SamplingParams(stop=["a", "bc"], stop_token_ids=[3, 4], seed=2**63 - 1, top_k=5)
    assert p.stop == ("a", "bc") and p.stop_token_ids == (3, 4)
    assert SamplingParams(temperature=0).is_greedy and SamplingParams(top_k=1).is_greedy
    assert not SamplingParams(temperature=0.7).is_greedy
    assert SamplingParams() == SamplingParams(max_tokens=16, top_k=-1)


def test_request_sampler_generators():
    assert RequestSampler(SamplingParams()).generator is None
    g = RequestSampler(SamplingParams(seed=42)).generator
    assert g is not None and g.initial_seed() == 42
    logits = torch.randn(100)
    a = RequestSampler(SamplingParams(seed=5)).sample(logits)
    assert a == RequestSampler(SamplingParams(seed=5)).sample(logits)


def test_shapes_are_checked():
    with pytest.raises(ValueError):
        sample_next_tokens(torch.zeros(5), [SamplingParams()], [None])
    with pytest.raises(ValueError):
        sample_next_tokens(torch.zeros(2, 5), [SamplingParams()], [None, None])
    out = sample_next_tokens(torch.zeros(0, 5), [], [])
    assert out.shape == (0,) and out.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    logits = torch.randn(7, 300, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[3, 10] = logits[3, 20] = logits[3].max() + 1  # tie: lowest index wins
    out = sample_next_tokens(logits, [SamplingParams(temperature=0)] * 7, [None] * 7)
    assert out.dtype == torch.int64 and out.shape == (7,)
    assert out.tolist() == logits.argmax(dim=1).tolist()
    assert out[3].item() == 10


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 100.0])
def test_top_k_one_is_greedy(temperature):
    logits = torch.randn(16, 500, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=temperature, top_k=1, seed=i) for i in range(16)]
    gens = [RequestSampler(p).generator for p in params]
    assert sample_next_tokens(logits, params, gens).tolist() == logits.argmax(dim=1).tolist()


def test_tiny_top_p_keeps_only_the_max():
    logits = torch.randn(32, 1000, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=20.0, top_p=1e-6, seed=i) for i in range(32)]
    gens = [RequestSampler(p).generator for p in params]
    assert sample_next_tokens(logits, params, gens).tolist() == logits.argmax(dim=1).tolist()


def test_masked_tokens_are_never_sampled():
    logits = torch.randn(2000, 50, generator=torch.Generator().manual_seed(3))
    logits[:, 25:] = float("-inf")
    out = sample_next_tokens(logits, [SamplingParams(temperature=3.0)] * 2000, [None] * 2000)
    assert int(out.max()) < 25


def _run(logits_seq, params, gens):
    return [sample_next_tokens(logits, params, gens) for logits in logits_seq]


def test_seeded_rows_are_deterministic_and_batch_independent():
    vocab, steps = 2000, 5
    rng = torch.Generator().manual_seed(4)
    target_logits = [torch.randn(1, vocab, generator=rng) * 3 for _ in range(steps)]
    for target in [SamplingParams(seed=123), SamplingParams(seed=123, top_p=0.9, top_k=50, temperature=0.8)]:
        alone = [t.item() for t in _concat(_run(target_logits, [target], [RequestSampler(target).generator]))]
        again = [t.item() for t in _concat(_run(target_logits, [target], [RequestSampler(target).generator]))]
        assert alone == again
        others = [
            SamplingParams(temperature=0), SamplingParams(), SamplingParams(seed=9, top_p=0.5),
            SamplingParams(top_k=3, temperature=2.0), SamplingParams(seed=123), SamplingParams(seed=7),
        ]
        for position in (0, 3, 6):
            batch_params = others[:position] + [target] + others[position:]
            samplers = [RequestSampler(p) for p in batch_params]
            results = []
            for step in range(steps):
                logits = torch.randn(len(batch_params), vocab, generator=rng) * 3
                logits[position] = target_logits[step][0]
                out = sample_next_tokens(logits, batch_params, [s.generator for s in samplers])
                results.append(out[position].item())
            assert results == alone


def _concat(outs):
    return torch.cat(outs)


def _empirical(logits, params, draws=20_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = logits.unsqueeze(0).expand(draws, -1)
    out = sample_next_tokens(batch, [params] * draws, [g] * draws)
    return torch.bincount(out, minlength=logits.numel()).double() / draws


def test_distribution_matches_softmax():
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0])
    freq = _empirical(logits, SamplingParams(temperature=1.0))
    assert torch.allclose(freq, torch.softmax(logits.double(), 0), atol=0.015)


def test_temperature_scales_the_distribution():
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0])
    freq = _empirical(logits, SamplingParams(temperature=2.0), seed=1)
    assert torch.allclose(freq, torch.softmax(logits.double() / 2, 0), atol=0.015)


def test_top_k_and_top_p_renormalise():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    freq = _empirical(logits, SamplingParams(top_k=3), seed=2)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0]).double() / 0.95, atol=0.015)
    # mass before token 2 is 0.8 >= 0.7: keep {0, 1}
    freq = _empirical(logits, SamplingParams(top_p=0.7), seed=3)
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0, 0]).double(), atol=0.015)
    # top-p applies to the top-k renormalised distribution: 0.5/0.8 = 0.625 >= 0.6 keeps only token 0
    freq = _empirical(logits, SamplingParams(top_k=2, top_p=0.6), seed=4, draws=500)
    assert freq.tolist() == [1.0, 0.0, 0.0, 0.0]


@settings(max_examples=150, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20, width=32), min_size=1, max_size=40),
    top_k=st.integers(0, 45),
    top_p=st.floats(1e-4, 1.0),
    temperature=st.floats(0.05, 5.0),
    seed=st.integers(0, 2**63 - 1),
)
def test_sample_stays_in_support(logits, top_k, top_p, temperature, seed):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    row = torch.tensor(logits, dtype=torch.float32)
    token = sample_next_tokens(row.unsqueeze(0), [params], [RequestSampler(params).generator]).item()
    scaled = row / torch.tensor(temperature, dtype=torch.float32)
    higher = scaled > scaled[token]
    if top_k > 0:
        assert int(higher.sum()) < top_k
    kept = scaled.double().sort(descending=True).values[: top_k or len(logits)]
    probs = torch.softmax(kept, 0)
    mass_before = float(probs[: int(higher.sum())].sum())
    assert mass_before < top_p + 1e-4
    assert math.isfinite(logits[token])
