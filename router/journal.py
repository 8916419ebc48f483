"""The ingress's journal of accepted requests in Redis: the ledger that proves nothing is lost.

Every request the ingress accepts (it passed validation and access checks) is written to the
``journal`` hash (:mod:`state.schema`, key 4) with everything needed to run it again, under
the placeholder replica ``unassigned``; when the first output names the replica serving it, the
entry moves to that replica's set (status ``running``); when a replica fails before the first
output and the dispatcher sends the request again, it moves back (``accepted``); when the client
has its answer, its error, or has gone away, the entry is removed. So the hash holds the accepted
requests without a terminal answer, and after load stops it must be empty:
``tests/test_reliability.py`` checks that after killing replicas and restarting Redis.

The journal is write-behind, off the request path: each change only updates this ingress's
pending batch, and a background task writes the batch in one pipelined round trip every
``flush_interval_s`` (50 ms). A request accepted and answered within one interval never reaches
Redis at all (its put and delete cancel out), so short requests cost nothing; the ledger lags the
ingress by at most one interval (requests accepted in the last 50 ms before an ingress crash are
not in it). The ingress is the only writer of its entries, so no read or compare-and-set is
needed. While Redis is away the batch stays pending and is retried every interval (bounded by
``max_pending``; beyond it new entries are not journalled and are counted); every failed flush is
counted in ``write_failures`` and logged once per outage; ``GET /v1/router/stats`` shows it all.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import Any

from replicas.replica_request import ReplicaRequest
from state.client import ClusterState, StateUnavailable
from state.schema import JournalEntry, SchemaError

log = logging.getLogger("ray.serve")
UNASSIGNED = "unassigned"  # replica id of an entry the request router has not placed yet
FLUSH_INTERVAL_S = 0.05


@dataclass
class _Slot:
    """One request's entry: what Redis should hold (``entry``, or nothing once ``deleted``) and
    which replica set holds it there now (``written``; None: not in Redis)."""

    entry: JournalEntry
    written: str | None = None
    deleted: bool = False


def replica_request_from_journal(entry: JournalEntry) -> ReplicaRequest:
    """The request a journal entry holds, ready to send to a replica again (validated field by field)."""
    return ReplicaRequest.from_dict({**entry.params, "request_id": entry.request_id, "arrival_s": entry.arrival,
                                     "slo_class": entry.slo_class, "prompt_token_ids": entry.prompt_token_ids},
                                    where=f"journal[{entry.request_id}]")


class RequestJournal:
    """Write-behind journal for one ingress; a no-op without a Redis URL."""

    def __init__(self, state: ClusterState | None, flush_interval_s: float = FLUSH_INTERVAL_S,
                 max_pending: int = 100_000) -> None:
        self.state = state
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self.write_failures = 0
        self.not_journalled = 0
        self.open_requests = 0
        self._dirty: dict[str, _Slot] = {}  # slots Redis does not reflect yet, in change order
        self._wake: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._down = False

    @classmethod
    def from_url(cls, redis_url: str | None, namespace: str) -> RequestJournal:
        """A journal on ``redis_url`` (None: disabled)."""
        return cls(ClusterState(redis_url, namespace=namespace) if redis_url else None)

    def open(self, payload: ReplicaRequest) -> JournalRecord:
        """Journal the accepted request ``payload`` (see :func:`router.payload.build_payload`)."""
        return JournalRecord(self, payload)

    def stats(self) -> dict[str, Any]:
        """Counters for ``/v1/router/stats``."""
        return {"enabled": self.state is not None, "open_requests": self.open_requests,
                "pending_writes": len(self._dirty), "write_failures": self.write_failures,
                "not_journalled": self.not_journalled}

    async def flush(self) -> bool:
        """Write the pending batch now in one round trip; False (batch kept) if Redis failed."""
        if self.state is None or not self._dirty:
            return True
        batch = [(rid, slot, slot.entry, slot.deleted) for rid, slot in self._dirty.items()]
        self._dirty.clear()
        puts = [(entry, slot.written) for _, slot, entry, deleted in batch if not deleted]
        deletes = [(rid, slot.written) for rid, slot, _, deleted in batch if deleted and slot.written is not None]
        try:
            await self.state.journal_apply(puts, deletes)
        except (StateUnavailable, SchemaError) as exc:
            self.write_failures += 1
            if not self._down:
                log.warning("request journal: write failed (%s); requests keep flowing, writes retry", exc)
            self._down = True
            for rid, slot, _, _ in batch:  # keep what changed meanwhile (newer) in front of the retry
                self._dirty.setdefault(rid, slot)
            return False
        if self._down:
            log.warning("request journal: Redis writes succeed again")
        self._down = False
        for rid, slot, entry, deleted in batch:
            slot.written = None if deleted else entry.replica_id
            if (slot.deleted != deleted or slot.entry is not entry) and rid not in self._dirty:
                self._dirty[rid] = slot  # changed while the write was in flight (and dropped as unwritten)
        return True

    def _changed(self, request_id: str, slot: _Slot) -> None:
        self._dirty[request_id] = slot
        if self._flusher is None or self._flusher.done():
            self._wake = asyncio.Event()
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        assert self._wake is not None
        self._wake.set()

    async def _flush_loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.flush_interval_s)  # gather a batch
            self._wake.clear()
            if not await self.flush() or self._dirty:
                self._wake.set()  # retry, or write what changed during the flush, next interval


class JournalRecord:
    """One accepted request's journal entry; call :meth:`assigned`, :meth:`retrying`, :meth:`close`."""

    def __init__(self, journal: RequestJournal, payload: ReplicaRequest) -> None:
        self.journal = journal
        self.request_id = payload.request_id
        self.closed = False
        self.slot: _Slot | None = None
        journal.open_requests += 1
        if journal.state is None:
            return
        if len(journal._dirty) >= journal.max_pending:
            journal.not_journalled += 1
            return
        wire = payload.to_dict()
        params = {key: wire[key] for key in ("sampling", "ttft_slo_s", "tpot_slo_s", "priority", "sheddable")}
        self.slot = _Slot(JournalEntry(
            request_id=self.request_id, replica_id=UNASSIGNED, slo_class=payload.slo_class,
            deadline=payload.deadline, arrival=payload.arrival_s, params=params,
            prompt_token_ids=payload.prompt_token_ids, status="accepted", updated_at=payload.arrival_s,
        ))
        journal._changed(self.request_id, self.slot)

    def assigned(self, replica_id: str) -> None:
        """The replica ``replica_id`` produced this request's first output."""
        if replica_id:
            self._move(replica_id, "running")

    def retrying(self) -> None:
        """The replica failed before the first output; the dispatcher sends the request again."""
        self._move(UNASSIGNED, "accepted")

    def close(self) -> None:
        """The client has its answer or error, or went away: drop the entry (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.journal.open_requests -= 1
        slot = self.slot
        if slot is None:
            return
        slot.deleted = True
        if slot.written is None and self.request_id in self.journal._dirty:
            del self.journal._dirty[self.request_id]  # never reached Redis: nothing to write at all
        else:
            self.journal._changed(self.request_id, slot)

    def _move(self, replica_id: str, status: str) -> None:
        slot = self.slot
        if self.closed or slot is None or slot.entry.replica_id == replica_id:
            return
        slot.entry = replace(slot.entry, replica_id=replica_id, status=status,
                             attempts=slot.entry.attempts + int(replica_id == UNASSIGNED))
        self.journal._changed(self.request_id, slot)
