"""The simulated router's view of fresh replica states, kept as rows of a :class:`PlacementTable`.

What :meth:`bench.sim.router.Router._loads` computes per decision, maintained incrementally with
the same values (``tests/test_sim.py`` checks whole runs against it):

* A replica that published since the last decision gets its row rebuilt from its queue snapshot
  (``QueueIndex.build`` at the decision time, as the router does on a new state).
* ``updated_at`` of each state follows the replica's heartbeat (every ``heartbeat_s``); a heap of
  the next heartbeat per row replaces recomputing it for every row at every decision.
* The router also rebuilds an index when the heartbeat moved or the index is older than
  ``ttl_s``: re-classifying its items at that time. The rebuilt index only differs once some
  item can have turned late (:func:`~bench.sim.placement_table.reclassify_after`), so a row is only
  looked at then: its chain of rebuild times is replayed over the recorded decision times and it
  is rebuilt at the last one, exactly when and as the router would have.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from heapq import heappop, heappush

import numpy as np

from bench.sim.placement_table import PlacementTable, reclassify_after
from bench.sim.replica import INF, SimReplica
from router.placement import QueueIndex

_EARLY = 1e-9  # heartbeat heap keys come this much (relative) early: rounding never makes one late


class FreshStates:
    """Rows of every replica's current published state (no staleness) for ``slo_aware``/``least_loaded``."""

    def __init__(self, replicas: Sequence[SimReplica], heartbeat_s: float, ttl_s: float) -> None:
        n = len(replicas)
        self.replicas, self.hb, self.ttl = list(replicas), heartbeat_s, ttl_s
        self.table = PlacementTable(n)
        self.updated = np.zeros(n)  # updated_at (last heartbeat) of each state now, for the ages
        self.t_pub = [0.0] * n  # when the state was published (replicas publish an empty one at start)
        self.built_at = [-INF] * n  # the router's last (re)build of each row's index ...
        self.updated_at = [-INF] * n  # ... and the state's updated_at then
        self.flip = [INF] * n  # before this time a rebuild of the row's index changes nothing
        self.snap: list[tuple | None] = [None] * n  # the published (queued, running, running_s); None: empty
        self.dirty: set[int] = set(range(n))  # published since the last decision
        self.times: list[float] = []  # every decision time so far (non-decreasing)
        # at most one live entry per row in each heap: (time to look at the row again, row)
        self.beats: list[tuple[float, int]] = []  # its next heartbeat (rows with a non-empty state)
        self.has_beat = [False] * n
        self.looks: list[tuple[float, int]] = []  # when a rebuild may re-classify it (a stale key: skipped)
        self.look_at = [INF] * n
        self.reclassified = 0  # rows rebuilt because items turned late (diagnostics)
        for r in self.replicas:
            r.publish_hook = self._published
            r.deliver_hook = self._delivered

    def _published(self, rep: SimReplica, t: float) -> None:
        self.dirty.add(rep.index)
        self.table.inflight[rep.index] = rep.inbox_cost_s

    def _delivered(self, rep: SimReplica, t: float) -> None:
        self.table.inflight[rep.index] = rep.inbox_cost_s

    def _upd(self, i: int, t: float) -> float:
        """``updated_at`` of row ``i``'s state as the router sees it at ``t`` (its last heartbeat)."""
        t_pub = self.t_pub[i]
        since = t - t_pub
        return t_pub if since < self.hb else t_pub + math.floor(since / self.hb) * self.hb

    def _next_beat(self, i: int, t: float) -> float:
        """A time (slightly early) before which ``_upd(i, .)`` keeps its value at ``t``."""
        t_pub, hb = self.t_pub[i], self.hb
        since = t - t_pub
        nxt = t_pub + ((0 if since < hb else math.floor(since / hb)) + 1) * hb
        return nxt - _EARLY * max(1.0, abs(nxt))

    def _look(self, i: int, at: float) -> None:
        if at < self.look_at[i]:
            self.look_at[i] = at
            heappush(self.looks, (at, i))

    def refresh(self, now: float) -> PlacementTable:
        """The table as the router sees it at decision time ``now`` (called once per decision)."""
        self.times.append(now)
        if self.dirty:
            self._new_states(now)
        if self.beats and self.beats[0][0] <= now:
            self._heartbeats(now)
        if self.looks and self.looks[0][0] <= now:
            self._reclassify(now)
        table = self.table
        table.age = np.maximum(now - self.updated, 0.0)  # now - updated if now > updated else 0.0
        return table

    def _new_states(self, now: float) -> None:
        for i in self.dirty:
            rep = self.replicas[i]
            self.t_pub[i] = rep.event_at
            u = self._upd(i, now)
            self.updated[i] = self.updated_at[i] = u
            self.built_at[i] = now
            if rep.has_prefill_work:
                self._build(i, rep.queue_snapshot(), now)
                if not self.has_beat[i]:  # a live entry is never later than this state's next heartbeat
                    self.has_beat[i] = True
                    heappush(self.beats, (self._next_beat(i, now), i))
                self._look(i, self.flip[i])
            elif self.snap[i] is not None:  # an empty queue: the same row whatever the time
                self.snap[i] = None
                self.table.clear(i)
                self.flip[i] = INF
        self.dirty.clear()

    def _heartbeats(self, now: float) -> None:
        beats, later = self.beats, []
        while beats and beats[0][0] <= now:
            i = heappop(beats)[1]
            if self.snap[i] is None:  # empty: its age does not matter until it publishes again
                self.has_beat[i] = False
                continue
            self.updated[i] = self._upd(i, now)
            nxt = self._next_beat(i, now)
            if nxt <= now:
                later.append((nxt, i))
            else:
                heappush(beats, (nxt, i))
        for entry in later:  # just before the heartbeat: look again at the next decision
            heappush(beats, entry)

    def _reclassify(self, now: float) -> None:
        looks, later = self.looks, []
        while looks and looks[0][0] <= now:
            at, i = heappop(looks)
            if at != self.look_at[i]:
                continue  # superseded by an earlier entry
            self.look_at[i] = INF
            if self.snap[i] is None:
                continue
            if self.flip[i] <= now:
                self._replay(i)
            nxt = self.flip[i]
            if nxt <= now:  # can turn late but not rebuilt yet: not before the router's next rebuild
                b = self.built_at[i]
                ttl_at = b + self.ttl
                nxt = min(ttl_at - _EARLY * max(1.0, abs(ttl_at)), self._next_beat(i, b))
            if nxt <= now:
                later.append((nxt, i))
            elif nxt < INF:
                self._look(i, nxt)
        for at, i in later:
            self.look_at[i] = at
            heappush(looks, (at, i))

    def _build(self, i: int, snap: tuple, t: float) -> None:
        self.snap[i] = snap
        self.table.set_index(i, QueueIndex.build(*snap, t))
        self.flip[i] = reclassify_after(snap[0], snap[1], t)

    def _replay(self, i: int) -> None:
        """Row ``i``'s rebuilds at the decisions since its last one (the router rebuilds when the heartbeat
        moved or the index is older than ``ttl_s``); rebuild it at the last one that can re-classify."""
        times, ttl, hb, t_pub = self.times, self.ttl, self.hb, self.t_pub[i]
        b, u = self.built_at[i], self.updated_at[i]
        j, n = bisect_right(times, b), len(times)
        while j < n:
            ja = bisect_right(times, b + ttl, j, n)  # the first decision with t - b > ttl, exactly:
            while ja > j and times[ja - 1] - b > ttl:
                ja -= 1
            while ja < n and not times[ja] - b > ttl:
                ja += 1
            since = b - t_pub  # the first decision before it whose heartbeat moved
            jb = bisect_left(times, t_pub + ((0 if since < hb else math.floor(since / hb)) + 1) * hb, j, ja)
            while jb > j and self._upd(i, times[jb - 1]) != u:
                jb -= 1
            while jb < ja and self._upd(i, times[jb]) == u:
                jb += 1
            if jb >= n:
                break
            b = times[jb]
            u = self._upd(i, b)
            if b >= self.flip[i]:
                self._build(i, self.snap[i], b)  # type: ignore[arg-type]
                self.reclassified += 1
            j = jb + 1
        self.built_at[i], self.updated_at[i] = b, u

