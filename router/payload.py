"""The :class:`~replicas.replica_request.ReplicaRequest` the ingress sends to the replica deployment.

Shared by the HTTP ingress and the gRPC service so both APIs hand replicas exactly the same record.
"""

from __future__ import annotations

from replicas.prefix_hash import PrefixNaming
from replicas.replica_request import ReplicaRequest
from router.protocol import GenerateRequest


def build_payload(req: GenerateRequest, arrival: float, naming: PrefixNaming | None = None) -> ReplicaRequest:
    """The replica request for ``req``, which the ingress accepted at ``arrival`` (epoch seconds), with
    its prompt's routing names under ``naming`` (the replicas' prefix cache; none without one)."""
    ids = tuple(req.prompt_token_ids or ())
    return ReplicaRequest(
        request_id=req.request_id, prompt_token_ids=ids, arrival_s=arrival,
        ttft_slo_s=req.slo.ttft_slo_s, sampling=req.sampling, tpot_slo_s=req.slo.tpot_slo_s,
        priority=req.slo.priority, slo_class=req.slo.class_name, sheddable=req.slo.sheddable,
        prefix_names=naming.names_of(ids) if naming is not None else (),
    )
