"""Whether a P/D handover overlaps with the prefill engine's next prefill (``bench handover --overlap``).

``flowprefill bench handover --overlap [--lengths 512,2048] [--repeats 5] [--no-ray] [--json FILE]``

On the serving path (:mod:`replicas.deployment`) a ``prefill`` engine gathers a request's KV on its
loop thread right after the first token (:func:`~replicas.engine_handover.build_handover`: serial
with its compute by construction, reported here as ``gather_ms``), ends the stream with the
handover, and goes on to its next prefill; the replica's asyncio event-loop thread then puts the
handover in Ray's object store (:func:`~replicas.handover_transport.send_handover`), the decode
replica awaits it (:func:`~replicas.handover_transport.receive_handover`) and its engine copies the
KV in (the admission, :func:`~replicas.handover.scatter_kv`). That transfer is what can overlap with
the next prefill. Per repeat, with the same prompt and the handover of the previous prefill of the
same length, three variants run in a rotating order:

- ``idle``: the next prefill alone (the handover is moved after it);
- ``handover``: the handover moves on an event-loop thread while the next prefill computes;
- ``serial``: the handover is moved first, then the next prefill is submitted.

``next_prefill_ms`` runs from the moment the handover is ready (and the next prompt submitted, in
``idle`` and ``handover``) to the next prompt's first token, so ``serial - idle`` is the transfer's
cost on the critical path and ``overlap = (serial - handover) / (serial - idle)``, clamped to [0, 1],
is the part of it hidden (1: fully hidden, 0: as slow as serial; None where ``serial <= idle``, i.e.
nothing measurable to hide), from the three variants' medians; ``paired_overlap_fraction`` is the
median of each repeat's own fraction (its three variants ran back to back: less exposed to load
that drifts over the run). ``transfer_ms`` is the handover's transfer alone (put + get + admission:
``idle``'s and ``serial``'s), ``in_flight_ms`` the same transfer while the prefill computes.

Everything runs in this process: the transfer on a thread running an asyncio loop (the replica's
event loop), the admission on the decode engine's compute thread. The decode engine's loop is not
started, so no decode step follows an admission (each admitted request is aborted after its
variant): only the handover itself competes with the prefill. Prefix caching is off on both
engines, so the same prompt costs the same in every variant and no admission attaches cached blocks.
In a deployment the decode side is another process (no GIL shared with the prefill engine); on one
node it still shares the cores.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from bench.handover_bench import HandoverBenchConfig, _prompt, build_engine_pair

if TYPE_CHECKING:
    from replicas.engine_types import RequestOutput
    from replicas.handover import KVHandover

VARIANTS = ("idle", "handover", "serial")
_TIMEOUT_S = 300.0


def overlap_fraction(idle_ms: float, handover_ms: float, serial_ms: float) -> float | None:
    """``(serial - handover) / (serial - idle)`` clamped to [0, 1]; None when ``serial <= idle``."""
    if serial_ms - idle_ms <= 0:
        return None
    return min(max((serial_ms - handover_ms) / (serial_ms - idle_ms), 0.0), 1.0)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


class _Job:
    """One prompt on the prefill engine: when its first token came, and its final output (the handover)."""

    def __init__(self) -> None:
        self.first_at: float | None = None
        self.final: RequestOutput | None = None
        self.done = threading.Event()

    def sink(self, out: RequestOutput) -> None:  # runs on the prefill engine's loop thread
        if out.token_ids and self.first_at is None:
            self.first_at = time.perf_counter()
        if out.finish_reason is not None:
            self.final = out
            self.done.set()

    def handover(self, rid: str) -> KVHandover:
        """Wait for the prompt's end; its handover."""
        if not self.done.wait(_TIMEOUT_S) or self.final is None or self.first_at is None:
            raise RuntimeError(f"{rid}: the prefill engine did not finish within {_TIMEOUT_S:.0f} s")
        if self.final.finish_reason != "handover" or self.final.handover is None:
            raise RuntimeError(f"{rid}: the prefill engine ended with {self.final.finish_reason!r} "
                               f"({self.final.error})")
        return self.final.handover


class _Rig:
    """A started prefill engine, a decode engine driven on its compute thread, an event-loop thread."""

    def __init__(self, model_dir: Path, cfg: HandoverBenchConfig) -> None:
        from replicas.handover_transport import HandoverStats

        self.engines = build_engine_pair(model_dir, cfg, prefix_caching=False)
        self.prefill, self.decode = self.engines["prefill"], self.engines["decode"]
        self.prefill.start()  # the decode engine's loop stays off: admissions run via run_on_compute_thread
        self.transport = HandoverStats() if cfg.ray else None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="bench-event-loop", daemon=True)
        self._thread.start()

    def submit(self, rid: str, prompt: list[int]) -> _Job:
        """Queue ``prompt`` on the prefill engine (greedy, two tokens: it hands over after the first)."""
        from replicas.sampling_params import SamplingParams
        from replicas.scheduler.request import Request

        job = _Job()
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        self.prefill.add_request(Request(rid, prompt, arrival_s=self.prefill.clock(), ttft_slo_s=60.0), params,
                                 job.sink)
        return job

    async def _transfer(self, h: KVHandover) -> dict[str, float]:
        """Move ``h`` as the serving path does: put and get through Ray (when on), then the decode
        engine's admission on its compute thread. Runs on the event-loop thread; its timings (ms)."""
        from replicas.handover_transport import receive_handover, send_handover

        started = time.perf_counter()
        row: dict[str, float] = {}
        if self.transport is not None:
            ticket = send_handover(h, self.transport)  # a blocking ray.put on the loop, as ReplicaServer.generate
            h, timing = await receive_handover(ticket, ticket["box"], self.transport)
            row.update(put_ms=timing["put_ms"], get_ms=timing["get_ms"])
        admit_from = time.perf_counter()
        outs: list[RequestOutput] = []
        self.decode.add_handover(h, outs.append)
        self.decode.run_on_compute_thread(self.decode._drain_inbox)  # the loop's own step: validate + scatter
        done = time.perf_counter()
        if outs or h.request_id not in self.decode.live:
            raise RuntimeError(f"{h.request_id}: the decode engine refused the handover: "
                               f"{outs[-1].error if outs else '?'}")
        row.update(admit_ms=(done - admit_from) * 1e3, transfer_ms=(done - started) * 1e3)
        return row

    def transfer_async(self, h: KVHandover) -> Future[dict[str, float]]:
        """Start moving ``h`` on the event-loop thread; a future of its timings."""
        return asyncio.run_coroutine_threadsafe(self._transfer(h), self.loop)

    def release(self, rid: str) -> None:
        """Free an admitted handover's KV on the decode engine (its decode is not measured)."""
        self.decode.abort(rid)
        self.decode.run_on_compute_thread(self.decode._drain_inbox)

    def measure(self, variant: str, h: KVHandover, rid: str, prompt: list[int]) -> tuple[dict[str, float], KVHandover]:
        """One variant: moving ``h`` and prefilling ``prompt``; its timings and the prompt's own handover."""
        t0 = time.perf_counter()
        if variant == "serial":
            moved = self.transfer_async(h).result(_TIMEOUT_S)
        elif variant == "handover":
            flight = self.transfer_async(h)
        job = self.submit(rid, prompt)
        nxt = job.handover(rid)
        assert job.first_at is not None
        row = {"next_prefill_ms": (job.first_at - t0) * 1e3, "gather_ms": h.gather_s * 1e3}
        if variant == "handover":
            moved = flight.result(_TIMEOUT_S)
        elif variant == "idle":
            moved = self.transfer_async(h).result(_TIMEOUT_S)
        self.release(h.request_id)
        return {**row, **moved}, nxt

    def shutdown(self) -> None:
        """Stop the engines and the event-loop thread."""
        for engine in self.engines.values():
            engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10.0)
        self.loop.close()


def _summarise(length: int, spec: Any, repeats: list[dict[str, Any]], nbytes: int) -> dict[str, Any]:  # noqa: ANN401
    """One length's row: each variant's next-prefill spread, the transfer's, and the overlap fraction."""
    blocks = -(-length // spec.block_size)
    nxt = {v: spread([r[v]["next_prefill_ms"] for r in repeats]) for v in VARIANTS}
    alone = [r[v]["transfer_ms"] for r in repeats for v in ("idle", "serial")]
    parts = {p: statistics.median([r[v][p] for r in repeats for v in ("idle", "serial")])
             for p in ("put_ms", "get_ms", "admit_ms") if p in repeats[0]["idle"]}
    for r in repeats:
        r["overlap_fraction"] = overlap_fraction(*(r[v]["next_prefill_ms"] for v in VARIANTS))
    paired = [r["overlap_fraction"] for r in repeats if r["overlap_fraction"] is not None]
    return {
        "length": length, "blocks": blocks, "bytes": nbytes, "bytes_per_token": nbytes // (blocks * spec.block_size),
        "n": len(repeats), "next_prefill_ms": nxt, "transfer_ms": spread(alone),
        "in_flight_ms": spread([r["handover"]["transfer_ms"] for r in repeats]), "parts_ms": parts,
        "gather_ms": spread([r[v]["gather_ms"] for r in repeats for v in VARIANTS]),
        "overlap_fraction": overlap_fraction(*(nxt[v]["median"] for v in VARIANTS)),
        "paired_overlap_fraction": statistics.median(paired) if paired else None, "repeats": repeats,
    }


def run_overlap_bench(model_dir: Path, cfg: HandoverBenchConfig, progress: bool = True) -> dict[str, Any]:
    """Every length ``cfg.repeats`` times, the three variants interleaved; the report (rows per length)."""
    if cfg.ray:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("bench handover --overlap with Ray: initialise Ray first (the CLI starts a local one)")
    rig = _Rig(model_dir, cfg)
    try:
        spec, vocab = rig.prefill.kv.spec, rig.prefill.vocab_size
        rows = []
        with tqdm(total=len(cfg.lengths) * (3 * cfg.repeats + 2), desc="bench handover --overlap", unit="prefill",
                  disable=not progress) as bar:
            for length in cfg.lengths:
                warm = _prompt(length, f"{cfg.seed}/overlap-warm/{length}", vocab)
                h = rig.submit(f"o{length}-warm", warm).handover(f"o{length}-warm")
                bar.update()
                _, h = rig.measure("serial", h, f"o{length}-warm2", warm)  # warms put/get and the admission
                bar.update()
                repeats: list[dict[str, Any]] = []
                for i in range(cfg.repeats):
                    prompt = _prompt(length, f"{cfg.seed}/overlap/{length}/{i}", vocab)
                    order = VARIANTS[i % 3:] + VARIANTS[:i % 3]
                    rep: dict[str, Any] = {}
                    for variant in order:
                        rep[variant], h = rig.measure(variant, h, f"o{length}-{i}-{variant}", prompt)
                        bar.update()
                    repeats.append(rep)
                rows.append(_summarise(length, spec, repeats, h.nbytes))
        kv = {role: {"free_blocks": e.kv.allocator.num_free_blocks, "num_blocks": e.kv.allocator.num_blocks,
                     "hit_tokens": e.kv.allocator.hit_tokens, "live": len(e.live)} for role, e in rig.engines.items()}
        return {
            "model": rig.prefill.model_name, "config": dataclasses.asdict(cfg), "variants": list(VARIANTS),
            "kv_spec": {"block_size": spec.block_size, "num_layers": spec.num_layers, "num_kv_heads": spec.num_kv_heads,
                        "head_dim": spec.head_dim, "dtype": str(spec.dtype), "bytes_per_block": spec.bytes_per_block},
            "compute_threads": rig.prefill.compute_threads, "rows": rows, "kv_end": kv,
            "transport": rig.transport.summary() if rig.transport is not None else None,
        }
    finally:
        rig.shutdown()


def format_overlap_table(report: dict[str, Any]) -> str:
    """The report's rows as a plain-text table: ms as median [min, max]."""
    def cell(s: dict[str, float]) -> str:
        return f"{s['median']:.1f} [{s['min']:.1f}, {s['max']:.1f}]"

    def frac(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    head = ["tokens", "bytes", *(f"next, {v} ms" for v in VARIANTS), "transfer ms", "in flight ms", "gather ms",
            "overlap", "paired"]
    lines = [head]
    for row in report["rows"]:
        lines.append([str(row["length"]), f"{row['bytes']:,}", *(cell(row["next_prefill_ms"][v]) for v in VARIANTS),
                      cell(row["transfer_ms"]), cell(row["in_flight_ms"]), cell(row["gather_ms"]),
                      frac(row["overlap_fraction"]), frac(row["paired_overlap_fraction"])])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)
