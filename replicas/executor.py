"""The preemptible executor: advances operator programs and stops them at preemption points.

A program is a generator that yields a :class:`~replicas.model.decoder.Boundary` after each
operator. The executor's granularity says which boundaries are preemption points; at each one
it asks ``should_stop`` and, if told to, returns with the program suspended. The suspended
program is resumed by passing it to :meth:`PreemptibleExecutor.run` again.

On CUDA the host does not wait for the device at every point: operators are launched ahead
asynchronously, an event is recorded at each point, and the host blocks only when more than
``max_inflight`` points are outstanding. A preemption therefore lands within about
``max_inflight`` operators of being asked for, with no host sync on the common path. On CPU
every operator is synchronous and the executor never waits.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch

from replicas.model.decoder import Boundary
from replicas.scheduler.config import GRANULARITIES


class Granularity(StrEnum):
    """Where a running program may be preempted (the names are ``SchedulerConfig``'s ``GRANULARITIES``)."""

    NONE = "none"
    LAYER = "layer"
    BLOCK = "block"
    OP = "op"

    @property
    def threshold(self) -> Boundary | None:
        """The coarsest boundary level that counts as a preemption point (None: never)."""
        return {
            Granularity.NONE: None,
            Granularity.LAYER: Boundary.LAYER,
            Granularity.BLOCK: Boundary.BLOCK,
            Granularity.OP: Boundary.OP,
        }[self]


assert sorted(g.value for g in Granularity) == sorted(GRANULARITIES)  # one list of names, checked at import
_task_ids = itertools.count()


@dataclass(eq=False)
class Task:
    """A started program: its generator, progress and (once done) its result."""

    program: Generator[Boundary, None, Any]
    label: str = ""
    task_id: int = field(default_factory=lambda: next(_task_ids))
    done: bool = False
    result: Any = None
    points_passed: int = 0
    suspensions: int = 0
    busy_s: float = 0.0  # wall time spent inside run() for this task (compute, not time suspended)


class PreemptibleExecutor:
    """Runs :class:`Task` programs until they finish or a preemption point says stop."""

    def __init__(self, granularity: Granularity | str = Granularity.BLOCK, max_inflight: int = 2,
                 device: torch.device | str = "cpu") -> None:
        self.granularity = Granularity(granularity)
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.max_inflight = max_inflight
        self.device = torch.device(device)
        self._threshold = self.granularity.threshold
        self._events: deque[torch.cuda.Event] = deque()
        self._use_events = self.device.type == "cuda"

    def start(self, program: Generator[Boundary, None, Any], label: str = "") -> Task:
        """Wrap a program; nothing runs until :meth:`run`."""
        return Task(program=program, label=label)

    def run(self, task: Task, should_stop: Callable[[], bool] | None = None) -> bool:
        """Advance ``task``; True when it finished, False when suspended at a preemption point."""
        if task.done:
            return True
        entered = time.perf_counter()
        try:
            return self._advance(task, should_stop)
        finally:
            task.busy_s += time.perf_counter() - entered

    def _advance(self, task: Task, should_stop: Callable[[], bool] | None) -> bool:
        program, threshold = task.program, self._threshold
        while True:
            try:
                level = next(program)
            except StopIteration as stop:
                task.result, task.done = stop.value, True
                self._drain()
                return True
            if threshold is None or level < threshold:
                continue
            task.points_passed += 1
            if self._use_events:
                self._bound_inflight()
            if should_stop is not None and should_stop():
                task.suspensions += 1
                return False

    def run_to_completion(self, program: Generator[Boundary, None, Any]) -> Any:  # noqa: ANN401
        """Run a program without preemption and return its result."""
        task = self.start(program)
        self.run(task)
        return task.result

    def _bound_inflight(self) -> None:
        event = torch.cuda.Event()
        event.record()
        self._events.append(event)
        while len(self._events) > self.max_inflight:
            self._events.popleft().synchronize()

    def _drain(self) -> None:
        if self._events:
            self._events[-1].synchronize()
            self._events.clear()
