"""GLUE task files: the column layout and label ids of MNLI, QNLI, RTE and SST-2, a loader for
their TSVs, and where the offline GLUE copy lives."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tadlora.data.dataset import TextDataset

__all__ = [
    "GLUE_DIR_ENV",
    "GLUE_TASKS",
    "GlueTask",
    "csv_error",
    "find_glue_dir",
    "glue_task",
    "glue_task_of",
    "load_glue_tsv",
    "looks_like_glue",
    "not_utf8",
    "read_tsv",
    "refuse_repeated_columns",
]

GLUE_DIR_ENV = "TADLORA_GLUE_DIR"


@dataclass(frozen=True)
class GlueTask:
    """Column layout and label ids (Hugging Face ``glue`` order) of one GLUE task's TSVs."""

    name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    labels_are_ids: bool  # SST-2 writes "0"/"1"; the NLI tasks write the label name.
    train_file: str = "train.tsv"
    dev_file: str = "dev.tsv"
    label_columns: tuple[str, ...] = ("label",)  # the first of these that a file's header has holds its labels


_NLI2 = ("entailment", "not_entailment")
GLUE_TASKS: Mapping[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask(
            "MNLI",
            ("sentence1", "sentence2"),
            ("entailment", "neutral", "contradiction"),
            labels_are_ids=False,
            dev_file="dev_matched.tsv",
            # GLUE's own MNLI files have no "label" column: the gold label follows the annotators' label1..label5.
            label_columns=("label", "gold_label"),
        ),
        GlueTask("QNLI", ("question", "sentence"), _NLI2, labels_are_ids=False),
        GlueTask("RTE", ("sentence1", "sentence2"), _NLI2, labels_are_ids=False),
        GlueTask("SST-2", ("sentence",), ("negative", "positive"), labels_are_ids=True),
    )
}


def _task_key(name: str) -> str:
    return re.sub(r"[-_\s]", "", name).upper()


_TASK_BY_KEY = {_task_key(name): task for name, task in GLUE_TASKS.items()}


def glue_task(name: str) -> GlueTask:
    """The task called ``name``, ignoring case, ``-`` and ``_`` (``sst2`` is SST-2).

    Raises ``ValueError`` listing the known tasks.
    """
    task = _TASK_BY_KEY.get(_task_key(name))
    if task is None:
        raise ValueError(f"unknown GLUE task {name!r}; known tasks: {', '.join(GLUE_TASKS)}")
    return task


def not_utf8(path: Path, exc: UnicodeDecodeError) -> ValueError:
    """The error for a data file that does not decode as UTF-8, naming the file (the codec's own
    message names neither the file nor, for a streamed read, the place in it)."""
    return ValueError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8")


def csv_error(path: Path, lineno: int, exc: csv.Error) -> ValueError:
    """The error for a row the csv module cannot read (a field over its size limit, say), naming file and line:
    csv.Error is no ValueError, so it would escape every caller that refuses bad data with a message."""
    return ValueError(f"{path}:{lineno}: {exc}")


def read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a tab-separated UTF-8 file (a leading BOM is allowed) read with quoting off.

    Raises ``ValueError`` for an empty file, one that is not UTF-8 or a row the csv module cannot read.
    """
    # Quoting off: GLUE sentences contain '"', and default CSV quoting silently merges or
    # alters rows (MNLI dev_matched would lose 101 of them). utf-8-sig: a file saved by Excel
    # or Notepad starts with a BOM, which would otherwise become part of the first column's name.
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            try:
                rows = list(reader)
            except csv.Error as exc:
                raise csv_error(path, reader.line_num, exc) from exc
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc) from exc
    if not rows:
        raise ValueError(f"{path}: empty file (expected a header row)")
    return rows[0], rows[1:]


def refuse_repeated_columns(source: object, header: Sequence[str], used: Sequence[str]) -> None:
    """Raise ``ValueError`` if a column in ``used`` is named more than once in ``header``: which of the two a reader
    takes is an accident of its code (a dict keeps the last, ``list.index`` finds the first)."""
    for column in dict.fromkeys(used):
        if (times := list(header).count(column)) > 1:
            raise ValueError(f"{source}: column {column!r} appears {times} times in the header {list(header)}")


def looks_like_glue(header: Sequence[str]) -> bool:
    """True if ``header`` has the text columns and a label column of some GLUE task."""
    columns = set(header)
    return any(set(t.text_columns) <= columns and not columns.isdisjoint(t.label_columns) for t in GLUE_TASKS.values())


def _infer_task(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> GlueTask:
    for part in reversed(path.parts[:-1]):
        if (task := _TASK_BY_KEY.get(_task_key(part))) is not None:
            return task
    columns = set(header)
    if {"question", "sentence", "label"} <= columns:
        return GLUE_TASKS["QNLI"]
    if {"sentence1", "sentence2", "gold_label"} <= columns and "label" not in columns:
        return GLUE_TASKS["MNLI"]  # of the four, only MNLI's GLUE files name the column gold_label
    if {"sentence1", "sentence2", "label"} <= columns:
        # MNLI and RTE share a header; only MNLI has a third class.
        col = header.index("label")
        values = {row[col] for row in rows if len(row) > col}
        if values & {"neutral", "contradiction"}:
            return GLUE_TASKS["MNLI"]
        if "not_entailment" in values:
            return GLUE_TASKS["RTE"]
    elif {"sentence", "label"} <= columns:
        return GLUE_TASKS["SST-2"]
    raise ValueError(
        f"{path}: cannot tell which GLUE task this is from its folder or header "
        f"{list(header)}; pass task= one of {', '.join(GLUE_TASKS)}"
    )


def glue_task_of(path: str | os.PathLike[str]) -> str:
    """The name of the GLUE task `load_glue_tsv` reads ``path`` as without ``task=`` (from its folder, else its
    header and labels). Raises ``ValueError`` as it would."""
    p = Path(path)
    header, rows = read_tsv(p)
    return _infer_task(p, header, rows).name


def load_glue_tsv(path: str | os.PathLike[str], task: str | None = None) -> TextDataset:
    """Load a GLUE TSV (header row, tab-separated, quoting off) of MNLI, QNLI, RTE or SST-2.

    With ``task=None`` the task is inferred from a folder named after it, else from the header
    (and, for the header MNLI and RTE share, from the labels); MNLI's labels may be in GLUE's own
    ``gold_label`` column. Label ids follow Hugging Face ``glue``. Blank lines are skipped.
    Raises ``ValueError`` naming file and line for a malformed row, an unknown label or an empty
    text, and for a file without data rows.
    """
    p = Path(path)
    header, rows = read_tsv(p)
    spec = glue_task(task) if task is not None else _infer_task(p, header, rows)
    label_column = next((c for c in spec.label_columns if c in header), spec.label_columns[0])
    missing = [c for c in (*spec.text_columns, label_column) if c not in header]
    if missing:
        raise ValueError(f"{p}: header {header} lacks {missing}, needed for GLUE {spec.name}")
    refuse_repeated_columns(p, header, (*spec.text_columns, label_column))
    text_cols = [header.index(c) for c in spec.text_columns]
    label_col = header.index(label_column)
    if spec.labels_are_ids:
        label_ids = {str(i): i for i in range(len(spec.label_names))}
    else:
        label_ids = {n: i for i, n in enumerate(spec.label_names)}
    texts: list[list[str]] = [[] for _ in text_cols]
    labels: list[int] = []
    for lineno, row in enumerate(rows, start=2):
        if not row:
            continue  # a blank line (one at the end of the file, say) holds no example, as in load_csv
        if len(row) != len(header):
            raise ValueError(f"{p}:{lineno}: expected {len(header)} tab-separated fields {header}, got {len(row)}")
        label = label_ids.get(row[label_col])
        if label is None:
            raise ValueError(
                f"{p}:{lineno}: unknown {spec.name} label {row[label_col]!r}; expected one of {list(label_ids)}"
            )
        labels.append(label)
        for out, col in zip(texts, text_cols, strict=True):
            if not row[col].strip():
                raise ValueError(f"{p}:{lineno}: {header[col]!r} is empty")
            out.append(row[col])
    if not labels:
        raise ValueError(f"{p}: no data rows")
    return TextDataset(
        name=spec.name,
        text_a=tuple(texts[0]),
        text_b=tuple(texts[1]) if len(texts) == 2 else None,
        labels=np.asarray(labels, dtype=np.int64),
        label_names=spec.label_names,
    )


def _glue_dir_candidates() -> Iterator[tuple[str, Path]]:
    env = os.environ.get(GLUE_DIR_ENV)
    if env:
        # An explicit setting is the only place looked: falling back would hide a typo.
        yield f"${GLUE_DIR_ENV}", Path(env)
        return
    yield "current directory", Path.cwd() / ".." / "shared" / "data" / "glue"
    # node/tadlora/data/glue.py: parents[3] is the root of a source checkout.
    root = Path(__file__).resolve().parents[3]
    yield "repository root", root / ".." / "shared" / "data" / "glue"


def find_glue_dir() -> Path:
    """The GLUE data folder: ``$TADLORA_GLUE_DIR`` if set (and then only it), else
    ``../shared/data/glue`` from the current directory, else from the repository root.

    Raises ``FileNotFoundError`` saying where it looked.
    """
    looked = []
    for origin, candidate in _glue_dir_candidates():
        if candidate.is_dir():
            return candidate.resolve()
        looked.append(f"{candidate} ({origin})")
    raise FileNotFoundError(
        f"GLUE data folder not found; looked in: {'; '.join(looked)}. Set {GLUE_DIR_ENV} "
        "to a folder holding MNLI/, QNLI/, RTE/ and SST-2/ TSV files"
    )
