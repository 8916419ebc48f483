"""The request payload the ingress sends to the replica deployment's ``generate``.

Shared by the HTTP ingress and the gRPC service so both APIs hand replicas exactly the same dict.
"""

from __future__ import annotations

from typing import Any

from router.protocol import GenerateRequest


def build_payload(req: GenerateRequest, arrival: float) -> dict[str, Any]:
    """The replica payload for ``req``, which arrived at ``arrival`` (epoch seconds).

    Keys: ``request_id``, ``prompt_token_ids``, ``arrival_s``, ``ttft_slo_s``, ``tpot_slo_s``,
    ``priority``, ``slo_class``, ``sheddable``, ``deadline`` (arrival + TTFT SLO), ``prompt_tokens``
    and ``sampling`` (``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``,
    ``stop_token_ids``, ``ignore_eos``).
    """
    s = req.sampling
    return {
        "request_id": req.request_id, "prompt_token_ids": list(req.prompt_token_ids or ()), "arrival_s": arrival,
        "ttft_slo_s": req.slo.ttft_slo_s, "tpot_slo_s": req.slo.tpot_slo_s, "priority": req.slo.priority,
        "slo_class": req.slo.class_name, "sheddable": req.slo.sheddable,
        "deadline": arrival + req.slo.ttft_slo_s, "prompt_tokens": req.num_prompt_tokens or 0,
        "sampling": {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
                     "top_k": s.top_k, "seed": s.seed, "stop": list(s.stop),
                     "stop_token_ids": list(s.stop_token_ids), "ignore_eos": s.ignore_eos},
    }
