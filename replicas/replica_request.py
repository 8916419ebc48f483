"""The request the ingress hands a replica: one typed record from the router to the engine.

The HTTP and gRPC ingresses build a :class:`ReplicaRequest` (:func:`router.payload.build_payload`)
and pass the object itself through the replica deployment's handle; Serve's request router reads
its deadline and size for placement, the replica turns it into the scheduler's
:class:`~replicas.scheduler.request.Request`. Where it crosses a process boundary as data (the
Redis journal, a caller with a plain dict), :meth:`ReplicaRequest.from_dict` is its one parser:
every field is validated and a bad one raises :class:`~replicas.errors.InvalidRequestError` naming
it (``payload.sampling.top_p``). Times are Unix epoch seconds (:mod:`state.clock`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from replicas.errors import InvalidRequestError
from replicas.sampling_params import SamplingParams
from replicas.scheduler.request import Request
from state.fields import FieldReader


@dataclass(frozen=True)
class ReplicaRequest:
    """One accepted request: its prompt, SLO and sampling parameters, and when the ingress accepted it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    arrival_s: float  # epoch seconds at the ingress (the TTFT clock starts here)
    ttft_slo_s: float
    sampling: SamplingParams
    tpot_slo_s: float | None = None
    priority: int = 0
    slo_class: str = "default"
    sheddable: bool = False
    prefix_names: tuple[str, ...] = ()  # the prompt's routing names (replicas.prefix_hash), for placement only

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))
        object.__setattr__(self, "prefix_names", tuple(self.prefix_names))
        if not isinstance(self.request_id, str) or not self.request_id:
            raise InvalidRequestError("request_id", f"request_id must be a non-empty string, got {self.request_id!r}")
        if not self.prompt_token_ids:
            raise InvalidRequestError("prompt_token_ids", "prompt_token_ids must not be empty")
        if not isinstance(self.sampling, SamplingParams):
            raise InvalidRequestError("sampling",
                                      f"sampling must be SamplingParams, got {type(self.sampling).__name__}")

    @property
    def deadline(self) -> float:
        """Absolute TTFT deadline (epoch seconds)."""
        return self.arrival_s + self.ttft_slo_s

    @property
    def prompt_tokens(self) -> int:
        """Prompt length in tokens."""
        return len(self.prompt_token_ids)

    def to_engine_request(self) -> Request:
        """The scheduler's view of this request (validated again by :class:`Request`)."""
        try:
            return Request(self.request_id, list(self.prompt_token_ids), arrival_s=self.arrival_s,
                           ttft_slo_s=self.ttft_slo_s, tpot_slo_s=self.tpot_slo_s, priority=self.priority,
                           slo_class=self.slo_class, sheddable=self.sheddable, max_tokens=self.sampling.max_tokens)
        except ValueError as exc:
            raise InvalidRequestError("payload", f"malformed replica request: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what :meth:`from_dict` parses)."""
        return {
            "request_id": self.request_id, "prompt_token_ids": list(self.prompt_token_ids),
            "arrival_s": self.arrival_s, "ttft_slo_s": self.ttft_slo_s, "tpot_slo_s": self.tpot_slo_s,
            "priority": self.priority, "slo_class": self.slo_class, "sheddable": self.sheddable,
            "prefix_names": list(self.prefix_names),
            "sampling": self.sampling.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: object, where: str = "payload") -> ReplicaRequest:
        """Parse and validate; a bad field raises :class:`InvalidRequestError` naming ``where.field``."""
        def error(field: str | None, message: str) -> InvalidRequestError:
            path = f"{where}.{field}" if field else where
            return InvalidRequestError(path, f"{path}: {message}")

        r = FieldReader(data, error)
        sampling = r.obj("sampling")
        try:
            params = SamplingParams.from_dict(sampling)
        except InvalidRequestError as exc:
            raise error(f"sampling.{exc.field}", exc.message) from None
        return cls(
            request_id=r.text("request_id", non_empty=True),
            prompt_token_ids=r.integers("prompt_token_ids", non_empty=True),
            arrival_s=r.number("arrival_s"),
            ttft_slo_s=r.number("ttft_slo_s", positive=True),
            tpot_slo_s=r.number("tpot_slo_s", None, positive=True),
            priority=r.integer("priority", 0),
            slo_class=r.text("slo_class", "default", non_empty=True),
            sheddable=r.boolean("sheddable", False),
            sampling=params,
            prefix_names=_names(r),
        )


def _names(r: FieldReader) -> tuple[str, ...]:
    names = r.array("prefix_names", [])
    if not all(isinstance(n, str) and len(n) == 8 and all(c in "0123456789abcdef" for c in n) for n in names):
        raise r.fail("prefix_names", "expected a list of 8-character lowercase hex routing names")
    return tuple(names)


def replica_request_of(payload: ReplicaRequest | Mapping[str, Any]) -> ReplicaRequest:
    """``payload`` as a :class:`ReplicaRequest` (a mapping is parsed by :meth:`ReplicaRequest.from_dict`)."""
    return payload if isinstance(payload, ReplicaRequest) else ReplicaRequest.from_dict(payload)
