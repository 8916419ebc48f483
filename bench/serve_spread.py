"""``bench serve --fixed-rate``'s extras: an idle-server probe before each replay and the spread
report, so each replay's attainment can be read beside the speed the machine had at that moment.

The probe sends one fresh copy of the window's median-length prompt three times, one at a time, to
the idle server (``max_tokens`` 1, no SLO) and keeps the median TTFT: on a shared VM the same
prefill takes a different time from one minute to the next, and a replay's attainment follows it.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any

from bench.loadgen import LoadConfig, LoadRequest, run_load_sync

PROBES = 3
# Below these a fixed-rate replay's spread is mostly the VM's speed of the moment and one request's
# weight (measured on 2026-12-04: 32 requests, 3 s: spread 0.19; 160 requests, 73 s: 0.04).
SHORT_REPLAY_S = 30.0
FEW_REQUESTS = 100


def probe_prompt(prompt: str | tuple[int, ...], tag: int) -> str | tuple[int, ...]:
    """``prompt`` made new for probe ``tag`` (same length in ids up to a token or two): a text prefix
    or a rotation, so the probe shares no prefix-cache entry with the replays or another probe."""
    if isinstance(prompt, str):
        return f" probe{tag}{prompt}"
    shift = 1 + tag % max(len(prompt) - 1, 1)
    return (*prompt[shift:], *prompt[:shift])


def idle_probe_ms(base_url: str, model: str, requests: list[LoadRequest], run: int) -> float | None:
    """Median TTFT (ms) of :data:`PROBES` fresh median-length prompts sent one at a time (None when
    none answered)."""
    median = sorted(requests, key=lambda r: r.input_tokens)[len(requests) // 2]
    cfg = LoadConfig(base_url, model, drain_s=120.0, cancel_missed=False)
    times = []
    for i in range(PROBES):
        probe = replace(median, arrival_s=0.0, ttft_slo_s=1e9, max_tokens=1,
                        prompt=probe_prompt(median.prompt, PROBES * run + i))
        res = run_load_sync(cfg, [probe])[0]
        if res.ttft_s is not None:
            times.append(res.ttft_s * 1000.0)
    return round(statistics.median(times), 2) if times else None


def correlation(xs: list[float], ys: list[float]) -> float | None:
    """Pearson's r (None with fewer than two pairs or a constant series)."""
    try:
        return round(statistics.correlation(xs, ys), 3)
    except statistics.StatisticsError:
        return None


def format_spread(systems: list[dict[str, Any]]) -> list[str]:
    """Per system at its fixed rate: every replay's attainment and probe, the spread and their correlation."""
    lines = ["fixed-rate replays (attainment @ idle probe ms), spread = max - min, r = corr(attainment, probe)"]
    for e in systems:
        for p in e.get("points") or []:
            runs = p.get("repeats") or []
            att = [r["attainment"] for r in runs]
            probes = [r.get("probe_ms") for r in runs]
            pairs = [(a, b) for a, b in zip(att, probes) if b is not None]
            cells = ", ".join(f"{a:.2f}@{b:.0f}" if b is not None else f"{a:.2f}" for a, b in zip(att, probes))
            r = correlation([a for a, _ in pairs], [b for _, b in pairs])
            lines.append(f"  {e['system']} at {p['rate_rps']:.2f} req/s: {cells}; median {p['attainment']:.2f}, "
                         f"spread {p.get('spread', max(att) - min(att)):.2f}" + ("" if r is None else f", r {r:+.2f}"))
    return lines


def short_replay_warning(requests: int, rate_rps: float) -> str | None:
    """A warning when a fixed-rate replay of ``requests`` at ``rate_rps`` sends for under
    :data:`SHORT_REPLAY_S` or holds under :data:`FEW_REQUESTS` requests: such a replay samples one
    moment of a shared machine's speed, and one request moves its attainment by ``1/requests``."""
    if requests < 1 or not rate_rps > 0:
        raise ValueError(f"need requests >= 1 and a positive rate, got {requests} and {rate_rps}")
    span_s = requests / rate_rps
    if span_s >= SHORT_REPLAY_S and requests >= FEW_REQUESTS:
        return None
    return (f"a replay of {requests} requests at {rate_rps:.2f} req/s sends for {span_s:.1f} s; one request is "
            f"{1 / requests:.3f} of attainment and the run sees one moment of the machine's speed, so the "
            f"spread says little (use >= {FEW_REQUESTS} requests and >= {SHORT_REPLAY_S:.0f} s: --max-requests, "
            f"--window-start-s; on the code trace --window-start-s 2180 holds a dense stretch of 320)")

