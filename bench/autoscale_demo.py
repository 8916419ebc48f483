"""``flowprefill bench autoscale``: SLO-driven autoscaling on this machine, measured end to end.

Starts a private Redis, a loopback Ray (with logical CPUs to spare, so every replica Serve asks
for fits) and the Serve app of ``ray_config.yaml`` with ``args.autoscaling`` set (FlowPrefill's
policy, ``cluster/autoscaling.py``; 1 to ``max_replicas`` replicas). Then it offers an open-loop
Poisson load of streaming ``/v1/completions`` requests that steps up and back down (low, high,
low), and samples every second the replica states (``serve.status()``) and, from Redis, which
replicas hold requests. It reports:

* the replica timeline (running / starting) and the offered rate;
* client-side TTFT attainment per phase, and in the high phase before and after the new replica
  served its first request;
* the scale-up time: from the load step to the new replica's first request, split into the
  policy's decision (a replica starting) and the replica's start-up; and the scale-down time.

Never imported by the serving path, and not part of the test suite (it takes minutes).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.stack import ServingStack

DEPLOYMENT = "FlowPrefillReplica"
NAMESPACE = "autoscale-demo"
_TEXT = ("Summarise these notes on distributed systems for a new engineer: replication keeps copies of data on "
         "several machines, consensus lets them agree on an order of updates, and sharding splits the data.")


@dataclass(frozen=True)
class AutoscaleDemoConfig:
    """The demo's load and autoscaling settings (the defaults finish in about ``minutes + 2`` minutes)."""

    minutes: float = 4.5  # the load (start-up and shutdown come on top)
    phases: tuple[float, float, float] = (0.2, 0.45, 0.35)  # low, high, low: fractions of the load time
    # Calibrated on a 2-core CPU with the 135M default model, one core per replica: with prompts of
    # about 140 tokens (3 repeats) 2 requests/s overload one replica and two carry them (2.4 is too
    # much for two on 2 cores).
    low_rate: float = 0.3  # requests per second
    high_rate: float = 2.0
    max_tokens: int = 2
    prompt_repeats: int = 3  # the prompt text this many times (longer prompts: more prefill per request)
    ttft_slo_ms: float = 2500.0
    max_replicas: int = 2
    num_cpus: int = 4  # logical CPUs for Ray: replicas take 1 each, the router 0.25
    seed: int = 0
    policy_kwargs: dict[str, Any] = field(default_factory=lambda: {
        "target_utilization": 0.4, "attainment_goal": 0.9, "min_samples": 5, "upscale_cooldown_s": 30.0,
        "downscale_delay_s": 45.0, "hysteresis": 0.2})

    def autoscaling(self) -> dict[str, Any]:
        """``args.autoscaling`` of the demo's app."""
        return {"min_replicas": 1, "max_replicas": self.max_replicas, "initial_replicas": 1,
                "metrics_interval_s": 1.0, "look_back_period_s": 5.0,
                "policy": {"policy_kwargs": dict(self.policy_kwargs)}}

    def phase_bounds(self) -> tuple[float, float, float]:
        """Seconds from the start of the load: end of the first low phase, of the high one, of the run."""
        total = self.minutes * 60
        first, high = self.phases[0] * total, (self.phases[0] + self.phases[1]) * total
        return first, high, total

    def rate_at(self, t: float) -> float:
        """Offered requests per second at ``t`` seconds into the load."""
        first, high, _ = self.phase_bounds()
        return self.high_rate if first <= t < high else self.low_rate


def arrival_times(config: AutoscaleDemoConfig) -> list[float]:
    """Seeded Poisson arrivals (seconds from the start) following :meth:`AutoscaleDemoConfig.rate_at`."""
    rng = random.Random(config.seed)
    total = config.phase_bounds()[2]
    peak = max(config.low_rate, config.high_rate)
    out, t = [], 0.0
    while True:  # thinning of a rate-``peak`` process
        t += rng.expovariate(peak)
        if t >= total:
            return out
        if rng.random() < config.rate_at(t) / peak:
            out.append(t)


@dataclass
class Sent:
    """One request as the client saw it (times in seconds from the start of the load)."""

    index: int
    sent: float
    ttft: float | None = None
    error: str | None = None


async def _send(session: Any, url: str, index: int, t0: float, config: AutoscaleDemoConfig, model: str) -> Sent:  # noqa: ANN401
    import aiohttp

    record = Sent(index, time.time() - t0)
    prompt = f"[{index}] " + " ".join([_TEXT] * config.prompt_repeats)
    body = {"model": model, "prompt": prompt, "max_tokens": config.max_tokens, "stream": True,
            "temperature": 0.0}
    headers = {"x-slo-ttft-ms": str(config.ttft_slo_ms)}
    start = time.time()
    try:
        async with session.post(url, json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=max(60.0, config.ttft_slo_ms / 50))) as resp:
            if resp.status != 200:
                record.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return record
            async for line in resp.content:
                text = line.decode().strip()
                if text.startswith("data:") and record.ttft is None and text != "data: [DONE]":
                    if '"error"' in text:
                        record.error = text[5:205]
                        return record
                    record.ttft = time.time() - start
    except (aiohttp.ClientError, TimeoutError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    return record


async def _drive(url: str, config: AutoscaleDemoConfig, model: str, t0: float) -> list[Sent]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        tasks = []
        for index, at in enumerate(arrival_times(config)):
            await asyncio.sleep(max(0.0, t0 + at - time.time()))
            tasks.append(asyncio.create_task(_send(session, url, index, t0, config, model)))
        return list(await asyncio.gather(*tasks))


def _replica_counts() -> tuple[int, int]:
    from ray import serve

    app = serve.status().applications.get("flowprefill")
    deployment = app.deployments.get(DEPLOYMENT) if app else None
    states = {str(getattr(k, "value", k)): v for k, v in (deployment.replica_states if deployment else {}).items()}
    return states.get("RUNNING", 0), states.get("STARTING", 0) + states.get("UPDATING", 0)


async def _sample(redis_url: str, t0: float, stop: asyncio.Event, samples: list[dict], busy: dict[str, float]) -> None:
    from state.client import ClusterState, StateUnavailable

    async with ClusterState(redis_url, namespace=NAMESPACE) as state:
        while not stop.is_set():
            now = time.time() - t0
            running, starting = await asyncio.to_thread(_replica_counts)
            try:
                states = await state.read_all_replica_states(skip_invalid=True)
            except StateUnavailable:
                states = {}
            for rid, st in states.items():
                if st.requests and rid not in busy:
                    busy[rid] = now
            samples.append({"t": round(now, 2), "running": running, "starting": starting,
                            "pending_work_s": round(sum(s.pending_work_s for s in states.values()), 3)})
            await asyncio.sleep(1.0)


def _attainment(records: list[Sent], slo_s: float, lo: float, hi: float) -> dict[str, Any]:
    chosen = [r for r in records if lo <= r.sent < hi]
    met = sum(r.ttft is not None and r.ttft <= slo_s for r in chosen)
    return {"requests": len(chosen), "attainment": round(met / len(chosen), 3) if chosen else None}


def analyse(config: AutoscaleDemoConfig, records: list[Sent], samples: list[dict],
            busy: dict[str, float]) -> dict[str, Any]:
    """The report: timelines, per-phase attainment, scale-up and scale-down times."""
    first, high, total = config.phase_bounds()
    slo = config.ttft_slo_ms / 1000
    initial = {rid for rid, t in busy.items() if t < first} or set(list(busy)[:1])
    new_busy = min((t for rid, t in busy.items() if rid not in initial and t >= first), default=None)
    up = next((s["t"] for s in samples if s["t"] >= first and s["running"] + s["starting"] > 1), None)
    running2 = next((s["t"] for s in samples if s["t"] >= first and s["running"] > 1), None)
    peak = max((s["running"] + s["starting"] for s in samples), default=1)
    down = next((s["t"] for s in samples if s["t"] >= high and s["running"] + s["starting"] < peak), None)
    timeline, last = [], None
    for s in samples:
        key = (s["running"], s["starting"])
        if key != last:
            timeline.append(s)
            last = key
    split = new_busy if new_busy is not None else high

    def rel(t: float | None, since: float) -> float | None:
        return None if t is None else round(t - since, 1)

    return {
        "config": {**asdict(config), "autoscaling": config.autoscaling()},
        "phases_s": {"low_until": round(first, 1), "high_until": round(high, 1), "end": round(total, 1)},
        "scale_up": {"load_step_s": round(first, 1), "decision_s": rel(up, first),
                     "new_replica_running_s": rel(running2, first),
                     "new_replica_first_request_s": rel(new_busy, first)},
        "scale_down": {"load_drop_s": round(high, 1), "replica_removed_after_s": rel(down, high)},
        "max_replicas_seen": peak,
        "replica_timeline": timeline,
        "attainment": {
            "low_before": _attainment(records, slo, 0, first),
            "high_one_replica": _attainment(records, slo, first, split),
            "high_after_new_replica": _attainment(records, slo, split, high),
            "low_after": _attainment(records, slo, high, total),
            "overall": _attainment(records, slo, 0, total),
        },
        "errors": sum(r.error is not None for r in records),
        "requests": [asdict(r) for r in records],
        "samples": samples,
        "replicas_first_busy_s": {rid: round(t, 2) for rid, t in busy.items()},
    }


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """Replica count and offered rate (top), TTFT per request and rolling attainment (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, requests = report["samples"], report["requests"]
    slo = report["config"]["ttft_slo_ms"] / 1000
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ts = [s["t"] for s in samples]
    top.step(ts, [s["running"] for s in samples], where="post", label="running replicas", color="tab:blue")
    top.step(ts, [s["running"] + s["starting"] for s in samples], where="post", linestyle="--",
             label="running + starting", color="tab:blue", alpha=0.5)
    top.set_ylabel("replicas")
    top.set_ylim(0, report["config"]["max_replicas"] + 0.5)
    rate = top.twinx()
    end = report["phases_s"]["end"]
    bins = [b * 10.0 for b in range(int(end // 10) + 1)]
    rate.plot([b + 5 for b in bins], [sum(b <= r["sent"] < b + 10 for r in requests) / 10 for b in bins],
              color="tab:gray", label="offered req/s")
    rate.set_ylabel("offered requests/s")
    top.legend(loc="upper left", fontsize=8)
    rate.legend(loc="upper right", fontsize=8)
    ok = [r for r in requests if r["ttft"] is not None]
    bottom.scatter([r["sent"] for r in ok], [r["ttft"] for r in ok], s=8,
                   c=["tab:green" if r["ttft"] <= slo else "tab:red" for r in ok], label="TTFT (red: missed)")
    bottom.axhline(slo, color="tab:red", linestyle=":", label=f"TTFT SLO {slo:g}s")
    bottom.set_yscale("log")
    bottom.set_ylabel("TTFT (s)")
    bottom.set_xlabel("seconds since the load started")
    att = bottom.twinx()
    window = [(b, [r for r in requests if b - 15 <= r["sent"] < b]) for b in bins[1:]]
    att.plot([b for b, rs in window if rs], [sum(r["ttft"] is not None and r["ttft"] <= slo for r in rs) / len(rs)
                                             for _, rs in window if rs], color="black", label="attainment (15 s)")
    att.set_ylim(0, 1.05)
    att.set_ylabel("TTFT attainment")
    bottom.legend(loc="upper left", fontsize=8)
    att.legend(loc="lower right", fontsize=8)
    up = report["scale_up"]
    for axis in (top, bottom):
        axis.axvspan(report["phases_s"]["low_until"], report["phases_s"]["high_until"], color="tab:orange", alpha=0.08)
        if up["new_replica_first_request_s"] is not None:
            axis.axvline(up["load_step_s"] + up["new_replica_first_request_s"], color="tab:purple", alpha=0.6)
    top.set_title(f"SLO-driven autoscaling: scale-up {up['new_replica_first_request_s']} s from load step "
                  "to the new replica's first request", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_autoscale_demo(config: AutoscaleDemoConfig, stack: ServingStack) -> dict[str, Any]:
    """Start everything, offer the load, tear everything down; returns the report."""
    import ray
    from ray import serve

    from state.redis_server import redis_url_from_env_or_start

    base = stack.app_args()
    args = stack.prepare({**base, "namespace": NAMESPACE, "autoscaling": config.autoscaling()})
    port, grpc_port = _free_port(), _free_port()
    redis_url, redis = redis_url_from_env_or_start()
    os.environ["REDIS_URL"] = redis_url
    try:
        stack.start_ray(config.num_cpus)
        started = time.time()
        url = stack.deploy(args, "127.0.0.1", port, redis_url, grpc_port)
        ready_s = time.time() - started
        print(f"serving at {url} after {ready_s:.0f}s; offering load for {config.minutes:g} min", flush=True)
        report = asyncio.run(_measure(config, url, redis_url, args.get("model_name", "SmolLM2-135M-Instruct")))
        report["serve_ready_s"] = round(ready_s, 1)
        return report
    finally:
        serve.shutdown()
        if ray.is_initialized():
            ray.shutdown()
        if redis is not None:
            redis.close()


async def _measure(config: AutoscaleDemoConfig, url: str, redis_url: str, model: str) -> dict[str, Any]:
    samples: list[dict] = []
    busy: dict[str, float] = {}
    stop = asyncio.Event()
    t0 = time.time()
    sampler = asyncio.create_task(_sample(redis_url, t0, stop, samples, busy))
    records = await _drive(f"{url}/v1/completions", config, model, t0)
    stop.set()
    await sampler
    return analyse(config, records, samples, busy)


def summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    up, down, att = report["scale_up"], report["scale_down"], report["attainment"]
    lines = [f"scale-up: decision {up['decision_s']} s, replica running {up['new_replica_running_s']} s, "
             f"first request on it {up['new_replica_first_request_s']} s after the load step",
             f"scale-down: {down['replica_removed_after_s']} s after the load dropped",
             "replicas (t: running+starting): " + ", ".join(f"{s['t']:.0f}s: {s['running']}+{s['starting']}"
                                                         for s in report["replica_timeline"])]
    lines += [f"attainment {k}: {v['attainment']} ({v['requests']} requests)" for k, v in att.items()]
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], json_path: str | None, plot_path: str | None) -> None:
    """Write the JSON report and the PNG where asked."""
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    if plot_path:
        plot_report(report, plot_path)
