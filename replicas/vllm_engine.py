"""A replica engine backed by vLLM, behind the same interface as the native engine.

vLLM runs as a **child process in its own virtual environment** (``.venv-vllm``, made by
``scripts/vllm_env.sh``): it pins its own torch, transformers and FastAPI versions, which cannot
share the project's environment, so :class:`VLLMEngine` starts vLLM's OpenAI server on a private
loopback port (:mod:`replicas.vllm_process`) and speaks HTTP to it.  The replica deployment, the
router, Redis publishing and the OpenAI API in front stay exactly as for the native engine.

* ``generate`` posts the prompt's token ids to ``/v1/completions`` (streaming, ``return_token_ids``)
  with vLLM's ``priority`` set from the request's TTFT deadline: milliseconds since
  :data:`PRIORITY_EPOCH` (lower = earlier deadline = more urgent), so vLLM's waiting queue runs
  earliest-deadline-first.  Limits: vLLM never preempts a running prefill for priority (only when
  KV memory runs out); priority orders the waiting queue only; chunked prefill
  (``max_num_batched_tokens``, ``long_prefill_token_threshold``) bounds how long a long prompt
  holds each step, not how long it keeps its place.  Closing the stream early closes the HTTP
  stream, which makes vLLM abort the request and free its KV blocks.  A request with prompt logprobs
  goes unstreamed (vLLM refuses ``prompt_logprobs`` on a stream): its whole output comes as one
  output per choice when vLLM has finished it, the prompt's entries (ranks included) on the first.
* ``stats`` reports the replica's own accounting of its requests before their first token: each
  request's prefill predicted by the cost model, worked off at one second per second in vLLM's
  order (started ones first, then by deadline), plus vLLM's own counters from ``/metrics``
  (``vllm:num_requests_waiting``, ``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``, and its
  prefix-cache counters as ``prefix_queried_tokens`` / ``prefix_hit_tokens``, the native engine's names).
  Decode steps interleaved with prefill chunks are not modelled.
* ``cost_model`` is profiled through the running server (:mod:`replicas.vllm_profile`), cached on disk.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replicas.engine_config import EngineConfigError
from replicas.engine_stats import EngineStats
from replicas.engine_types import RequestOutput
from replicas.sampling_params import SamplingParams
from replicas.scheduler.cost_model import CostModel
from replicas.scheduler.request import Request
from replicas.scheduler.stats import QueueEntry
from replicas.vllm_fields import parse_logprobs, parse_prompt_logprobs, sampling_fields
from replicas.vllm_process import (
    VLLMConfig,
    VLLMProcess,
    bound_threads,
    check_venv,
    http_get,
    parse_vllm_metrics,
)
from state.clock import WALL_CLOCK, Clock, require_clock

log = logging.getLogger("flowprefill.vllm")

PRIORITY_EPOCH = 1_700_000_000.0  # vLLM priority = ms from here to the deadline (int64: ~292 million years)
MAX_ONGOING = 1024  # Serve's bound on requests in progress per vLLM replica (vLLM queues what it cannot run)
_WATCHED = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc", "kv_total_tokens",
            "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")
# vLLM's prefix-cache counters, under the names the native engine's counters use
_PREFIX_COUNTERS = {"prefix_queried_tokens": "vllm:prefix_cache_queries_total",
                    "prefix_hit_tokens": "vllm:prefix_cache_hits_total"}


def deadline_priority(deadline: float) -> int:
    """vLLM ``priority`` of a request with this TTFT deadline (epoch seconds): earlier is lower."""
    return int(math.floor((deadline - PRIORITY_EPOCH) * 1000.0))


@dataclass
class _Live:
    """A request between submission and its end; ``done_s`` is prefill work credited to it."""

    request: Request
    predicted_s: float
    submitted: float
    done_s: float = 0.0
    started: bool = False
    decoding: bool = False

    @property
    def remaining_s(self) -> float:
        return max(self.predicted_s - self.done_s, 0.0)


class VLLMEngine:
    """vLLM's OpenAI server as a replica engine (see the module docstring).

    Building it starts the server and waits until it serves (100-125 s on 2 CPU cores), then loads
    or profiles the cost model.  ``server`` injects an already running server (anything with
    ``url``, ``alive()`` and ``stop()``); ``cost_model`` skips the profile.
    """

    kind = "vllm"

    def __init__(self, config: VLLMConfig, *, clock: Clock = WALL_CLOCK,
                 on_state_change: Callable[[EngineStats], None] | None = None, server: Any = None,  # noqa: ANN401
                 cost_model: CostModel | None = None) -> None:
        from replicas.model.config import ModelConfig
        from replicas.model.default_model import prepare_default_model

        self.config = config
        self.model_dir = config.model or str(prepare_default_model())
        self.model_config = ModelConfig.from_dir(self.model_dir)
        self._name = Path(self.model_dir).name
        if config.max_model_len > self.model_config.max_position_embeddings:
            raise EngineConfigError("engine.max_model_len", f"{config.max_model_len} exceeds the model's "
                                    f"max_position_embeddings ({self.model_config.max_position_embeddings})")
        self.clock = require_clock(clock, "VLLMEngine")
        self.on_state_change = on_state_change
        self.threads = bound_threads(config.omp_threads_bind)
        self._lock = threading.RLock()
        self._live: dict[str, _Live] = {}
        self._advanced_at = clock()
        self._vllm: dict[str, Any] = {}
        self.counters = {"submitted": 0, "finished": 0, "aborted": 0, "errors": 0}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._started = False
        self.server = server if server is not None else self._launch()
        try:
            self.cost_model = cost_model or self._load_cost_model()
        except BaseException:
            self.server.stop()
            raise
        self._publish(self.clock())

    # ------------------------------------------------------------------ the child process
    def _launch(self) -> VLLMProcess:
        python = check_venv(self.config.venv)
        proc = VLLMProcess(python, self.config.server_args(self.model_dir, self._name), self.config.server_env(),
                           self._name)
        log.info("starting vLLM on %s (log %s)", proc.url, proc.log_path)
        proc.start()
        took = proc.wait_ready(self.config.startup_timeout_s)
        log.info("vLLM ready on %s after %.0f s", proc.url, took)
        return proc

    def _load_cost_model(self) -> CostModel:
        from replicas.vllm_profile import load_or_profile_vllm

        return load_or_profile_vllm(
            self.server.url, self._name, self.model_config.vocab_size, model=self._name, dtype=self.config.dtype,
            budget=self.config.max_num_batched_tokens, threads=self.threads,
            max_tokens=self.config.profile_max_tokens, path=self.config.profile)

    # ------------------------------------------------------------------ ReplicaEngineAPI
    @property
    def model_name(self) -> str:
        """The served model's name (its directory name, as for the native engine)."""
        return self._name

    @property
    def max_model_len(self) -> int:
        """Longest prompt plus output vLLM accepts (``--max-model-len``)."""
        return self.config.max_model_len

    @property
    def vocab_size(self) -> int:
        """The checkpoint's vocabulary size (``config.json``)."""
        return self.model_config.vocab_size

    @property
    def policy_name(self) -> str:
        """vLLM's priority scheduling, priorities from deadlines."""
        return "vllm-priority"

    @property
    def url(self) -> str:
        """The vLLM server's base URL (loopback)."""
        return str(self.server.url)

    def prefix_naming(self) -> dict[str, object] | None:
        """vLLM's own prefix cache is not visible to placement."""
        return None

    def start(self) -> None:
        """Start polling vLLM's ``/metrics`` (the server itself started when the engine was built)."""
        if self._poller is None:
            self._started = True
            self._poller = threading.Thread(target=self._poll_loop, name="vllm-metrics", daemon=True)
            self._poller.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop polling and stop the vLLM server (its whole process group)."""
        self._stop.set()
        self._started = False
        if self._poller is not None:
            self._poller.join(timeout_s)
            self._poller = None
        self.server.stop()

    def is_alive(self) -> bool:
        """Whether :meth:`start` ran, :meth:`shutdown` did not, and the vLLM process runs."""
        return self._started and bool(self.server.alive())

    def stats(self) -> EngineStats:
        """The latest queue-state snapshot (see the module docstring)."""
        return self._stats

    def request_body(self, request: Request, params: SamplingParams) -> dict[str, Any]:
        """The ``/v1/completions`` body for ``request`` (token-id prompt, deadline priority, streaming
        unless it asks for prompt logprobs)."""
        body: dict[str, Any] = {
            "model": self._name, "prompt": list(request.prompt_ids), "max_tokens": params.max_tokens,
            "temperature": params.temperature, "top_p": params.top_p, "ignore_eos": params.ignore_eos,
            "stream": params.prompt_logprobs is None, "return_token_ids": True,
            "priority": deadline_priority(request.deadline),
        }
        if params.top_k > 0:
            body["top_k"] = params.top_k
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)
        body.update(sampling_fields(params))
        return body

    async def generate(self, request: Request, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Stream ``request`` through vLLM; closing the stream early aborts it there."""
        import aiohttp

        rid, n_prompt = request.request_id, request.num_prompt_tokens
        self._track(request)
        finished, count, first = False, 0, True
        counts = [0] * params.n  # generated tokens per choice
        open_choices = params.n
        try:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0)
            # read_bufsize: the first event repeats the prompt's token ids (one SSE line, ~6 bytes a token)
            async with aiohttp.ClientSession(timeout=timeout, read_bufsize=1 << 22) as session, \
                    session.post(self.url + "/v1/completions", json=self.request_body(request, params)) as resp:
                if resp.status != 200:
                    finished = True
                    yield self._error(request, count, f"vLLM answered HTTP {resp.status}: "
                                      f"{_error_message(await resp.text())}")
                    return
                async for data in _events(resp, params.prompt_logprobs is None):
                    event = json.loads(data)
                    if "error" in event:
                        finished = True
                        yield self._error(request, count, f"vLLM: {_error_message(data)}")
                        return
                    for choice in event.get("choices") or ():
                        ids = tuple(int(t) for t in choice.get("token_ids") or ())
                        text, reason = choice.get("text") or "", choice.get("finish_reason")
                        index = choice.get("index") or 0
                        if not ids and not text and reason is None:
                            continue
                        if not isinstance(index, int) or not 0 <= index < params.n:
                            finished = True
                            yield self._error(request, count, f"vLLM sent choice {index!r} of n = {params.n}")
                            return
                        ttft = None
                        if ids and first:
                            first = False
                            ttft = self._first_token(rid) - request.arrival_s
                        count += len(ids)
                        counts[index] += len(ids)
                        error = None
                        if reason is not None and reason not in ("stop", "length"):
                            reason, error = "error", f"vLLM finished the request with {reason!r}"
                        if reason is not None:
                            open_choices -= 1
                        finished = reason is not None and (open_choices == 0 or error is not None)
                        prompt = parse_prompt_logprobs(choice, request.prompt_ids, params.prompt_logprobs) \
                            if ttft is not None else None
                        yield RequestOutput(rid, ids, text, reason, n_prompt, counts[index], ttft_s=ttft,
                                            error=error, logprobs=parse_logprobs(choice, ids, params.logprobs),
                                            index=index, choices_left=open_choices, prompt_logprobs=prompt)
                        if finished:
                            return
            if not finished:
                finished = True
                yield self._error(request, count, "vLLM's stream ended without a finish reason")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            if not finished:
                finished = True
                yield self._error(request, count, f"vLLM request failed: {type(exc).__name__}: {exc}")
        finally:
            self._untrack(rid, finished)

    # ------------------------------------------------------------------ accounting
    def _error(self, request: Request, count: int, message: str) -> RequestOutput:
        self.counters["errors"] += 1
        log.warning("request %s: %s", request.request_id, message)
        return RequestOutput(request.request_id, (), "", "error", request.num_prompt_tokens, count, error=message)

    def _track(self, request: Request) -> None:
        """Account a submitted request: its predicted prefill joins the queue state."""
        with self._lock:
            now = self.clock()
            self._advance(now)
            self._live[request.request_id] = _Live(request, self.cost_model.predict(request.num_prompt_tokens), now)
            self._advance(now)  # an idle engine starts it at once
            self.counters["submitted"] += 1
            self._publish(now)

    def _untrack(self, rid: str, finished: bool) -> None:
        """Forget a request that finished (or was aborted: ``finished`` False)."""
        with self._lock:
            now = self.clock()
            self._advance(now)
            self._live.pop(rid, None)
            self.counters["finished" if finished else "aborted"] += 1
            self._publish(now)

    def _first_token(self, rid: str) -> float:
        """Mark ``rid`` decoding (its prefill leaves the queue state); returns the time."""
        with self._lock:
            now = self.clock()
            self._advance(now)
            live = self._live.get(rid)
            if live is not None:
                live.decoding = True
            self._publish(now)
        return now

    def _prefill_order(self) -> list[_Live]:
        """Requests before their first token in vLLM's order: started first, then by deadline."""
        pending = [lr for lr in self._live.values() if not lr.decoding]
        return sorted(pending, key=lambda lr: (not lr.started, lr.request.deadline, lr.submitted))

    def _advance(self, now: float) -> None:
        """Credit the prefill work done since the last event, one second per second, in vLLM's order;
        the head is always started (vLLM schedules a waiting request as soon as it has room)."""
        elapsed, self._advanced_at = now - self._advanced_at, max(now, self._advanced_at)
        order = self._prefill_order()
        for lr in order:
            if elapsed <= 0.0:
                break
            take = min(lr.remaining_s, elapsed)
            lr.started = True
            lr.done_s += take
            elapsed -= take
        if order:
            order[0].started = True

    def _publish(self, now: float) -> None:
        """Rebuild the snapshot and hand it to ``on_state_change`` (caller holds the lock)."""
        rows: dict[bool, list[QueueEntry]] = {True: [], False: []}
        for lr in self._prefill_order():
            rows[lr.started].append(QueueEntry(lr.request.request_id, lr.request.deadline, lr.remaining_s,
                                               lr.request.num_prompt_tokens))
        running = sum(r.predicted_remaining_s for r in rows[True])
        waiting = sum(r.predicted_remaining_s for r in rows[False])
        kv_total = int(self._vllm.get("kv_total_tokens") or self._kv_tokens_estimate())
        usage = float(self._vllm.get("vllm:kv_cache_usage_perc", 0.0))
        decoding = sum(lr.decoding for lr in self._live.values())
        self._stats = EngineStats(
            self._name, now, policy=self.policy_name, waiting=tuple(rows[False]), running=tuple(rows[True]),
            running_remaining_s=running, pending_work_s=running + waiting,
            kv_free_tokens=max(int(kv_total * (1.0 - usage)), 0), kv_total_tokens=kv_total, decoding=decoding,
            counters={**self.counters, **self._prefix_counters()},
            details={"vllm_url": self.url, "vllm_pid": getattr(self.server, "pgid", None),
                     "vllm_log": str(getattr(self.server, "log_path", "")),
                     "vllm": {"waiting": int(self._vllm.get("vllm:num_requests_waiting", 0)),
                              "running": int(self._vllm.get("vllm:num_requests_running", 0)), "kv_usage": usage,
                              "generation_tokens": int(self._vllm.get("vllm:generation_tokens_total", 0))}},
        )
        if self.on_state_change is not None:
            try:
                self.on_state_change(self._stats)
            except Exception:  # publishing is best effort; serving goes on
                log.exception("on_state_change failed")

    def _prefix_counters(self) -> dict[str, int]:
        """vLLM's prefix-cache counters from its last ``/metrics`` (none before it reports them)."""
        return {k: int(self._vllm[m]) for k, m in _PREFIX_COUNTERS.items() if m in self._vllm}

    def _kv_tokens_estimate(self) -> int:
        """KV tokens ``kv_cache_gib`` holds (keys and values of every layer) until vLLM reports its own."""
        c = self.model_config
        per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * (4 if self.config.dtype == "float32" else 2)
        return self.config.kv_cache_gib * (1 << 30) // per_token

    def poll_metrics(self) -> bool:
        """Read vLLM's ``/metrics`` once; publish and return True when the numbers used changed."""
        got = http_get(self.url + "/metrics", timeout_s=5.0)
        if got is None or got[0] != 200:
            return False
        values = parse_vllm_metrics(got[1].decode(errors="replace"))
        with self._lock:
            if all(values.get(k) == self._vllm.get(k) for k in _WATCHED):
                self._vllm = values
                return False
            self._vllm = values
            now = self.clock()
            self._advance(now)
            self._publish(now)
        return True

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.config.metrics_interval_s):
            try:
                self.poll_metrics()
            except Exception:  # a bad scrape must not end polling
                log.exception("polling vLLM's metrics failed")


async def _events(resp: Any, streaming: bool) -> AsyncIterator[bytes]:  # noqa: ANN401 - an aiohttp response
    """The JSON events of vLLM's answer: each SSE ``data:`` line up to ``[DONE]``, or the one body."""
    if not streaming:
        yield await resp.read()
        return
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield data


def _error_message(text: str | bytes) -> str:
    """The ``message`` of an OpenAI/vLLM error body, else the text itself (shortened)."""
    raw = text.decode(errors="replace") if isinstance(text, bytes) else text
    try:
        data = json.loads(raw)
        err = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
    except ValueError:
        pass
    return raw[:500]

