"""ComputeThread: jobs run in order on one thread, results and exceptions come back to the caller."""

from __future__ import annotations

import threading

import pytest

from replicas.compute_thread import ComputeThread


def test_calls_run_on_the_thread_in_order_and_return_or_raise():
    worker = ComputeThread("test-compute")
    try:
        order: list[int] = []
        futures = [worker.submit(lambda i=i: order.append(i) or threading.get_ident()) for i in range(5)]
        assert {f.result(5) for f in futures} == {worker.ident}
        assert order == [0, 1, 2, 3, 4]
        assert worker.call(lambda: 6 * 7) == 42
        with pytest.raises(ValueError, match="bad job"):
            worker.call(lambda: (_ for _ in ()).throw(ValueError("bad job")))
        assert worker.call(lambda: worker.call(lambda: "inline")) == "inline"  # no deadlock on itself
    finally:
        worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(lambda: None)
    worker.close()  # idempotent
