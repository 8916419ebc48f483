"""Placement of handed-over requests on decode replicas: room for the KV first, then TPOT headroom.

A prefill replica's handover ticket (:func:`replicas.handover_transport.send_handover`) says how many
KV tokens the request needs and its TPOT SLO (its class's). Each decode replica publishes in Redis
(:class:`~state.schema.ReplicaQueueState`) its free KV (``kv_free_tokens``, evictable cached blocks
included), its decode pace (``decode_step_interval_s``, ``tpot_s``), its decoding streams' tightest
TPOT SLO (``tpot_target_s``) and its batch (``decoding``, ``max_decoding``). :func:`rank_decoders`:

1. **KV memory**: a replica whose free KV, less this router's own dispatches its state does not show
   yet, cannot hold the request is skipped: the decode engine never evicts or overwrites a block
   another sequence holds, so sending it there only earns a refusal. When no replica has room the
   handover *waits* (no replica chosen: Serve backs off and asks again as states change), for at
   most ``max_kv_wait_s``; after that, or when the request exceeds every known replica's whole KV
   pool, the short replicas are ranked by most free KV, refuse it, and the router's resends end
   with a clear 503 (router/pd_dispatch.py).
2. **TPOT headroom**, among the replicas with room: the TPOT SLO that binds there (the request's
   class SLO, or the tightest of the streams already decoding, whichever is smaller) less the TPOT
   the replica's streams would see with this one added (the current TPOT, or one step more per
   round when the batch is full and the request starts another round; an idle replica's is 0).
   Most headroom wins; then fewest decoding, most free KV.
3. Replicas without a fresh state (none in Redis, or older than ``max_state_age_s``) rank after
   every known one with room: they may have it.

:class:`DecodeRequestRouter` is the Serve ``RequestRouter`` of the decode deployment
(``cluster/app.py``): one replica per tier, strict order, on an injectable clock.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from state.client import ClusterState, StateUnavailable
from state.clock import WALL_CLOCK, Clock, require_clock
from state.schema import ReplicaQueueState

log = logging.getLogger("ray.serve")
DEFAULT_TPOT_SLO_S = 0.5  # a request without a TPOT SLO, on a replica decoding none with one (EngineConfig's)
MAX_KV_WAIT_S = 30.0


@dataclass(frozen=True)
class DecodeDemand:
    """What a handover asks of a decode replica: KV tokens (0: unknown) and its TPOT SLO (None: none)."""

    kv_tokens: int = 0
    tpot_slo_s: float | None = None


def tpot_headroom(st: ReplicaQueueState, tpot_slo_s: float | None, mine: int = 0) -> float:
    """Seconds of TPOT to spare on ``st``'s replica with one more stream there (see the module docstring;
    ``mine``: this router's unfinished dispatches there)."""
    decoding = max(st.decoding, mine)
    slos = [s for s in (tpot_slo_s, st.tpot_target_s if decoding else None) if s]
    slo = min(slos) if slos else DEFAULT_TPOT_SLO_S
    if decoding == 0:
        return slo
    rounds = math.ceil((decoding + 1) / st.max_decoding) if st.max_decoding > 0 else 1
    return slo - st.decode_step_interval_s * rounds


def rank_decoders(candidates: Sequence[str], states: Mapping[str, ReplicaQueueState], demand: DecodeDemand,
                  now: float, *, local: Mapping[str, int] | None = None, local_kv: Mapping[str, int] | None = None,
                  max_age_s: float = 5.0, waited_s: float = 0.0, max_kv_wait_s: float = MAX_KV_WAIT_S) -> list[str]:
    """``candidates`` best first for ``demand`` (the module docstring); empty: the handover waits.
    ``local``/``local_kv``: this router's unfinished dispatches (count, KV tokens) per replica that its
    state does not show yet; ``waited_s``: how long this handover has waited for room so far."""
    local, local_kv = local or {}, local_kv or {}
    fresh = {rid: st for rid in candidates if (st := states.get(rid)) is not None and now - st.updated_at <= max_age_s}

    def free(rid: str) -> int:
        return fresh[rid].kv_free_tokens - local_kv.get(rid, 0)

    roomy = [rid for rid in fresh if free(rid) >= demand.kv_tokens]
    short = [rid for rid in fresh if free(rid) < demand.kv_tokens]
    unknown = sorted((rid for rid in candidates if rid not in fresh), key=lambda rid: (local.get(rid, 0), rid))
    roomy.sort(key=lambda rid: (-tpot_headroom(fresh[rid], demand.tpot_slo_s, local.get(rid, 0)),
                                max(fresh[rid].decoding, local.get(rid, 0)), -free(rid), rid))
    if roomy or unknown:
        return roomy + unknown
    never = all(0 < fresh[rid].kv_total_tokens < demand.kv_tokens for rid in short)
    if short and (never or waited_s >= max_kv_wait_s):
        return sorted(short, key=lambda rid: (-free(rid), rid))  # they refuse it, clearly
    return []


def ticket_demand(pending_request: PendingRequest | None) -> DecodeDemand:
    """What a ``decode(ticket, box)`` call's ticket asks for (zeros where it does not say)."""
    if pending_request is None:
        return DecodeDemand()
    ticket = pending_request.args[0] if pending_request.args else pending_request.kwargs.get("ticket")
    if not isinstance(ticket, Mapping):
        return DecodeDemand()
    tokens, tpot = ticket.get("kv_tokens"), ticket.get("tpot_slo_s")
    valid_tokens = isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0
    valid_tpot = isinstance(tpot, int | float) and not isinstance(tpot, bool) and 0 < tpot < math.inf
    return DecodeDemand(tokens if valid_tokens else 0, float(tpot) if valid_tpot else None)


class DecodeRequestRouter(RequestRouter):
    """Serve request router of the decode deployment (see the module docstring)."""

    def initialize_state(self, redis_url: str | None = None, namespace: str = "flowprefill",
                         cache_ttl_s: float = 0.02, max_state_age_s: float = 5.0, cluster: Any = None,  # noqa: ANN401
                         clock: Clock = WALL_CLOCK, max_kv_wait_s: float = MAX_KV_WAIT_S) -> None:
        """Set up (Serve passes ``request_router_kwargs``); ``cluster`` and ``clock`` are for tests."""
        if isinstance(max_kv_wait_s, bool) or not isinstance(max_kv_wait_s, int | float) or not max_kv_wait_s >= 0:
            raise ValueError(f"DecodeRequestRouter: max_kv_wait_s must be a number >= 0, got {max_kv_wait_s!r}")
        self._cluster = cluster if cluster is not None else (
            ClusterState(redis_url, namespace=namespace, socket_timeout_s=0.25) if redis_url else None)
        self._cache_ttl_s, self._max_age_s, self._max_kv_wait_s = cache_ttl_s, max_state_age_s, float(max_kv_wait_s)
        self._clock = require_clock(clock, "DecodeRequestRouter")
        self._states: dict[str, ReplicaQueueState] = {}
        self._read_at = float("-inf")
        self._local: dict[str, int] = {}  # replica id -> this router's unfinished dispatches
        self._routed: dict[str, tuple[str, float, int]] = {}  # internal request id -> (replica, routed at, KV)
        self._waiting: dict[str, float] = {}  # internal request id -> when it first found no room
        self.kv_waits = 0  # handovers that waited for a decode replica with room

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

    def _unseen_kv(self, states: Mapping[str, ReplicaQueueState]) -> dict[str, int]:
        """KV tokens this router dispatched per replica after that replica's state was written."""
        out: dict[str, int] = {}
        for rid, routed_at, tokens in self._routed.values():
            st = states.get(rid)
            if st is None or routed_at >= st.updated_at:
                out[rid] = out.get(rid, 0) + tokens
        return out

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """One replica per tier, best first (:func:`rank_decoders`); none while the handover waits."""
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if not by_id:
            return []
        if pending_request is not None:  # Serve asks again after a growing pause, not at once
            pending_request.routing_context.should_backoff = True
        now = self._clock()
        states = await self._read_states(now)
        demand = ticket_demand(pending_request)
        key = pending_request.metadata.internal_request_id if pending_request is not None else ""
        waited = now - self._waiting.get(key, now)
        ranked = rank_decoders(list(by_id), states, demand, now, local=self._local, local_kv=self._unseen_kv(states),
                               max_age_s=self._max_age_s, waited_s=waited, max_kv_wait_s=self._max_kv_wait_s)
        if not ranked and key not in self._waiting:
            self.kv_waits += 1
            self._waiting[key] = now
            self._forget_stale_waits(now)
            log.info("decode router: no decode replica has KV for %d tokens now; the handover waits (at most %.0f s)",
                     demand.kv_tokens, self._max_kv_wait_s)
        return [[by_id[rid]] for rid in ranked]

    def _forget_stale_waits(self, now: float) -> None:
        """Drop waits of requests cancelled before any replica took them (bounded memory)."""
        horizon = 4 * self._max_kv_wait_s + 60.0
        for key in [k for k, since in self._waiting.items() if now - since > horizon]:
            del self._waiting[key]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:  # noqa: ANN401
        """Count the dispatch (and its KV) on its replica until it completes."""
        rid, key = replica_id.unique_id, pending_request.metadata.internal_request_id
        self._waiting.pop(key, None)
        self._routed[key] = (rid, self._clock(), ticket_demand(pending_request).kv_tokens)
        self._local[rid] = self._local.get(rid, 0) + 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """The decode stream ended: it no longer counts."""
        routed = self._routed.pop(internal_request_id, None)
        if routed is not None:
            self._local[routed[0]] = max(self._local.get(routed[0], 0) - 1, 0)
