"""Errors raised while reading model checkpoints."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint directory is missing a file, or a file holds an invalid field.

    The message always names the offending file and, when one is known, the field, e.g.
    ``CheckpointError("/models/x/tokenizer.json: missing")`` or
    ``CheckpointError("/models/x/config.json: field 'hidden_size' must be a positive integer")``.
    """
