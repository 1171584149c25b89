"""The algorithm core, shared by the simulator and the node daemon: pure functions on tensors and graphs.

Two exceptions: `topology.make_topology` reads the edge list of a ``file:PATH`` spec, and `methods` keeps the
process-wide registry of method names (`methods.register`).
"""
