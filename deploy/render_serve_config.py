"""Write the RayService ``serveConfigV2`` of every deployment variant from ``ray_config.yaml``.

``ray_config.yaml`` is the one Serve config. Kubernetes needs two changes to it, the same in every
variant (:data:`KUBERNETES`): the proxy listens on all interfaces (the local config keeps it on
loopback) and Serve's gRPC proxy gets its port and servicer (``flowprefill serve`` passes those in
code). An overlay may then change a few of the application's ``args`` (:data:`VARIANTS`), and
nothing else. The results are written into

* ``deploy/kubernetes/base/rayservice.yaml`` (the ``serveConfigV2: |`` block), variant ``base``;
* ``deploy/kubernetes/overlays/<variant>/serve-config.yaml``, a patch replacing ``serveConfigV2``.

Run it after editing ``ray_config.yaml`` or a variant; ``--check`` only reports files that are out of
date (exit status 1). ``tests/test_deploy_manifests.py`` fails while any is.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY_CONFIG = ROOT / "ray_config.yaml"
KUBE = ROOT / "deploy" / "kubernetes"
BASE_MANIFEST = KUBE / "base" / "rayservice.yaml"
APP_NAME = "flowprefill"
POLICY = "cluster.autoscaling:SLOAutoscalingPolicy"

# Every variant: what Kubernetes needs that the loopback-only local config must not have.
KUBERNETES: dict[str, Any] = {
    "http_options": {"host": "0.0.0.0"},
    "grpc_options": {"port": 9000, "grpc_servicer_functions": ["router.grpc_build.add_servicer_to_server"]},
}

# Per overlay: changes to applications[flowprefill].args (deep-merged; a mapping merges, anything else replaces).
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "cpu-demo": {
        "autoscaling": {
            "min_replicas": 1, "max_replicas": 3, "initial_replicas": 1,
            "metrics_interval_s": 2.0, "look_back_period_s": 10.0,
            "policy": {"policy_function": POLICY,
                       "policy_kwargs": {"target_utilization": 0.7, "attainment_goal": 0.9,
                                         "upscale_cooldown_s": 30.0, "downscale_delay_s": 60.0}},
        },
    },
    "gpu-prod": {
        "replica_cpus": 4.0,
        "replica_gpus": 1.0,  # one replica per GPU
        "engine": {"device": "cuda", "dtype": "bfloat16", "kv_cache_bytes": 16 << 30},
        "autoscaling": {
            "min_replicas": 1, "max_replicas": 8, "initial_replicas": 1,
            "metrics_interval_s": 5.0, "look_back_period_s": 20.0,
            "policy": {"policy_function": POLICY,
                       "policy_kwargs": {"target_utilization": 0.7, "attainment_goal": 0.9,
                                         "upscale_cooldown_s": 90.0, "downscale_delay_s": 300.0}},
        },
    },
}

_PATCH_HEADER = """\
# generated from ray_config.yaml by deploy/render_serve_config.py (variant: {name}); do not edit.
# The overlay's Serve config: ray_config.yaml with the variant's changes listed in that script.
apiVersion: ray.io/v1
kind: RayService
metadata:
  name: flowprefill
spec:
  serveConfigV2: |
"""
_BLOCK_KEY = "  serveConfigV2: |"


def deep_merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied: mappings merge key by key, other values replace."""
    out = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_serve_config(path: Path = RAY_CONFIG) -> dict[str, Any]:
    """The Serve config in ``path`` (a mapping with the FlowPrefill application)."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not any(a.get("name") == APP_NAME for a in data.get("applications") or ()):
        raise ValueError(f"{path}: no application named {APP_NAME!r} under 'applications'")
    return data


def render(variant: str, source: Path = RAY_CONFIG) -> dict[str, Any]:
    """The Serve config of ``variant``: ``source`` + :data:`KUBERNETES` + the variant's args changes."""
    if variant not in VARIANTS:
        raise KeyError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    config = deep_merge(load_serve_config(source), KUBERNETES)
    config["applications"] = [
        {**app, "args": deep_merge(app.get("args") or {}, VARIANTS[variant])} if app.get("name") == APP_NAME else app
        for app in config["applications"]
    ]
    return config


def render_text(variant: str, source: Path = RAY_CONFIG) -> str:
    """``serveConfigV2`` as it appears in the manifests (a YAML document with a header comment)."""
    body = yaml.safe_dump(render(variant, source), sort_keys=False, default_flow_style=False, width=100)
    header = f"# generated from ray_config.yaml by deploy/render_serve_config.py (variant: {variant}); do not edit"
    return f"{header}\n{body}"


def target(variant: str) -> Path:
    """The file that holds ``variant``'s ``serveConfigV2``."""
    return BASE_MANIFEST if variant == "base" else KUBE / "overlays" / variant / "serve-config.yaml"


def _indent(text: str, prefix: str) -> str:
    return "".join(prefix + line if line.strip() else line for line in text.splitlines(keepends=True))


def _with_base_block(manifest: str, text: str) -> str:
    """``manifest`` with the lines of its ``serveConfigV2: |`` block replaced by ``text``."""
    lines = manifest.splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if line.rstrip() == _BLOCK_KEY) + 1
    except StopIteration:
        raise ValueError(f"{BASE_MANIFEST}: no line {_BLOCK_KEY.strip()!r} at indentation 2") from None
    end = start
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith("    ")):
        end += 1
    return "".join(lines[:start]) + _indent(text, "    ") + "".join(lines[end:])


def expected_file(variant: str, source: Path = RAY_CONFIG) -> str:
    """The full expected contents of :func:`target` for ``variant``."""
    text = render_text(variant, source)
    if variant == "base":
        return _with_base_block(BASE_MANIFEST.read_text(), text)
    return _PATCH_HEADER.format(name=variant) + _indent(text, "    ")


def stale(source: Path = RAY_CONFIG) -> list[Path]:
    """Files whose ``serveConfigV2`` differs from what ``source`` renders to."""
    return [target(v) for v in VARIANTS if not target(v).exists() or target(v).read_text() != expected_file(v, source)]


def main(argv: Sequence[str] | None = None) -> int:
    """Write (or with ``--check`` only list) the out-of-date files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="list out-of-date files and exit 1 if any")
    args = parser.parse_args(argv)
    out_of_date = stale()
    for path in out_of_date:
        if args.check:
            print(f"out of date: {path.relative_to(ROOT)}", file=sys.stderr)
        else:
            variant = next(v for v in VARIANTS if target(v) == path)
            path.write_text(expected_file(variant))
            print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    return 1 if args.check and out_of_date else 0


if __name__ == "__main__":
    sys.exit(main())
