"""Simulator configuration (a frozen dataclass), its grid of cells, and the named presets."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tadlora.adapter import INITS, LoraSpec
from tadlora.core.methods import (
    Method,
    make_method,
    method_names,
    recommended_switch_interval,
    takes_switch_interval,
)
from tadlora.core.robust import parse_robust_mixing
from tadlora.core.topology import make_topology
from tadlora.data.splits import parse_shard_scheme
from tadlora.training import TrainSpec

ALL_METHODS: tuple[str, ...] = ("tad", "adf", "lora", "ffa", "rolora", "decaf", "tad-nojoint")
# "auto": batched on CUDA; sequential on CPU, where padding every client's batch to the longest of all of them
# costs more than one big pass saves (measured: SST-2 at length 64, 10 clients, 190 vs 134 ms per client-step).
ENGINES = ("auto", "batched", "sequential")


@dataclass(frozen=True)
class SimConfig:
    """One simulator run: a grid of method × topology × p × T × seed over the same model and data.

    ``switch_intervals`` is the T grid of the methods in ``sweep_methods``; other methods that take T use
    their own default (``adf``: 5) and methods without T run once per (topology, p, seed). ``"auto"`` in the T
    grid picks TAD-LoRA's topology-aware T from the expected degree.
    """

    name: str = "custom"
    model: str = "minilm"
    dataset: str = "builtin:sst2-small"
    num_clients: int = 10
    split: str = "label-skew"
    samples_per_client: int | None = None
    eval_samples: int | None = None  # dev examples evaluated (a fixed seeded subset); None: all of them
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    rounds: int = 50
    eval_every: int = 10
    methods: tuple[str, ...] = ALL_METHODS
    topologies: tuple[str, ...] = ("er",)
    link_probs: tuple[float, ...] = (0.5,)
    switch_intervals: tuple[int | str, ...] = (5,)
    sweep_methods: tuple[str, ...] = ("tad", "tad-nojoint")
    seeds: tuple[int, ...] = (0,)
    engine: str = "auto"
    device: str = "auto"
    max_group_sequences: int = 256  # batched engine: sequences per forward pass (bounds activation memory)
    checkpoint_every: int = 10  # rounds between mid-cell checkpoints (resume points)
    robust_mixing: str = "none"  # none, clip:TAU or trim:F (tadlora.core.robust); as the daemon's flag
    init: str = "portable"  # how A and the head are drawn (`tadlora.adapter.INITS`); the daemon's is portable

    def __post_init__(self) -> None:
        parse_robust_mixing(self.robust_mixing)  # raises ValueError on a bad rule
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        for axis in ("methods", "topologies", "link_probs", "switch_intervals", "seeds"):
            if not getattr(self, axis):  # an empty axis would run no cell of the grid, or none of a swept method
                raise ValueError(f"{axis} must name at least one value")
        for method in (*self.methods, *self.sweep_methods):
            if method not in method_names():
                # A config file may be a run directory's own config.json, of a grid run through a user's module.
                raise ValueError(
                    f"unknown method {method!r}; known: {', '.join(method_names())} (a method of your own is known "
                    "only to a run made through the module that registers it: docs/simulator.md#extending)"
                )
        for method in self.methods:
            self.train.check_method(make_method(method))
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        for name in ("num_clients", "rounds", "eval_every", "checkpoint_every", "max_group_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("samples_per_client", "eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:  # 0 would fail only once a cell trains or evaluates
                raise ValueError(f"{name} must be >= 1 or null (all of them), got {value}")
        for t in self.switch_intervals:
            if not (t == "auto" or (isinstance(t, int) and t >= 1)):
                raise ValueError(f"switch interval must be an int >= 1 or 'auto', got {t!r}")
        for p in self.link_probs:
            if not 0.0 < p <= 1.0:
                raise ValueError(f"link probability must be in (0, 1], got {p}")
        if min(self.seeds) < 0:  # seeds the data split's numpy generator, which takes no negative seed
            raise ValueError(f"seeds must be >= 0, got {min(self.seeds)}")
        for topo in self.topologies:
            try:
                make_topology(topo, self.num_clients)  # validates the spec early, before hours of compute
            except (ValueError, OSError) as exc:
                if not topo.startswith(("file:", "edges:")):
                    raise
                # Which of the grid's topologies, and that its nodes are the run's clients (a file of another m).
                clients = f"{self.num_clients} clients, nodes 0..{self.num_clients - 1}"
                raise ValueError(f"topology {topo} ({clients}): {exc}") from None
        parse_shard_scheme(self.split)  # likewise, before the model and data load
        # A cell's file is named by its key, which shows these axes' values lossily: two values shown alike would
        # share one file, and the second cell would be taken as finished with the first one's results.
        for axis, shown in (("topologies", _topology_tag), ("link_probs", _prob_tag)):
            tags: dict[str, Any] = {}
            for value in getattr(self, axis):
                other = tags.setdefault(shown(value), value)
                if other != value:
                    raise ValueError(
                        f"{axis} {other!r} and {value!r} would share result files (both are {shown(value)!r} in a "
                        "cell's file name): give only one of them"
                    )
        # A cell's files are named by its key: one longer than a file system takes would be refused only once the
        # cell had run a checkpoint interval (hours of compute).
        for cell in self.cells():
            longest = len(cell.key.encode()) + CELL_FILE_EXTRA
            if longest > NAME_MAX:
                raise ValueError(
                    f"topology {cell.topology!r} makes cell file names of {longest} bytes, over the {NAME_MAX} a "
                    "file name may have: give it a shorter spec (for a file:PATH, a shorter path, e.g. a link beside "
                    "the run)"
                )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (written to results.json)."""
        return dataclasses.asdict(self)

    def cells(self) -> Iterator[Cell]:
        """Every run of the grid once, in a stable order (seeds outermost so early results cover all methods).

        A value given twice on an axis (``--seeds 0,0``) names the same cells again: they are not yielded twice,
        which would count one run as two seeds in the summary."""
        seen: set[Cell] = set()
        for seed in self.seeds:
            for p in self.link_probs:
                for topo in self.topologies:
                    for method in self.methods:
                        for t in self._intervals(method, topo, p):
                            cell = Cell(method=method, topology=topo, link_prob=p, switch_interval=t, seed=seed)
                            if cell not in seen:
                                seen.add(cell)
                                yield cell

    def _intervals(self, method: str, topo: str, p: float) -> list[int | None]:
        if not takes_switch_interval(method):
            return [None]
        if method not in self.sweep_methods:
            return [make_method(method).switch_interval]
        out: list[int | None] = []
        for t in self.switch_intervals:
            if t == "auto":
                degree = make_topology(topo, self.num_clients, link_prob=p).expected_degree()
                t = recommended_switch_interval(degree)
            if t not in out:
                out.append(int(t))
        return out


@dataclass(frozen=True)
class Cell:
    """One simulated run."""

    method: str
    topology: str
    link_prob: float
    switch_interval: int | None
    seed: int

    @property
    def key(self) -> str:
        """A file-name-safe unique key."""
        t = "-" if self.switch_interval is None else str(self.switch_interval)
        return f"{self.method}__{_topology_tag(self.topology)}__p{_prob_tag(self.link_prob)}__T{t}__s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return dataclasses.asdict(self)

    @property
    def computation(self) -> tuple[Method, str, float, int]:
        """What the simulator computes for this cell. Under one config, two cells with equal computations produce
        the same results: a method's name is only a label, its policy is what runs (``adf`` with T is ``tad``
        with T; ``tad-nojoint`` with T = 1 is ``rolora``), so such a cell is run once and shared."""
        policy = dataclasses.replace(make_method(self.method, self.switch_interval), name="")
        return policy, self.topology, self.link_prob, self.seed

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Cell:
        """The cell a results record names (ValueError if it names none)."""
        try:
            return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls)})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a cell record: {exc}") from None


NAME_MAX = 255  # bytes in a file name (ext4, xfs, btrfs, APFS, NTFS in characters)
# What the longest file of a cell adds to its key: a checkpoint's temporary file, ".KEY.ckpt.safetensors.XXXXXXXX.tmp"
# (`tadlora.fsutil.atomic_write_bytes`, whose mkstemp draws 8 characters).
CELL_FILE_EXTRA = len(".") + len(".ckpt.safetensors") + len(".XXXXXXXX") + len(".tmp")


def _topology_tag(topology: str) -> str:
    """A topology as a cell's key shows it (file-name-safe)."""
    return "".join(c if c.isalnum() else "_" for c in topology)


def _prob_tag(link_prob: float) -> str:
    """A link probability as a cell's key shows it."""
    return f"{link_prob:g}"


_SMOKE = SimConfig(
    name="smoke",
    model="tiny",
    dataset="builtin:sst2-small",
    num_clients=4,
    samples_per_client=64,
    eval_samples=64,
    lora=LoraSpec(r=4, alpha=8.0),
    train=TrainSpec(local_steps=3, batch_size=8, max_length=32, lr=5e-3),
    rounds=6,
    eval_every=2,
    link_probs=(0.5,),
    switch_intervals=(2,),
    checkpoint_every=2,
    engine="batched",  # tiny model: one batched pass beats per-client passes even on CPU
    device="cpu",
)

_PAPER_MNLI = SimConfig(
    name="paper-mnli",
    model="roberta-base",
    dataset="glue:MNLI",
    num_clients=10,
    lora=LoraSpec(r=8, alpha=16.0),
    train=TrainSpec(local_steps=20, batch_size=32, max_length=128, lr=5e-4),
    rounds=150,
    eval_every=10,
    link_probs=(0.5, 0.1, 0.02),
    switch_intervals=(1, 2, 3, 5, 10, 15),
    seeds=(0, 1, 2),
    device="auto",
)

# The CPU presets run the paper's protocol on the offline MiniLM encoder and the real GLUE files. cpu-sst2 is sized
# from measured learning curves (docs/simulator.md): with 10 local steps of batch 16 per round, TAD-LoRA at p = 0.02
# was still climbing at round 60 (0.69) and reached 0.76 ± 0.09 at round 100, so 100 rounds it is. Its cells are
# exactly those of the sizing study, so that study's finished cells count towards a cpu-sst2 grid.
_CPU_SST2 = SimConfig(
    name="cpu-sst2",
    model="minilm",
    dataset="glue:SST-2",
    num_clients=10,
    samples_per_client=2000,
    eval_samples=500,
    lora=LoraSpec(r=8, alpha=16.0),
    train=TrainSpec(local_steps=10, batch_size=16, max_length=64, lr=1e-3),
    rounds=100,
    eval_every=10,
    link_probs=(0.5, 0.1, 0.02),
    switch_intervals=("auto",),
    seeds=(0, 1, 2),
    engine="sequential",  # what "auto" picks on CPU; fixed so that results do not depend on the machine
    device="auto",
    # The committed grid's cells ran before the portable init existed, with torch's (on an x86 CPU with AVX2; other
    # CPUs draw other bits from it): kept, so that the grid stays one computation. A new grid may pass --init portable.
    init="torch",
)

# MNLI: the same budget as SST-2 with longer sequences (pairs), all of the train subset. Measured (docs/simulator.md):
# the budget learns MNLI on one client with all the data (0.61), but at p = 0.02 with label skew every client stays
# at its majority class for at least half the run, for TAD-LoRA and LoRA alike, and at p = 0.5 with 300 rounds x 2
# steps TAD-LoRA stays at chance too, while the same budget with an IID split learns. Plain SGD is no way out (it
# does not learn MNLI in 300 steps even on one client with all the data). Not sized: its cells measure nothing.
_CPU_MNLI = dataclasses.replace(
    _CPU_SST2,
    name="cpu-mnli",
    dataset="glue:MNLI",
    samples_per_client=None,
    train=TrainSpec(local_steps=10, batch_size=16, max_length=96, lr=1e-3),
)

PRESETS: dict[str, SimConfig] = {c.name: c for c in (_SMOKE, _PAPER_MNLI, _CPU_SST2, _CPU_MNLI)}

# What a user must know before spending hours on a preset (shown in --help and warned at the start of a run).
PRESET_CAVEATS: dict[str, str] = {
    "cpu-mnli": (
        "not sized: with the paper's label skew, MiniLM's clients stay at chance (about 0.33) on every CPU budget "
        "measured, up to 300 rounds, so its cells do not separate the methods (docs/simulator.md, MNLI); "
        "the MNLI column needs paper-mnli on a GPU"
    ),
}


def preset(name: str) -> SimConfig:
    """The named preset (ValueError listing the known ones otherwise)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


# A run's stamp (OUT/config.json) records, beside its settings, how the host resolved those that depend on it
# (`Simulator._resolved`): not a setting, so a stamp given back as a config file leaves it out.
RESOLVED_KEY = "resolved_on_host"


def config_from_json(text: str, base: SimConfig | None = None, *, stamp: bool = False) -> SimConfig:
    """A SimConfig from a JSON object of overrides on ``base`` (default: SimConfig()). With ``stamp`` the object
    is a run's stamp (OUT/config.json), whose settings added since it was written are what that run used
    (`stamp_settings`), not today's defaults: given back to go on with its run, it must match what the run ran."""
    raw = json.loads(text, object_pairs_hook=_object_of_unique_keys)
    if not isinstance(raw, dict):
        raise ValueError("a simulator config file holds a JSON object")
    raw.pop(RESOLVED_KEY, None)
    return override(base or SimConfig(), stamp_settings(raw) if stamp else raw)


# Settings whose default is not what runs made before they existed did: those runs' value.
_BEFORE_IT_EXISTED: dict[str, Any] = {"init": "torch"}


def stamp_settings(stamped: dict[str, Any]) -> dict[str, Any]:
    """A run's stamped config with the settings added since it was written at what that run used: their defaults
    (top level and in the nested ``lora`` and ``train``), or `_BEFORE_IT_EXISTED`."""
    defaults = json.loads(json.dumps(SimConfig().to_dict()))
    out = dict(stamped)
    for key, default in defaults.items():
        if key not in out:
            out[key] = _BEFORE_IT_EXISTED.get(key, default)
        elif isinstance(default, dict) and isinstance(out[key], dict):
            out[key] = {**default, **out[key]}
    return out


def _object_of_unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object of a config file, each key given once: json keeps the last of two equal keys unseen (a second
    ``"train"`` object would drop the first one's settings)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the config gives {key!r} twice: merge them into one")
        out[key] = value
    return out


def override(base: SimConfig, changes: dict[str, Any]) -> SimConfig:
    """``base`` with ``changes`` applied; nested ``lora``/``train`` may be given as partial dicts.

    Every value must have its setting's type (a JSON list for a tuple, an object for ``lora``/``train``): a
    ValueError names the one that has not, instead of a TypeError from deep in a run hours later."""
    replaced: SimConfig = _replaced(base, changes, "simulator", base)
    return replaced


def _replaced(base: Any, changes: dict[str, Any], what: str, root: SimConfig) -> Any:
    """The dataclass ``base`` with ``changes`` type-checked (`_typed`) and applied (``what``: for messages;
    ``root``: the whole config, to say where a misplaced setting goes)."""
    hints = typing.get_type_hints(type(base))
    unknown = sorted(set(changes) - set(hints))
    if unknown:
        # A setting given in the wrong place ("lr" at the top for "train": {"lr": ...}, "rounds" inside "train"):
        # say where it goes.
        places = [_where(key, group) for key in unknown for group in _places(root, key)]
        where = f" ({'; '.join(places)})" if places else ""
        raise ValueError(f"unknown {what} settings: {unknown}{where}; known: {sorted(hints)}")
    fixed: dict[str, Any] = {}
    for key, value in changes.items():
        current = getattr(base, key)
        if dataclasses.is_dataclass(current):  # lora, train: a partial object of their own settings
            if isinstance(value, dict):
                value = _replaced(current, value, key, root)
            elif not isinstance(value, type(current)):
                raise ValueError(f"{key} must be an object of {key} settings, got {value!r}")
        else:
            value = _typed(key, value, hints[key])
        fixed[key] = value
    return dataclasses.replace(base, **fixed)


def _places(root: SimConfig, key: str) -> list[str]:
    """Where ``key`` is a setting of a simulator config: "simulator" (the top level) and/or the names of the nested
    groups (lora, train) that have it."""
    groups = [f.name for f in dataclasses.fields(root) if dataclasses.is_dataclass(getattr(root, f.name))]
    top = ["simulator"] if key in {f.name for f in dataclasses.fields(root)} else []
    return top + [g for g in groups if key in {f.name for f in dataclasses.fields(getattr(root, g))}]


def _where(key: str, group: str) -> str:
    """How to write ``key`` where it belongs (`_places`), for a message."""
    if group == "simulator":
        return f'{key!r} is a top-level setting: {{"{key}": ...}}'
    return f'{key!r} is a {group} setting: {{"{group}": {{"{key}": ...}}}}'


def _typed(name: str, value: Any, hint: Any) -> Any:
    """``value`` as a setting of type ``hint`` (int, float, str, bool, None, unions, tuple[X, ...]), a JSON list
    becoming a tuple; ValueError naming the setting if it is not one."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        for option in typing.get_args(hint):
            try:
                return _typed(name, value, option)
            except ValueError:
                pass
    elif typing.get_origin(hint) is tuple:
        if isinstance(value, list | tuple):
            return tuple(_typed(name, v, typing.get_args(hint)[0]) for v in value)
    elif hint is type(None):
        if value is None:
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    shown = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    shown = "a list" if typing.get_origin(hint) is tuple else shown
    raise ValueError(f"{name} must be {shown}, got {value!r}")
