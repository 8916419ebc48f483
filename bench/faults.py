"""``flowprefill bench faults``: attainment before, during and after a replica crash and a Redis outage.

A FlowPrefill server with ``replicas`` replicas (``flowprefill serve`` as a subprocess, as in
``bench serve``) uses a password-protected ``redis-server`` on its own port that this bench owns.
The trace window of ``bench serve --quick`` is sent open loop at ``rate_rps`` for the whole run
while two faults are injected, each measured in windows of ``phase_s`` seconds:

1. ``replica crash``: at ``phase_s`` one replica's worker process is killed with SIGKILL (a harder
   stop than ``ray.kill``: the actor gets no chance to clean up). Serve starts a replacement.
2. ``Redis outage``: at ``3 x phase_s`` redis-server is stopped for ``outage_s`` seconds, then
   started again, empty, on the same port.

Requests are grouped by arrival into ``before crash``, ``crash`` (the ``phase_s`` after the kill),
``after crash``, ``outage`` and ``after outage``. The load generator does not cancel late requests:
every request ends with an answer, a clear error (an HTTP status or an SSE error event), or hangs
until ``drain_s`` after the last arrival; a hung request and an accepted request left in Redis's
journal at the end are both counted as lost.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.loadgen import LoadConfig, LoadRequest, RequestResult, run_load
from bench.outcomes import class_outcomes
from bench.serve_bench import engine_overrides, warm_up
from bench.servers import ManagedServer, metric_values, metrics_text, router_journal, server_spec
from bench.soak import tiled, window_workload

PHASES = ("before crash", "crash", "after crash", "outage", "after outage")
REPLICA_TITLE = "ServeReplica:flowprefill:FlowPrefillReplica"  # the Ray worker title of a replica actor


@dataclass(frozen=True)
class FaultConfig:
    """The load (``rate_rps`` over every replica) and the fault timeline."""

    trace: str
    rate_rps: float = 1.2
    replicas: int = 2
    phase_s: float = 30.0
    outage_s: float = 15.0
    cpu_threads: int = 1  # per replica: two replicas share this 2-core machine
    drain_s: float = 120.0
    max_requests: int = 32
    length_scale: float = 1 / 16
    max_output_tokens: int = 8
    seed: int = 0
    log_dir: str = "out/faults"

    def __post_init__(self) -> None:
        if not self.rate_rps > 0:
            raise ValueError(f"--rate-rps: must be positive, got {self.rate_rps}")
        if self.replicas < 2:
            raise ValueError(f"--replicas: a crash needs a survivor, so at least 2, got {self.replicas}")
        if not self.phase_s > 0 or not self.outage_s > 0:
            raise ValueError("--phase-s and --outage-s must be positive")

    def starts(self) -> dict[str, float]:
        """Start of each phase, in seconds from the first request (the crash at ``crash``, the
        outage from ``outage`` to ``after outage``)."""
        p, o = self.phase_s, self.outage_s
        return dict(zip(PHASES, (0.0, p, 2 * p, 3 * p, 3 * p + o)))

    @property
    def duration_s(self) -> float:
        """Seconds of load: ``phase_s`` after the outage ends."""
        return self.starts()["after outage"] + self.phase_s


def phase_of(cfg: FaultConfig, arrival_s: float) -> str:
    """The phase a request arriving at ``arrival_s`` belongs to."""
    name = PHASES[0]
    for phase, start in cfg.starts().items():
        if arrival_s >= start:
            name = phase
    return name


def replica_pids(title: str = REPLICA_TITLE) -> list[int]:
    """PIDs of the processes whose command line starts with Ray's title of a replica actor."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith(f"ray::{title}"):
            pids.append(int(entry))
    return sorted(pids)


def summarize(cfg: FaultConfig, results: list[RequestResult], journal_left: int) -> dict[str, dict[str, Any]]:
    """:func:`summarize_phases` over :data:`PHASES` by arrival (:func:`phase_of`)."""
    return summarize_phases(PHASES, lambda t: phase_of(cfg, t), results, journal_left)


def summarize_phases(phases: Sequence[str], phase_for: Callable[[float], str], results: list[RequestResult],
                     journal_left: int) -> dict[str, dict[str, Any]]:
    """Per phase (``phase_for(arrival_s)``): the outcome rows of :mod:`bench.outcomes` plus ``accepted``
    (not refused at the door), ``failed_clearly`` (an HTTP error or an SSE error event) and ``lost`` (no
    answer by the drain limit); the journal's leftovers are added to the last phase's ``lost``."""
    table: dict[str, dict[str, Any]] = {}
    for phase in phases:
        mine = [r for r in results if phase_for(r.arrival_s) == phase]
        rows = class_outcomes(mine)
        hung = sum(r.error is not None and r.error.startswith("cancelled") for r in mine)
        refused = sum(r.status == 429 for r in mine)
        table[phase] = {
            "requests": len(mine), "accepted": len(mine) - refused, "refused_429": refused,
            "completed": sum(r.error is None for r in mine),
            "failed_clearly": sum(r.error is not None and r.status != 429 and not r.error.startswith("cancelled")
                                  for r in mine),
            "lost": hung,
            # a stream cut short by the crash does not count as met, even if its first token was in time
            "attainment": round(sum(r.met and r.error is None for r in mine) / len(mine), 3) if mine else None,
            "errors": sorted({(r.error or "")[:120] for r in mine if r.error and r.status != 429})[:5],
            "classes": rows,
        }
    table[phases[-1]]["lost"] += journal_left
    return table


async def _run(cfg: FaultConfig, base_url: str, model: str, requests: list[LoadRequest], redis: Any,
               events: list[dict[str, Any]], bar: Any) -> list[RequestResult]:  # noqa: ANN401
    load_cfg = LoadConfig(base_url, model, drain_s=cfg.drain_s, cancel_missed=False)
    load = asyncio.create_task(run_load(load_cfg, requests, on_done=lambda _result: bar.update(1)))
    t0 = time.perf_counter()
    starts = cfg.starts()

    async def at(t: float) -> None:
        await asyncio.sleep(max(0.0, t - (time.perf_counter() - t0)))

    await at(starts["crash"])
    pids = replica_pids()
    if not pids:
        raise RuntimeError(f"no replica process titled ray::{REPLICA_TITLE} to kill")
    os.kill(pids[0], signal.SIGKILL)
    events.append({"t_s": time.perf_counter() - t0, "event": "replica process killed (SIGKILL)", "pid": pids[0],
                   "replicas_before": len(pids)})
    await at(starts["outage"])
    await asyncio.to_thread(redis.stop)
    events.append({"t_s": time.perf_counter() - t0, "event": "redis-server stopped"})
    await at(starts["after outage"])
    await asyncio.to_thread(redis.start)
    events.append({"t_s": time.perf_counter() - t0, "event": "redis-server started again (empty)"})
    results = await load
    events.append({"t_s": time.perf_counter() - t0, "event": "load finished", "replicas_after": len(replica_pids())})
    return results


COUNTERS = ("flowprefill_replica_retries_total", "flowprefill_redis_fallbacks_total")


def run_faults(cfg: FaultConfig, model_dir: Path | None = None) -> dict[str, Any]:
    """Start Redis and the server, run the load with both faults, stop everything; returns the report."""
    from tqdm import tqdm

    from replicas.model.default_model import prepare_default_model
    from state.redis_server import RedisServer

    model_dir = model_dir or prepare_default_model()
    workload = window_workload(cfg.trace, model_dir, cfg.max_requests, cfg.length_scale, cfg.max_output_tokens,
                               cfg.seed)
    base = workload.requests(0)
    requests = tiled(base, cfg.rate_rps, cfg.duration_s, copies=workload.requests)
    work = Path(cfg.log_dir)
    work.mkdir(parents=True, exist_ok=True)
    events: list[dict[str, Any]] = []
    with RedisServer(password=secrets.token_hex(16)) as redis:
        spec = server_spec("flowprefill", model_dir, model_dir.name, work_dir=work,
                           engine={**engine_overrides(cfg.length_scale), "cpu_threads": cfg.cpu_threads})
        # Ray's logical CPUs: a whole one per replica (as ray_config.yaml asks) and one for the router.
        spec.argv += ["--replicas", str(cfg.replicas), "--num-cpus", str(cfg.replicas + 1)]
        spec.env["REDIS_URL"] = redis.url
        with ManagedServer(spec, work / "server.log") as server:
            warm_up(spec.base_url, server.model_name, base, count=len(base))  # every prompt length once, unscored
            with tqdm(total=len(requests), desc=f"faults at {cfg.rate_rps:g} req/s", unit="req") as bar:
                results = asyncio.run(_run(cfg, spec.base_url, server.model_name, requests, redis, events, bar))
            journal_left = int(router_journal(spec.base_url).get("open_requests", 0))
            text = metrics_text(spec.base_url)
            counters = {name: sum(metric_values(text, name)) for name in COUNTERS}  # summed over labels
    phases = summarize(cfg, results, journal_left)
    return {"config": asdict(cfg), "requests": len(results), "events": events, "journal_left": journal_left,
            "counters": counters, "phases": phases}


def print_faults(report: dict[str, Any]) -> None:
    """One row per phase, then the fault events and the distinct errors."""
    width = max(13, *(len(p) for p in report["phases"]))
    print(f"{'phase':<{width}} {'req':>5} {'accepted':>8} {'done':>5} {'failed*':>7} {'lost':>5} {'429':>5} "
          f"{'attain':>7}")
    for phase, row in report["phases"].items():
        att = "-" if row["attainment"] is None else f"{row['attainment']:.2f}"
        print(f"{phase:<{width}} {row['requests']:>5} {row['accepted']:>8} {row['completed']:>5} "
              f"{row['failed_clearly']:>7} {row['lost']:>5} {row['refused_429']:>5} {att:>7}")
    print("* failed with a clear error (HTTP status or SSE error event)")
    for e in report["events"]:
        print(f"  t={e['t_s']:6.1f} s  {e['event']}")
    print("  " + ", ".join(f"{k} {v:g}" for k, v in report["counters"].items())
          + f"; journal entries left: {report['journal_left']}")
    for phase, row in report["phases"].items():
        for err in row["errors"]:
            print(f"  {phase}: {err}")
