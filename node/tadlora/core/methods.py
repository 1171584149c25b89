"""Decentralized LoRA methods as small pure policies, registered by name.

A method answers three questions for round ``t`` (0-based, shared by every node):
which factors train during local steps (``trained``), which factors are mixed with the neighbours
(``mixed``), and whether mixing acts on the product ``B @ A`` instead of the factors (``product_mixing``,
DeCAF). Nothing here touches tensors; `tadlora.core.mixing` applies a method to tensors.

Alternating methods follow one schedule: the active factor is B in rounds [0, T), A in [T, 2T), B again in
[2T, 3T) and so on. B goes first because it starts at zero: training A first while B = 0 would leave the
adapter's update B @ A at zero and give A no gradient.

How the alternating methods relate:

* ``tad`` (TAD-LoRA): the alternating schedule with switching interval T, **both** factors mixed every round
  (joint mixing). Mixing the frozen factor too keeps the nodes' frozen blocks in consensus, which keeps the
  cross term C = (1/m) Σ (B_i − B̄)(A_i − Ā) small; the "topology-aware" part is choosing T from the
  connectivity (longer T when links are sparse): see `recommended_switch_interval`.
* ``adf`` (ADF-LoRA, the same authors' earlier scheme): the same mechanism — one factor updated per round,
  both mixed — with a fixed interval that does not adapt to the topology (default T = 5). ``adf`` with T is
  exactly ``tad`` with the same T; they differ in how T is chosen.
* ``tad-nojoint``: tad's schedule but only the active factor is mixed (the ablation of joint mixing).
* ``rolora`` (RoLoRA): alternate every round (T = 1, fixed) and mix only the active factor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from tadlora.core.factors import BOTH, Factor

ONLY_A: frozenset[Factor] = frozenset({Factor.A})
ONLY_B: frozenset[Factor] = frozenset({Factor.B})


def active_factor(t: int, switch_interval: int) -> Factor:
    """The factor an alternating schedule trains in round ``t``: B for the first T rounds, then A, ..."""
    if t < 0:
        raise ValueError(f"round must be >= 0, got {t}")
    if switch_interval < 1:
        raise ValueError(f"switch interval T must be >= 1, got {switch_interval}")
    return Factor.B if (t // switch_interval) % 2 == 0 else Factor.A


@dataclass(frozen=True)
class Method:
    """A method policy. Construct through `make_method` so names and parameters are validated."""

    name: str
    switch_interval: int | None = None  # T, for alternating methods only
    alternating: bool = False
    joint_mixing: bool = True  # alternating methods: mix both factors (True) or only the active one
    trains_a: bool = True  # non-alternating methods: is A trained (False for FFA-LoRA)
    mixes_a: bool = True  # non-alternating methods: is A mixed (False for FFA-LoRA)
    product_mixing: bool = False  # DeCAF: mix B @ A, then truncate back to rank r

    def trained(self, t: int) -> frozenset[Factor]:
        """Factors that local steps update in round ``t``."""
        if self.alternating:
            return frozenset({active_factor(t, self.switch_interval or 1)})
        return BOTH if self.trains_a else ONLY_B

    def mixed(self, t: int) -> frozenset[Factor]:
        """Factors that are exchanged and mixed at the end of round ``t``."""
        if self.alternating:
            return BOTH if self.joint_mixing else self.trained(t)
        return BOTH if self.mixes_a else ONLY_B

    def phase(self, t: int) -> str:
        """A short label of what trains in round ``t`` ("A", "B" or "AB"), for logs and status."""
        return "".join(sorted(f.value for f in self.trained(t)))


MethodFactory = Callable[[int | None], Method]
_REGISTRY: dict[str, tuple[MethodFactory, int | None]] = {}


# A method's name is a file name part (a simulator cell's files), an item of a comma list (--methods) and a word of
# the node's schedule string: letters, digits, '.', '_' and '-', starting with a letter or digit.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # at most 64: the schedule, of 256 at most, holds it


def register(name: str, default_switch_interval: int | None = None) -> Callable[[MethodFactory], MethodFactory]:
    """Register a method factory under ``name``, which the factory's `Method` must carry as its ``name``.

    ``default_switch_interval``: None for a method that takes no T (it does not alternate, or fixes T itself, as
    rolora), else the T it runs at unless one is given. A duplicate name, a name that is not letters, digits, '.',
    '_' and '-' (it names files and is an item of comma lists) and a default T below 1 are refused (ValueError).
    A method of your own is registered from your module before a run: docs/simulator.md#extending."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"method name {name!r}: use at most 64 letters, digits, '.', '_' and '-' (starting with a letter or digit)"
        )
    if default_switch_interval is not None and default_switch_interval < 1:
        raise ValueError(f"method {name!r}: default switch interval T must be >= 1, got {default_switch_interval}")

    def decorator(factory: MethodFactory) -> MethodFactory:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        _REGISTRY[name] = (factory, default_switch_interval)
        return factory

    return decorator


def method_names() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def takes_switch_interval(name: str) -> bool:
    """Whether the method ``name`` takes a switching interval T as a parameter."""
    return _lookup(name)[1] is not None


def _lookup(name: str) -> tuple[MethodFactory, int | None]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(method_names())}") from None


def make_method(name: str, switch_interval: int | None = None) -> Method:
    """Build the method ``name``. ``switch_interval`` (T) applies to alternating methods only; None takes the
    method's default. Giving T to a method that takes none (it does not alternate, or fixes T itself, as rolora) is
    an error, not silently ignored."""
    factory, default_t = _lookup(name)
    if default_t is None:
        method = _named(name, factory(None))
        if switch_interval is not None:
            why = f"its T = {method.switch_interval} is part of it" if method.alternating else "it does not alternate"
            raise ValueError(f"method {name!r} takes no switch interval: {why}")
        return method
    t = default_t if switch_interval is None else switch_interval
    if t < 1:
        raise ValueError(f"switch interval T must be >= 1, got {t}")
    return _named(name, factory(t))


def _named(name: str, method: Method) -> Method:
    """``method``, which the factory registered as ``name`` made: refused unless it carries that name (a node's status,
    logs and refusals name ``method.name``, its schedule and run settings the registered name)."""
    if method.name != name:
        raise ValueError(f"the factory registered as method {name!r} made a Method named {method.name!r}")
    return method


def recommended_switch_interval(expected_degree: float, max_interval: int = 15) -> int:
    """TAD-LoRA's topology-aware T: about the number of rounds a node needs to see two live links.

    Sparse graphs need longer phases so that the frozen factor has time to reach consensus before it trains
    again; dense graphs reach consensus quickly and gain nothing from long phases. ``expected_degree`` is a
    node's expected number of live links per round (p·(m−1) for Erdős–Rényi). Result in [1, max_interval].
    A rule of thumb of this project, after the paper's finding that the best T grows as connectivity falls (the
    paper gives no formula); the T sweep in benchmarks/paper_table.py measures it.
    """
    if max_interval < 1:
        raise ValueError(f"max_interval must be >= 1, got {max_interval}")
    if math.isnan(expected_degree):
        raise ValueError("expected degree is NaN")
    if expected_degree <= 0:
        return max_interval
    return max(1, min(max_interval, math.ceil(2.0 / expected_degree)))


@register("tad", default_switch_interval=5)
def _tad(t: int | None) -> Method:
    return Method("tad", switch_interval=t, alternating=True, joint_mixing=True)


@register("adf", default_switch_interval=5)
def _adf(t: int | None) -> Method:
    return Method("adf", switch_interval=t, alternating=True, joint_mixing=True)


@register("tad-nojoint", default_switch_interval=5)
def _tad_nojoint(t: int | None) -> Method:
    return Method("tad-nojoint", switch_interval=t, alternating=True, joint_mixing=False)


@register("rolora")
def _rolora(_: int | None) -> Method:
    # RoLoRA alternates every round by definition: T = 1 is part of the method, not a parameter.
    return Method("rolora", switch_interval=1, alternating=True, joint_mixing=False)


@register("lora")
def _lora(_: int | None) -> Method:
    return Method("lora")


@register("ffa")
def _ffa(_: int | None) -> Method:
    return Method("ffa", trains_a=False, mixes_a=False)


@register("decaf")
def _decaf(_: int | None) -> Method:
    return Method("decaf", product_mixing=True)
