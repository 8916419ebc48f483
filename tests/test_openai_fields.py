"""The new OpenAI fields against the real serving stack: Ray Serve app, one replica, Redis, HTTP and
gRPC on loopback, the default model, and the official ``openai`` client (streaming and not).

Slow (starts Ray, Redis and HTTP/gRPC servers): run it alone, e.g.
``scripts/test tests/test_openai_fields.py``. The same paths run in process, without servers, in
``tests/test_ingress_openai_fields.py``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.slow

PORT = 8768
GRPC_PORT = 9768
BASE = f"http://127.0.0.1:{PORT}"
MODEL = "SmolLM2-135M-Instruct"
NAMESPACE = "openai-fields-test"
MSGS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def cluster(redis_server, default_model_dir):
    from cluster.launcher import ensure_profile, run_app, start_local_ray  # noqa: I001 (before ray: sets its env)

    import ray
    from ray import serve

    args = ensure_profile({
        "model_name": MODEL, "num_replicas": 1, "replica_cpus": 1.0, "namespace": NAMESPACE,
        "engine": {"model": str(default_model_dir), "kv_cache_bytes": 256 << 20},
    })
    start_local_ray(num_cpus=2)
    try:
        run_app(args, "127.0.0.1", PORT, redis_server.url, grpc_port=GRPC_PORT)
        yield {"model_dir": default_model_dir}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    import openai

    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tokenizer(cluster):
    from replicas.model.tokenizer import Tokenizer

    return Tokenizer.from_dir(cluster["model_dir"])


def _post(path: str, body: object) -> tuple[int, dict]:
    req = urllib.request.Request(BASE + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs(client, stream):
    kwargs = {"model": MODEL, "messages": MSGS, "temperature": 0, "max_tokens": 8, "logprobs": True,
              "top_logprobs": 3}
    if stream:
        items = [t for c in client.chat.completions.create(stream=True, **kwargs)
                 if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    else:
        reply = client.chat.completions.create(**kwargs)
        items = reply.choices[0].logprobs.content
        assert len(items) == reply.usage.completion_tokens
        assert "Paris" in "".join(t.token for t in items)
    assert items and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in items)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in items)  # greedy: the argmax


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs(client, stream):
    kwargs = {"model": MODEL, "prompt": "The capital of France is", "temperature": 0, "max_tokens": 5,
              "logprobs": 2}
    if stream:
        parts = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kwargs)
                 if c.choices and c.choices[0].logprobs]
        tokens = [t for p in parts for t in p.tokens]
        offsets = [o for p in parts for o in p.text_offset]
    else:
        lp = client.completions.create(**kwargs).choices[0].logprobs
        tokens, offsets = lp.tokens, lp.text_offset
        assert all(len(top) in (2, 3) for top in lp.top_logprobs)
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


@pytest.mark.parametrize("stream", [False, True])
def test_penalties_bias_min_p_and_min_tokens_are_served(client, tokenizer, stream):
    forced = tokenizer.encode(" Paris")[0]
    kwargs = {"model": MODEL, "messages": MSGS, "temperature": 0, "max_tokens": 4, "logit_bias": {str(forced): 100},
              "presence_penalty": 0.5, "frequency_penalty": 0.5,
              "extra_body": {"repetition_penalty": 1.1, "min_p": 0.05, "min_tokens": 4}}
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    else:
        text = client.chat.completions.create(**kwargs).choices[0].message.content
    assert text == " Paris" * 4


def test_bad_values_are_400_naming_the_field(client):
    import openai

    for kwargs, param in [({"presence_penalty": 2.5}, "presence_penalty"),
                          ({"logit_bias": {"99999999": 1}}, "logit_bias"),
                          ({"extra_body": {"min_p": 2}}, "min_p"),
                          ({"top_logprobs": 2}, "top_logprobs")]:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model=MODEL, messages=MSGS, **kwargs)
        assert bad.value.param == param


def test_tokenize_detokenize_and_models(client, tokenizer):
    status, out = _post("/tokenize", {"model": MODEL, "messages": MSGS})
    assert status == 200 and out["tokens"] == tokenizer.encode_chat(MSGS) and out["count"] == len(out["tokens"])
    status, text = _post("/detokenize", {"model": MODEL, "tokens": out["tokens"]})
    assert status == 200 and "capital of France" in text["prompt"]
    status, err = _post("/tokenize", {"model": MODEL})
    assert status == 400 and err["error"]["param"] == "prompt"
    card = client.models.list().data[0]
    assert card.id == MODEL and card.created > 1_700_000_000 and card.model_extra["max_model_len"] > 0


def test_grpc_logprobs_and_fields(cluster):
    import grpc

    from router.grpc_gen import flowprefill_pb2 as pb
    from router.grpc_gen import flowprefill_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        stub = pb_grpc.FlowPrefillStub(channel)
        msg = pb.GenerateRequest(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0.0,
                                 logprobs=2, presence_penalty=0.5, min_tokens=2)
        chunks = list(stub.Generate(msg, timeout=300))
    entries = [lp for c in chunks for lp in c.logprobs]
    assert len(entries) == sum(len(c.token_ids) for c in chunks) and all(len(e.top) == 2 for e in entries)
