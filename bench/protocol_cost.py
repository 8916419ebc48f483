"""What parsing one OpenAI request and building one response cost in the router, in microseconds.

Times (``timeit``, median of 5 repeats) the request side of :mod:`router.protocol` and the response
side of :mod:`router.responses` as the ingress uses them: (a) parsing a four-message streamed chat
request with sampling fields and logprobs, (b) a completion request with ``n``, ``stop`` and
``logprobs``, (c) one streamed chat chunk through ``StreamEncoder.delta``, (d) the same with log
probabilities (5 alternatives), (e) one completion chunk (``completion_chunk`` + ``sse_event``) and
(f) one non-streaming chat body with one choice, JSON-encoded as Starlette's ``JSONResponse`` does.

``--against DIR`` runs the same measurements, in a subprocess, on the ``router`` package of another
checkout (e.g. ``main`` in a second worktree) and prints both side by side; ``--rounds`` alternates
the two that many times and reports each side's median round (a shared machine drifts). Only
``router`` and ``replicas`` are imported, so the file runs by path against any checkout::

    python bench/protocol_cost.py --against /work/wt/respbase
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

REPEATS = 5
CONFIG_MODEL = "tiny"


def _ops() -> dict[str, Callable[[], object]]:
    from replicas.engine_types import TokenLogprob
    from router.protocol import ProtocolConfig, parse_chat_request, parse_completion_request
    from router.responses import StreamEncoder, completion_chunk, response_body, sse_event

    config = ProtocolConfig((CONFIG_MODEL,), max_model_len=64, vocab_size=100)
    messages = [{"role": "user", "content": "hi"}]
    chat_req = parse_chat_request(json.dumps({"model": CONFIG_MODEL, "messages": messages}).encode(), {}, config)
    lp_body = {"model": CONFIG_MODEL, "messages": messages, "logprobs": True, "top_logprobs": 5, "stream": True}
    lp_req = parse_chat_request(json.dumps(lp_body).encode(), {}, config)
    comp_req = parse_completion_request(json.dumps({"model": CONFIG_MODEL, "prompt": "hello"}).encode(), {}, config)
    enc = StreamEncoder(chat_req)
    lp_enc = StreamEncoder(lp_req, token_text=lambda t: f"t{t}")
    entry = [TokenLogprob(token_id=7, logprob=-0.1, top=[(7, -0.1), (8, -2.5), (9, -3.0), (10, -4.0), (11, -1e-05)])]

    chat_raw = json.dumps({
        "model": CONFIG_MODEL, "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
            {"role": "assistant", "content": "hi"}, {"role": "user", "content": "tell me more"}],
        "max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "stream": True, "stream_options": {"include_usage": True},
        "seed": 3, "stop": ["\n\n"], "presence_penalty": 0.5, "logprobs": True, "top_logprobs": 2}).encode()
    completion_raw = json.dumps({"model": CONFIG_MODEL, "prompt": "once upon a time", "max_tokens": 16,
                                 "temperature": 0.0, "stop": "x", "n": 2, "logprobs": 1}).encode()

    def body() -> bytes:
        payload = response_body(chat_req, "hello world", "stop", 3, 2)
        return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")

    return {
        "chat_request_parse": lambda: parse_chat_request(chat_raw, {}, config),
        "completion_request_parse": lambda: parse_completion_request(completion_raw, {}, config),
        "chat_stream_delta": lambda: enc.delta("hello"),
        "chat_stream_delta_logprobs": lambda: lp_enc.delta("hello", entry),
        "completion_chunk": lambda: sse_event(completion_chunk(comp_req, "hello")),
        "chat_body_1_choice": body,
    }


def measure(number: int = 20000) -> dict[str, float]:
    """Microseconds per operation (median of :data:`REPEATS` repeats of ``number`` calls each)."""
    out = {}
    for name, op in _ops().items():
        op()  # warm up (imports, caches)
        times = timeit.repeat(op, number=number, repeat=REPEATS)
        out[name] = statistics.median(times) / number * 1e6
    return out


def _run_against(root: str, number: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(root).resolve())}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--json", "--number", str(number)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(done.stdout)


def _median_round(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}


def main(argv: list[str] | None = None) -> int:
    """Print the JSON of the measurements, then (unless ``--json``) a table, old beside new."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="another checkout's root, measured in a subprocess as the baseline")
    parser.add_argument("--number", type=int, default=20000, help="calls per repeat")
    parser.add_argument("--rounds", type=int, default=3, help="baseline/this alternations (median reported)")
    parser.add_argument("--json", action="store_true", help="print only this checkout's JSON")
    args = parser.parse_args(argv)
    if args.json:
        print(json.dumps(measure(args.number)))
        return 0
    bases, heres = [], []
    for _ in range(args.rounds):
        if args.against:
            bases.append(_run_against(args.against, args.number))
        heres.append(measure(args.number))
    here = _median_round(heres)
    base = _median_round(bases) if bases else None
    print(json.dumps({"baseline": base, "this": here}, indent=1))
    print("| op | baseline µs | this µs | ratio |\n|---|---|---|---|")
    for name, value in here.items():
        old = base.get(name) if base else None
        ratio = f"{value / old:.2f}x" if old else "-"
        print(f"| {name} | {old:.2f} | {value:.2f} | {ratio} |" if old else f"| {name} | - | {value:.2f} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
