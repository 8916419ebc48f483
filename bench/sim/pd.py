"""Prefill/decode disaggregation in the simulator: prefill and decode pools and the KV handover.

A P/D deployment of ``prefill + decode`` replicas runs, as the real one does (README, Prefill/decode
disaggregation):

* **Prefill replicas** (:class:`SimPrefillReplica`): the colocated replica's scheduler, operator-
  level preemption and event loop, placed by the same router; when a prompt is computed its first
  token is sampled there and the request leaves the replica (the scheduler's ``on_finish``: its
  sequence is freed) and is handed over. A one-token request ends on the prefill replica.
* **The handover** (:class:`~bench.sim.kv_transfer.KVTransferCost`): the decode replica is chosen
  when the first token is out (:class:`DecodeRouter`: fewest requests decoding or on their way
  there, as ``router.decode_router`` ranks by decode batch room and free KV; ties rotate), and the
  request joins it ``cost.seconds(prompt tokens)`` later. The transfer costs neither replica
  compute.
* **Decode replicas** (:class:`SimDecodeReplica`): the colocated replica's decode batching with no
  prefill at all: steps back to back while anything decodes, a handed-over request joining at the
  next step boundary, step time from the measured decode curve (or the cost model's marginal token).

``first_token`` says when the client sees the first token: ``prefill`` (FlowPrefill's path: it
streams as soon as the prefill replica has it, so the transfer shows in the gap to the second token,
i.e. in TPOT) or ``decode`` (systems that stream only from the decode side, e.g. vLLM's
disaggregated-prefill proxy: TTFT includes the transfer).

Not modelled: KV memory limits (a decode replica admits every handover; colocated replicas are not
limited either), and the gather's compute on the prefill replica (``bench handover``: 96 ms of the
2048-token handover's 480 ms on this CPU): the whole handover is a delay of the request alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bench.sim.kv_transfer import KVTransferCost
from bench.sim.replica import DECODE, IDLE, SimReplica, SimRequest

FIRST_TOKEN_MODES = ("prefill", "decode")


@dataclass(frozen=True)
class PDConfig:
    """A disaggregated deployment: ``prefill`` and ``decode`` replicas and the handover's cost."""

    prefill: int
    decode: int
    transfer: KVTransferCost = field(default_factory=KVTransferCost)
    first_token: str = "prefill"

    def __post_init__(self) -> None:
        if self.prefill < 1 or self.decode < 1:
            raise ValueError(f"P/D: need at least one prefill and one decode replica, got {self.prefill}:"
                             f"{self.decode}")
        if self.first_token not in FIRST_TOKEN_MODES:
            raise ValueError(f"--pd-first-token: one of {FIRST_TOKEN_MODES}, got {self.first_token!r}")

    @property
    def replicas(self) -> int:
        """Replicas (GPUs) of both pools."""
        return self.prefill + self.decode

    @property
    def label(self) -> str:
        """``P:D a:b``, the sweep's column name."""
        return f"P:D {self.prefill}:{self.decode}"


def parse_ratio(text: str) -> tuple[int, int]:
    """``"1:3"`` -> ``(1, 3)`` (positive integers), with an error naming ``--pd-ratios``."""
    p, sep, d = text.strip().partition(":")
    try:
        if not sep:
            raise ValueError
        ratio = int(p), int(d)
    except ValueError:
        raise ValueError(f"--pd-ratios: expected P:D such as 1:3, got {text!r}") from None
    if min(ratio) < 1:
        raise ValueError(f"--pd-ratios: both sides must be >= 1, got {text!r}")
    return ratio


def split_replicas(total: int, ratio: tuple[int, int]) -> tuple[int, int]:
    """``total`` replicas split ``P:D`` (rounded, at least one of each): 16 at 1:3 -> (4, 12)."""
    if total < 2:
        raise ValueError(f"--replicas: a P/D deployment needs at least 2 replicas, got {total}")
    p = round(total * ratio[0] / (ratio[0] + ratio[1]))
    p = min(max(p, 1), total - 1)
    return p, total - p


class SimPrefillReplica(SimReplica):
    """A prefill-role replica: prefill exactly as colocated, then the request is handed over
    (``handoff(replica, request, t)``, set by the cluster) instead of decoding here."""

    handoff: Callable[[SimPrefillReplica, SimRequest, float], None] | None = None  # set by the cluster

    def _prefilled(self, t: float, sr: SimRequest) -> None:
        if sr.request.max_tokens <= 1 or self.handoff is None:  # nothing to hand over (or nowhere to)
            super()._prefilled(t, sr)
            return
        self._record(sr.idx, t - sr.request.arrival_s)
        self._leave(t, sr)  # the sequence is freed here once its KV is gathered
        self.handoff(self, sr, t)


class SimDecodeReplica(SimReplica):
    """A decode-role replica: handed-over requests join its decode batch at the next step boundary."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.joining: list[SimRequest] = []  # arrived during a step: they join at its end
        self.on_the_way = 0  # handovers assigned here whose KV is still in transit

    @property
    def decode_load(self) -> int:
        """What the decode router compares: requests decoding, joining or on their way here."""
        return len(self.decoding) + len(self.joining) + self.on_the_way

    def accept(self, t: float, sr: SimRequest) -> None:
        """``sr``'s KV arrived at ``t``: it decodes its remaining ``max_tokens - 1`` tokens here."""
        self.live[sr.request.request_id] = sr
        if self.mode == DECODE:
            self.joining.append(sr)
        else:
            assert self.mode == IDLE, "a decode replica never prefills"
            self._start_decoding(sr)
            self._start_step(t)
        self._reschedule()

    def _drain(self, t: float) -> None:
        joining, self.joining = self.joining, []
        for sr in joining:
            self._start_decoding(sr)
        super()._drain(t)


class DecodeRouter:
    """Chooses the decode replica of a handover: the fewest requests decoding or in transit there
    (most TPOT headroom: a step's time grows with its batch), ties broken by a rotating start."""

    def __init__(self, replicas: list[SimDecodeReplica]) -> None:
        if not replicas:
            raise ValueError("DecodeRouter: need at least one decode replica")
        self.replicas = replicas
        self._next = 0

    def choose(self) -> SimDecodeReplica:
        """The decode replica for the next handover."""
        n = len(self.replicas)
        start, self._next = self._next, (self._next + 1) % n
        best = self.replicas[start]
        for k in range(1, n):
            rep = self.replicas[(start + k) % n]
            if rep.decode_load < best.decode_load:
                best = rep
        return best
