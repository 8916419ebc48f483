"""The one OS thread that runs all of an engine's torch work: model load, profile, KV cache, the loop.

Why a single thread: libgomp, the OpenMP runtime of torch's CPU wheels, gives every OS thread that
opens a parallel region a team of worker threads of its own and keeps it. Once a process holds more
such workers than it has cores, libgomp stops spinning between parallel regions (its "throttled" spin
count, 100 spins instead of 300,000) and parks the workers on a futex, so each of the hundreds of
operators of a forward pass pays a wake-up. Measured on the 2-core dev machine (SmolLM2-135M, fp32,
2 threads): a decode step of 4 sequences took 60-75 ms when one thread did all the computing and
100-140 ms when the model had first been loaded on another thread; a 512-token prefill 1.0-1.05 s
against 1.2-1.3 s. A replica used to load its model on Serve's start-up thread and compute on its
loop thread, so it always ran throttled.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


class ComputeThread:
    """A daemon thread that runs submitted callables one at a time, in order.

    :meth:`call` runs a callable there and returns its result (or raises its exception); a call
    from the thread itself runs inline. A long-running job (the engine loop) holds the thread
    until it returns, so calls made meanwhile wait for it.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], Future[object]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        """The OS-level identity of the thread (``threading.get_ident()`` on it)."""
        return self._thread.ident

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, who re-raises it
                future.set_exception(exc)

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Queue ``fn``; its future completes when it has run on the thread."""
        if not self._thread.is_alive():
            raise RuntimeError(f"compute thread {self._thread.name} is closed")
        future: Future[T] = Future()
        self._jobs.put((fn, future))  # type: ignore[arg-type]
        return future

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the thread and return its result."""
        if threading.get_ident() == self._thread.ident:
            return fn()
        return self.submit(fn).result()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop after the jobs already queued (idempotent)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            if threading.get_ident() != self._thread.ident:
                self._thread.join(timeout_s)


def run_on_fresh_thread(fn: Callable[[], T], name: str = "flowprefill-setup") -> T:
    """Run ``fn`` on a thread that then exits, taking its OpenMP team with it: for torch set-up work
    (loading a model that engines will share) in a process whose engines compute on threads of their own."""
    worker = ComputeThread(name)
    try:
        return worker.call(fn)
    finally:
        worker.close()
