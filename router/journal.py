"""The ingress's journal of accepted requests in Redis: the ledger that proves nothing is lost.

Every request the ingress accepts (it passed validation and access checks) is written to the
``journal`` hash (:mod:`cluster.state_schema`, key 4) with everything needed to run it again, under
the placeholder replica ``unassigned``; when the first output names the replica serving it, the
entry moves to that replica's set (status ``running``); when a replica fails before the first
output and the dispatcher sends the request again, it moves back (``accepted``); when the client
has its answer, its error, or has gone away, the entry is removed. So at any moment the hash holds
exactly the accepted requests without a terminal answer, and after load stops it must be empty:
``tests/test_reliability.py`` checks that after killing replicas and restarting Redis.

Writes never delay or fail a request. They run as background tasks chained per request (accept,
then assign, then remove, in order). While Redis is away they fail fast (the client's socket
timeout); a removal that failed is kept in a backlog and retried after the next successful write,
so entries written before an outage do not outlive it. Each failure is counted
(``journal_write_failures``), logged once per outage, and shown by ``GET /v1/router/stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from cluster.state_client import ClusterState, StateUnavailable
from cluster.state_schema import JournalEntry, SchemaError

log = logging.getLogger("ray.serve")
UNASSIGNED = "unassigned"  # replica id of an entry the request router has not placed yet
_MAX_BACKLOG = 100_000  # removals kept for retry while Redis is away (ids only)


class RequestJournal:
    """Background journal writes for one ingress; a no-op without a Redis URL."""

    def __init__(self, state: ClusterState | None) -> None:
        self.state = state
        self.write_failures = 0
        self.open_requests = 0
        self._backlog: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._down = False

    @classmethod
    def from_url(cls, redis_url: str | None, namespace: str) -> RequestJournal:
        """A journal on ``redis_url`` (None: disabled)."""
        return cls(ClusterState(redis_url, namespace=namespace) if redis_url else None)

    def open(self, payload: dict[str, Any]) -> JournalRecord:
        """Journal the accepted request ``payload`` (see :func:`router.payload.build_payload`)."""
        return JournalRecord(self, payload)

    def stats(self) -> dict[str, Any]:
        """Counters for ``/v1/router/stats``."""
        return {"enabled": self.state is not None, "open_requests": self.open_requests,
                "write_failures": self.write_failures, "removal_backlog": len(self._backlog)}

    async def drain(self) -> None:
        """Wait for the writes scheduled so far (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ------------------------------------------------------------------ internals
    def _schedule(self, after: asyncio.Task[None] | None, write: Callable[[], Awaitable[object]],
                  request_id: str, removal: bool = False) -> asyncio.Task[None]:
        async def run() -> None:
            if after is not None:
                with contextlib.suppress(Exception):
                    await after
            ok = await self._write(write)
            if removal and not ok and len(self._backlog) < _MAX_BACKLOG:
                self._backlog.add(request_id)
            if ok and self._backlog and not removal:
                await self._flush_backlog()

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _write(self, write: Callable[[], Awaitable[object]]) -> bool:
        try:
            await write()
        except (StateUnavailable, SchemaError) as exc:
            self.write_failures += 1
            if not self._down:
                log.warning("request journal: write failed (%s); requests keep flowing, removals retry later", exc)
            self._down = True
            return False
        if self._down:
            log.warning("request journal: Redis writes succeed again")
        self._down = False
        return True

    async def _flush_backlog(self) -> None:
        assert self.state is not None
        state = self.state
        for request_id in list(self._backlog):
            if not await self._write(lambda rid=request_id: state.journal_remove(rid)):
                return
            self._backlog.discard(request_id)


class JournalRecord:
    """One accepted request's journal entry; call :meth:`assigned`, :meth:`retrying`, :meth:`close`."""

    def __init__(self, journal: RequestJournal, payload: dict[str, Any]) -> None:
        self.journal = journal
        self.request_id = str(payload["request_id"])
        self.replica_id = UNASSIGNED
        self.closed = False
        self._last: asyncio.Task[None] | None = None
        journal.open_requests += 1
        state = journal.state
        if state is None:
            return
        params = {"sampling": payload.get("sampling", {}), "ttft_slo_s": payload.get("ttft_slo_s"),
                  "tpot_slo_s": payload.get("tpot_slo_s"), "priority": payload.get("priority"),
                  "sheddable": payload.get("sheddable")}
        entry = JournalEntry(
            request_id=self.request_id, replica_id=UNASSIGNED, slo_class=str(payload["slo_class"]),
            deadline=float(payload["deadline"]), arrival=float(payload["arrival_s"]), params=params,
            prompt_token_ids=tuple(payload["prompt_token_ids"]), status="accepted",
            updated_at=float(payload["arrival_s"]),
        )
        self._last = journal._schedule(None, lambda: state.journal_accept(entry), self.request_id)

    def assigned(self, replica_id: str) -> None:
        """The replica ``replica_id`` produced this request's first output."""
        if self.closed or not replica_id or replica_id == self.replica_id:
            return
        self.replica_id = replica_id
        self._update("running", replica_id)

    def retrying(self) -> None:
        """The replica failed before the first output; the dispatcher sends the request again."""
        if self.closed:
            return
        self.replica_id = UNASSIGNED
        self._update("accepted", UNASSIGNED)

    def close(self) -> None:
        """The client has its answer or error, or went away: drop the entry (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.journal.open_requests -= 1
        state = self.journal.state
        if state is not None:
            self._last = self.journal._schedule(self._last, lambda: state.journal_remove(self.request_id),
                                                self.request_id, removal=True)

    def _update(self, status: str, replica_id: str) -> None:
        state = self.journal.state
        if state is not None:
            self._last = self.journal._schedule(
                self._last, lambda: state.journal_update_status(self.request_id, status, replica_id=replica_id),
                self.request_id)
