"""Prefill/decode handover cost per request against prompt length.

``flowprefill bench handover [--lengths 32,128,512,2048] [--repeats 10] [--no-ray] [--json FILE]``

A ``prefill`` engine and a ``decode`` engine (:mod:`replicas.handover`) run in this process on the
same model. Each request is a fresh random prompt (no prefix-cache hit on either side: the report
counts the hits, which should be 0) with ``max_tokens=2`` greedy, so the prefill engine samples the
first token and hands the request over, and the decode engine samples the second. Per request:

- ``bytes``: the KV handed over (``KVHandover.nbytes``: the prompt's blocks, keys and values);
- ``gather_ms``: the prefill engine copying those blocks out (``KVHandover.gather_s``);
- ``admit_ms``: the decode engine validating the handover and copying the KV in (its
  ``handover_admit_us`` counter, read at the state change that follows the admission);
- ``put_ms``/``get_ms`` (with Ray): :func:`~replicas.handover_transport.send_handover` and
  :func:`~replicas.handover_transport.receive_handover`, the deployment's own transport, through
  a local single-node Ray (driver to driver: serialisation and the object store, no network);
- ``e2e_ms``: from the first token reaching the prefill engine's sink to the decode engine's
  admission (gather, the handover output, put/get, the decode inbox, the admission).

Each length first runs one untimed request (allocator warm-up). Percentiles are nearest-rank: with
10 repeats, p99 is the slowest repeat. The cost model is a fixed one with
a 60 s SLO: scheduling plays no part in a lone request's handover.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

if TYPE_CHECKING:
    from replicas.engine import ReplicaEngine
    from replicas.engine_stats import EngineStats
    from replicas.handover_transport import HandoverStats

PARTS = ("gather_ms", "admit_ms", "put_ms", "get_ms", "e2e_ms")
_TIMEOUT_S = 300.0


@dataclasses.dataclass(frozen=True)
class HandoverBenchConfig:
    """What to measure: prompt lengths (tokens), repeats per length, and the engines' settings."""

    lengths: tuple[int, ...] = (32, 128, 512, 2048)
    repeats: int = 10
    ray: bool = True  # put/get through Ray's object store (Ray must be initialised by the caller)
    dtype: str = "float32"
    device: str = "cpu"
    kv_cache_bytes: int = 512 << 20
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 1 or self.repeats < 1:
            raise ValueError(f"bench handover: positive lengths and repeats needed, got {self.lengths}, "
                             f"{self.repeats}")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 1]) as :class:`~replicas.handover_transport.HandoverStats`."""
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else 0.0


def build_engine_pair(model_dir: Path, cfg: HandoverBenchConfig, *, prefix_caching: bool = True
                      ) -> dict[str, ReplicaEngine]:
    """A ``prefill`` and a ``decode`` engine (not started) sharing one loaded model and tokenizer."""
    from replicas.engine import ReplicaEngine
    from replicas.engine_config import EngineConfig
    from replicas.model.decoder import DecoderModel
    from replicas.model.tokenizer import Tokenizer
    from replicas.scheduler.cost_model import CostModel

    model = DecoderModel.load(str(model_dir), dtype=cfg.dtype, device=cfg.device)
    tokenizer = Tokenizer.from_dir(str(model_dir))
    cost = CostModel.from_coefficients(1e-3, 2e-5, max_profiled_tokens=max(8192, max(cfg.lengths) * 2))
    engines: dict[str, ReplicaEngine] = {}
    for role in ("prefill", "decode"):
        config = EngineConfig(model=str(model_dir), role=role, dtype=cfg.dtype, device=cfg.device,
                              kv_cache_bytes=cfg.kv_cache_bytes, enable_prefix_caching=prefix_caching)
        engines[role] = ReplicaEngine(config, model=model, tokenizer=tokenizer, cost_model=cost)
    return engines


class _Pair:
    """A prefill engine and a decode engine; the decode engine's admissions are timestamped."""

    def __init__(self, model_dir: Path, cfg: HandoverBenchConfig) -> None:
        self.engines = build_engine_pair(model_dir, cfg)
        self.prefill, self.decode = self.engines["prefill"], self.engines["decode"]
        self.admissions: list[tuple[float, int]] = []  # (perf_counter, handover_admit_us so far)
        self._admitted = threading.Condition()
        self._seen = 0
        self.decode.on_state_change = self._on_decode_state
        for engine in self.engines.values():
            engine.start()

    def _on_decode_state(self, stats: EngineStats) -> None:  # runs on the decode engine's loop thread
        now = time.perf_counter()
        if stats.counters["handovers_in"] > self._seen:
            with self._admitted:
                self._seen = stats.counters["handovers_in"]
                self.admissions.append((now, stats.counters["handover_admit_us"]))
                self._admitted.notify_all()

    def wait_admissions(self, n: int) -> None:
        """Block until the decode engine has admitted ``n`` handovers in all."""
        with self._admitted:
            if not self._admitted.wait_for(lambda: len(self.admissions) >= n, _TIMEOUT_S):
                raise RuntimeError(f"the decode engine admitted {len(self.admissions)} handovers, {n} expected")

    def shutdown(self) -> None:
        """Stop both engines."""
        for engine in self.engines.values():
            engine.shutdown()


def _prompt(length: int, key: str, vocab: int) -> list[int]:
    """A seeded random prompt: two prompts with different keys share no block in practice."""
    rng = random.Random(key)
    return [rng.randrange(3, vocab) for _ in range(length)]


def _one(pair: _Pair, rid: str, prompt: list[int], transport: HandoverStats | None,
         loop: asyncio.AbstractEventLoop | None) -> dict[str, float]:
    """Run one request through prefill, the handover (and Ray) and decode; its costs."""
    from replicas.engine_types import RequestOutput
    from replicas.handover_transport import receive_handover, send_handover
    from replicas.sampling_params import SamplingParams
    from replicas.scheduler.request import Request

    first: list[float] = []
    handed: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
    done: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()

    def on_prefill(out: RequestOutput) -> None:
        if out.token_ids and not first:
            first.append(time.perf_counter())
        if out.finish_reason is not None:
            handed.put(out)

    def on_decode(out: RequestOutput) -> None:
        if out.finish_reason is not None:
            done.put(out)

    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    hits_before = pair.prefill.kv.allocator.hit_tokens
    cached_before = pair.decode.counters["handover_cached_tokens"]
    n = len(pair.admissions)
    pair.prefill.add_request(Request(rid, prompt, arrival_s=pair.prefill.clock(), ttft_slo_s=60.0), params,
                             on_prefill)
    out = handed.get(timeout=_TIMEOUT_S)
    if out.finish_reason != "handover":
        raise RuntimeError(f"{rid}: the prefill engine ended with {out.finish_reason!r} ({out.error})")
    h, row = out.handover, {}
    if transport is not None and loop is not None:
        ticket = send_handover(h, transport)
        h, timing = loop.run_until_complete(receive_handover(ticket, ticket["box"], transport))
        row.update(put_ms=timing["put_ms"], get_ms=timing["get_ms"])
    pair.decode.add_handover(h, on_decode)
    pair.wait_admissions(n + 1)
    last = done.get(timeout=_TIMEOUT_S)
    if last.finish_reason != "length":
        raise RuntimeError(f"{rid}: the decode engine ended with {last.finish_reason!r} ({last.error})")
    admitted_at, admit_us = pair.admissions[n]
    before_us = pair.admissions[n - 1][1] if n else 0
    row.update(bytes=float(h.nbytes), gather_ms=h.gather_s * 1e3, admit_ms=(admit_us - before_us) / 1e3,
               e2e_ms=(admitted_at - first[0]) * 1e3,
               prefix_hit_tokens=float(pair.prefill.kv.allocator.hit_tokens - hits_before
                                       + pair.decode.counters["handover_cached_tokens"] - cached_before))
    return row


def _summarise(length: int, block_size: int, samples: list[dict[str, float]]) -> dict[str, Any]:
    """One length's row: bytes, blocks, prefix hits and p50/p99 of each part measured."""
    row: dict[str, Any] = {"length": length, "blocks": -(-length // block_size), "n": len(samples),
                           "bytes": int(samples[0]["bytes"]),
                           "prefix_hit_tokens": int(sum(s["prefix_hit_tokens"] for s in samples))}
    if len({s["bytes"] for s in samples}) != 1:
        raise RuntimeError(f"length {length}: handover bytes vary across repeats")
    for part in PARTS:
        values = [s[part] for s in samples if part in s]
        if values:
            row[part] = {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99)}
    return row


def run_handover_bench(model_dir: Path, cfg: HandoverBenchConfig) -> dict[str, Any]:
    """Measure every length ``cfg.repeats`` times; the report (rows per length, samples, KV state)."""
    transport: HandoverStats | None = None
    loop: asyncio.AbstractEventLoop | None = None
    if cfg.ray:
        import ray

        from replicas.handover_transport import HandoverStats as Stats

        if not ray.is_initialized():
            raise RuntimeError("bench handover with Ray: initialise Ray first (the CLI starts a local one)")
        transport, loop = Stats(), asyncio.new_event_loop()
    pair = _Pair(model_dir, cfg)
    try:
        spec, vocab = pair.decode.kv.spec, pair.decode.vocab_size
        samples: dict[int, list[dict[str, float]]] = {}
        with tqdm(total=len(cfg.lengths) * (cfg.repeats + 1), desc="bench handover", unit="req") as bar:
            for length in cfg.lengths:
                _one(pair, f"warm-{length}", _prompt(length, f"{cfg.seed}/warm/{length}", vocab), transport, loop)
                bar.update()
                samples[length] = []
                for i in range(cfg.repeats):
                    prompt = _prompt(length, f"{cfg.seed}/{length}/{i}", vocab)
                    samples[length].append(_one(pair, f"h{length}-{i}", prompt, transport, loop))
                    bar.update()
        kv = {role: {"free_blocks": e.kv.allocator.num_free_blocks, "num_blocks": e.kv.allocator.num_blocks,
                     "cached_blocks": e.kv.allocator.num_cached_blocks, "live": len(e.live)}
              for role, e in pair.engines.items()}
        return {
            "model": pair.decode.model_name, "config": dataclasses.asdict(cfg),
            "kv_spec": {"block_size": spec.block_size, "num_layers": spec.num_layers,
                        "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "dtype": str(spec.dtype),
                        "bytes_per_block": spec.bytes_per_block},
            "compute_threads": pair.decode.compute_threads,
            "rows": [_summarise(length, spec.block_size, samples[length]) for length in cfg.lengths],
            "samples": {str(length): rows for length, rows in samples.items()},
            "kv_end": kv, "transport": transport.summary() if transport is not None else None,
        }
    finally:
        pair.shutdown()
        if loop is not None:
            loop.close()


def format_table(report: dict[str, Any]) -> str:
    """The report's rows as a plain-text table (ms as p50/p99)."""
    parts = [p for p in PARTS if any(p in row for row in report["rows"])]
    head = ["tokens", "blocks", "bytes", *(f"{p[:-3]} p50/p99 ms" for p in parts)]
    lines = [head]
    for row in report["rows"]:
        lines.append([str(row["length"]), str(row["blocks"]), f"{row['bytes']:,}",
                      *(f"{row[p]['p50']:.2f} / {row[p]['p99']:.2f}" for p in parts)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)
