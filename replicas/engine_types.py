"""The types every engine kind and the replica deployment share: outputs, sinks, live requests.

Torch-free, so that the echo and vLLM engines and the deployment load without torch, and so that
the native engine's modules (:mod:`replicas.engine`, :mod:`replicas.engine_decode`) import these
from here instead of from each other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from replicas.detokenize import OutputStream
from replicas.sampling_params import SamplingParams
from replicas.scheduler.request import Request
from replicas.ttft_parts import EngineTTFT, TTFTTimer

if TYPE_CHECKING:  # torch: only the native engine builds samplers
    from replicas.sampling import RequestSampler


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled (or prompt) token's log probability and its most likely alternatives
    (``(token id, logprob)``, most likely first), as asked by ``SamplingParams.logprobs`` (or
    ``prompt_logprobs``)."""

    token_id: int
    logprob: float | None  # None: the first prompt token of prompt logprobs, which has none
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None  # prompt logprobs: the token's rank in its position's distribution (1: most likely)


@dataclass(frozen=True)
class RequestOutput:
    """One increment of a request's output, as the client stream sees it."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    # "stop" | "length" | "abort" | "rejected" | "error" | "handover"; "handover_lost" from a decode replica
    # whose handover died with its prefill replica (router/pd_dispatch.py prefills it again)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None  # set on the first output: engine arrival to first token
    error: str | None = None
    retry_after_s: float | None = None  # with finish_reason "rejected": when a retry may be admitted
    ttft_timing: EngineTTFT | None = None  # on the first output, where the engine measured it (replicas.ttft_parts)
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token id, when the request asked for them
    index: int = 0  # the choice (of the request's ``n``) these tokens belong to
    choices_left: int = 0  # choices still generating after this output; the request ends with a finish at 0
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # once, on the first output, when asked for
    # with finish_reason "handover" (a prefill engine): the KVHandover a decode engine continues from
    handover: Any = None


def ends_request(out: RequestOutput | Mapping[str, Any]) -> bool:
    """Whether ``out`` (an output, or its dict after Serve) is its request's last: a finish reason with no
    other choice still generating (every refusal and failure ends the whole request)."""
    if isinstance(out, RequestOutput):
        reason, left = out.finish_reason, out.choices_left
    else:
        reason, left = out.get("finish_reason"), out.get("choices_left") or 0
    return reason is not None and (left == 0 or reason not in ("stop", "length"))


Sink = Callable[[RequestOutput], None]


@dataclass(eq=False)
class LiveRequest:
    """The native engine's state of an admitted request: its scheduler request, sampling state, output
    stream and decode position."""

    request: Request
    params: SamplingParams
    sink: Sink
    seq_id: int
    sampler: RequestSampler
    stream: OutputStream
    position: int = 0  # next position to decode
    emitted_first: bool = False
    timer: TTFTTimer | None = None  # its TTFT decomposition until the first token (replicas.ttft_parts)
    extra: dict[str, Any] = field(default_factory=dict)
    index: int = 0  # the choice this sequence generates (replicas.parallel_sampling)
    choices: list[LiveRequest] = field(default_factory=list)  # on choice 0: the other choices' sequences
    open_choices: int = 1  # on choice 0: the request's choices still generating
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # as its prefill computes them

    @property
    def key(self) -> str:
        """Its decode-batch key: the request id for choice 0, ``"{request id}#{index}"`` for the others."""
        rid = self.request.request_id
        return rid if self.index == 0 else f"{rid}#{self.index}"
