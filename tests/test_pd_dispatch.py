"""The router's P/D dispatch (router/pd_dispatch.py) under decode-replica faults, injected by fake
handles (the real path runs in tests/test_pd_serving.py): a handover refused or whose decode replica
dies before its first decoded token is sent again, with the same KV reference; later failures end
the request with a 503."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from ray import exceptions as rex

from router.api_errors import APIError
from router.pd_dispatch import decode_outputs, pd_outputs

TICKET = {"request_id": "r1", "bytes": 64, "kv_tokens": 5, "ready_at": 0.0, "box": ["kv-ref"]}


class FakeStream:
    """A scripted replica stream: rows, then optionally an exception."""

    def __init__(self, rows: list[dict[str, Any]], error: BaseException | None = None) -> None:
        self.rows, self.error, self.cancelled = rows, error, False

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[dict[str, Any]]:
        for row in self.rows:
            yield row
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """Serve handle stand-in: each call of ``method`` takes the next scripted stream, recording its args."""

    def __init__(self, method: str, streams: list[FakeStream]) -> None:
        self.method, self.streams, self.calls = method, streams, []

    def options(self, **_: Any) -> FakeHandle:
        return self

    def __getattr__(self, name: str) -> Any:
        if name != self.method:
            raise AttributeError(name)
        handle = self

        class _Method:
            @staticmethod
            def remote(*args: Any) -> FakeStream:
                handle.calls.append(args)
                return handle.streams[len(handle.calls) - 1]

        return _Method


def _row(tokens: tuple[int, ...], finish: str | None = None, replica: str = "d") -> dict[str, Any]:
    return {"token_ids": tokens, "text": "".join(f"<{t}>" for t in tokens), "finish_reason": finish,
            "replica_id": replica, "error": "no KV memory" if finish == "rejected" else None}


async def _collect(gen: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row async for row in gen]


def test_fake_decode_replica_dying_before_its_first_token_gets_the_same_handover_resent(monkeypatch):
    monkeypatch.setattr("router.pd_dispatch._BACKOFF_S", 0.0)
    dead = FakeStream([], rex.RayActorError())
    refused = FakeStream([_row((), "rejected", "d2")])
    ok = FakeStream([_row((7,), None, "d3"), _row((8,), "length", "d3")])
    decoders = FakeHandle("decode", [dead, refused, ok])
    rows = asyncio.run(_collect(decode_outputs(decoders, TICKET, "r1")))
    assert [r["token_ids"] for r in rows] == [(7,), (8,)] and rows[-1]["replica_id"] == "d3"
    assert len(decoders.calls) == 3
    assert all(args[1] is TICKET["box"] for args in decoders.calls)  # the same KV reference every time
    assert all("box" not in args[0] for args in decoders.calls)


def test_fake_decode_replica_dying_mid_stream_ends_the_request_with_a_503():
    broken = FakeStream([_row((7,))], rex.RayActorError())
    decoders = FakeHandle("decode", [broken])
    with pytest.raises(APIError) as err:
        asyncio.run(_collect(decode_outputs(decoders, TICKET, "r1")))
    assert err.value.status == 503 and "while streaming" in str(err.value)
    assert len(decoders.calls) == 1


def test_fake_decode_pool_refusing_every_send_fails_clearly_after_the_attempts(monkeypatch):
    monkeypatch.setattr("router.pd_dispatch._BACKOFF_S", 0.0)
    decoders = FakeHandle("decode", [FakeStream([_row((), "rejected")]) for _ in range(3)])
    with pytest.raises(APIError, match="no decode replica took request r1 after 3 attempts: no KV memory"):
        asyncio.run(_collect(decode_outputs(decoders, TICKET, "r1", max_attempts=3)))


def test_fake_prefill_stream_first_token_then_handover_continues_on_the_decode_side():
    from replicas.replica_request import ReplicaRequest

    payload = ReplicaRequest.from_dict({"request_id": "r1", "prompt_token_ids": [1, 2, 3, 4], "arrival_s": 1.0,
                                        "ttft_slo_s": 5.0, "sampling": {"max_tokens": 3}})
    prefill = FakeHandle("generate", [FakeStream([_row((5,), None, "p"), {**_row((), "handover", "p"),
                                                                          "handover": TICKET}])])
    decoders = FakeHandle("decode", [FakeStream([_row((6,)), _row((7,), "length")])])
    seen: list[dict[str, Any]] = []
    rows = asyncio.run(_collect(pd_outputs(prefill, decoders, payload, on_handover=seen.append)))
    assert [r["token_ids"] for r in rows] == [(5,), (6,), (7,)]
    assert [r["replica_id"] for r in rows] == ["p", "d", "d"] and len(seen) == 1


# ---------------------------------------------------------------- re-prefill when the handover's owner is lost
TICKET2 = {**TICKET, "bytes": 64, "source": "p2", "box": ["kv-ref-2"]}


def _payload():
    from replicas.replica_request import ReplicaRequest

    return ReplicaRequest.from_dict({"request_id": "r1", "prompt_token_ids": [1, 2, 3, 4], "arrival_s": 1.0,
                                     "ttft_slo_s": 5.0, "sheddable": True, "sampling": {"max_tokens": 3}})


def _lost_row() -> dict[str, Any]:
    return {**_row((), "handover_lost", "d1"), "error": "handover of r1 from p1 is lost (OwnerDiedError)"}


def test_fake_prefill_owner_lost_before_the_fetch_is_prefilled_again_from_the_clients_token(monkeypatch):
    monkeypatch.setattr("router.pd_dispatch._BACKOFF_S", 0.0)
    # the second prefill samples another first token (unseeded sampling): the client's stays
    prefill = FakeHandle("generate", [
        FakeStream([_row((5,), None, "p1"), {**_row((), "handover", "p1"), "handover": TICKET}]),
        FakeStream([_row((9,), None, "p2"), {**_row((), "handover", "p2"), "handover": TICKET2}])])
    decoders = FakeHandle("decode", [FakeStream([_lost_row()]), FakeStream([_row((6,)), _row((7,), "length")])])
    retries: list[tuple[int, str]] = []
    rows = asyncio.run(_collect(pd_outputs(prefill, decoders, _payload(),
                                           on_retry=lambda n, exc: retries.append((n, type(exc).__name__)))))
    assert [r["token_ids"] for r in rows] == [(5,), (6,), (7,)]  # the first token once, never the 9
    assert retries == [(1, "HandoverLost")]  # the ingress moves the journal entry back (re-dispatch)
    again = prefill.calls[1][0]
    assert again.request_id == "r1" and again.prompt_token_ids == (1, 2, 3, 4)
    assert again.arrival_s > 1.0 and again.sheddable is False  # due one TTFT SLO from the loss, never shed
    meta, box = decoders.calls[1]
    assert box is TICKET2["box"] and meta["generated"] == [5] and "generated" not in decoders.calls[0][0]


def test_fake_prefill_replica_dying_after_the_first_token_is_prefilled_again(monkeypatch):
    monkeypatch.setattr("router.dispatch._BACKOFF_S", 0.0)
    prefill = FakeHandle("generate", [
        FakeStream([_row((5,), None, "p1")], rex.RayActorError()),  # died while building the handover
        FakeStream([_row((5,), None, "p2"), {**_row((), "handover", "p2"), "handover": TICKET2}])])
    decoders = FakeHandle("decode", [FakeStream([_row((6,)), _row((7,), "length")])])
    rows = asyncio.run(_collect(pd_outputs(prefill, decoders, _payload())))
    assert [r["token_ids"] for r in rows] == [(5,), (6,), (7,)]
    assert decoders.calls[0][0]["generated"] == [5]


def test_fake_decode_replica_raising_object_lost_counts_as_a_lost_handover(monkeypatch):
    monkeypatch.setattr("router.pd_dispatch._BACKOFF_S", 0.0)
    prefill = FakeHandle("generate", [
        FakeStream([_row((5,), None, "p1"), {**_row((), "handover", "p1"), "handover": TICKET}]),
        FakeStream([_row((5,), None, "p2"), {**_row((), "handover", "p2"), "handover": TICKET2}])])
    lost = rex.OwnerDiedError("ab" * 14, None, "")  # what awaiting the dead owner's object raised there
    decoders = FakeHandle("decode", [FakeStream([], lost), FakeStream([_row((6,), "length")])])
    rows = asyncio.run(_collect(pd_outputs(prefill, decoders, _payload())))
    assert [r["token_ids"] for r in rows] == [(5,), (6,)] and len(decoders.calls) == 2


def test_fake_handover_lost_on_every_prefill_fails_clearly(monkeypatch):
    monkeypatch.setattr("router.pd_dispatch._BACKOFF_S", 0.0)
    prefill = FakeHandle("generate", [FakeStream([_row((5,), None, "p"), {**_row((), "handover", "p"),
                                                                          "handover": TICKET}]) for _ in range(3)])
    decoders = FakeHandle("decode", [FakeStream([_lost_row()]) for _ in range(3)])
    with pytest.raises(APIError, match="r1: handover lost after 3 prefills") as err:
        asyncio.run(_collect(pd_outputs(prefill, decoders, _payload(), max_reprefills=2)))
    assert err.value.status == 503 and len(prefill.calls) == 3


def test_fake_prefill_failing_before_any_token_is_not_prefilled_again_here(monkeypatch):
    """Before the first output the colocated retry (router/dispatch.py) owns the re-dispatch."""
    monkeypatch.setattr("router.dispatch._BACKOFF_S", 0.0)
    prefill = FakeHandle("generate", [FakeStream([], rex.RayActorError()) for _ in range(2)])
    decoders = FakeHandle("decode", [])
    with pytest.raises(APIError, match="replica failed after 2 attempts"):
        asyncio.run(_collect(pd_outputs(prefill, decoders, _payload(), max_retries=1)))
