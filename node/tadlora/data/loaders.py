"""Loaders from csv/jsonl files, shipped data and the hub, and `resolve_dataset`: the one place
where a user's dataset string (``builtin:sst2-small``, ``glue:MNLI``, ``data.csv``, ...) becomes
data, for the simulator and the node alike."""

from __future__ import annotations

import csv
import importlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import numpy as np
import numpy.typing as npt

from tadlora.data.dataset import TextDataset
from tadlora.data.glue import (
    GLUE_TASKS,
    csv_error,
    find_glue_dir,
    glue_task,
    glue_task_of,
    load_glue_tsv,
    looks_like_glue,
    not_utf8,
    read_tsv,
    refuse_repeated_columns,
)

__all__ = [
    "BUILTIN_DATASETS",
    "DATASET_SPLITS",
    "check_dataset_spec",
    "load_csv",
    "load_glue_tsv",
    "load_hub",
    "load_jsonl",
    "resolve_dataset",
]

DATASET_SPLITS = ("train", "dev")
# `builtin:NAME` -> (folder under tadlora/data/builtin, GLUE task whose TSV layout it uses)
BUILTIN_DATASETS: Mapping[str, tuple[str, str]] = {"sst2-small": ("sst2_small", "SST-2")}
_LOCAL_SUFFIXES = (".tsv", ".csv", ".jsonl")
_DEV_STEMS = ("dev", "dev_matched", "validation", "valid", "val")
_INT_RE = re.compile(r"[+-]?\d+")
# Text columns tried in order when a csv/jsonl/hub source does not name them.
_DEFAULT_TEXT_COLUMNS: tuple[tuple[str, ...], ...] = (
    ("premise", "hypothesis"),
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("question1", "question2"),
    ("text", "text_b"),
    ("sentence", "text_b"),
    ("text",),
    ("sentence",),
)

Record = tuple[int, Mapping[str, Any]]  # (line number, column -> value)
# Integer labels are class ids, and ids up to the largest get a name each: one far larger (an index column given as
# the label) would allocate names by the billion. No text classification head here is anywhere near this wide.
_MAX_CLASS_ID = 100_000


def _parse_int(value: object) -> int | None:
    if isinstance(value, bool):  # bool is an int subclass, but True is not a class id
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
        return int(value)
    return None


def _text_columns(requested: Sequence[str] | str | None, available: Sequence[str], source: str) -> tuple[str, ...]:
    if requested is None:
        for candidate in _DEFAULT_TEXT_COLUMNS:
            if set(candidate) <= set(available):
                return candidate
        raise ValueError(
            f"{source}: no text columns given and no default ones (text, sentence, text_b, "
            f"sentence1/sentence2, premise/hypothesis, ...) among {list(available)}"
        )
    cols = (requested,) if isinstance(requested, str) else tuple(requested)
    if not 1 <= len(cols) <= 2:
        raise ValueError(f"{source}: need 1 or 2 text columns, got {list(cols)}")
    missing = [c for c in cols if c not in available]
    if missing:
        raise ValueError(f"{source}: text column(s) {missing} not in {list(available)}")
    return cols


def _label_text(value: object, lineno: int, source: str) -> object:
    """``value`` with a string's surrounding spaces cut ("pos " is "pos"); an empty one refused: an unlabelled row
    would otherwise become a class "" and move every other class's id."""
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise ValueError(f"{source}:{lineno}: label {value!r} is empty (an unlabelled row?)")
    return value


def _encode_labels(
    raw: Sequence[object],
    linenos: Sequence[int],
    label_names: Sequence[str] | None,
    source: str,
) -> tuple[npt.NDArray[np.int64], tuple[str, ...]]:
    """Label ids and names: by ``label_names`` if given (a value may be a name or, unless the names are integers,
    an id); else all-integer labels are ids counted from 0, or from 1 when none is 0 (names "1", "2", ...), and
    otherwise labels are names with ids in sorted order."""
    raw = [_label_text(v, lineno, source) for v, lineno in zip(raw, linenos, strict=True)]
    if label_names is not None:
        names = tuple(label_names)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"{source}: label_names must be distinct and non-empty: {names}")
        index = {n: i for i, n in enumerate(names)}
        name_ints = [_parse_int(n) for n in names]
        # Integer names ("1", "2" of a file counted from 1) are matched by value: read as an id, a "0" would
        # silently be the class named "1".
        by_value = {v: i for i, v in enumerate(name_ints) if v is not None} if None not in name_ints else None
        ids = []
        for value, lineno in zip(raw, linenos, strict=True):
            label = index.get(value) if isinstance(value, str) else None
            if label is None:
                as_int = _parse_int(value)
                if by_value is None:
                    label = as_int
                elif as_int is not None:
                    label = by_value.get(as_int)
            if label is None or not 0 <= label < len(names):
                raise ValueError(
                    f"{source}:{lineno}: label {value!r} is neither one of {list(names)} nor an id in [0, {len(names)})"
                )
            ids.append(label)
        return np.asarray(ids, dtype=np.int64), names
    as_ints = [_parse_int(v) for v in raw]
    if all(v is not None for v in as_ints):
        int_ids = [v for v in as_ints if v is not None]
        for value, lineno in zip(int_ids, linenos, strict=True):
            if value < 0:  # -1 is the hub's "unlabelled", but -1/+1 is also a binary convention
                distinct = sorted(set(int_ids))
                names_hint = ",".join(map(str, distinct[:10])) + (",..." if len(distinct) > 10 else "")
                raise ValueError(
                    f"{source}:{lineno}: label {value} is negative (unlabelled?); if it is a class, name the classes "
                    f"in id order: label_names={names_hint} (a dataset spec's ?label_names=...)"
                )
            if value > _MAX_CLASS_ID:
                raise ValueError(
                    f"{source}:{lineno}: label {value} is past the largest of class ids 0..{_MAX_CLASS_ID}: is this "
                    "column an index rather than the label? Name the label column with label=COL"
                )
        first = 0 if 0 in int_ids else 1  # no 0: the file counts its classes from 1
        names = tuple(str(i) for i in range(first, max(int_ids) + 1))
        return np.asarray(int_ids, dtype=np.int64) - first, names
    for value, lineno in zip(raw, linenos, strict=True):
        match value:
            case bool():
                ok = False
            case str() | int():
                ok = True
            case _:
                ok = False
        if not ok:  # malformed data, hence ValueError with the line, not TypeError
            raise ValueError(f"{source}:{lineno}: label {value!r} is not a string or an int")
    names = tuple(sorted({str(v) for v in raw}))
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[str(v)] for v in raw], dtype=np.int64), names


def _build(
    source: str,
    records: Sequence[Record],
    columns: Sequence[str],
    text_columns: Sequence[str] | str | None,
    label_column: str,
    label_names: Sequence[str] | None,
) -> TextDataset:
    if not records:
        raise ValueError(f"{source}: no data rows")
    cols = _text_columns(text_columns, columns, source)
    if label_column not in columns:
        raise ValueError(f"{source}: label column {label_column!r} not in {list(columns)}")
    refuse_repeated_columns(source, columns, (*cols, label_column))
    texts: list[list[str]] = [[] for _ in cols]
    for lineno, record in records:
        for out, col in zip(texts, cols, strict=True):
            match record.get(col):
                case str(value) if value.strip():
                    out.append(value)
                case str():
                    raise ValueError(f"{source}:{lineno}: {col!r} is empty")
                case value:
                    raise ValueError(f"{source}:{lineno}: {col!r} is {value!r}, not a string")
    labels, names = _encode_labels(
        [r.get(label_column) for _, r in records],
        [lineno for lineno, _ in records],
        label_names,
        source,
    )
    return TextDataset(
        name=source,
        text_a=tuple(texts[0]),
        text_b=tuple(texts[1]) if len(texts) == 2 else None,
        labels=labels,
        label_names=names,
    )


def load_csv(
    path: str | os.PathLike[str],
    text_columns: Sequence[str] | str | None = None,
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    delimiter: str = ",",
) -> TextDataset:
    """Load a delimited file with a header: 1 or 2 text columns and a label column.

    All-integer labels are ids, counted from 0 or, when no label is 0, from 1 (named "1", "2", ...);
    other labels are names (spaces around them cut), given ids in sorted order unless ``label_names``
    fixes them. An empty label is refused. ``text_columns=None`` takes ``text``/``sentence`` (+ ``text_b``)
    or a known pair such as ``sentence1``/``sentence2``. A tab delimiter reads with quoting off,
    as GLUE-style TSVs need. Raises ``ValueError`` naming file and line for bad data.
    """
    p = Path(path)
    records: list[Record] = []
    # utf-8-sig: a leading BOM (Excel's "CSV UTF-8") would otherwise become part of the first column's name.
    with p.open(newline="", encoding="utf-8-sig") as f:
        if delimiter == "\t":
            reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{p}: empty file (expected a header row)")
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{p}:{reader.line_num}: expected {len(header)} fields {header}, got {len(row)}")
                records.append((reader.line_num, dict(zip(header, row, strict=True))))
        except UnicodeDecodeError as exc:
            raise not_utf8(p, exc) from exc
        except csv.Error as exc:
            raise csv_error(p, reader.line_num, exc) from exc
    return _build(str(p), records, header, text_columns, label_column, label_names)


def load_jsonl(
    path: str | os.PathLike[str],
    text_columns: Sequence[str] | str | None = None,
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> TextDataset:
    """Load JSON Lines (an object per line, blank lines skipped) with `load_csv`'s column and
    label rules; the columns are the first object's keys. Raises ``ValueError`` naming file and
    line for bad data."""
    p = Path(path)
    records: list[Record] = []
    # utf-8-sig: json.loads refuses a leading BOM, which some editors write.
    with p.open(encoding="utf-8-sig") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{p}:{lineno}: invalid JSON: {exc.msg}") from exc
                match record:
                    case dict():
                        records.append((lineno, record))
                    case _:
                        kind = type(record).__name__
                        raise ValueError(f"{p}:{lineno}: expected a JSON object, got {kind}")
        except UnicodeDecodeError as exc:
            raise not_utf8(p, exc) from exc
    columns = list(records[0][1]) if records else []
    return _build(str(p), records, columns, text_columns, label_column, label_names)


def load_hub(
    name: str,
    config: str | None = None,
    split: str = "train",
    text_columns: Sequence[str] | str | None = None,
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> TextDataset:
    """Load a split of a Hugging Face hub dataset with the optional ``datasets`` package.

    ``split="dev"`` means ``validation`` (``validation_matched`` for config ``mnli``); other
    names pass through. The class names are ``label_names`` if given (the train split's, for a
    dev split), else a ``ClassLabel`` label feature's. Raises ``RuntimeError`` if ``datasets``
    is missing or neither the hub nor a cache can serve it.
    """
    try:
        # Imported by name so that neither import time nor mypy depend on the optional extra.
        hf_datasets: Any = importlib.import_module("datasets")
    except ImportError as exc:
        raise RuntimeError(
            f"hub dataset {name!r} needs the optional 'datasets' package: "
            "pip install 'tadlora[hub]'; a Hugging Face hub must also be reachable "
            "(or the dataset already cached, with HF_HUB_OFFLINE=1)"
        ) from exc
    if split == "dev":
        split = "validation_matched" if (config or "").lower() == "mnli" else "validation"
    source = f"hub:{name}" + (f"/{config}" if config else "") + f"[{split}]"
    try:
        ds = hf_datasets.load_dataset(name, config, split=split)
    # datasets raises many exception types for "cannot fetch"; keep the cause chained.
    except Exception as exc:
        raise RuntimeError(
            f"could not load {source}: {exc}. A Hugging Face hub must be reachable "
            "(or the dataset already cached, with HF_HUB_OFFLINE=1)"
        ) from exc
    class_names = getattr(ds.features.get(label_column), "names", None)
    records: list[Record] = [(i + 1, row) for i, row in enumerate(ds)]
    if class_names:
        # A ClassLabel's ids become its names, so that names made of digits ("1".."5" stars) are not read by value.
        records = [(n, {**row, label_column: _class_name(row.get(label_column), class_names)}) for n, row in records]
    names = tuple(label_names) if label_names is not None else tuple(class_names) if class_names else None
    return _build(source, records, list(ds.column_names), text_columns, label_column, names)


def _class_name(value: object, names: Sequence[str]) -> object:
    """The ClassLabel name of id ``value``; any other value (-1, unlabelled) as it is, for `_build` to refuse."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    return value


# ------------------------------------------------------------------------ resolve_dataset


def _builtin(name: str) -> tuple[str, str]:
    """The folder and GLUE task of builtin dataset ``name``; ValueError listing those there are."""
    if name not in BUILTIN_DATASETS:
        known = ", ".join(BUILTIN_DATASETS)
        raise ValueError(f"unknown builtin dataset {name!r}; available: {known}")
    return BUILTIN_DATASETS[name]


def _resolve_builtin(name: str, split: str) -> TextDataset:
    folder, task = _builtin(name)
    resource = resources.files("tadlora.data") / "builtin" / folder / f"{split}.tsv"
    if not resource.is_file():
        raise FileNotFoundError(f"builtin data file {resource} is missing; reinstall tadlora")
    with resources.as_file(resource) as p:
        return load_glue_tsv(p, task=task)


def _resolve_glue(name: str, split: str) -> TextDataset:
    task = glue_task(name)
    folder = find_glue_dir() / task.name
    path = folder / (task.train_file if split == "train" else task.dev_file)
    if not path.is_file():
        raise FileNotFoundError(f"GLUE {task.name} {split} file not found: {path}")
    return load_glue_tsv(path, task=task.name)


def _parse_options(spec: str, query: str) -> tuple[list[str] | None, str, list[str] | None]:
    """(text columns, label column, label names) from ``text=A,B&label=C&label_names=X,Y``."""
    try:
        parsed = parse_qs(query, strict_parsing=True) if query else {}
    except ValueError as exc:
        raise ValueError(f"dataset spec {spec!r}: malformed options {query!r} ({exc})") from exc
    unknown = sorted(set(parsed) - {"text", "label", "label_names"})
    if unknown:
        raise ValueError(
            f"dataset spec {spec!r}: unknown option(s) {unknown}; "
            "use text=COL[,COL2], label=COL, label_names=NAME0,NAME1,..."
        )
    options = {k: [item for v in vs for item in v.split(",") if item] for k, vs in parsed.items()}
    label = options.get("label", ["label"])
    if len(label) != 1:
        raise ValueError(f"dataset spec {spec!r}: give exactly one label column, got {label}")
    return options.get("text"), label[0], options.get("label_names")


def _hub_target(spec: str, target: str) -> tuple[str, str | None, list[str] | None, str]:
    """(name, config, text columns, label column) of a ``hub:`` spec's ``target``; ValueError for a malformed one."""
    target, _, query = target.partition("?")
    text, label, label_names = _parse_options(spec, query)
    if label_names is not None:
        raise ValueError(f"dataset spec {spec!r}: hub datasets take their label names from hub")
    parts = target.split("/")
    if not parts[0] or len(parts) > 3 or any(not p for p in parts[1:-1]):
        raise ValueError(
            f"dataset spec {spec!r}: expected hub:NAME, hub:NAME/CONFIG, "
            "hub:ORG/NAME/CONFIG or hub:ORG/NAME/ (no config)"
        )
    if len(parts) == 3:
        return f"{parts[0]}/{parts[1]}", parts[2] or None, text, label
    return parts[0], (parts[1] or None) if len(parts) == 2 else None, text, label


def _resolve_hub(spec: str, target: str, split: str) -> TextDataset:
    name, config, text, label = _hub_target(spec, target)
    train_names = None
    if split != "train":
        # As for local files: without a ClassLabel feature, dev's ids would come from dev's own sorted
        # label values, which differ from train's (the model's) when dev lacks a class.
        train_names = load_hub(name, config, "train", text_columns=text, label_column=label).label_names
    return load_hub(name, config, split, text_columns=text, label_column=label, label_names=train_names)


def _dev_sibling(spec: str, given: Path) -> Path:
    siblings = [given.with_name(stem + given.suffix) for stem in _DEV_STEMS]
    for sibling in siblings:
        if sibling.is_file():
            return sibling
    names = ", ".join(s.name for s in siblings)
    raise FileNotFoundError(
        f"dataset spec {spec!r}: no dev split next to {given}; looked for {names} in {given.parent}"
    )


def _resolve_local(spec: str, split: str) -> TextDataset:
    path_str, _, query = spec.partition("?")
    text, label, label_names = _parse_options(spec, query)
    given = Path(path_str)
    path = given if split == "train" else _dev_sibling(spec, given)
    if not path.is_file():
        raise FileNotFoundError(f"dataset spec {spec!r}: file {path} not found")
    suffix = given.suffix.lower()
    if suffix == ".tsv" and not query and looks_like_glue(read_tsv(given)[0]):
        try:
            # A GLUE task's labels are fixed. Dev is read as train's task: outside a task folder RTE and MNLI are
            # told apart by their labels, and a dev slice holding only "entailment" could not tell on its own.
            return load_glue_tsv(path, task=None if split == "train" else glue_task_of(given))
        except ValueError as exc:
            # A spec cannot pass task=, and a file of the user's own may merely share a GLUE header.
            raise ValueError(
                f"{exc}. If this is not GLUE data but only shares a GLUE header, read it as a plain TSV "
                f"(labels as the file names them) by naming its columns: {path_str}?text=COL[,COL2]&label=COL"
            ) from exc
    if split != "train" and label_names is None:
        # Otherwise label ids come from one file's sorted label values: the dev file's own set (a class missing
        # from dev, say) would give its labels other ids than train's, and the model's outputs follow train's.
        label_names = list(_resolve_local(spec, "train").label_names)
    if suffix == ".jsonl":
        return load_jsonl(path, text, label, label_names)
    if suffix == ".csv":
        return load_csv(path, text, label, label_names)
    return load_csv(path, text, label, label_names, delimiter="\t")


def is_local_spec(spec: str) -> bool:
    """Whether ``spec`` names a file of the user's own (a path ending in .tsv, .csv or .jsonl, as `resolve_dataset`
    reads it), not named data (``builtin:``, ``glue:``, ``hub:``)."""
    spec = spec.strip()
    scheme, sep, _ = spec.partition(":")
    if sep and scheme in ("builtin", "glue", "hub"):
        return False
    return Path(spec.partition("?")[0]).suffix.lower() in _LOCAL_SUFFIXES


def check_dataset_spec(spec: str) -> None:
    """ValueError, as `resolve_dataset` raises it, for a spec whose form alone is wrong: an unknown builtin or GLUE
    task, malformed options, a hub name out of its grammar, no scheme or suffix it reads. Reads nothing (no file, no
    hub), so a node refuses such a --dataset at once, as bad flags (exit 2), not once its model has loaded."""
    spec = spec.strip()
    scheme, sep, rest = spec.partition(":")
    if sep and scheme == "builtin":
        _builtin(rest)
    elif sep and scheme == "glue":
        glue_task(rest)
    elif sep and scheme == "hub":
        _hub_target(spec, rest)
    elif is_local_spec(spec):
        _parse_options(spec, spec.partition("?")[2])
    else:
        raise ValueError(_unrecognised(spec))


def _unrecognised(spec: str) -> str:
    return (
        f"unrecognised dataset spec {spec!r}; expected builtin:NAME ({', '.join(BUILTIN_DATASETS)}), glue:TASK "
        f"({', '.join(GLUE_TASKS)}), a path ending in .tsv, .csv or .jsonl, or hub:NAME[/CONFIG]"
    )


def resolve_dataset(spec: str, split: str) -> TextDataset:
    """The data that ``spec`` names, for ``split`` ``"train"`` or ``"dev"``; named ``spec``.

    Specs:
      - ``builtin:sst2-small``: the SST-2 slice shipped with tadlora;
      - ``glue:SST-2|MNLI|QNLI|RTE``: from `find_glue_dir` (MNLI dev is dev_matched);
      - a path ending in ``.tsv``/``.csv``/``.jsonl``, optionally followed by
        ``?text=COL[,COL2]&label=COL&label_names=A,B`` (a GLUE-layout ``.tsv`` needs none);
        its dev split is the sibling ``dev``/``dev_matched``/``validation``/``valid``/``val``
        file with the same suffix;
      - ``hub:NAME[/CONFIG]`` or ``hub:ORG/NAME/CONFIG`` (``hub:ORG/NAME/`` for no config),
        optionally with ``?text=...&label=...``.

    Raises ``ValueError`` for a malformed spec or split, ``FileNotFoundError`` for missing
    files, and ``RuntimeError`` when a hub dataset cannot be fetched.
    """
    if split not in DATASET_SPLITS:
        raise ValueError(f"split must be one of {DATASET_SPLITS}, got {split!r}")
    spec = spec.strip()
    scheme, sep, rest = spec.partition(":")
    if sep and scheme == "builtin":
        dataset = _resolve_builtin(rest, split)
    elif sep and scheme == "glue":
        dataset = _resolve_glue(rest, split)
    elif sep and scheme == "hub":
        dataset = _resolve_hub(spec, rest, split)
    elif is_local_spec(spec):
        dataset = _resolve_local(spec, split)
    else:
        raise ValueError(_unrecognised(spec))
    if len(dataset.label_names) < 2:
        # Caught here, where the data is known: the model would refuse it later as "a classifier needs at least two
        # labels", naming neither the data nor the way out.
        raise ValueError(
            f"dataset {spec!r} ({split}): one class only ({', '.join(map(repr, dataset.label_names))}), and a "
            "classifier needs at least two; if the task has others, name all of them in id order with "
            "?label_names=A,B,..."
        )
    return replace(dataset, name=spec)
