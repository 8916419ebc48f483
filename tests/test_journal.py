"""The ingress's request journal (router/journal.py) on a real redis-server: the ledger of
accepted, unanswered requests follows each request's life and survives a Redis outage."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

from replicas.replica_request import ReplicaRequest
from replicas.sampling_params import SamplingParams
from router.journal import UNASSIGNED, RequestJournal, replica_request_from_journal
from state.client import ClusterState
from state.redis_server import RedisServer
from state.schema import JournalEntry


def _payload(rid: str) -> ReplicaRequest:
    return ReplicaRequest(rid, (1, 2, 3), arrival_s=100.0, ttft_slo_s=1.0, tpot_slo_s=0.5, slo_class="interactive",
                          sampling=SamplingParams(max_tokens=4, temperature=0.0))


def test_entries_follow_accept_assign_retry_and_close(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        ns = f"j{uuid.uuid4().hex[:8]}"
        journal = RequestJournal.from_url(redis_server.url, ns)
        async with ClusterState(redis_server.url, namespace=ns) as state:
            a, b = journal.open(_payload("a")), journal.open(_payload("b"))
            assert await state.journal_get("a") is None  # write-behind: nothing before a flush
            assert await journal.flush()
            entry = await state.journal_get("a")
            assert entry is not None and entry.replica_id == UNASSIGNED and entry.status == "accepted"
            assert entry.prompt_token_ids == (1, 2, 3) and entry.params["sampling"]["max_tokens"] == 4
            assert entry.deadline == 101.0 and replica_request_from_journal(entry) == _payload("a")  # all to rerun it
            a.assigned("r1")
            b.assigned("r1")
            assert await journal.flush()
            assert [e.request_id for e in await state.journal_for_replica("r1")] == ["a", "b"]
            assert await state.journal_for_replica(UNASSIGNED) == []
            b.retrying()  # r1 failed before b's first output: b waits for a new replica
            b.assigned("r2")
            assert await journal.flush()
            moved = await state.journal_get("b")
            assert moved is not None and moved.replica_id == "r2" and moved.status == "running"
            assert moved.attempts == 2
            assert [e.request_id for e in await state.journal_for_replica("r1")] == ["a"]
            a.close()
            b.close()
            b.close()  # idempotent
            assert await journal.flush()
            assert await state.journal_for_replica("r2") == [] and await state.journal_get("a") is None
            assert journal.stats() == {"enabled": True, "open_requests": 0, "pending_writes": 0,
                                       "write_failures": 0, "not_journalled": 0}

    asyncio.run(scenario())


def test_a_request_answered_within_one_interval_never_reaches_redis(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        ns = f"j{uuid.uuid4().hex[:8]}"
        journal = RequestJournal.from_url(redis_server.url, ns)
        async with ClusterState(redis_server.url, namespace=ns) as state:
            record = journal.open(_payload("quick"))
            record.assigned("r1")
            record.close()
            assert journal.stats()["pending_writes"] == 0
            await asyncio.sleep(2 * journal.flush_interval_s)
            assert await state._redis.hlen(state.keys.journal()) == 0

    asyncio.run(scenario())


def test_a_request_closed_while_its_first_write_is_in_flight_leaves_no_entry(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        ns = f"j{uuid.uuid4().hex[:8]}"
        journal = RequestJournal(ClusterState(redis_server.url, namespace=ns), flush_interval_s=3600)
        async with ClusterState(redis_server.url, namespace=ns) as state:
            record = journal.open(_payload("racy"))
            in_flight = asyncio.create_task(journal.flush())
            await asyncio.sleep(0)  # the flush has taken its batch and awaits Redis
            record.assigned("r1")
            record.close()  # Redis does not hold the entry yet, but it will once the write lands
            assert await in_flight
            assert await journal.flush()
            assert await state._redis.hlen(state.keys.journal()) == 0
            assert await state.journal_for_replica(UNASSIGNED) == []

    asyncio.run(scenario())


async def _until(check: Callable[[], Awaitable[bool]], interval_s: float) -> bool:
    """Poll ``check`` every ``interval_s`` (the journal's own timer drives the writes), up to 100 times."""
    for _ in range(100):
        if await check():
            return True
        await asyncio.sleep(interval_s)
    return False


def test_the_background_flush_writes_within_an_interval(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        ns = f"j{uuid.uuid4().hex[:8]}"
        journal = RequestJournal.from_url(redis_server.url, ns)
        async with ClusterState(redis_server.url, namespace=ns) as state:
            record = journal.open(_payload("slow"))

            async def written() -> bool:
                return await state.journal_get("slow") is not None

            async def removed() -> bool:
                return not await written()

            assert await _until(written, journal.flush_interval_s)  # no explicit flush here
            record.close()
            assert await _until(removed, journal.flush_interval_s)

    asyncio.run(scenario())


def test_an_outage_counts_failures_and_keeps_writes_until_redis_returns() -> None:
    server = RedisServer()
    server.start()
    try:
        async def scenario() -> None:
            journal = RequestJournal(ClusterState(server.url, namespace="outage"), flush_interval_s=3600)
            # (explicit flushes only: the background flusher's timer never fires in this test)
            async with ClusterState(server.url, namespace="outage") as state:
                early = journal.open(_payload("early"))
                assert await journal.flush()
                assert await state.journal_get("early") is not None
                server.stop()
                try:
                    during = journal.open(_payload("during"))  # accepted while Redis is away
                    assert not await journal.flush()
                    early.close()  # its removal waits for Redis
                    assert not await journal.flush()
                    assert journal.stats()["write_failures"] == 2 and journal.stats()["pending_writes"] == 2
                finally:
                    server.start()  # empty (no persistence): put back what a persistent Redis would hold
                await state.journal_accept(_entry("early"))
                assert await journal.flush()
                assert await state.journal_get("early") is None
                assert await state.journal_get("during") is not None  # still open: journalled late
                during.close()
                assert await journal.flush()
                assert await state._redis.hlen(state.keys.journal()) == 0

        asyncio.run(scenario())
    finally:
        server.stop()


def _entry(rid: str) -> JournalEntry:
    return JournalEntry(request_id=rid, replica_id=UNASSIGNED, slo_class="interactive", deadline=1.0, arrival=0.0,
                        prompt_token_ids=(1,))
