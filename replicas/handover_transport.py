"""Moving a :class:`~replicas.handover.KVHandover` between replica actors through Ray's object store.

The prefill replica puts the handover in its node's object store (:func:`send_handover`) and
streams a *ticket* (a plain dict: the request id, the bytes, when it was ready, and a one-element
list holding the object reference, so no Ray call resolves it on the way) to the router, which
passes it to the decode replica it chose; that replica fetches the object (:func:`receive_handover`:
zero-copy on the same node, a transfer between nodes' object stores otherwise). Both ends measure
(bytes, put/get ms, ready-to-admitted ms) into :class:`HandoverStats`, which the replica's ``stats()``
reports. The router holds the reference until the decode replica streams, so a decode replica that
dies before its first token can be sent the same handover again.

The object lives as long as its owner, the prefill replica that put it: one that dies before a decode
replica fetched it takes the KV with it, and :func:`receive_handover` raises :class:`HandoverLost`.
The router then prefills the request again elsewhere and sends the new handover with the ticket's
``generated`` field set to the tokens the client already has, which replace the new handover's own
(they may differ under unseeded sampling; the prompt's KV does not depend on them).

Ray is imported lazily: this module loads where the deployment does, never in the engine.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from replicas.errors import HandoverError, HandoverLost
from state.clock import WALL_CLOCK

if TYPE_CHECKING:  # torch: the deployment loads without it; only the engine's objects carry tensors
    from replicas.handover import KVHandover

log = logging.getLogger("flowprefill.handover")
_WINDOW = 1024  # recent handovers kept for percentiles


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else 0.0


class HandoverStats:
    """Counts, bytes and timings (ms) of the handovers a replica sent or received, recent ones kept."""

    def __init__(self) -> None:
        self.sent = self.received = 0
        self.bytes_sent = self.bytes_received = 0
        self.recent: dict[str, deque[float]] = {name: deque(maxlen=_WINDOW)
                                                for name in ("gather_ms", "put_ms", "get_ms", "transfer_ms")}

    def record(self, **ms: float) -> None:
        """Add timings (``gather_ms=...``, ...)."""
        for name, value in ms.items():
            self.recent[name].append(value)

    def summary(self) -> dict[str, Any]:
        """Totals, and p50/p99 and the latest value of each timing over the recent window."""
        out: dict[str, Any] = {"sent": self.sent, "received": self.received, "bytes_sent": self.bytes_sent,
                               "bytes_received": self.bytes_received}
        for name, values in self.recent.items():
            if values:
                out[name] = {"p50": _percentile(values, 0.5), "p99": _percentile(values, 0.99), "n": len(values),
                             "last": values[-1]}
        return out


def send_handover(h: KVHandover, stats: HandoverStats) -> dict[str, Any]:
    """Put ``h`` in the object store; returns the ticket the router forwards to a decode replica."""
    import ray

    started = time.perf_counter()
    ref = ray.put(h)
    put_ms = (time.perf_counter() - started) * 1e3
    stats.sent += 1
    stats.bytes_sent += h.nbytes
    stats.record(gather_ms=h.gather_s * 1e3, put_ms=put_ms)
    return {"request_id": h.request_id, "bytes": h.nbytes, "kv_tokens": h.num_tokens + 1, "source": h.source,
            "tpot_slo_s": h.request.tpot_slo_s, "ready_at": WALL_CLOCK(), "gather_ms": h.gather_s * 1e3,
            "put_ms": put_ms, "box": [ref]}


def check_ticket(ticket: object) -> dict[str, Any]:
    """A ticket's fields, validated (:class:`HandoverError` names a bad one); ``box`` stays out."""
    if not isinstance(ticket, Mapping):
        raise HandoverError("ticket", f"expected a mapping, got {type(ticket).__name__}")
    rid, nbytes, tokens, ready = (ticket.get(k) for k in ("request_id", "bytes", "kv_tokens", "ready_at"))
    if not isinstance(rid, str) or not rid:
        raise HandoverError("ticket.request_id", f"expected a non-empty string, got {rid!r}")
    for name, value in (("bytes", nbytes), ("kv_tokens", tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise HandoverError(f"ticket.{name}", f"expected a positive integer, got {value!r}")
    if isinstance(ready, bool) or not isinstance(ready, int | float):
        raise HandoverError("ticket.ready_at", f"expected epoch seconds, got {ready!r}")
    tpot = ticket.get("tpot_slo_s")
    if tpot is not None and (isinstance(tpot, bool) or not isinstance(tpot, int | float) or not tpot > 0
                             or tpot == float("inf")):
        raise HandoverError("ticket.tpot_slo_s", f"expected null or a positive number of seconds, got {tpot!r}")
    generated = ticket.get("generated")
    if generated is not None and (not isinstance(generated, list | tuple) or not generated or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in generated)):
        raise HandoverError("ticket.generated", f"expected a non-empty list of token ids, got {generated!r}")
    return {k: v for k, v in ticket.items() if k != "box"}


async def receive_handover(ticket: Mapping[str, Any], box: Sequence[Any], stats: HandoverStats
                           ) -> tuple[KVHandover, dict[str, float]]:
    """Fetch the handover a ticket names; returns it with its timing (ms), and with the ticket's
    ``generated`` tokens in place of its own where the ticket has them. Raises :class:`HandoverError`
    when the ticket, the reference or the object is not what it claims, :class:`HandoverLost` when
    the object died with its owner."""
    import ray

    from replicas.handover import KVHandover

    fields = check_ticket(ticket)
    if not isinstance(box, list | tuple) or len(box) != 1 or not isinstance(box[0], ray.ObjectRef):
        raise HandoverError("box", "expected a list holding one ObjectRef")
    started = time.perf_counter()
    try:
        h = await box[0]
    except ray.exceptions.ObjectLostError as exc:  # OwnerDiedError included: the prefill replica died
        raise HandoverLost(f"handover of {fields['request_id']} from {fields.get('source') or '?'} is lost "
                           f"({type(exc).__name__}): its prefill replica died before it was fetched") from exc
    get_ms = (time.perf_counter() - started) * 1e3
    if not isinstance(h, KVHandover):
        raise HandoverError("box[0]", f"expected a KVHandover, got {type(h).__name__}")
    if h.request_id != fields["request_id"] or h.nbytes != fields["bytes"]:
        raise HandoverError("ticket", f"names {fields['request_id']} ({fields['bytes']} bytes), the object is "
                            f"{h.request_id} ({h.nbytes} bytes)")
    if fields.get("generated") is not None:
        if len(fields["generated"]) != len(h.generated):
            raise HandoverError("ticket.generated", f"{len(fields['generated'])} tokens for a handover of "
                                f"{len(h.generated)}")
        h = dataclasses.replace(h, generated=tuple(fields["generated"]))
    transfer_ms = max(WALL_CLOCK() - float(fields["ready_at"]), 0.0) * 1e3
    stats.received += 1
    stats.bytes_received += h.nbytes
    stats.record(get_ms=get_ms, transfer_ms=transfer_ms)
    timing = {"bytes": float(h.nbytes), "gather_ms": float(fields.get("gather_ms", 0.0)),
              "put_ms": float(fields.get("put_ms", 0.0)), "get_ms": get_ms, "transfer_ms": transfer_ms}
    log.info("handover %s from %s: %d bytes, %d KV tokens; gather %.2f ms, put %.2f ms, get %.2f ms, "
             "ready to fetched %.2f ms", h.request_id, h.source or "?", h.nbytes, h.num_tokens,
             timing["gather_ms"], timing["put_ms"], get_ms, transfer_ms)
    return h, timing
