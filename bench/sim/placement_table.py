""":func:`~router.placement.rank_replicas`' first choice for many replicas at once (numpy).

A :class:`PlacementTable` holds one row per replica: its :class:`~router.placement.QueueIndex`
padded into arrays, the replica's in-flight seconds and the age of its state.  :meth:`choose`
then evaluates a request on every row with the same floating-point operations as
:func:`~router.placement.evaluate` (preemptive engines) and picks the row that ``rank_replicas``
would rank first, with the same shed verdict, in a fixed number of vectorised operations
instead of one Python call per replica.  Rows must be in replica-id order: ties break towards
the lower row, as ``rank_replicas`` breaks them by id.  ``tests/test_placement_table.py``
checks the choice against ``rank_replicas`` on random loads.

The cluster simulator uses it; the serving router ranks a handful of replicas per decision and
keeps calling ``rank_replicas`` (it needs the whole ranking, one replica per Serve tier).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import chain

import numpy as np

from router.placement import PREEMPT_LATENCY_S, QueueIndex

_INF = math.inf
_REL_EPS = 1e-9  # far above the rounding of (deadline - now) - remaining_s


def reclassify_after(queued: Iterable[tuple[float, float]], running: Iterable[tuple[float, float]],
                     now: float) -> float:
    """A time before which :meth:`QueueIndex.build` of these items classifies them as it does at ``now``
    (conservative: possibly earlier than the first change; ``inf``: never changes).

    An item ``(deadline, remaining_s)`` is late once ``(deadline - now) - remaining_s <= 0``, which
    only ever turns true as ``now`` grows; feasible items turn late near ``deadline - remaining_s``.
    Items within rounding of that point count as about to change.
    """
    first = _INF
    for d, s in chain(queued, running):
        x = d - s
        eps = _REL_EPS * max(1.0, abs(d), abs(now))
        if x > now - eps and x - eps < first:
            first = x - eps
    return first


class PlacementTable:
    """Rows of padded queue indices for ``n`` replicas (all empty at first).

    The caller sets ``age``, ``inflight`` and ``usable`` (arrays of ``n``) and the rows
    (:meth:`set_index`, :meth:`clear`); deadlines are stored transposed (one column per row) so
    that counting the ones due by a deadline is one reduction over the longest queue's depth.
    """

    def __init__(self, n: int, width: int = 8) -> None:
        if n < 1:
            raise ValueError(f"PlacementTable: need at least one row, got {n}")
        self.n = n
        self.age = np.zeros(n)  # seconds since each state was (re)published, as ReplicaLoad.age_s
        self.inflight = np.zeros(n)  # dispatched seconds not yet in the state
        self.usable = np.ones(n, dtype=bool)  # known and not stale
        self.total = np.zeros(n)  # QueueIndex.total_s
        self.f_total = np.zeros(n)  # feasible_prefix[-1] (0 when none)
        self.nf = np.zeros(n, dtype=np.intp)
        self.nl = np.zeros(n, dtype=np.intp)
        # running_key > own is run_f > deadline for a feasible own key (False, deadline), run_l > deadline
        # for a late one (True, deadline): -inf without a running batch, +inf for a late one (run_f)
        self.run_f = np.full(n, -_INF)
        self.run_l = np.full(n, -_INF)
        self.depth = [n, 0]  # depth[w]: rows whose longer list holds w items
        self.deep = 0  # the longest list (columns of fd, ld to look at)
        self.width = 0
        self._alloc(width)

    def _alloc(self, width: int) -> None:
        """(Re)allocate the padded columns for queues of up to ``width`` items, keeping the rows."""
        old, n = self.width, self.n
        fd, ld = np.full((width, n), _INF), np.full((width, n), _INF)  # deadlines; +inf pads never count
        lp = np.zeros((n, width + 1))
        pf = np.zeros((2, n, width + 1))  # feasible prefix sums and min slacks: one gather for both
        pf[1] = -_INF  # -inf past the feasible items: no later work to harm
        if old:
            fd[:old], ld[:old] = self.fd, self.ld
            pf[:, :, :old + 1], lp[:, :old + 1] = self.pf, self.lp
        self.width = width
        self.fd, self.ld = fd, ld  # fd[j, i]: row i's j-th feasible deadline
        self.pf, self.lp = pf, lp
        self.fp = pf[0]  # prefix sums after a leading 0: fp[i, k] = feasible_prefix[k - 1]
        self.fms = pf[1]  # fms[i, k] = feasible_min_slack[k] (-inf from k = nf on)
        self._pf_flat = pf.reshape(2, -1)
        self.base = np.arange(n) * (width + 1)  # flat offset of each row in fp, lp, fms
        self.depth.extend([0] * (width + 1 - len(self.depth)))

    def _set_depth(self, i: int, nf: int, nl: int) -> None:
        depth = self.depth
        depth[max(self.nf[i], self.nl[i])] -= 1
        w = max(nf, nl)
        depth[w] += 1
        self.nf[i], self.nl[i] = nf, nl
        if w > self.deep:
            self.deep = w
        while self.deep and not depth[self.deep]:
            self.deep -= 1

    def set_index(self, i: int, idx: QueueIndex) -> None:
        """Row ``i`` holds ``idx`` (a preemptive engine's queue)."""
        nf, nl = len(idx.feasible_deadlines), len(idx.late_deadlines)
        if nf > self.width or nl > self.width:
            self._alloc(max(2 * self.width, nf, nl))
        old_f, old_l = self.nf[i], self.nl[i]
        if nf:
            self.fd[:nf, i] = idx.feasible_deadlines
            self.fp[i, 1:nf + 1] = idx.feasible_prefix
            self.fms[i, :nf] = idx.feasible_min_slack
            self.f_total[i] = idx.feasible_prefix[-1]
        else:
            self.f_total[i] = 0.0
        if old_f > nf:
            self.fd[nf:old_f, i] = _INF
            self.fms[i, nf:old_f] = -_INF
        if nl:
            self.ld[:nl, i] = idx.late_deadlines
            self.lp[i, 1:nl + 1] = idx.late_prefix
        if old_l > nl:
            self.ld[nl:old_l, i] = _INF
        self._set_depth(i, nf, nl)
        self.total[i] = idx.total_s
        rk = idx.running_key
        if rk is None:
            self.run_f[i] = self.run_l[i] = -_INF
        elif rk[0]:
            self.run_f[i], self.run_l[i] = _INF, rk[1]
        else:
            self.run_f[i], self.run_l[i] = rk[1], -_INF

    def clear(self, i: int) -> None:
        """Row ``i`` has an empty queue."""
        if self.nf[i]:
            self.fd[:self.nf[i], i] = _INF
            self.fms[i, :self.nf[i]] = -_INF
        if self.nl[i]:
            self.ld[:self.nl[i], i] = _INF
        self._set_depth(i, 0, 0)
        self.total[i] = self.f_total[i] = 0.0
        self.run_f[i] = self.run_l[i] = -_INF

    def pending(self) -> np.ndarray:
        """``ReplicaLoad.pending_s`` of every row."""
        return np.where(self.usable, np.maximum(self.total - self.age, 0.0) + self.inflight, self.inflight)

    def _evaluate(self, deadline: float, cost_s: float | np.ndarray, now: float, preempt_latency_s: float,
                  all_usable: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool | np.ndarray]:
        """``(ttft, harm, k, own_late)``: ``k`` counts the row's deadlines (of own's class) ``<= deadline``.
        ``cost_s`` per row (an array: a prefix-cache hit makes the request cheaper on some replicas)
        makes ``own_late`` per row too."""
        if isinstance(cost_s, np.ndarray):
            return self._evaluate_rows(deadline, cost_s, now, preempt_latency_s, all_usable)
        age, inflight, deep = self.age, self.inflight, self.deep
        own_late = deadline - now - cost_s <= 0.0
        if own_late:  # late already: all feasible work first, then late work EDF
            k = np.add.reduce(self.ld[:deep] <= deadline, axis=0) if deep else np.zeros(self.n, np.intp)
            ahead = self.f_total + self.lp.take(self.base + k)
            harm = np.zeros(self.n, dtype=bool)
            preempts = self.run_l > deadline
        else:
            k = np.add.reduce(self.fd[:deep] <= deadline, axis=0) if deep else np.zeros(self.n, np.intp)
            ahead, later_slack = self._pf_flat.take(self.base + k, axis=1)  # fp[i, k], fms[i, k]
            slack = later_slack - (now - age + inflight)  # the slack of feasible work due later (-inf: none)
            harm = (slack >= 0.0) & (slack < cost_s)  # slack - cost < 0, exactly
            preempts = self.run_f > deadline
        ttft = np.maximum(ahead - age, 0.0) + inflight + cost_s
        np.add(ttft, preempt_latency_s, out=ttft, where=preempts)
        if not all_usable:
            off = ~self.usable
            ttft[off] = inflight[off] + cost_s
            harm &= self.usable
        return ttft, harm, k, own_late

    def _evaluate_rows(self, deadline: float, cost: np.ndarray, now: float, preempt_latency_s: float,
                       all_usable: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`_evaluate` with a cost per row: both of ``evaluate``'s branches, each row taking the one
        its own key (late or not, at its own cost) selects."""
        age, inflight, deep = self.age, self.inflight, self.deep
        own_late = deadline - now - cost <= 0.0
        zero = np.zeros(self.n, np.intp)
        k_f = np.add.reduce(self.fd[:deep] <= deadline, axis=0) if deep else zero
        k_l = np.add.reduce(self.ld[:deep] <= deadline, axis=0) if deep else zero
        ahead_f, later_slack = self._pf_flat.take(self.base + k_f, axis=1)
        slack = later_slack - (now - age + inflight)
        harm = (slack >= 0.0) & (slack < cost) & ~own_late
        ahead = np.where(own_late, self.f_total + self.lp.take(self.base + k_l), ahead_f)
        preempts = np.where(own_late, self.run_l > deadline, self.run_f > deadline)
        ttft = np.maximum(ahead - age, 0.0) + inflight + cost
        np.add(ttft, preempt_latency_s, out=ttft, where=preempts)
        if not all_usable:
            off = ~self.usable
            ttft[off] = inflight[off] + cost[off]
            harm &= self.usable
        return ttft, harm, np.where(own_late, k_l, k_f), own_late

    def _displaces(self, k: np.ndarray, own_late: bool | np.ndarray) -> np.ndarray:
        if isinstance(own_late, np.ndarray):
            out = np.where(own_late, k < self.nl, (k < self.nf) | (self.nl > 0))
        else:
            out = k < self.nl if own_late else (k < self.nf) | (self.nl > 0)
        return out & self.usable

    def ttft(self, deadline: float, cost_s: float | np.ndarray, now: float,
             preempt_latency_s: float = PREEMPT_LATENCY_S) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ttft, harm, displaces)`` per row: :func:`~router.placement.evaluate` for every row."""
        ttft, harm, k, own_late = self._evaluate(deadline, cost_s, now, preempt_latency_s, bool(self.usable.all()))
        return ttft, harm, self._displaces(k, own_late)

    def choose(self, policy: str, deadline: float, cost_s: float | np.ndarray, now: float, *, sheddable: bool = False,
               margin_s: float = 0.0, allow_shed: bool = True, preempt_latency_s: float = PREEMPT_LATENCY_S,
               all_usable: bool | None = None) -> tuple[int, bool]:
        """``(row, shed)``: the row ``rank_replicas(policy, ...)`` ranks first and its shed verdict
        (``policy``: ``slo_aware`` or ``least_loaded``; the request has ``deadline`` and own cost
        ``cost_s``, one per row or the same on every row; ``all_usable``: whether ``usable`` is all true,
        when the caller knows)."""
        if policy == "least_loaded":
            return int(np.argmin(self.pending())), False  # argmin: the first (lowest id) of equals
        if policy != "slo_aware":
            raise ValueError(f"PlacementTable.choose: unsupported policy {policy!r}")
        if all_usable is None:
            all_usable = bool(self.usable.all())
        ttft, harm, k, own_late = self._evaluate(deadline, cost_s, now, preempt_latency_s, all_usable)
        slack = (deadline - now) - ttft
        best = float(slack.max())
        # budget - ttft >= 0 exactly when ttft <= budget: some replica meets the deadline
        shed = sheddable and allow_shed and not (ttft <= deadline - now).any()
        if all_usable and not (best >= 0.0 and best >= margin_s):  # no roomy replica (tier 0)
            if best >= 0.0:  # tier 1 (harm, -slack, id): harmless first, then the most slack, lowest row
                masked = np.where(harm, -_INF, slack)
                i = int(np.argmax(masked))
                return (i if masked[i] >= 0.0 else int(np.argmax(slack))), shed
            return int(np.argmax(slack)), shed  # tier 3 (-slack, id): the least late
        # the general case: tiers as rank_replicas, 0 roomy, 1 tight, 2 no usable state, 3 late
        late = slack < 0.0
        tier = np.where(self.usable, np.where(late, 3, np.where(slack < margin_s, 1, 0)), 2)
        best_tier = int(tier.min())
        cand = np.flatnonzero(tier == best_tier)
        if best_tier == 1:  # (harm, -slack, id)
            keys: tuple[np.ndarray, ...] = (-slack[cand], harm[cand])
        elif best_tier == 3:  # (-slack, id)
            keys = (-slack[cand],)
        elif best_tier == 2:  # (ttft, id)
            keys = (ttft[cand],)
        else:  # (harm, displaces, cost, slack, pending, id)
            displaces = self._displaces(k, own_late)
            if isinstance(cost_s, np.ndarray):
                keys = (self.pending()[cand], slack[cand], cost_s[cand], displaces[cand], harm[cand])
            else:
                keys = (self.pending()[cand], slack[cand], displaces[cand], harm[cand])
        return int(cand[np.lexsort((cand, *keys))[0]]), shed
