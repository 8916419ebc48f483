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
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from cluster.state_client import ClusterState, StateUnavailable
from cluster.state_schema import QueuedRequest, ReplicaInfo, ReplicaQueueState
from replicas.autoscaling_stats import AutoscalingStats
from replicas.engine_api import ReplicaEngineAPI, make_engine
from replicas.errors import InvalidRequestError
from replicas.sampling import SamplingParams
from replicas.scheduler.request import Request

log = logging.getLogger("flowprefill.replica")

_STATUS = {"waiting": "waiting", "running": "running", "suspended": "suspended"}


def request_from_payload(payload: dict[str, Any]) -> tuple[Request, SamplingParams]:
    """The engine request and sampling parameters of a router payload (validated by the router)."""
    try:
        request = Request(
            str(payload["request_id"]), list(payload["prompt_token_ids"]), arrival_s=float(payload["arrival_s"]),
            ttft_slo_s=float(payload["ttft_slo_s"]), tpot_slo_s=payload.get("tpot_slo_s"),
            priority=int(payload.get("priority", 0)), slo_class=str(payload.get("slo_class", "default")),
            sheddable=bool(payload.get("sheddable", False)), max_tokens=int(payload["sampling"]["max_tokens"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidRequestError("payload", f"malformed replica payload: {exc}") from exc
    return request, SamplingParams.from_dict(payload["sampling"])


def queue_state_from_stats(replica_id: str, stats: dict[str, Any], seq: int,
                           engine_kind: str = "flowprefill") -> ReplicaQueueState:
    """Convert the engine's stats snapshot into the Redis queue-state record."""
    entries = []
    for status in ("running", "suspended", "waiting"):
        for row in stats.get(status, ()):
            entries.append(QueuedRequest(row["request_id"], _STATUS[status], row["deadline"],
                                         row["predicted_remaining_s"], row.get("remaining_tokens", 0)))
    return ReplicaQueueState(
        replica_id=replica_id, engine_kind=engine_kind, model=str(stats.get("model", "")),
        updated_at=time.time(), seq=seq, requests=tuple(entries),
        running_remaining_s=float(stats.get("running_remaining_s", 0.0)),
        kv_free_tokens=int(stats.get("kv_free_tokens", 0)),
        preemptions=int((stats.get("counters") or {}).get("preemptions", stats.get("preemptions", 0))),
        cost_scale=float(stats.get("cost_scale", 1.0)),
    )


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
        self._latest: dict[str, Any] | None = None
        self._seq = 0
        self.state_ttl_s = state_ttl_s
        self.engine: ReplicaEngineAPI = await asyncio.to_thread(
            make_engine, engine_kind, engine or {}, clock=time.time, on_state_change=self._on_state_change)
        self.engine.start()
        self.autoscaling = AutoscalingStats(self.engine.cost_model.predict, clock=time.time)
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
                           hardware=hardware, registered_at=time.time())
        await self.cluster.register_replica(self.replica_id, info)
        await self.cluster.save_profile(self.engine.model_name, hardware, self.engine.cost_model)

    def _on_state_change(self, stats: dict[str, Any]) -> None:
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
                state = queue_state_from_stats(self.replica_id, self._latest, self._seq, self.engine.kind)
                if await self.cluster.publish_replica_state(self.replica_id, state):
                    log.info("replica %s: not in Redis's registry (Redis restarted?); registering again",
                             self.replica_id)
                    await self._register()
            except StateUnavailable as exc:
                log.warning("replica %s: cannot publish queue state (%s)", self.replica_id, exc)
                await asyncio.sleep(heartbeat)
            except Exception:
                log.exception("replica %s: publishing queue state failed", self.replica_id)

    async def generate(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream the outputs of one request (dicts of :class:`~replicas.engine.RequestOutput`)."""
        received = time.time()
        request, params = request_from_payload(payload)
        first = True
        async for out in self.autoscaling.observe(request, self.engine.generate(request, params)):
            row = {**asdict(out), "replica_id": self.replica_id}
            if first and out.token_ids:  # the replica's own TTFT: receipt to first token, no router
                row["replica_ttft_s"], first = time.time() - received, False
            yield row

    def stats(self) -> dict[str, Any]:
        """The engine's latest queue-state snapshot plus this replica's id, and the compute threads of
        an engine that computes in this process (the native one; vLLM runs its own server)."""
        out = {"replica_id": self.replica_id, **self.engine.stats()}
        threads = getattr(self.engine, "compute_threads", None)
        if threads is not None:
            out["compute_threads"] = threads
        return out

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics hook: predicted prefill load and recent TTFT attainment
        (see :mod:`replicas.autoscaling_stats`; the policy is :mod:`cluster.autoscaling`)."""
        return self.autoscaling.snapshot(float(self.engine.stats().get("pending_work_s", 0.0)))

    def tokenizer_info(self) -> dict[str, Any]:
        """What the router needs to validate prompts: context length and vocabulary size."""
        return {"model": self.engine.model_name, "max_model_len": self.engine.max_model_len,
                "vocab_size": self.engine.vocab_size}

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
