"""The :class:`~replicas.replica_request.ReplicaRequest` the ingress sends to the replica deployment.

Shared by the HTTP ingress and the gRPC service so both APIs hand replicas exactly the same record.
"""

from __future__ import annotations

from replicas.replica_request import ReplicaRequest
from router.protocol import GenerateRequest


def build_payload(req: GenerateRequest, arrival: float) -> ReplicaRequest:
    """The replica request for ``req``, which the ingress accepted at ``arrival`` (epoch seconds)."""
    return ReplicaRequest(
        request_id=req.request_id, prompt_token_ids=tuple(req.prompt_token_ids or ()), arrival_s=arrival,
        ttft_slo_s=req.slo.ttft_slo_s, sampling=req.sampling, tpot_slo_s=req.slo.tpot_slo_s,
        priority=req.slo.priority, slo_class=req.slo.class_name, sheddable=req.slo.sheddable,
    )
