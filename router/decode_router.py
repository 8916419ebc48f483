"""Placement of handed-over requests on decode replicas: free KV memory first, then fewest decoding.

A prefill replica's handover ticket (:func:`replicas.handover_transport.send_handover`) says how many
KV tokens the request needs. :func:`rank_decoders` orders the decode replicas by what they publish
in Redis (:class:`~state.schema.ReplicaQueueState`: ``kv_free_tokens``, ``decoding``,
``max_decoding``): replicas whose free KV holds the request come first, those with decode batch
room (fewer decoding than one step takes) before full ones, then fewest decoding (each step's time,
and so every stream's TPOT, grows with the batch), then most free KV. Replicas without a fresh state
rank after every known one, and so do known ones that cannot hold the request: the decode engine
refuses a handover it cannot fit rather than overwrite anything, and the router tries the next.

:class:`DecodeRequestRouter` is the Serve ``RequestRouter`` of the decode deployment
(``cluster/app.py``): one replica per tier, strict order. Requests it dispatched and that are not
finished count as decoding on their replica until its published state catches up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from state.client import ClusterState, StateUnavailable
from state.clock import WALL_CLOCK, Clock, require_clock
from state.schema import ReplicaQueueState

log = logging.getLogger("ray.serve")


def rank_decoders(candidates: Sequence[str], states: Mapping[str, ReplicaQueueState], kv_tokens: int,
                  local: Mapping[str, int], now: float, max_age_s: float = 5.0) -> list[str]:
    """``candidates`` best first for a handover needing ``kv_tokens`` (``local``: this router's own
    unfinished dispatches per replica; a state older than ``max_age_s`` counts as unknown)."""
    def key(rid: str) -> tuple[int, int, int, int, str]:
        st = states.get(rid)
        mine = local.get(rid, 0)
        if st is None or now - st.updated_at > max_age_s:
            return (2, 0, mine, 0, rid)
        decoding = max(st.decoding, mine)
        full = int(st.max_decoding > 0 and decoding >= st.max_decoding)
        return (0 if st.kv_free_tokens >= kv_tokens else 3, full, decoding, -st.kv_free_tokens, rid)

    return sorted(candidates, key=key)


def ticket_tokens(pending_request: PendingRequest | None) -> int:
    """The KV tokens a ``decode(ticket, box)`` call's ticket asks for (0: unknown)."""
    if pending_request is None:
        return 0
    ticket = pending_request.args[0] if pending_request.args else pending_request.kwargs.get("ticket")
    tokens = ticket.get("kv_tokens") if isinstance(ticket, Mapping) else None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0 else 0


class DecodeRequestRouter(RequestRouter):
    """Serve request router of the decode deployment (see the module docstring)."""

    def initialize_state(self, redis_url: str | None = None, namespace: str = "flowprefill",
                         cache_ttl_s: float = 0.02, max_state_age_s: float = 5.0, cluster: Any = None,  # noqa: ANN401
                         clock: Clock = WALL_CLOCK) -> None:
        """Set up (Serve passes ``request_router_kwargs``); ``cluster`` and ``clock`` are for tests."""
        self._cluster = cluster if cluster is not None else (
            ClusterState(redis_url, namespace=namespace, socket_timeout_s=0.25) if redis_url else None)
        self._cache_ttl_s, self._max_age_s = cache_ttl_s, max_state_age_s
        self._clock = require_clock(clock, "DecodeRequestRouter")
        self._states: dict[str, ReplicaQueueState] = {}
        self._read_at = float("-inf")
        self._local: dict[str, int] = {}  # replica id -> this router's unfinished dispatches
        self._routed: dict[str, str] = {}  # internal request id -> replica id

    async def _read_states(self, now: float) -> dict[str, ReplicaQueueState]:
        if self._cluster is None or now - self._read_at <= self._cache_ttl_s:
            return self._states
        try:
            self._states = await self._cluster.read_all_replica_states(skip_invalid=True)
        except StateUnavailable as exc:  # rank on this router's own counts until Redis returns
            log.warning("decode router: %s; placing on local counts", exc)
            self._states = {}
        self._read_at = now
        return self._states

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """One replica per tier, best first (:func:`rank_decoders`)."""
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if not by_id:
            return []
        now = self._clock()
        states = await self._read_states(now)
        ranked = rank_decoders(list(by_id), states, ticket_tokens(pending_request), self._local, now,
                               self._max_age_s)
        return [[by_id[rid]] for rid in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:  # noqa: ANN401
        """Count the dispatch on its replica until it completes."""
        rid = replica_id.unique_id
        self._routed[pending_request.metadata.internal_request_id] = rid
        self._local[rid] = self._local.get(rid, 0) + 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """The decode stream ended: it no longer counts."""
        rid = self._routed.pop(internal_request_id, None)
        if rid is not None:
            self._local[rid] = max(self._local.get(rid, 0) - 1, 0)
