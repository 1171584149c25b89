"""Method policies: which factor trains and which factors mix in each round."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tadlora.core import methods
from tadlora.core.factors import Factor
from tadlora.core.methods import (
    Method,
    active_factor,
    make_method,
    method_names,
    recommended_switch_interval,
    register,
)
from tadlora.sim.config import ALL_METHODS

A, B = frozenset({Factor.A}), frozenset({Factor.B})
AB = frozenset({Factor.A, Factor.B})


def test_every_paper_method_is_registered() -> None:
    assert set(ALL_METHODS) <= set(method_names())


def test_alternating_schedule_starts_with_b_and_switches_every_t_rounds() -> None:
    assert [active_factor(t, 3).value for t in range(8)] == list("BBBAAABB")
    assert [active_factor(t, 1).value for t in range(4)] == list("BABA")


@pytest.mark.parametrize(
    ("name", "t", "trained", "mixed"),
    [
        ("tad", 0, B, AB),
        ("tad", 5, A, AB),
        ("tad", 10, B, AB),
        ("adf", 4, B, AB),
        ("adf", 5, A, AB),
        ("tad-nojoint", 0, B, B),
        ("tad-nojoint", 5, A, A),
        ("rolora", 0, B, B),
        ("rolora", 1, A, A),
        ("lora", 3, AB, AB),
        ("ffa", 3, B, B),
        ("decaf", 3, AB, AB),
    ],
)
def test_each_method_trains_and_mixes_the_stated_factors(
    name: str, t: int, trained: frozenset, mixed: frozenset
) -> None:
    method = make_method(name)
    assert method.trained(t) == trained
    assert method.mixed(t) == mixed
    assert method.phase(t) == "".join(sorted(f.value for f in trained))  # logs and status name what trains


def test_adf_default_interval_is_five_and_equals_tad_with_that_interval() -> None:
    adf, tad = make_method("adf"), make_method("tad", 5)
    assert adf.switch_interval == 5
    assert all(adf.trained(t) == tad.trained(t) and adf.mixed(t) == tad.mixed(t) for t in range(40))


def test_only_decaf_mixes_products() -> None:
    assert [n for n in ALL_METHODS if make_method(n).product_mixing] == ["decaf"]


def test_bad_method_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        make_method("nope")
    with pytest.raises(ValueError, match="does not alternate"):
        make_method("lora", 3)
    with pytest.raises(ValueError, match=">= 1"):
        make_method("tad", 0)


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register("tad")(lambda t: Method("tad"))


def test_recommended_interval_grows_as_connectivity_falls() -> None:
    m = 10
    ts = [recommended_switch_interval(p * (m - 1)) for p in (0.5, 0.1, 0.02, 0.0)]
    assert ts == sorted(ts) and ts[0] < ts[-1]
    # T ≈ rounds to see two live links, ⌈2 / degree⌉, within [1, 15]; no live links at all: the longest T
    assert ts == [1, 3, 12, 15]


def test_a_t_given_to_rolora_is_refused_without_claiming_it_does_not_alternate() -> None:
    assert make_method("rolora").alternating
    with pytest.raises(ValueError, match="takes no switch interval") as info:
        make_method("rolora", 2)
    assert "does not alternate" not in str(info.value)


def test_recommended_interval_refuses_inputs_that_give_no_valid_t() -> None:
    with pytest.raises(ValueError, match="max_interval"):
        recommended_switch_interval(0.0, max_interval=0)
    with pytest.raises(ValueError, match="degree"):
        recommended_switch_interval(float("nan"))


@pytest.mark.parametrize(
    ("name", "t", "schedule"),
    [
        ("tad", None, "BBBBBAAAAABBBBB"),  # the registered default T = 5
        ("adf", None, "BBBBBAAAAABBBBB"),
        ("tad-nojoint", None, "BBBBBAAAAABBBBB"),  # tad's schedule
        ("tad", 3, "BBBAAABBBAAA"),
        ("adf", 2, "BBAABBAA"),
        ("tad-nojoint", 2, "BBAABBAA"),
        ("rolora", None, "BABABA"),
    ],
)
def test_alternating_methods_hold_each_factor_for_t_rounds_including_the_rounds_inside_a_phase(
    name: str, t: int | None, schedule: str
) -> None:
    # The cases above sample rounds 0, 4, 5, 10, where T = 5 and T = 1 (or T = 4) happen to agree; a method that
    # ignored its T, or a default T other than 5, passed them. Every round of a few phases pins the schedule.
    method = make_method(name, t)
    joint = name in ("tad", "adf")
    for r, active in enumerate(schedule):
        assert method.trained(r) == frozenset({Factor(active)}), (name, r)
        assert method.mixed(r) == (AB if joint else frozenset({Factor(active)})), (name, r)
    assert "".join(method.phase(r) for r in range(len(schedule))) == schedule


@pytest.mark.parametrize("name", ["my/lora", "a,b", "two words", "", "-x", "tad T=5", "m" * 65])
def test_a_method_name_a_run_cannot_use_is_refused_at_registration(name: str) -> None:
    """A name is a part of a cell's file name, an item of --methods' comma list and a word of the node's schedule:
    "my/lora" used to be registered and then fail on a lock file in a missing folder, "a,b" as "unknown method 'a'";
    a name of hundreds of characters would make the schedule too long for the wire (256), refused by every peer."""
    with pytest.raises(ValueError, match="method name"):
        register(name)(lambda t: Method(name))
    assert name not in method_names()


def test_a_method_name_of_64_characters_is_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    from tadlora.core import methods

    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))  # this test's registration ends with it
    name = "m" * 64
    register(name)(lambda t: Method(name))
    assert name in method_names()


def test_a_default_switch_interval_below_one_is_refused_at_registration() -> None:
    with pytest.raises(ValueError, match="default switch interval"):
        register("zero-t", default_switch_interval=0)(lambda t: Method("zero-t", switch_interval=t, alternating=True))
    assert "zero-t" not in method_names()


def test_a_factory_whose_method_carries_another_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The node's status and logs name ``Method.name``, its schedule the registered name: they must be one."""
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))  # this test's registration ends with it
    register("named-wrong")(lambda t: Method("lora", mixes_a=False))
    with pytest.raises(ValueError, match="made a Method named 'lora'"):
        make_method("named-wrong")


def test_recommended_interval_is_capped_at_max_interval() -> None:
    # ⌈2 / 0.01⌉ = 200 and ⌈2 / 0.1⌉ = 20 rounds: a sparse graph still gets at most max_interval
    assert recommended_switch_interval(0.01) == 15
    assert recommended_switch_interval(0.1, max_interval=4) == 4


@pytest.mark.parametrize(
    ("t", "switch_interval", "message"), [(-1, 5, "round must be >= 0"), (3, 0, "switch interval T must be >= 1")]
)
def test_the_alternating_schedule_refuses_a_negative_round_and_an_interval_below_one(
    t: int, switch_interval: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        active_factor(t, switch_interval)


_PHASES = """
from tadlora.core.factors import BOTH
from tadlora.core.methods import make_method
print("".join(f.value for f in BOTH), make_method("lora").phase(0), make_method("decaf").phase(0))
"""


def test_the_phase_of_a_method_training_both_factors_is_ab_whatever_the_hash_seed() -> None:
    """A set of str enums iterates in an order that PYTHONHASHSEED decides, so two nodes (or a node and its status
    reader) would log "AB" and "BA" for one phase unless `phase` sorts. Each seed needs a process of its own (one
    that imports torch: a second or two each, so a handful of seeds); the test checks that the set itself iterated
    as B, A under at least one of them, or it would prove nothing."""
    package_root = str(Path(methods.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PHASES], env={**env, "PYTHONHASHSEED": str(seed)}, stdout=subprocess.PIPE, text=True
        )
        for seed in range(6)
    ]
    lines = [proc.communicate(timeout=60)[0].split() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert "BA" in {line[0] for line in lines}, "no seed here iterates the set as B, A: pick others"
    assert {(line[1], line[2]) for line in lines} == {("AB", "AB")}
