"""The algorithm core: pure, I/O-free functions shared by the simulator and the node daemon."""
