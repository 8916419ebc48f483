"""``flowprefill bench sampling``: what logprobs, penalties, ``min_p`` + bias and a JSON grammar add
to a decode step, against plain greedy at the same batch size.

A step is what :meth:`replicas.engine_decode.DecodeBatcher.step` runs: one batched forward of ``B``
sequences (``decode_program``), then :func:`replicas.sampling.sample_batch` with each sequence's
:class:`~replicas.sampling.RequestSampler` (logits processors, grammar mask, draw, logprobs, history).
``B`` sequences are prefilled once with the same prompt; every variant then steps them from that
context. Variants run round-robin within each repeat (fresh samplers every repeat, so penalties'
histories and grammars start where a request would), which spreads a shared machine's drift over
all of them alike; each repeat's value is the mean of its ``steps``. The report gives per batch size
and variant the median step and sampling-only milliseconds over the repeats, their min-max, and the
ratio of the median step to greedy's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from replicas.executor import PreemptibleExecutor
from replicas.kv_cache import PagedKVCache
from replicas.model.decoder import DecoderModel
from replicas.model.tokenizer import Tokenizer
from replicas.programs import PrefillItem, decode_program, prefill_program
from replicas.sampling import RequestSampler, sample_batch
from replicas.sampling_params import SamplingParams

JSON_OBJECT = '{"type": "object"}'
_BIAS = ((11, 2.0), (13, -1.5), (198, 3.0), (30, -100.0))
VARIANTS: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0.0},
    "logprobs": {"temperature": 0.0, "logprobs": 5},
    "penalties": {"temperature": 0.8, "seed": 1, "presence_penalty": 0.5, "frequency_penalty": 0.5,
                  "repetition_penalty": 1.1},
    "min_p_bias": {"temperature": 0.8, "seed": 1, "min_p": 0.05, "logit_bias": _BIAS},
    "json": {"temperature": 0.0, "json_schema": JSON_OBJECT},
    "all": {"temperature": 0.8, "seed": 1, "logprobs": 5, "presence_penalty": 0.5, "frequency_penalty": 0.5,
            "repetition_penalty": 1.1, "min_p": 0.05, "logit_bias": _BIAS, "json_schema": JSON_OBJECT},
}


@dataclass(frozen=True)
class SamplingBenchConfig:
    """What to measure (``flowprefill bench sampling`` flags); errors name the flag."""

    batch_sizes: tuple[int, ...] = (1, 4, 16)
    variants: tuple[str, ...] = tuple(VARIANTS)
    prompt_tokens: int = 64
    steps: int = 12
    repeats: int = 5

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                       for b in self.batch_sizes):
            raise ValueError(f"--batch-sizes: need positive integers, got {self.batch_sizes}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"--variants: unknown {unknown}; expected some of {', '.join(VARIANTS)}")
        if "greedy" not in self.variants:
            raise ValueError("--variants: must include greedy (the ratios are against it)")
        for name, value in (("--prompt-tokens", self.prompt_tokens), ("--steps", self.steps),
                            ("--repeats", self.repeats)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: need a positive integer, got {value!r}")


def _sampler_factory(model: DecoderModel, tokenizer: Tokenizer, prompt: list[int]
                     ) -> Callable[[str], RequestSampler]:
    """A fresh sampler for a variant, as the engine makes one (grammar attached when constrained)."""
    eos = tuple(dict.fromkeys((*tokenizer.eos_token_ids, *model.config.eos_token_ids)))
    grammar_tokenizer = None

    def make(variant: str) -> RequestSampler:
        nonlocal grammar_tokenizer
        params = SamplingParams(max_tokens=1024, **VARIANTS[variant])
        sampler = RequestSampler(params, model.device, prompt_ids=prompt, eos_token_ids=eos)
        if params.constrained:
            if grammar_tokenizer is None:
                from replicas.structured_output import GrammarTokenizer

                grammar_tokenizer = GrammarTokenizer(tokenizer.to_json(), model.config.vocab_size, eos)
            sampler.grammar = grammar_tokenizer.matcher(params)
        return sampler
    return make


def measure_sampling_steps(model: DecoderModel, tokenizer: Tokenizer, cfg: SamplingBenchConfig,
                           progress: bool = True) -> dict[str, Any]:
    """Run every variant at every batch size (see the module doc); returns the JSON-ready report."""
    spec = model.kv_spec()
    top = max(cfg.batch_sizes)
    context = cfg.prompt_tokens
    kv = PagedKVCache(spec, top * (-(-(context + 1) // spec.block_size) + 1), model.device)
    prompt = [(7 * i + 3) % model.config.vocab_size for i in range(context)]
    run = PreemptibleExecutor("none", device=model.device).run_to_completion
    make = _sampler_factory(model, tokenizer, prompt)
    by_batch: dict[str, dict[str, Any]] = {}
    samples: dict[str, list[int]] = {}
    bar = tqdm(total=len(cfg.batch_sizes) * cfg.repeats * len(cfg.variants), desc="bench sampling",
               disable=not progress)
    with torch.inference_mode():
        for seq in range(top):
            kv.allocator.ensure_capacity(seq, context + 1)
            run(prefill_program(model, kv, [PrefillItem(seq, prompt)]))
        for b in cfg.batch_sizes:
            triples = [(seq, prompt[-1], context) for seq in range(b)]
            run(decode_program(model, kv, triples))  # warm this shape
            raw: dict[str, dict[str, list[float]]] = {v: {"step_ms": [], "sample_ms": []} for v in cfg.variants}
            for _ in range(cfg.repeats):
                for variant in cfg.variants:
                    samplers = [make(variant) for _ in range(b)]
                    step_s = sample_s = 0.0
                    tokens: list[int] = []
                    for _ in range(cfg.steps):
                        start = time.perf_counter()
                        logits = run(decode_program(model, kv, triples))
                        rows = torch.stack([logits[seq] for seq in range(b)])
                        mid = time.perf_counter()
                        picked = sample_batch(rows, samplers)
                        end = time.perf_counter()
                        step_s += end - start
                        sample_s += end - mid
                        tokens.append(picked[0][0])
                    raw[variant]["step_ms"].append(step_s / cfg.steps * 1e3)
                    raw[variant]["sample_ms"].append(sample_s / cfg.steps * 1e3)
                    if variant in ("json", "all") and not any(s.grammar is None or s.grammar.failed
                                                              for s in samplers):
                        samples[variant] = tokens
                    bar.update()
            greedy = statistics.median(raw["greedy"]["step_ms"])
            by_batch[str(b)] = {v: {
                "step_ms": statistics.median(r["step_ms"]), "step_ms_min": min(r["step_ms"]),
                "step_ms_max": max(r["step_ms"]), "sample_ms": statistics.median(r["sample_ms"]),
                "ratio_to_greedy": statistics.median(r["step_ms"]) / greedy, "repeats": r,
            } for v, r in raw.items()}
    bar.close()
    return {"prompt_tokens": context, "steps": cfg.steps, "repeats": cfg.repeats,
            "variants": {v: VARIANTS[v] for v in cfg.variants}, "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
            "by_batch": by_batch,
            "constrained_text": {v: tokenizer.decode(t) for v, t in samples.items()}}


def format_table(report: dict[str, Any]) -> str:
    """The report as a table: per batch size and variant, median step ms [min-max], sampling ms, ratio."""
    lines = [f"decode step, {report['prompt_tokens']}-token context, {report['steps']} steps x "
             f"{report['repeats']} repeats ({report['device']}, {report['dtype']}, {report['torch_threads']} threads)",
             f"{'batch':>5} {'variant':<11} {'step ms median [min-max]':>26} {'sampling ms':>12} {'x greedy':>9}"]
    for b, rows in report["by_batch"].items():
        for v, r in rows.items():
            span = f"{r['step_ms']:.1f} [{r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}]"
            lines.append(f"{b:>5} {v:<11} {span:>26} {r['sample_ms']:>12.2f} {r['ratio_to_greedy']:>9.2f}")
    return "\n".join(lines)


def run_sampling_bench(model_dir: Path, cfg: SamplingBenchConfig, dtype: str = "float32",
                       device: str = "cpu") -> dict[str, Any]:
    """Load the checkpoint, measure, print the table; returns the report."""
    model = DecoderModel.load(model_dir, dtype=dtype, device=device)
    report = measure_sampling_steps(model, Tokenizer.from_dir(model_dir), cfg)
    report["model"] = str(model_dir)
    print(format_table(report), flush=True)
    return report
