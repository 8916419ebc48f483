"""A stand-in for vLLM's OpenAI server, for the vLLM engine's fast tests (no vLLM needed).

Run as ``python fake_vllm_server.py --host H --port P --served-model-name NAME ... [vLLM flags]``
(the flags the engine passes; unknown ones are ignored).  It serves ``/v1/models``, ``/metrics``
and streaming ``/v1/completions`` for token-id prompts: it waits ``PREFILL_S_PER_TOKEN`` per
prompt token (at most 0.5 s), then streams ``max_tokens`` tokens ``1000 + i`` (text ``" t<i>"``) one every
``STEP_S``.  Unstreamed (the profile's requests, and ``prompt_logprobs`` ones, which get made-up
prompt logprobs in vLLM's format) it answers once.  Every request body is appended to
``$FAKE_VLLM_LOG`` as a JSON line, and so is ``{"aborted": n_sent}`` when the client goes away
mid-stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from aiohttp import web

PREFILL_S_PER_TOKEN = 2e-4
STEP_S = 0.02


def _record(entry: dict) -> None:
    path = os.environ.get("FAKE_VLLM_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def main() -> None:
    """Parse the vLLM-style flags and serve until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", required=True)
    args, _ = parser.parse_known_args()
    print("fake vLLM starting", flush=True)
    time.sleep(float(os.environ.get("FAKE_VLLM_STARTUP_S", "0.2")))
    if os.environ.get("FAKE_VLLM_FAIL"):
        print("fake vLLM: boom, cannot start", flush=True)
        raise SystemExit(3)
    running = {"n": 0}

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": args.served_model_name, "object": "model"}]})

    async def metrics(_: web.Request) -> web.Response:
        text = (f'vllm:num_requests_running{{engine="0",model_name="{args.served_model_name}"}} {running["n"]}.0\n'
                f'vllm:num_requests_waiting{{engine="0"}} 0.0\nvllm:kv_cache_usage_perc{{engine="0"}} 0.25\n'
                'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="1000"} 1.0\n')
        return web.Response(text=text)

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        _record(body)
        if body.get("model") != args.served_model_name:
            return web.json_response({"error": {"message": f"model {body.get('model')!r} not found"}}, status=404)
        ids = body["prompt"]
        if not body.get("stream"):
            await asyncio.sleep(PREFILL_S_PER_TOKEN * len(ids))
            if body.get("prompt_logprobs") is None:
                return web.json_response({"choices": [{"text": " t0", "finish_reason": "length"}]})
            # vLLM's unstreamed prompt logprobs: prompt token i has logprob -i/10 and rank 2 behind token 3
            scored = [None] + [{str(t): {"logprob": -i / 10, "rank": 2, "decoded_token": "?"},
                                "3": {"logprob": -0.01, "rank": 1, "decoded_token": "x"}}
                               for i, t in enumerate(ids) if i > 0]
            tokens = list(range(1000, 1000 + body["max_tokens"]))
            return web.json_response({"choices": [
                {"index": i, "text": "".join(f" t{t - 1000}" for t in tokens), "token_ids": tokens,
                 "finish_reason": "length", "prompt_logprobs": scored} for i in range(body.get("n", 1))]})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        running["n"] += 1
        sent = 0
        try:
            await asyncio.sleep(min(PREFILL_S_PER_TOKEN * len(ids), 0.5))
            for i in range(body["max_tokens"]):
                if i:
                    await asyncio.sleep(STEP_S)
                last = i == body["max_tokens"] - 1
                for index in range(body.get("n", 1)):  # choice i's tokens are offset by 100 * i
                    choice = {"index": index, "text": f" t{i + 100 * index}",
                              "finish_reason": "length" if last else None, "token_ids": [1000 + i + 100 * index]}
                    if i == 0 and body.get("return_token_ids"):  # as vLLM: the prompt's ids in the first event
                        choice["prompt_token_ids"] = ids
                    await resp.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
                sent += 1
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            _record({"aborted": sent})
            raise
        finally:
            running["n"] -= 1
        return resp

    app = web.Application()
    app.add_routes([web.get("/v1/models", models), web.get("/metrics", metrics),
                    web.post("/v1/completions", completions)])
    web.run_app(app, host=args.host, port=args.port, print=None, handler_cancellation=True)


if __name__ == "__main__":
    main()
