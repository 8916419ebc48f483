"""Argument helpers shared by the ``flowprefill bench`` subcommands (argparse only, no heavy imports):
the engine flags, the prefix-sharing flags and the small argparse types they use."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--dtype`` and ``--device`` (shared with ``generate`` and ``profile``)."""
    p.add_argument("--model", default=None, help="HF model directory (default: the prepared SmolLM2-135M)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def model_dir(arg: str | None) -> Path:
    """``--model``, or the prepared default model."""
    if arg:
        return Path(arg)
    from replicas.model.default_model import prepare_default_model

    return prepare_default_model()


def positive_ints(text: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers (an argparse type)."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


PREFIX_MODES = ("unique", "trace", "multiturn")  # bench.shared_prefix.PREFIX_MODES, without importing it here


def fraction(text: str) -> float:
    """A number or a ratio such as ``1/32`` (an argparse type)."""
    num, sep, den = text.partition("/")
    try:
        return float(num) / float(den) if sep else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a ratio such as 1/32, got {text!r}") from None


def add_prefix_args(p: argparse.ArgumentParser) -> None:
    """``--prefix-mode`` and the multi-turn generator's settings (``bench serve`` and ``bench policies``)."""
    p.add_argument("--prefix-mode", choices=PREFIX_MODES, default=None,
                   help="which prompts share prefixes: trace (the trace's hash_ids, Mooncake), multiturn (generated "
                        "conversations with a shared system prompt, for Azure) or unique (every prompt its own, "
                        "vLLM without prefix caching); default: trace if the trace has hash_ids, else unique")
    p.add_argument("--prefix-groups", type=fraction, default=None, metavar="FRACTION",
                   help="trace mode: keep this seeded fraction of the prefix groups over the whole trace (Mooncake "
                        "shares over hundreds of requests; 1/32 leaves ~100 requests, 62%% reusable); then pick the "
                        "window, e.g. --window-start-s 0")
    p.add_argument("--multiturn-system-tokens", type=int, default=None,
                   help="multiturn: system prompt tokens at full length, a multiple of 512 (default 1024)")
    p.add_argument("--multiturn-continue", type=float, default=None,
                   help="multiturn: probability that a request long enough continues an open conversation "
                        "(default 0.5)")


def prefix_settings(args: argparse.Namespace) -> dict[str, object]:
    """The prefix flags as config fields (flags not given keep the config's defaults)."""
    out: dict[str, object] = {"prefix_mode": args.prefix_mode}
    for name in ("prefix_groups", "multiturn_system_tokens", "multiturn_continue"):
        if getattr(args, name) is not None:
            out[name] = getattr(args, name)
    return out
