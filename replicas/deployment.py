"""The Ray Serve replica deployment: one engine per replica, queue state published to Redis.

On start the replica registers in Redis under its Serve replica id; on every scheduler event the
engine hands it a queue-state snapshot, which a publisher task writes with a TTL heartbeat
(coalescing bursts: at most one write in flight, always the newest snapshot); on shutdown it
deregisters. Outputs stream back through Serve's streaming handles as plain dicts.
No policy logic lives here: this is an adapter between Serve, the engine and Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict, replace
from typing import Any

from replicas.autoscaling_stats import AutoscalingStats
from replicas.engine_api import ReplicaEngineAPI, make_engine
from replicas.engine_stats import EngineStats
from replicas.engine_types import RequestOutput
from replicas.errors import HandoverLost
from replicas.handover_transport import HandoverStats, receive_handover, send_handover
from replicas.replica_request import ReplicaRequest, replica_request_of
from state.client import ClusterState, StateUnavailable
from state.clock import WALL_CLOCK
from state.schema import ReplicaInfo

log = logging.getLogger("flowprefill.replica")

class ReplicaServer:
    """One engine behind Serve (one GPU per replica on GPU nodes); ``engine_kind`` picks it
    (:data:`replicas.engine_api.ENGINE_KINDS`) and ``engine`` holds its settings."""

    async def __init__(self, engine: dict[str, Any] | None = None, redis_url: str | None = None,
                       namespace: str = "flowprefill", state_ttl_s: float = 5.0,
                       engine_kind: str = "flowprefill") -> None:
        from ray import serve

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.loop = asyncio.get_running_loop()
        self._dirty = asyncio.Event()
        self._latest: EngineStats | None = None
        self._seq = 0
        self._prefix_version = 0  # the prefix summary version last written to Redis
        self.state_ttl_s = state_ttl_s
        self.engine: ReplicaEngineAPI = await asyncio.to_thread(
            make_engine, engine_kind, engine or {}, clock=WALL_CLOCK, on_state_change=self._on_state_change)
        self.engine.start()
        if hasattr(self.engine, "replica_id"):  # names the source of a prefill engine's handovers
            self.engine.replica_id = self.replica_id
        self.handovers = HandoverStats()
        self.autoscaling = AutoscalingStats(self.engine.cost_model.predict, clock=WALL_CLOCK)
        self.cluster = ClusterState(redis_url, namespace=namespace, state_ttl_s=state_ttl_s) if redis_url else None
        self._publisher: asyncio.Task[None] | None = None
        if self.cluster is not None:
            try:
                await self._register()
            except StateUnavailable as exc:
                log.warning("replica %s: Redis unavailable at start (%s); will keep publishing", self.replica_id, exc)
            self._publisher = asyncio.create_task(self._publish_loop())
        self._on_state_change(self.engine.stats())

    async def _register(self) -> None:
        """Register this replica's info and cost profile in Redis (again after Redis lost them)."""
        assert self.cluster is not None
        hardware = "_".join(self.engine.cost_model.hardware.split()) or "unknown"
        info = ReplicaInfo(self.replica_id, self.engine.model_name, self.engine.kind, self.engine.policy_name,
                           hardware=hardware, registered_at=WALL_CLOCK())
        await self.cluster.register_replica(self.replica_id, info)
        await self.cluster.save_profile(self.engine.model_name, hardware, self.engine.cost_model.to_dict())

    def _on_state_change(self, stats: EngineStats) -> None:
        """Called on the engine thread after every event: keep the newest snapshot, wake the publisher."""
        self._latest = stats
        self.loop.call_soon_threadsafe(self._dirty.set)

    async def _publish_loop(self) -> None:
        assert self.cluster is not None
        heartbeat = self.state_ttl_s / 3
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), heartbeat)
            except TimeoutError:
                pass
            self._dirty.clear()
            if self._latest is None:
                continue
            self._seq += 1
            try:
                latest = self._latest
                state = latest.queue_state(self.replica_id, self.engine.kind, self._seq, WALL_CLOCK())
                prefix = latest.prefix if latest.prefix and latest.prefix.version != self._prefix_version else None
                if await self.cluster.publish_replica_state(self.replica_id, state, prefix=prefix):
                    log.info("replica %s: not in Redis's registry (Redis restarted?); registering again",
                             self.replica_id)
                    await self._register()
                    self._prefix_version = 0  # Redis lost it too: write it again next time
                elif prefix is not None:
                    self._prefix_version = prefix.version
            except StateUnavailable as exc:
                log.warning("replica %s: cannot publish queue state (%s)", self.replica_id, exc)
                await asyncio.sleep(heartbeat)
            except Exception:
                log.exception("replica %s: publishing queue state failed", self.replica_id)

    async def generate(self, payload: ReplicaRequest | dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream the outputs of one request (dicts of :class:`~replicas.engine_types.RequestOutput`);
        a plain mapping is parsed by :meth:`ReplicaRequest.from_dict` (a bad field is refused, named)."""
        received = WALL_CLOCK()
        replica_request = replica_request_of(payload)
        request, params = replica_request.to_engine_request(), replica_request.sampling
        first = True
        async for out in self.autoscaling.observe(request, self.engine.generate(request, params)):
            row = {**asdict(replace(out, handover=None)), "replica_id": self.replica_id}
            if first and out.token_ids:  # the replica's own TTFT: receipt to first token, no router
                row["replica_ttft_s"], first = WALL_CLOCK() - received, False
            if out.finish_reason == "handover":  # a prefill engine: the KV goes on through Ray's object store
                row["handover"] = send_handover(out.handover, self.handovers)
            yield row

    async def decode(self, ticket: dict[str, Any], box: list[Any]) -> AsyncIterator[dict[str, Any]]:
        """Continue a request a prefill replica handed over (a decode-role engine): ``ticket`` is the
        prefill replica's handover row (:func:`~replicas.handover_transport.send_handover`), ``box``
        holds the object reference of its :class:`~replicas.handover.KVHandover`. Streams the decoded
        tokens' output dicts as :meth:`generate` does; the first carries the transfer's timing. A handover
        whose object died with its prefill replica ends at once with finish_reason ``handover_lost``
        (nothing admitted): the router prefills the request again."""
        continue_decoding = getattr(self.engine, "continue_decoding", None)
        if continue_decoding is None or getattr(self.engine, "role", "colocated") == "prefill":
            raise RuntimeError(f"replica {self.replica_id} ({self.engine.kind}) does not decode handed-over requests")
        try:
            handover, timing = await receive_handover(ticket, box, self.handovers)
        except HandoverLost as exc:
            log.warning("replica %s: %s", self.replica_id, exc)
            lost = RequestOutput(str(ticket.get("request_id", "?")), (), "", "handover_lost", error=str(exc))
            yield {**asdict(lost), "replica_id": self.replica_id}
            return
        first = True
        async for out in continue_decoding(handover):
            row = {**asdict(replace(out, handover=None)), "replica_id": self.replica_id}
            if first:
                row["handover_timing"], first = timing, False
            yield row

    def stats(self) -> dict[str, Any]:
        """The engine's latest queue-state snapshot plus this replica's id, and the compute threads of
        an engine that computes in this process (the native one; vLLM runs its own server)."""
        out = {"replica_id": self.replica_id, **self.engine.stats().to_dict(), "handover": self.handovers.summary()}
        threads = getattr(self.engine, "compute_threads", None)
        if threads is not None:
            out["compute_threads"] = threads
        return out

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics hook: predicted prefill load and recent TTFT attainment
        (see :mod:`replicas.autoscaling_stats`; the policy is :mod:`cluster.autoscaling`)."""
        return self.autoscaling.snapshot(self.engine.stats().pending_work_s)

    def tokenizer_info(self) -> dict[str, Any]:
        """What the router needs to validate prompts (context length, vocabulary size) and to name a
        prompt's prefix as this engine's cache does (``prefix``: salt, block size and routing stride,
        or None without a prefix cache)."""
        return {"model": self.engine.model_name, "max_model_len": self.engine.max_model_len,
                "vocab_size": self.engine.vocab_size, "prefix": self.engine.prefix_naming()}

    def check_health(self) -> None:
        """Serve's health probe: the engine loop must be alive."""
        if not self.engine.is_alive():
            raise RuntimeError("engine loop is not running")

    async def __del__(self) -> None:
        if getattr(self, "_publisher", None) is not None:
            self._publisher.cancel()
        if getattr(self, "engine", None) is not None:
            await asyncio.to_thread(self.engine.shutdown)
        if getattr(self, "cluster", None) is not None:
            try:
                await self.cluster.deregister_replica(self.replica_id)
                await self.cluster.close()
            except StateUnavailable:
                pass
