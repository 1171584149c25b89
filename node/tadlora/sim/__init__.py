"""The in-process simulator: m clients sharing one frozen base model, driven by the algorithm core."""
