"""Decode step time against batch size, with and without the small-row GEMM path.

Part of ``flowprefill bench engine``. ``B`` sequences, each with a prefilled context, take one
decode step together (``decode_program``, as the engine's decode batcher runs it); the step is
timed with :class:`~replicas.model.decoder.DecoderModel`'s small-row path on (what the engine
runs) and off (every projection a plain ``F.linear``), interleaved within each repeat so that
the ratio cancels a shared machine's drift, reported as the best of the repeats. The logits of
both paths are compared too (the largest absolute difference), since the path changes the
summation order.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from replicas.executor import PreemptibleExecutor
from replicas.kv_cache import PagedKVCache
from replicas.model.decoder import DecoderModel
from replicas.programs import PrefillItem, decode_program, prefill_program

DECODE_BATCHES = (1, 2, 4, 8, 16)


def measure_decode_steps(model: DecoderModel, batches: tuple[int, ...] = DECODE_BATCHES, context: int = 150,
                         repeats: int = 3, steps_per_repeat: int = 4) -> dict[str, Any]:
    """Milliseconds per decode step at each batch size, small-row path on and off (see the module doc)."""
    spec = model.kv_spec()
    top = max(batches)
    kv = PagedKVCache(spec, top * (-(-(context + 1) // spec.block_size) + 1), model.device)
    prompt = [(7 * i + 3) % model.config.vocab_size for i in range(context)]
    on = (model.small_rows_max, model.small_rows_max_lm_head)
    run = PreemptibleExecutor("none", device=model.device).run_to_completion  # as the decode batcher runs steps

    def sync() -> None:
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
    rows: dict[str, dict[str, float]] = {}
    try:
        with torch.inference_mode():
            for seq in range(top):
                kv.allocator.ensure_capacity(seq, context + 1)
                run(prefill_program(model, kv, [PrefillItem(seq, prompt)]))
            for b in batches:
                triples = [(seq, 5, context) for seq in range(b)]
                best = {"small_rows": float("inf"), "plain": float("inf")}
                logits = {}
                for _ in range(repeats):
                    for name, limits in (("small_rows", on), ("plain", (0, 0))):
                        model.small_rows_max, model.small_rows_max_lm_head = limits
                        logits[name] = run(decode_program(model, kv, triples))  # untimed: warm this shape
                        sync()
                        start = time.perf_counter()
                        for _ in range(steps_per_repeat):
                            run(decode_program(model, kv, triples))
                        sync()
                        best[name] = min(best[name], (time.perf_counter() - start) / steps_per_repeat)
                diff = max(float((logits["small_rows"][s] - logits["plain"][s]).abs().max()) for s in range(b))
                rows[str(b)] = {"small_rows_ms": best["small_rows"] * 1e3, "plain_ms": best["plain"] * 1e3,
                                "speedup": best["plain"] / best["small_rows"], "max_abs_logit_diff": diff}
    finally:
        model.small_rows_max, model.small_rows_max_lm_head = on
    return {"context": context, "small_rows_max": on[0], "small_rows_max_lm_head": on[1], "by_batch": rows}


def print_decode(report: dict[str, Any]) -> None:
    """The decode table of ``bench engine``."""
    print(f"\ndecode step, context {report['context']} (small-row path: up to {report['small_rows_max']} rows, "
          f"{report['small_rows_max_lm_head']} for the vocabulary projection)")
    print(f"{'batch':>6} {'small-row ms':>13} {'plain ms':>9} {'speedup':>8} {'max |dlogit|':>13}")
    for b, row in report["by_batch"].items():
        print(f"{b:>6} {row['small_rows_ms']:>13.1f} {row['plain_ms']:>9.1f} {row['speedup']:>8.2f} "
              f"{row['max_abs_logit_diff']:>13.2e}")
