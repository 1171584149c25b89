"""A method of your own, registered from your own module: train A and B every round, mix only B ("lora-bmix").

tadlora's methods are policies registered by name (`tadlora.core.methods.register`). There is no plugin hook or
entry point: a module of yours registers its method, then runs the simulator or the node daemon in the same
process, whose every check and flag (--methods, --method, a config file's "methods") reads the registry when it
runs (docs/simulator.md#extending). This file is such a module:

    python examples/own_method.py sim --preset smoke --methods tad,lora-bmix --out runs/own-method
    python examples/own_method.py node --method lora-bmix --insecure --out runs/n0 ...   # every node of the cluster

A later command on the same --out (a resume, --report-only) goes through this module too: the directory's
config.json names lora-bmix, which plain `tadlora-sim` does not know.
"""

from __future__ import annotations

import sys

from tadlora.core.methods import Method, register


@register("lora-bmix")  # no default_switch_interval: it does not alternate, so it takes no T
def lora_b_only_mix(_: int | None) -> Method:
    """Both factors train (trains_a), only B is mixed and sent (mixes_a=False): each client's A stays its own."""
    return Method("lora-bmix", trains_a=True, mixes_a=False)


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "sim":
        from tadlora.sim.cli import main as sim_main

        return sim_main(rest)
    if command == "node":
        from tadlora.node.entry import main as node_main

        return node_main(rest)
    sys.stderr.write(f"usage: {sys.argv[0]} sim|node [the tadlora-sim or tadlora-node arguments]\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
