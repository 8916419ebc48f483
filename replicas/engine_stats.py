"""The queue-state snapshot every engine kind publishes after each event, as one typed record.

The replica deployment turns an :class:`EngineStats` into the Redis queue state
(:meth:`EngineStats.queue_state`), feeds its pending work to autoscaling, and returns it from its
``stats`` method as a dict (:meth:`EngineStats.to_dict`), which :meth:`EngineStats.from_dict`, the
one parser, validates field by field where it is read back (benchmarks, tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from replicas.scheduler.stats import QueueEntry, QueueStats
from state.fields import FieldError, FieldReader
from state.schema import REPLICA_ROLES, PrefixSummary, QueuedRequest, ReplicaQueueState


class StatsError(FieldError):
    """Invalid engine stats; ``field`` names the field (``stats.running[0].deadline``)."""


@dataclass(frozen=True)
class EngineStats:
    """One engine's state: unfinished prefills by state, predicted work, KV memory and counters.

    ``updated_at`` and the entries' deadlines are epoch seconds (:mod:`state.clock`). ``counters``
    are the engine's running totals (preemptions, prefill batches, decode steps, rejections,
    errors, ...); ``details`` holds what only one engine kind reports (the scheduler's pass and
    outcome counts, vLLM's URL and process group), for dashboards and tests: the serving path
    reads none of it.
    """

    model: str
    updated_at: float
    policy: str = ""
    waiting: tuple[QueueEntry, ...] = ()
    running: tuple[QueueEntry, ...] = ()
    suspended: tuple[QueueEntry, ...] = ()
    running_remaining_s: float = 0.0
    pending_work_s: float = 0.0
    kv_free_tokens: int = 0
    kv_total_tokens: int = 0
    decoding: int = 0
    preemptions: int = 0
    cost_scale: float = 1.0
    counters: Mapping[str, int] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)
    prefix: PrefixSummary | None = None  # what the prefix cache holds, for placement (None: no prefix cache)
    role: str = "colocated"  # colocated | prefill | decode (replicas/handover.py)
    max_decoding: int = 0  # sequences one decode step takes at most (0: unknown)
    # decode pace, for the decode router: smoothed seconds between decode steps of a busy batch, the
    # decoding streams' time per output token now (0: none decoding) and their tightest TPOT SLO (0: none)
    decode_step_interval_s: float = 0.0
    tpot_s: float = 0.0
    tpot_target_s: float = 0.0

    @classmethod
    def from_queue(cls, queue: QueueStats, *, model: str, updated_at: float, **engine: Any) -> EngineStats:  # noqa: ANN401
        """An engine's stats around its scheduler's :class:`QueueStats`; ``engine`` sets the other fields
        and overrides the queue's (e.g. the engine's own count of preemptions it carried out)."""
        details = {"suspended_batches": queue.suspended_batches, "running_batch_id": queue.running_batch_id,
                   "finished": queue.finished, "aborted": queue.aborted, "rejected": queue.rejected,
                   "scheduling_passes": queue.scheduling_passes, "memory_blocked": queue.memory_blocked,
                   **engine.pop("details", {})}
        values: dict[str, Any] = {
            "policy": queue.policy, "waiting": queue.waiting, "running": queue.running, "suspended": queue.suspended,
            "running_remaining_s": queue.running_remaining_s, "pending_work_s": queue.pending_work_s,
            "decoding": queue.decoding, "preemptions": queue.preemptions, "cost_scale": queue.cost_scale,
        }
        return cls(model=model, updated_at=updated_at, details=details, **{**values, **engine})

    @property
    def counts(self) -> dict[str, int]:
        """Requests per state."""
        return {"waiting": len(self.waiting), "running": len(self.running), "suspended": len(self.suspended),
                "decoding": self.decoding}

    def queue_state(self, replica_id: str, engine_kind: str, seq: int, updated_at: float) -> ReplicaQueueState:
        """The Redis queue-state record of this snapshot (running, then suspended, then waiting)."""
        entries = [QueuedRequest(e.request_id, status, e.deadline, e.predicted_remaining_s, e.remaining_tokens)
                   for status, rows in (("running", self.running), ("suspended", self.suspended),
                                        ("waiting", self.waiting)) for e in rows]
        return ReplicaQueueState(
            replica_id=replica_id, engine_kind=engine_kind, model=self.model, updated_at=updated_at, seq=seq,
            requests=tuple(entries), running_remaining_s=self.running_remaining_s,
            kv_free_tokens=self.kv_free_tokens, preemptions=self.preemptions, cost_scale=self.cost_scale,
            prefix_version=self.prefix.version if self.prefix is not None else 0,
            prefix_hit_tokens=int(self.counters.get("prefix_hit_tokens", 0)),
            prefix_queried_tokens=int(self.counters.get("prefix_queried_tokens", 0)),
            prefix_evictions=int(self.counters.get("prefix_evictions", 0)),
            role=self.role, decoding=self.decoding, kv_total_tokens=self.kv_total_tokens,
            max_decoding=self.max_decoding, decode_step_interval_s=self.decode_step_interval_s,
            tpot_s=self.tpot_s, tpot_target_s=self.tpot_target_s,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what :meth:`from_dict` parses), with ``counts`` added."""
        out = asdict(self)
        out["counters"], out["details"] = dict(self.counters), dict(self.details)
        if self.prefix is not None:
            out["prefix"]["names"] = list(self.prefix.names)
        for name in ("waiting", "running", "suspended"):  # JSON arrays
            out[name] = list(out[name])
        return {**out, "counts": self.counts}

    @classmethod
    def from_dict(cls, data: object, where: str = "stats") -> EngineStats:
        """Parse and validate; a bad field raises :class:`StatsError` naming ``where.field``."""
        r = FieldReader(data, lambda name, message: StatsError(f"{where}.{name}" if name else where, message))

        def entries(name: str) -> tuple[QueueEntry, ...]:
            out = []
            for i, item in enumerate(r.array(name, [])):
                e = r.item(name, i, item)
                out.append(QueueEntry(e.text("request_id", non_empty=True), e.number("deadline"),
                                      e.number("predicted_remaining_s", minimum=0.0),
                                      e.integer("remaining_tokens", 0, minimum=0), e.number("slack_s", None)))
            return tuple(out)

        counters = r.obj("counters", {})
        bad = [k for k, v in counters.items() if isinstance(v, bool) or not isinstance(v, int)]
        if bad:
            raise r.fail(f"counters.{bad[0]}", f"expected an integer, got {counters[bad[0]]!r}")
        return cls(
            model=r.text("model"), updated_at=r.number("updated_at"), policy=r.text("policy", ""),
            waiting=entries("waiting"), running=entries("running"), suspended=entries("suspended"),
            running_remaining_s=r.number("running_remaining_s", 0.0, minimum=0.0),
            pending_work_s=r.number("pending_work_s", 0.0, minimum=0.0),
            kv_free_tokens=r.integer("kv_free_tokens", 0, minimum=0),
            kv_total_tokens=r.integer("kv_total_tokens", 0, minimum=0),
            decoding=r.integer("decoding", 0, minimum=0), preemptions=r.integer("preemptions", 0, minimum=0),
            cost_scale=r.number("cost_scale", 1.0, positive=True), counters=counters, details=r.obj("details", {}),
            prefix=None if r.data.get("prefix") is None else _prefix(r.nested("prefix")),
            role=r.text("role", "colocated", choices=REPLICA_ROLES),
            max_decoding=r.integer("max_decoding", 0, minimum=0),
            decode_step_interval_s=r.number("decode_step_interval_s", 0.0, minimum=0.0),
            tpot_s=r.number("tpot_s", 0.0, minimum=0.0), tpot_target_s=r.number("tpot_target_s", 0.0, minimum=0.0),
        )


def _prefix(r: FieldReader) -> PrefixSummary:
    names = r.array("names", [])
    if not all(isinstance(n, str) for n in names):
        raise r.fail("names", "expected a list of strings")
    return PrefixSummary(r.integer("version", minimum=0), r.integer("block_tokens", minimum=1), r.text("salt"),
                         tuple(names))
