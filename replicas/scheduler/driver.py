"""How an engine carries out a scheduling :class:`~replicas.scheduler.events.Decision`.

One function, :func:`apply_decision`, for the native engine (:class:`replicas.engine.ReplicaEngine`)
and the cluster simulator's replica (``bench/sim/replica.py``): the order of the steps and the
executor marks the scheduler must see are the protocol :mod:`replicas.scheduler.core` documents,
so they live once, here. What each step does to programs (tensors on the executor, or seconds of
virtual work) is the :class:`DecisionTarget`'s.
"""

from __future__ import annotations

from typing import Protocol

from replicas.scheduler.core import Scheduler
from replicas.scheduler.events import BatchPlan, Decision


class DecisionTarget(Protocol):
    """The program side of an engine, as a scheduling decision drives it."""

    @property
    def current_batch(self) -> int | None:
        """The batch id of the program the executor runs now (None: none runs)."""

    def refuse(self, request_id: str, now: float) -> None:
        """End a request the scheduler refused (admission) or expired; its reason is on the request."""

    def drop_program(self, batch_id: int) -> None:
        """Discard the program of ``batch_id`` (all its members were aborted or expired)."""

    def suspend_current(self, now: float) -> None:
        """Stop the running program at its operator boundary and keep it; nothing runs afterwards."""

    def start_program(self, plan: BatchPlan, now: float) -> bool:
        """Build the program of a new ``plan`` (or pick up the suspended one to resume) and make it the
        current one; False when it could not start (the target has failed its members)."""


def apply_decision(decision: Decision, now: float, target: DecisionTarget, scheduler: Scheduler) -> bool:
    """Carry out ``decision`` at ``now`` in :class:`Decision`'s order: refusals, dropped programs,
    the preemption, the program to run; returns whether the running program was preempted.

    The scheduler is told when a program actually stops (``mark_suspended``) and starts or resumes
    (``mark_started``), so that its executed-time accounting matches what the executor did.
    """
    for request_id in decision.rejected:
        target.refuse(request_id, now)
    for batch_id in decision.dropped:
        target.drop_program(batch_id)
    preempted = False
    current = target.current_batch
    if decision.preempt_running and current is not None:
        target.suspend_current(now)
        scheduler.mark_suspended(current, now)
        preempted = True
    plan = decision.run
    if plan is not None:
        current = target.current_batch
        if current is not None and current != plan.batch_id:  # a plan superseding an unstarted one
            target.suspend_current(now)
            scheduler.mark_suspended(current, now)
        if target.start_program(plan, now):
            scheduler.mark_started(plan, now)
    return preempted
