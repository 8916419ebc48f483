"""The router's own estimate of each replica's load while Redis is unreachable.

:class:`LocalLoadEstimator` keeps the prefill work this router dispatched per replica and drains it
at wall-clock speed in EDF order, so routing still spreads load without the replicas' published
state (:mod:`router.request_router` falls back to it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from router.placement import ReplicaLoad

OVERDUE_S = 0.01  # work still charged for a request past its prediction


class LocalLoadEstimator:
    """Fallback while Redis is away: per replica, the work this router itself dispatched, drained at
    1 s of work per s of wall time in EDF order (as the replica runs it), so routing still spreads
    load.  Blind to other routers' work; a request leaves on :meth:`completed`.

    A request that outlives its prediction (the replica runs slower than profiled, or it is still
    decoding) is not taken for gone: it keeps :data:`OVERDUE_S` of work until it completes, so an
    idle replica still ranks before one whose long prefill overran.  One never completed (a lost
    callback) leaves ``overdue_ttl_s`` after its prediction ran out."""

    def __init__(self, overdue_ttl_s: float = 60.0) -> None:
        self._work: dict[str, dict[str, list[float]]] = {}  # replica -> id -> [deadline, remaining s, overdue since]
        self._where: dict[str, str] = {}  # request id -> replica
        self._drained_at: dict[str, float] = {}
        self._overdue_ttl_s = overdue_ttl_s

    def dispatched(self, replica_id: str, request_id: str, predicted_s: float, deadline: float, now: float) -> None:
        """Record ``predicted_s`` seconds of prefill dispatched to ``replica_id`` at ``now``."""
        self.completed(request_id)
        self._drain(replica_id, now)
        self._work.setdefault(replica_id, {})[request_id] = [deadline, max(predicted_s, 0.0), math.inf]
        self._where[request_id] = replica_id

    def completed(self, request_id: str) -> None:
        """Forget a request (finished, failed or cancelled); unknown ids are ignored."""
        rid = self._where.pop(request_id, None)
        if rid is not None:
            self._work.get(rid, {}).pop(request_id, None)

    def loads(self, replica_ids: Iterable[str], now: float) -> list[ReplicaLoad]:
        """Estimated loads of ``replica_ids`` at ``now`` (fresh, known: usable by every policy)."""
        out = []
        for rid in replica_ids:
            self._drain(rid, now)
            work = self._work.get(rid, {}).values()
            out.append(ReplicaLoad(rid, queued=tuple((d, max(s, OVERDUE_S)) for d, s, _ in work)))
        return out

    def _drain(self, replica_id: str, now: float) -> None:
        elapsed = now - self._drained_at.get(replica_id, now)
        self._drained_at[replica_id] = max(now, self._drained_at.get(replica_id, now))
        work = self._work.get(replica_id)
        if not work or elapsed <= 0.0:
            return
        for req_id, item in sorted(work.items(), key=lambda kv: kv[1][0]):
            if item[1] <= 0.0:  # overdue: waits for completed(), or its TTL
                if now - item[2] > self._overdue_ttl_s:
                    del work[req_id]
                    self._where.pop(req_id, None)
                continue
            done = min(item[1], elapsed)
            item[1] -= done
            elapsed -= done
            if item[1] <= 0.0:
                item[2] = now - elapsed  # when its prediction ran out
