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
