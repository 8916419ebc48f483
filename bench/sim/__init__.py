"""Cluster simulator: N replicas running the real scheduler policies behind the real placement logic.

``flowprefill bench sim`` (:mod:`bench.sim.sweep`) finds goodput per replica count and router
policy; :mod:`bench.sim.validate` compares the simulator with a real in-process replay.
"""
