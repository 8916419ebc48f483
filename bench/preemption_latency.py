"""Preemption latency of the engine's executor (``preempt_latency_ms`` of ``bench engine``).

A background thread asks for a preemption at random moments while a long prefill runs; the
latency is the time from the request until the device is free for other work (on CPU the
executor returning, on CUDA the end of the operators already launched, an event recorded at
every point). Chunked execution (separate programs of C tokens, the device synchronised at each
boundary as an iteration-level scheduler does) is measured the same way. See
:mod:`bench.engine_bench` for the whole report.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from replicas.executor import Granularity, PreemptibleExecutor
from replicas.kv_cache import PagedKVCache
from replicas.model.decoder import DecoderModel
from replicas.programs import PrefillItem, prefill_program

if TYPE_CHECKING:
    from bench.engine_bench import EngineBenchConfig


class Prefiller:
    """Our engine reduced to what the benchmark needs: prefill one prompt, free its KV."""

    def __init__(self, model: DecoderModel, max_tokens: int) -> None:
        self.model = model
        spec = model.kv_spec()
        self.kv = PagedKVCache(spec, -(-max_tokens // spec.block_size) + 1, model.device)

    def program(self, ids: list[int], start: int = 0, end: int | None = None, chunk: int = 8192) -> Any:  # noqa: ANN401
        self.kv.allocator.ensure_capacity(0, len(ids))
        return prefill_program(self.model, self.kv, [PrefillItem(0, ids, start, end)], chunk)

    def reset(self) -> None:
        self.kv.allocator.free(0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


class _PreemptionProbe:
    """A thread that asks for a preemption at random moments and timestamps each request."""

    def __init__(self, mean_gap_s: float, seed: int) -> None:
        self.mean_gap_s = mean_gap_s
        self.rng = random.Random(seed)
        self.flag = threading.Event()
        self.armed = threading.Event()
        self.stopped = threading.Event()
        self.requested_at = 0.0
        self.samples: list[float] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stopped.is_set():
            self.armed.wait()
            self.armed.clear()
            if self.stopped.wait(self.rng.uniform(0, 2 * self.mean_gap_s)):
                return
            self.requested_at = time.perf_counter()
            self.flag.set()

    def __enter__(self) -> _PreemptionProbe:
        self.thread.start()
        self.armed.set()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.armed.set()
        self.thread.join(timeout=10)

    def should_stop(self) -> bool:
        return self.flag.is_set()

    def record_and_rearm(self) -> None:
        """Called when the executor returned after a request: log the latency, ask again later."""
        self.samples.append(time.perf_counter() - self.requested_at)
        self.flag.clear()
        self.armed.set()


def _latency_stats(samples_s: list[float]) -> dict[str, float | int]:
    ms = np.array(samples_s) * 1000 if samples_s else np.array([float("nan")])
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "max": float(ms.max()),
            "samples": len(samples_s)}


def _timeline_latencies(points: list[float], begin: float, end: float, draws: int, seed: int,
                        free_at: list[float] | None = None) -> list[float]:
    """Latency a request arriving uniformly in ``[begin, end)`` sees: from then until the device is
    free after the next point (``free_at[j]``: when point ``j``'s launched work has finished; on CPU
    the point itself). Points are host times, in order."""
    marks = np.array([*points, end])
    free = np.array([*(points if free_at is None else free_at), end])
    t = np.random.default_rng(seed).uniform(begin, end, draws)
    nxt = np.searchsorted(marks, t, side="left")
    return list(free[nxt] - t)


class _PointClock:
    """Host time of every preemption point and, on CUDA, when the device finished what was
    launched before it (an event per point, read against a start event after the run)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.points: list[float] = []
        self.events: list[torch.cuda.Event] = []
        self.begin = 0.0
        self.start: torch.cuda.Event | None = None

    def open(self) -> None:
        """Mark the start of a run (the device idle: synchronised before)."""
        if self.cuda:
            torch.cuda.synchronize()
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        self.begin = time.perf_counter()

    def mark(self) -> None:
        """A preemption point, now."""
        self.points.append(time.perf_counter())
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)

    def free_at(self) -> list[float]:
        """When the device was free after each point (host clock; call after a synchronise)."""
        if not self.cuda or self.start is None:
            return list(self.points)
        # the start event ran at once on the idle device, at host time ~begin (within a launch)
        device = [self.begin + self.start.elapsed_time(e) / 1000 for e in self.events]
        return [max(h, d) for h, d in zip(self.points, device)]


def measure_preemption(model: DecoderModel, cfg: EngineBenchConfig, bar: tqdm) -> dict[str, Any]:
    """Preemption latency per granularity and for chunked execution (milliseconds).

    Each run both serves real preemption requests from a probe thread (``measured``: request
    to executor-free, resumed at once) and records the time of every preemption point; the
    headline p50/p99/max come from 2000 request times drawn uniformly over the run against that
    measured timeline (enough samples for a p99), and ``measured`` validates them.
    """
    n = cfg.latency_tokens
    prefiller = Prefiller(model, n)
    ids = [random.Random(cfg.seed + 1).randrange(model.config.vocab_size) for _ in range(n)]
    PreemptibleExecutor("none").run_to_completion(prefiller.program(ids[:64]))  # warm-up
    prefiller.reset()
    whole = timed(lambda: (PreemptibleExecutor("none").run_to_completion(prefiller.program(ids)),
                           prefiller.reset()), model.device)
    out: dict[str, Any] = {"prompt_tokens": n, "uninterrupted_s": whole,
                           "method": "timeline of measured preemption points, 2000 uniform request times"}
    out["max_inflight_default"] = PreemptibleExecutor().max_inflight
    for index, (name, granularity, chunk, k) in enumerate(latency_configs(cfg)):
        executor = PreemptibleExecutor(granularity, max_inflight=k, device=model.device)
        measured: list[float] = []
        timeline: list[float] = []
        for run in range(cfg.latency_runs):
            clock = _PointClock(model.device)
            gap = whole / max(min(-(-n // chunk), 40) if granularity == "none" else 40, 2)
            with _PreemptionProbe(gap, seed=cfg.seed + 97 * index + run) as probe:

                def check(clock: _PointClock = clock, probe: _PreemptionProbe = probe) -> bool:
                    clock.mark()
                    return probe.should_stop()

                def served(probe: _PreemptionProbe = probe) -> None:
                    sync(model.device)  # free only once the launched operators have run
                    probe.record_and_rearm()

                clock.open()
                for start in range(0, n, chunk):
                    task = executor.start(prefiller.program(ids, start, min(start + chunk, n), chunk))
                    while not executor.run(task, check):
                        served()
                    if start + chunk < n:  # a chunk boundary is a preemption point
                        sync(model.device)  # an iteration-level scheduler waits for each chunk
                        if check():
                            served()
                sync(model.device)
                end = time.perf_counter()
                if probe.should_stop():  # asked during the last stretch: served at completion
                    probe.record_and_rearm()
                measured += probe.samples
            timeline += _timeline_latencies(clock.points, clock.begin, end, 2000 // cfg.latency_runs,
                                            cfg.seed + run, clock.free_at())
            prefiller.reset()
            bar.update(1)
        out[name] = {**_latency_stats(timeline), "measured": _latency_stats(measured), "max_inflight": k}
    return out


def latency_configs(cfg: EngineBenchConfig) -> list[tuple[str, str, int, int]]:
    """``(row name, granularity, chunk tokens, K)`` of every preemption-latency row."""
    n, default_k = cfg.latency_tokens, PreemptibleExecutor().max_inflight
    rows = [(g.value, g.value, n, default_k) for g in Granularity]
    rows += [(f"block-K{k}", "block", n, k) for k in cfg.max_inflight]
    return rows + [(f"chunked-{c}", "none", c, default_k) for c in cfg.chunk_sizes]
