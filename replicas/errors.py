"""Errors shared by the replica engine's request-facing modules."""

from __future__ import annotations

from state.fields import FieldError


class HandoverError(FieldError):
    """A prefill/decode handover (or its ticket) the receiving side cannot take; ``field`` names the
    bad field (:mod:`replicas.handover`)."""


class InvalidRequestError(ValueError):
    """A request field has an invalid value.

    ``field`` names the offending field (e.g. ``"top_p"``, ``"prompt"``) so an API layer can report
    it; the message names it too, e.g. ``InvalidRequestError("top_p", "top_p must be in (0, 1], got 1.5")``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class HandoverLost(Exception):
    """A handover's KV is gone from Ray's object store before a decode replica fetched it: the prefill
    replica that put it there (the object's owner) died. Nothing was admitted; the request must be
    prefilled again (:func:`router.pd_dispatch.pd_outputs`)."""
