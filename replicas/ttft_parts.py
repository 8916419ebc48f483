"""Where a request's time to first token went: the TTFT decomposition, from ingress to first token.

The engine times each request it serves with a :class:`TTFTTimer` and hands the result,
:class:`EngineTTFT`, to the first :class:`~replicas.engine_types.RequestOutput`. The ingress adds
what it saw (its arrival stamp, the moment it called the replica handle, the moment the first
output reached it) and builds :class:`TTFTParts`, which goes back to the client: the
``x-flowprefill-ttft-parts`` response header (JSON) and, in a stream, the ``flowprefill.ttft_parts``
field of the chunk that carries the ``finish_reason``.

The parts, in seconds, in the order a request lives them:

* ``ingress_s``: ingress arrival (body read, validation, tokenizing, journal) until the handle call;
* ``handle_s``: the handle call until the engine accepted the request (Serve's request router,
  the hop to the replica actor, retries after a replica failure);
* ``queue_s``: engine acceptance until its prefill first started (waiting in the scheduler, and
  for the engine loop to reach an operator boundary);
* ``prefill_s``: compute of the prefill passes of the batches it ran in, plus the step from the
  end of its last pass to its first token (scheduling pass, sampling);
* ``suspended_s``: started, but its batch preempted (or, ``chunked``, between two chunks) while
  other work ran;
* ``decode_interleave_s``: decode steps of other requests run at operator boundaries of its
  running prefill;
* ``return_s``: the engine's first token until the ingress had it (replica, Serve, ingress).

They add up to the ingress's own TTFT (first output at the ingress minus its arrival) up to the
engine's bookkeeping between the marks (admission and scheduling passes while its batch runs,
tested to stay within ``2 ms + 2 %``). What a client measures beyond the sum is the proxy's two
hops (client to ingress, ingress to client) and the client itself: a load generator reports it as
``unattributed`` (:mod:`bench.ttft_breakdown`).

Clocks: every timestamp is the engine's :class:`~state.clock.Clock` (epoch seconds,
``WALL_CLOCK`` in production) and every engine-side duration is a difference of that clock, so
the engine's parts add up in one clock. ``handle_s`` and ``return_s`` subtract timestamps taken
in two processes (ingress and replica): on one machine they agree; across machines a clock skew
shows up in them, so they may be slightly negative and are validated as finite only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from state.fields import FieldError, FieldReader

#: The response header carrying :meth:`TTFTParts.to_dict` as compact JSON.
TTFT_PARTS_HEADER = "x-flowprefill-ttft-parts"
#: The parts in the order a request lives them (the fields of :class:`TTFTParts`).
PARTS = ("ingress_s", "handle_s", "queue_s", "prefill_s", "suspended_s", "decode_interleave_s", "return_s")
_CROSS_PROCESS = frozenset({"handle_s", "return_s"})  # subtract two processes' clocks: any finite value


class TTFTPartsError(FieldError):
    """A malformed TTFT decomposition; ``field`` names the bad field (``ttft_parts.queue_s``)."""


def _reader(data: object, where: str) -> FieldReader:
    def error(field: str | None, message: str) -> TTFTPartsError:
        return TTFTPartsError(f"{where}.{field}" if field else where, message)

    return FieldReader(data, error)


@dataclass(frozen=True)
class EngineTTFT:
    """What the engine measured of one request's TTFT: when it accepted the request and emitted the
    first token (epoch seconds), and the engine's parts (seconds, see the module docstring)."""

    accepted_s: float
    first_token_s: float
    queue_s: float
    prefill_s: float
    suspended_s: float
    decode_interleave_s: float

    @property
    def engine_ttft_s(self) -> float:
        """First token minus acceptance: what the engine's parts add up to (within its bookkeeping)."""
        return self.first_token_s - self.accepted_s

    @property
    def parts_s(self) -> float:
        """The sum of the engine's four parts."""
        return self.queue_s + self.prefill_s + self.suspended_s + self.decode_interleave_s

    def to_dict(self) -> dict[str, float]:
        """JSON-ready form (what :meth:`from_dict` parses)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object, where: str = "ttft_timing") -> EngineTTFT:
        """Parse and validate; raises :class:`TTFTPartsError` naming the bad field."""
        r = _reader(data, where)
        return cls(accepted_s=r.number("accepted_s"), first_token_s=r.number("first_token_s"),
                   **{f: r.number(f, minimum=0.0) for f in ("queue_s", "prefill_s", "suspended_s",
                                                            "decode_interleave_s")})


class TTFTTimer:
    """One request's TTFT clockwork inside the engine (the engine calls it; no clock is read here).

    ``started(now)`` when a batch holding the request starts or resumes, ``stopped(now)`` when that
    batch is suspended or its chunk ends with the request's prompt unfinished, ``computed(dt)`` per
    executor run of its batch, ``interleaved(dt)`` per decode step while its batch is the current
    one, then ``finished(prefill_end, first_token)`` gives the :class:`EngineTTFT`.
    """

    __slots__ = ("accepted_s", "started_s", "stopped_s", "running", "queue_s", "prefill_s", "suspended_s",
                 "decode_interleave_s")

    def __init__(self, accepted_s: float) -> None:
        self.accepted_s = accepted_s
        self.started_s: float | None = None
        self.stopped_s: float | None = None
        self.running = False
        self.queue_s = self.prefill_s = self.suspended_s = self.decode_interleave_s = 0.0

    def started(self, now: float) -> None:
        """Its batch starts (the first time: the queue ends) or resumes (a suspension ends)."""
        if self.running:
            return
        if self.started_s is None:
            self.started_s = now
            self.queue_s = max(now - self.accepted_s, 0.0)
        elif self.stopped_s is not None:
            self.suspended_s += max(now - self.stopped_s, 0.0)
        self.running, self.stopped_s = True, None

    def stopped(self, now: float) -> None:
        """Its batch stops with its prompt unfinished (preempted, or a chunk ended)."""
        if self.running:
            self.running, self.stopped_s = False, now

    def computed(self, seconds: float) -> None:
        """Its batch's program ran for ``seconds``."""
        if self.running:
            self.prefill_s += max(seconds, 0.0)

    def interleaved(self, seconds: float) -> None:
        """A decode step of ``seconds`` ran at an operator boundary of its running prefill."""
        if self.running:
            self.decode_interleave_s += max(seconds, 0.0)

    def finished(self, prefill_end_s: float, first_token_s: float) -> EngineTTFT:
        """Its prompt is prefilled (at ``prefill_end_s``) and its first token emitted: the engine's parts."""
        if self.started_s is None:  # never marked running (a target that skipped the marks): all queue
            self.queue_s = max(prefill_end_s - self.accepted_s, 0.0)
        self.running = False
        return EngineTTFT(self.accepted_s, first_token_s, self.queue_s,
                          self.prefill_s + max(first_token_s - prefill_end_s, 0.0), self.suspended_s,
                          self.decode_interleave_s)


@dataclass(frozen=True)
class TTFTParts:
    """A request's TTFT decomposed from the ingress to the first token at the ingress (seconds; the
    fields are :data:`PARTS`, described in the module docstring)."""

    ingress_s: float
    handle_s: float
    queue_s: float
    prefill_s: float
    suspended_s: float
    decode_interleave_s: float
    return_s: float

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise TTFTPartsError(f"ttft_parts.{f.name}", f"expected a finite number, got {v!r}")
            if f.name not in _CROSS_PROCESS and v < 0:
                raise TTFTPartsError(f"ttft_parts.{f.name}", f"expected a number >= 0, got {v!r}")

    @property
    def total_s(self) -> float:
        """The sum of the parts: the TTFT the ingress saw, less the engine's bookkeeping."""
        return sum(getattr(self, name) for name in PARTS)

    @classmethod
    def assemble(cls, arrival_s: float, dispatched_s: float, engine: EngineTTFT, received_s: float) -> TTFTParts:
        """The parts of a request the ingress accepted at ``arrival_s``, sent through the replica handle
        at ``dispatched_s`` and whose first output it had at ``received_s`` (all epoch seconds), with
        the engine's measurements ``engine``."""
        return cls(ingress_s=max(dispatched_s - arrival_s, 0.0), handle_s=engine.accepted_s - dispatched_s,
                   queue_s=engine.queue_s, prefill_s=engine.prefill_s, suspended_s=engine.suspended_s,
                   decode_interleave_s=engine.decode_interleave_s, return_s=received_s - engine.first_token_s)

    def to_dict(self) -> dict[str, float]:
        """JSON-ready form (what :meth:`from_dict` parses), values rounded to microseconds."""
        return {name: round(getattr(self, name), 6) for name in PARTS}

    def to_header(self) -> str:
        """The value of the :data:`TTFT_PARTS_HEADER` header: compact JSON."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: object, where: str = "ttft_parts") -> TTFTParts:
        """Parse and validate (every part required); raises :class:`TTFTPartsError` naming the field."""
        r = _reader(data, where)
        return cls(**{name: r.number(name) if name in _CROSS_PROCESS else r.number(name, minimum=0.0)
                      for name in PARTS})


def parse_ttft_parts(value: object) -> TTFTParts | None:
    """``value`` (a header's JSON text, or a decoded object) as :class:`TTFTParts`; None when it is
    absent or malformed in any way (a client must not fail a request over its diagnostics)."""
    if value is None:
        return None
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except (ValueError, UnicodeDecodeError):
            return None
    if not isinstance(value, Mapping):
        return None
    try:
        return TTFTParts.from_dict(value)
    except (TTFTPartsError, TypeError, ValueError):
        return None


def engine_ttft_of(value: Any) -> EngineTTFT | None:  # noqa: ANN401 (an output dict's field)
    """An output's engine timing (an :class:`EngineTTFT` or its dict) or None when absent or malformed."""
    if value is None or isinstance(value, EngineTTFT):
        return value
    try:
        return EngineTTFT.from_dict(value)
    except (TTFTPartsError, TypeError, ValueError):
        return None
