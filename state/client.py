"""Async client for the shared cluster state in Redis (key schema: :mod:`state.schema`).

Replicas register themselves and publish their queue state on every scheduler event; routers read
all states, add the work they dispatch to a replica's in-flight hash atomically, and journal the
requests they accept.  Every Redis connection or timeout error surfaces as
:class:`StateUnavailable` (URL redacted) so callers can fall back to local estimates: a Redis
outage must never fail a request.  Invalid data raises :class:`~state.schema.SchemaError`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from functools import partial
from types import TracebackType
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from state.clock import WALL_CLOCK, Clock, require_clock
from state.redis_server import redact_url
from state.schema import (
    DEFAULT_NAMESPACE,
    JOURNAL_STATUSES,
    JournalEntry,
    Keys,
    PrefixSummary,
    ReplicaInfo,
    ReplicaQueueState,
    SchemaError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# KEYS[1] = inflight hash; ARGV = request id, predicted seconds, TTL ms. Returns the new total.
_ADD_INFLIGHT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do total = total + (tonumber(v) or 0) end
return string.format('%.17g', total)
"""

# Compare-and-set a journal field and move the id between per-replica sets.
# KEYS = journal hash, old replica set, new replica set; ARGV = request id, expected old JSON,
# new JSON ('' deletes the entry). Returns 1 when applied, 0 when the entry changed meanwhile.
_JOURNAL_CAS = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('SREM', KEYS[2], ARGV[1])
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  redis.call('SADD', KEYS[3], ARGV[1])
end
return 1
"""


class StateUnavailable(Exception):
    """Redis could not be reached (connection refused, timeout, authentication): use local estimates."""


class ClusterState:
    """Shared replica queue state, in-flight work, request journal and cost profiles in Redis.

    ``socket_timeout_s`` bounds every command; ``retries`` reconnect attempts (default 1) make a
    stale pooled connection after a Redis restart invisible.  ``clock`` stamps ``updated_at``.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        state_ttl_s: float = 5.0,
        inflight_ttl_s: float = 60.0,
        socket_timeout_s: float = 0.5,
        retries: int = 1,
        clock: Clock = WALL_CLOCK,
    ) -> None:
        if not state_ttl_s > 0:
            raise ValueError(f"state_ttl_s must be > 0, got {state_ttl_s}")
        self.url = redact_url(url)
        self.keys = Keys(namespace)
        self.state_ttl_s = state_ttl_s
        self.inflight_ttl_s = inflight_ttl_s
        self.clock = require_clock(clock, "ClusterState")
        self._password = aioredis.connection.parse_url(url).get("password")
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries),
        )
        self._add_inflight = self._redis.register_script(_ADD_INFLIGHT)
        self._journal_cas = self._redis.register_script(_JOURNAL_CAS)

    # ------------------------------------------------------------------ plumbing
    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            reason = "authentication failed" if isinstance(exc, AuthenticationError) else type(exc).__name__
            detail = str(exc).replace(self._password, "***") if self._password else str(exc)
            raise StateUnavailable(f"Redis at {self.url} unavailable during {what}: {reason}: {detail}") from None

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()

    async def __aenter__(self) -> ClusterState:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def ping(self) -> None:
        """Raise :class:`StateUnavailable` unless Redis answers."""
        await self._call("ping", self._redis.ping)

    # ------------------------------------------------------------------ replicas
    async def register_replica(self, replica_id: str, info: ReplicaInfo) -> None:
        """Add the replica to ``replicas`` and store its info (routable once it publishes a state)."""
        if info.replica_id != replica_id:
            raise ValueError(f"info.replica_id {info.replica_id!r} != {replica_id!r}")

        async def op() -> None:
            async with self._redis.pipeline(transaction=True) as p:
                p.sadd(self.keys.replicas(), replica_id).set(self.keys.replica_info(replica_id), info.to_json())
                await p.execute()

        await self._call("register_replica", op)

    async def deregister_replica(self, replica_id: str) -> None:
        """Remove the replica, its info, state, prefix summary and in-flight work (its journal stays for
        re-dispatch)."""
        k = self.keys

        async def op() -> None:
            async with self._redis.pipeline(transaction=True) as p:
                p.srem(k.replicas(), replica_id)
                p.delete(k.replica_info(replica_id), k.replica_state(replica_id), k.replica_inflight(replica_id),
                         k.replica_prefixes(replica_id))
                await p.execute()

        await self._call("deregister_replica", op)

    async def registered_replicas(self) -> set[str]:
        """All ids in ``replicas`` (including ones whose state expired)."""
        return set(await self._call("registered_replicas", lambda: self._redis.smembers(self.keys.replicas())))

    async def replica_info(self, replica_id: str) -> ReplicaInfo | None:
        """The info stored at registration, or None."""
        key = self.keys.replica_info(replica_id)
        raw = await self._call("replica_info", lambda: self._redis.get(key))
        return None if raw is None else ReplicaInfo.from_json(raw, key)

    async def publish_replica_state(
        self, replica_id: str, state: ReplicaQueueState, reported_ids: Iterable[str] | None = None,
        prefix: PrefixSummary | None = None,
    ) -> bool:
        """Write the state with the heartbeat TTL and, atomically, drop the in-flight fields of
        ``reported_ids`` (default: every request the state lists; pass also ids that finished) and
        keep the replica in the registry; with ``prefix``, write the prefix-cache summary too (its
        TTL is refreshed with every state).  True when it was missing from the registry (Redis lost
        its data, e.g. a restart without persistence): the caller should register its info again."""
        if state.replica_id != replica_id:
            raise ValueError(f"state.replica_id {state.replica_id!r} != {replica_id!r}")
        ids = list(state.request_ids if reported_ids is None else reported_ids)
        payload, ttl_ms = state.to_json(), max(1, round(self.state_ttl_s * 1000))
        summary = prefix.to_json() if prefix is not None else None

        async def op() -> bool:
            async with self._redis.pipeline(transaction=True) as p:
                p.set(self.keys.replica_state(replica_id), payload, px=ttl_ms)
                p.sadd(self.keys.replicas(), replica_id)
                if summary is not None:
                    p.set(self.keys.replica_prefixes(replica_id), summary, px=ttl_ms)
                elif state.prefix_version:
                    p.pexpire(self.keys.replica_prefixes(replica_id), ttl_ms)
                if ids:
                    p.hdel(self.keys.replica_inflight(replica_id), *ids)
                results = await p.execute()
            return bool(results[1])

        return await self._call("publish_replica_state", op)

    async def read_replica_state(self, replica_id: str) -> ReplicaQueueState | None:
        """One replica's state, or None when it expired or was never published."""
        key = self.keys.replica_state(replica_id)
        raw = await self._call("read_replica_state", lambda: self._redis.get(key))
        return None if raw is None else _parse_state(replica_id, key, raw)

    async def read_all_replica_states(self, *, skip_invalid: bool = False) -> dict[str, ReplicaQueueState]:
        """States of all routable replicas (registered, state not expired), in two round trips.

        Invalid JSON raises :class:`SchemaError` naming the key, or with ``skip_invalid`` is
        logged and that replica treated as unroutable.
        """
        ids = sorted(await self.registered_replicas())
        if not ids:
            return {}
        keys = [self.keys.replica_state(i) for i in ids]
        raws = await self._call("read_all_replica_states", lambda: self._redis.mget(keys))
        out: dict[str, ReplicaQueueState] = {}
        for rid, key, raw in zip(ids, keys, raws):
            if raw is None:
                continue  # expired heartbeat: not routable
            try:
                out[rid] = _parse_state(rid, key, raw)
            except SchemaError:
                if not skip_invalid:
                    raise
                log.warning("skipping replica %s: invalid state", rid, exc_info=True)
        return out

    async def read_prefix_summaries(self, replica_ids: Iterable[str], *,
                                    skip_invalid: bool = False) -> dict[str, PrefixSummary]:
        """The prefix-cache summaries of ``replica_ids`` that have one (one round trip); invalid JSON
        raises :class:`SchemaError` naming the key, or with ``skip_invalid`` is logged and left out."""
        ids = list(replica_ids)
        if not ids:
            return {}
        keys = [self.keys.replica_prefixes(i) for i in ids]
        raws = await self._call("read_prefix_summaries", lambda: self._redis.mget(keys))
        out: dict[str, PrefixSummary] = {}
        for rid, key, raw in zip(ids, keys, raws):
            if raw is None:
                continue
            try:
                out[rid] = PrefixSummary.from_json(raw, key)
            except SchemaError:
                if not skip_invalid:
                    raise
                log.warning("ignoring replica %s's prefix summary: invalid", rid, exc_info=True)
        return out

    # ------------------------------------------------------------------ in-flight work
    async def add_inflight(self, replica_id: str, request_id: str, predicted_s: float) -> float:
        """Record dispatched work and return the replica's new in-flight total (one atomic step)."""
        if not (math.isfinite(predicted_s) and predicted_s >= 0):
            raise ValueError(f"predicted_s must be a finite number >= 0, got {predicted_s!r}")
        key, ttl_ms = self.keys.replica_inflight(replica_id), max(0, round(self.inflight_ttl_s * 1000))
        total = await self._call(
            "add_inflight", lambda: self._add_inflight(keys=[key], args=[request_id, repr(float(predicted_s)), ttl_ms])
        )
        return float(total)

    async def clear_inflight(self, replica_id: str, request_id: str) -> None:
        """Forget one dispatched request (e.g. the dispatch failed)."""
        key = self.keys.replica_inflight(replica_id)
        await self._call("clear_inflight", lambda: self._redis.hdel(key, request_id))

    async def read_inflight_totals(self) -> dict[str, float]:
        """In-flight seconds per registered replica (0.0 when none)."""
        ids = sorted(await self.registered_replicas())

        async def op() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as p:
                for rid in ids:
                    p.hvals(self.keys.replica_inflight(rid))
                return await p.execute()

        values = await self._call("read_inflight_totals", op) if ids else []
        return {rid: sum(_to_float(v) for v in vals) for rid, vals in zip(ids, values)}

    # ------------------------------------------------------------------ journal
    async def journal_accept(self, entry: JournalEntry) -> None:
        """Journal an accepted request on ``entry.replica_id`` (overwrites an entry with that id)."""
        k, payload = self.keys, entry.to_json()

        async def op() -> None:
            async with self._redis.pipeline(transaction=True) as p:
                p.hset(k.journal(), entry.request_id, payload)
                p.sadd(k.journal_replica(entry.replica_id), entry.request_id)
                await p.execute()

        await self._call("journal_accept", op)

    async def journal_get(self, request_id: str) -> JournalEntry | None:
        """One journal entry, or None."""
        raw = await self._call("journal_get", lambda: self._redis.hget(self.keys.journal(), request_id))
        return None if raw is None else JournalEntry.from_json(raw, f"{self.keys.journal()}[{request_id}]")

    async def journal_update_status(
        self, request_id: str, status: str, *, replica_id: str | None = None
    ) -> JournalEntry | None:
        """Set the status (and, to re-dispatch, a new replica: ``attempts`` grows); None if absent."""
        if status not in JOURNAL_STATUSES:
            raise ValueError(f"status must be one of {JOURNAL_STATUSES}, got {status!r}")
        return await self._journal_modify(request_id, status, replica_id)

    async def journal_remove(self, request_id: str) -> None:
        """Drop a finished (or answered-with-error) request from the journal."""
        await self._journal_modify(request_id, None, None)

    async def _journal_modify(self, request_id: str, status: str | None, replica_id: str | None) -> JournalEntry | None:
        get = partial(self._redis.hget, self.keys.journal(), request_id)
        for _ in range(16):  # compare-and-set; retries only when another writer changed the entry
            raw = await self._call("journal", get)
            if raw is None:
                return None
            old = JournalEntry.from_json(raw, f"{self.keys.journal()}[{request_id}]")
            new: JournalEntry | None = None
            if status is not None:
                moved = replica_id is not None and replica_id != old.replica_id
                new = replace(
                    old,
                    status=status,
                    updated_at=self.clock(),
                    replica_id=replica_id if moved else old.replica_id,
                    attempts=old.attempts + int(moved),
                )
            keys = [self.keys.journal(), self.keys.journal_replica(old.replica_id)]
            keys.append(self.keys.journal_replica(new.replica_id if new else old.replica_id))
            args = [request_id, raw, new.to_json() if new else ""]
            if await self._call("journal", partial(self._journal_cas, keys=keys, args=args)):
                return new
        raise StateUnavailable(f"journal entry {request_id!r} kept changing under concurrent writers")

    async def journal_apply(self, puts: list[tuple[JournalEntry, str | None]], deletes: list[tuple[str, str]]) -> None:
        """One round trip for a single writer's batch (the ingress owns its entries: no compare-and-set).

        ``puts``: ``(entry, previous replica id or None)``: the entry is written and its id moved
        from the previous replica's set to ``entry.replica_id``'s. ``deletes``: ``(request id,
        replica id)``: the entry and its set membership are removed.
        """
        k = self.keys

        async def op() -> None:
            async with self._redis.pipeline(transaction=False) as p:
                for entry, previous in puts:
                    if previous is not None and previous != entry.replica_id:
                        p.srem(k.journal_replica(previous), entry.request_id)
                    p.hset(k.journal(), entry.request_id, entry.to_json())
                    p.sadd(k.journal_replica(entry.replica_id), entry.request_id)
                for request_id, replica_id in deletes:
                    p.hdel(k.journal(), request_id)
                    p.srem(k.journal_replica(replica_id), request_id)
                await p.execute()

        if puts or deletes:
            await self._call("journal_apply", op)

    async def journal_for_replica(self, replica_id: str) -> list[JournalEntry]:
        """Entries journalled on ``replica_id`` (dangling ids in its set are removed)."""
        set_key, journal = self.keys.journal_replica(replica_id), self.keys.journal()
        ids = sorted(await self._call("journal_for_replica", lambda: self._redis.smembers(set_key)))
        if not ids:
            return []
        raws = await self._call("journal_for_replica", lambda: self._redis.hmget(journal, ids))
        dangling = [rid for rid, raw in zip(ids, raws) if raw is None]
        if dangling:
            await self._call("journal_for_replica", lambda: self._redis.srem(set_key, *dangling))
        return [JournalEntry.from_json(raw, f"{journal}[{rid}]") for rid, raw in zip(ids, raws) if raw is not None]

    # ------------------------------------------------------------------ cost profiles
    async def save_profile(self, model: str, hardware: str, profile: Mapping[str, Any]) -> None:
        """Store a cost profile (a JSON-ready mapping, e.g. ``CostModel.to_dict()``) for a model on a hardware."""
        key, payload = self.keys.profile(model, hardware), json.dumps(dict(profile), sort_keys=True)
        await self._call("save_profile", lambda: self._redis.set(key, payload))

    async def load_profile(self, model: str, hardware: str) -> dict[str, Any] | None:
        """The stored cost profile as a JSON object, or None; not a JSON object raises SchemaError.

        The profile's own fields are the cost model's to validate (``CostModel.from_dict``): this
        package stores it without knowing its shape."""
        key = self.keys.profile(model, hardware)
        raw = await self._call("load_profile", lambda: self._redis.get(key))
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SchemaError(key, None, f"not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise SchemaError(key, None, f"expected a JSON object, got {type(data).__name__}")
        return data


def _parse_state(replica_id: str, key: str, raw: str) -> ReplicaQueueState:
    state = ReplicaQueueState.from_json(raw, key)
    if state.replica_id != replica_id:
        raise SchemaError(key, "replica_id", f"expected {replica_id!r}, got {state.replica_id!r}")
    return state


def _to_float(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        return 0.0
