"""The ingress's request journal (router/journal.py) on a real redis-server: the ledger of
accepted, unanswered requests follows each request's life and survives a Redis outage."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from cluster.redis_server import RedisServer
from cluster.state_client import ClusterState
from cluster.state_schema import JournalEntry
from router.journal import UNASSIGNED, RequestJournal


def _payload(rid: str) -> dict[str, Any]:
    return {"request_id": rid, "prompt_token_ids": [1, 2, 3], "arrival_s": 100.0, "deadline": 101.0,
            "slo_class": "interactive", "ttft_slo_s": 1.0, "tpot_slo_s": 0.5, "priority": 0, "sheddable": False,
            "sampling": {"max_tokens": 4, "temperature": 0.0}}


def test_entries_follow_accept_assign_retry_and_close(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        ns = f"j{uuid.uuid4().hex[:8]}"
        journal = RequestJournal.from_url(redis_server.url, ns)
        async with ClusterState(redis_server.url, namespace=ns) as state:
            a, b = journal.open(_payload("a")), journal.open(_payload("b"))
            await journal.drain()
            entry = await state.journal_get("a")
            assert entry is not None and entry.replica_id == UNASSIGNED and entry.status == "accepted"
            assert entry.prompt_token_ids == (1, 2, 3) and entry.params["sampling"]["max_tokens"] == 4
            a.assigned("r1")
            b.assigned("r1")
            await journal.drain()
            assert [e.request_id for e in await state.journal_for_replica("r1")] == ["a", "b"]
            b.retrying()  # r1 failed before b's first output: b waits for a new replica
            b.assigned("r2")
            await journal.drain()
            moved = await state.journal_get("b")
            assert moved is not None and moved.replica_id == "r2" and moved.status == "running"
            assert [e.request_id for e in await state.journal_for_replica("r1")] == ["a"]
            a.close()
            b.close()
            b.close()  # idempotent
            await journal.drain()
            assert await state.journal_for_replica("r2") == [] and await state.journal_get("a") is None
            assert journal.stats() == {"enabled": True, "open_requests": 0, "write_failures": 0,
                                       "removal_backlog": 0}

    asyncio.run(scenario())


def test_an_outage_counts_failures_and_removals_are_retried_when_redis_returns() -> None:
    server = RedisServer()
    server.start()
    try:
        async def scenario() -> None:
            journal = RequestJournal.from_url(server.url, "outage")
            async with ClusterState(server.url, namespace="outage") as state:
                early = journal.open(_payload("early"))
                await journal.drain()
                assert await state.journal_get("early") is not None
                server.stop()
                try:
                    during = journal.open(_payload("during"))  # accepted while Redis is away
                    early.close()  # its removal fails now
                    during.close()
                    await journal.drain()
                    assert journal.stats()["write_failures"] >= 2 and journal.stats()["removal_backlog"] >= 1
                finally:
                    server.start()  # empty (no persistence): put back what a persistent Redis would hold
                await state.journal_accept(_entry("early"))
                journal.open(_payload("next")).close()  # a successful write flushes the backlog
                await journal.drain()
                assert journal.stats()["removal_backlog"] == 0
                assert await state.journal_get("early") is None and await state.journal_get("next") is None

        asyncio.run(scenario())
    finally:
        server.stop()


def _entry(rid: str) -> JournalEntry:
    return JournalEntry(request_id=rid, replica_id=UNASSIGNED, slo_class="interactive", deadline=1.0, arrival=0.0,
                        prompt_token_ids=(1,))
