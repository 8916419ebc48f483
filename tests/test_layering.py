"""The packages stack in one direction (scripts/import_layers.py), and the modules meant to run
without torch load without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "import_layers.py"


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--check", "--root", str(root)], capture_output=True,
                          text=True, timeout=60)


def test_every_package_imports_only_the_layers_before_it():
    out = _check(ROOT)
    assert out.returncode == 0, out.stdout
    assert "every package imports only the packages before it" in out.stdout
    assert "| **state** | - |  |  |  |  |" in out.stdout  # the leaf imports no other package


def test_an_import_against_the_layers_fails_the_check_naming_file_and_line(tmp_path: Path):
    for package in ("state", "replicas", "router", "bench", "cluster"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "router" / "ok.py").write_text("from state import clock\nimport replicas.engine\n")
    (tmp_path / "replicas" / "bad.py").write_text("import os\n\n\ndef f():\n    from router import placement\n")
    (tmp_path / "state" / "worse.py").write_text("from bench.x import y\n")
    (tmp_path / "bench" / "relative.py").write_text("from . import x\nfrom .sim import y\n")  # within bench: fine
    out = _check(tmp_path)
    assert out.returncode == 1
    assert "replicas/bad.py:5: replicas imports router (in a function)" in out.stdout
    assert "state/worse.py:1: state imports bench (at module level); state may import only nothing" in out.stdout
    assert "router/ok.py" not in out.stdout and "bench/relative.py" not in out.stdout
    assert "| **router** | 1 + 0 | 1 + 0 | - |" in out.stdout


def test_engine_kinds_without_tensors_and_the_deployment_load_without_torch():
    code = ("import sys, replicas.echo_engine, replicas.vllm_engine, replicas.engine_api, replicas.engine_types, "
            "replicas.engine_stats, replicas.deployment, replicas.decode_cadence, replicas.scheduler.driver, "
            "router.request_router, router.ingress; "
            "bad = {'torch'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_every_package_is_installed_and_copied_into_both_images():
    """A package left out of pyproject's list or an image's COPY lines would import fine here and fail there."""
    import tomllib

    layers = ("state", "replicas", "router", "bench", "cluster")
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(include) == sorted(f"{p}*" for p in layers)
    for kind in ("cpu", "gpu"):
        dockerfile = (ROOT / "deploy" / "docker" / f"Dockerfile.{kind}").read_text()
        ignore = (ROOT / "deploy" / "docker" / f"Dockerfile.{kind}.dockerignore").read_text().split()
        for package in layers:
            assert f"COPY --chown=ray:ray {package}/ {package}/" in dockerfile, (kind, package)
            assert f"!{package}/" in ignore, (kind, package)
