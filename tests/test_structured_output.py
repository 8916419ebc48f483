"""Structured output (replicas/structured_output.py, llguidance) in the real engine on a tiny checkpoint:
20 seeded samples of each schema all parse and validate; the mask only removes tokens (a choice's
log probabilities stay the raw model's); a bad schema is refused naming the field."""

from __future__ import annotations

import asyncio
import json

import pytest

from replicas.engine import ReplicaEngine
from replicas.engine_config import EngineConfig
from replicas.engine_types import RequestOutput
from replicas.errors import InvalidRequestError
from replicas.sampling_params import SamplingParams
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request

jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}},
     "required": ["name", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "n": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["color", "n"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                               "maxItems": 3}}, "required": ["tags"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint_factory):
    cost = CostModel.from_coefficients(1e-3, 1e-4, max_profiled_tokens=8192)
    engine = ReplicaEngine(EngineConfig(model=str(tiny_checkpoint_factory("llama", seed=3, num_layers=2)),
                                        cpu_threads=1), cost_model=cost)
    engine.start()
    yield engine
    engine.shutdown()


def _run(engine: ReplicaEngine, rid: str, prompt: list[int], params: SamplingParams) -> list[RequestOutput]:
    request = Request(rid, prompt, arrival_s=engine.clock(), ttft_slo_s=60.0, max_tokens=params.max_tokens)

    async def run() -> list[RequestOutput]:
        return [out async for out in engine.generate(request, params)]
    return asyncio.run(run())


def _texts(outs: list[RequestOutput], n: int) -> tuple[list[str], list[str | None]]:
    texts, reasons = [""] * n, [None] * n
    for out in outs:
        assert out.error is None, out.error
        texts[out.index] += out.text
        reasons[out.index] = out.finish_reason or reasons[out.index]
    return texts, reasons


@pytest.mark.parametrize("schema", SCHEMAS, ids=["string-bool", "enum-int", "array"])
def test_twenty_seeded_samples_all_parse_and_validate(engine, schema):
    prompt = engine.tokenizer.encode("Reply in JSON:", add_special_tokens=True)
    params = SamplingParams(max_tokens=120, temperature=1.0, seed=0, n=20, json_schema=json.dumps(schema))
    texts, reasons = _texts(_run(engine, f"s-{id(schema)}", prompt, params), 20)
    assert reasons == ["stop"] * 20  # every choice completed its JSON and ended on end-of-sequence
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    assert len(set(texts)) > 1


def test_json_object_gives_an_object_and_the_logprobs_stay_raw(engine):
    prompt = engine.tokenizer.encode("JSON please", add_special_tokens=True)
    free = _run(engine, "free", prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=0))
    constrained = _run(engine, "obj", prompt, SamplingParams(max_tokens=60, temperature=0.0, logprobs=0,
                                                              json_schema='{"type": "object"}'))
    first = constrained[0].logprobs[0]
    assert engine.tokenizer.decode([first.token_id]).lstrip().startswith("{")
    if first.token_id != free[0].logprobs[0].token_id:  # the grammar changed the choice, not the values
        assert first.logprob <= free[0].logprobs[0].logprob
    text = "".join(o.text for o in constrained)
    if constrained[-1].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # a long object cut by max_tokens is a valid prefix
        assert text.lstrip().startswith("{")


def test_bad_schemas_are_refused_naming_the_field(engine):
    for bad in ("not json", "[1, 2]", 3):
        with pytest.raises(InvalidRequestError) as err:
            SamplingParams(json_schema=bad)
        assert err.value.field == "json_schema"
    from replicas.json_grammar import schema_error

    assert schema_error('{"type": "object"}') is None
    assert schema_error('{"type": "no-such-type"}')
