"""Generate the gRPC Python stubs from ``proto/flowprefill.proto`` into the ``router.grpc_gen`` package.

The stubs are build output (``router/grpc_gen/`` is git-ignored): never edit them. ``ensure_stubs()``
regenerates them only when the proto's sha256 (or the grpcio-tools version, or the package name)
differs from the stamp file inside the package, so calling it on every import is cheap.

Generation runs ``python -m grpc_tools.protoc`` in a temporary folder on a copy of the proto placed
at the package's path, so the messages' ``__module__`` is ``router.grpc_gen.flowprefill_pb2`` and
they pickle; it rewrites the ``_pb2_grpc`` module's import of ``flowprefill_pb2`` into a
package-relative one, writes ``__init__.py`` and moves the files into place, stamp last, under a
file lock (several Serve actors may import at once).

Run ``python -m router.grpc_build`` (``scripts/bootstrap.sh`` does) to generate them up front.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_PATH = ROOT / "proto" / "flowprefill.proto"
GEN_DIR = ROOT / "router" / "grpc_gen"
STAMP_NAME = ".proto.sha256"
LOCK_NAME = ".lock"

_INIT_TEXT = '"""gRPC stubs generated from proto/flowprefill.proto by router/grpc_build.py: do not edit."""\n'
_ABSOLUTE_PB2_IMPORT = re.compile(r"^(?:from [\w.]+ )?import (\w+_pb2) as (\w+)$", re.MULTILINE)


class StubGenerationError(RuntimeError):
    """``grpc_tools.protoc`` failed, or the stubs are stale and their folder is not writable."""


def _tools_version() -> str:
    try:
        return importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _stamp_text(proto_path: Path, out_dir: Path) -> str:
    digest = hashlib.sha256(proto_path.read_bytes()).hexdigest()
    return f"{digest}\ngrpcio-tools {_tools_version()}\npackage {package_name(out_dir)}\n"


def _module_names(proto_path: Path) -> tuple[str, ...]:
    stem = proto_path.stem
    return ("__init__.py", f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py")


def stubs_current(proto_path: Path = PROTO_PATH, out_dir: Path = GEN_DIR) -> bool:
    """True when every generated file exists and the stamp matches the proto."""
    stamp = out_dir / STAMP_NAME
    if not stamp.is_file() or not all((out_dir / name).is_file() for name in _module_names(proto_path)):
        return False
    return stamp.read_text() == _stamp_text(proto_path, out_dir)


def package_name(out_dir: Path) -> str:
    """The dotted package name of ``out_dir``: relative to the repository root, else its folder name."""
    resolved = out_dir.resolve()
    if resolved.is_relative_to(ROOT):
        return ".".join(resolved.relative_to(ROOT).parts)
    return resolved.name


def _run_protoc(proto_path: Path, tmp: Path, package: str) -> Path:
    """Run protoc on a copy of the proto at ``tmp/<package path>/``; returns the folder of the output.

    protoc names the Python module after the proto's path under ``-I``, so the messages get the
    fully qualified ``__module__`` (``router.grpc_gen.flowprefill_pb2``) that pickling them needs:
    Ray Serve's proxy pickles the request message to send it to the ingress replica.
    """
    import grpc_tools  # only needed when generating

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    rel = Path(*package.split("."), proto_path.name)
    (tmp / rel).parent.mkdir(parents=True)
    shutil.copyfile(proto_path, tmp / rel)
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp}", f"-I{well_known}",
        f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", str(tmp / rel),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StubGenerationError(f"grpc_tools.protoc failed on {proto_path} (exit {done.returncode}): "
                                  f"{done.stderr.strip() or done.stdout.strip()}")
    return (tmp / rel).parent


def _make_relative(grpc_module: Path) -> None:
    """``from pkg import x_pb2 as y`` -> ``from . import x_pb2 as y`` (protoc emits absolute imports)."""
    text = grpc_module.read_text()
    fixed, count = _ABSOLUTE_PB2_IMPORT.subn(r"from . import \1 as \2", text)
    if count == 0:
        raise StubGenerationError(f"no pb2 import to make package-relative in {grpc_module}")
    grpc_module.write_text(fixed)


def generate_stubs(proto_path: Path = PROTO_PATH, out_dir: Path = GEN_DIR) -> None:
    """Generate the stubs now (unconditionally) and write the stamp; the caller holds the lock."""
    stamp = _stamp_text(proto_path, out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=out_dir))
    try:
        built = _run_protoc(proto_path, tmp, package_name(out_dir))
        _make_relative(built / f"{proto_path.stem}_pb2_grpc.py")
        (built / "__init__.py").write_text(_INIT_TEXT)
        (out_dir / STAMP_NAME).unlink(missing_ok=True)  # stale until every file is in place
        for name in _module_names(proto_path):
            os.replace(built / name, out_dir / name)
        (tmp / STAMP_NAME).write_text(stamp)
        os.replace(tmp / STAMP_NAME, out_dir / STAMP_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_stubs(proto_path: Path = PROTO_PATH, out_dir: Path = GEN_DIR) -> None:
    """Generate the stubs into ``out_dir`` unless the stamp says they match ``proto_path``.

    Raises :class:`StubGenerationError` when protoc fails or stale stubs cannot be rewritten.
    """
    if stubs_current(proto_path, out_dir):
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / LOCK_NAME, "a")  # held (and flocked) for the whole generation
    except OSError as exc:
        raise StubGenerationError(f"gRPC stubs in {out_dir} are stale and cannot be regenerated: {exc}") from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stubs_current(proto_path, out_dir):  # another process may have finished meanwhile
            generate_stubs(proto_path, out_dir)


def add_servicer_to_server(servicer: object, server: object) -> None:
    """``add_FlowPrefillServicer_to_server`` that generates the stubs first: the entry for Ray Serve's
    ``gRPCOptions(grpc_servicer_functions=["router.grpc_build.add_servicer_to_server"])``."""
    ensure_stubs()
    from router.grpc_gen import flowprefill_pb2_grpc

    flowprefill_pb2_grpc.add_FlowPrefillServicer_to_server(servicer, server)


def main() -> int:
    """``python -m router.grpc_build``: make sure the stubs are current; prints what it did."""
    fresh = stubs_current()
    ensure_stubs()
    where = GEN_DIR.relative_to(ROOT)
    print(f"grpc_build: {where} {'already up to date' if fresh else 'generated'} from {PROTO_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
