"""Device parameters for tests that run on the CPU here and on CUDA under ``scripts/gpu_check``.

A test parametrized with :data:`DEVICES` (or :data:`DEVICE_K`) runs its ``cpu`` case in the
default suite and its ``cuda`` cases only where a GPU is: those carry the ``cuda`` marker, which
``tests/conftest.py`` skips without CUDA (saying why) and ``scripts/gpu_check`` selects with
``-m cuda`` in every test file that uses it. The CPU case keeps the test's own code exercised by
CI, so a CUDA test cannot rot unseen between GPU runs.

A CUDA-only test needs no helper: mark it ``@pytest.mark.cuda`` (its file is picked up by the
marker's name). Name it after its area so gpu_check's table counts it there: ``parity``,
``suspend`` (suspend/resume), ``interleav``, ``kv_account``, ``prefix_cache``, ``launch_ahead``.
"""

from __future__ import annotations

import pytest

CUDA_SKIP_REASON = "needs a CUDA device (torch.cuda.is_available() is False); scripts/gpu_check runs it on a GPU"

#: K (``max_inflight``, operators launched ahead of the host) at which CUDA cases run. On the CPU
#: every operator is synchronous and K changes nothing, so the CPU case runs once.
CUDA_KS = (1, 2, 4)

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
DEVICE_K = [pytest.param(("cpu", 2), id="cpu")] + [
    pytest.param(("cuda", k), id=f"cuda-K{k}", marks=pytest.mark.cuda) for k in CUDA_KS
]
