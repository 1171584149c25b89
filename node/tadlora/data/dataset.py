"""`TextDataset`: labelled sentences or sentence pairs, held in memory and never mutated."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = ["TextDataset"]


@dataclass(frozen=True)
class TextDataset:
    """A classification dataset of texts or text pairs, labels in ``[0, num_classes)``.

    ``text_b`` is ``None`` for single-sentence tasks (SST-2), else the second sentence of each
    pair (MNLI hypothesis, QNLI sentence). ``labels`` becomes a read-only int64 copy, so
    neither the caller nor a consumer can change the dataset afterwards. Raises ``ValueError``
    if the lengths disagree or a label is out of range.
    """

    name: str
    text_a: tuple[str, ...]
    text_b: tuple[str, ...] | None
    labels: npt.NDArray[np.int64] = field(compare=False, repr=False)
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        labels = np.array(self.labels, dtype=np.int64, copy=True).reshape(-1)
        labels.setflags(write=False)
        # object.__setattr__ is how a frozen dataclass normalises its own fields.
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "text_a", tuple(self.text_a))
        object.__setattr__(self, "label_names", tuple(self.label_names))
        if self.text_b is not None:
            object.__setattr__(self, "text_b", tuple(self.text_b))
        n = len(self.text_a)
        where = f"dataset {self.name!r}"
        if self.text_b is not None and len(self.text_b) != n:
            raise ValueError(f"{where}: {len(self.text_b)} text_b entries for {n} text_a")
        if labels.shape[0] != n:
            raise ValueError(f"{where}: {labels.shape[0]} labels for {n} texts")
        if not self.label_names:
            raise ValueError(f"{where}: label_names must not be empty")
        if n and (labels.min() < 0 or labels.max() >= len(self.label_names)):
            raise ValueError(
                f"{where}: labels span [{labels.min()}, {labels.max()}], outside "
                f"[0, {len(self.label_names)}) for label_names {self.label_names}"
            )

    def __len__(self) -> int:
        return len(self.text_a)

    @property
    def num_classes(self) -> int:
        """``len(label_names)``; a class may have no examples in this dataset."""
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        """True when examples are sentence pairs (``text_b`` is present)."""
        return self.text_b is not None

    def label_counts(self) -> npt.NDArray[np.int64]:
        """Examples per class: an int64 array of length ``num_classes`` indexed by label id."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    def subset(self, indices: Sequence[int] | npt.NDArray[np.integer]) -> TextDataset:
        """The examples at ``indices``, in that order; same name and label names.

        Raises ``IndexError`` for an index outside ``[0, len(self))``: a negative index in a
        shard is a bug, not a request for the tail, so it is refused rather than wrapped.
        Raises ``TypeError`` for a boolean mask, which as int64 would name examples 0 and 1.
        """
        raw = np.asarray(indices)
        if raw.dtype == np.bool_:
            raise TypeError(
                f"dataset {self.name!r}: subset takes indices, not a boolean mask; use np.flatnonzero(mask)"
            )
        idx = raw.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"dataset {self.name!r} has {len(self)} examples; indices span [{idx.min()}, {idx.max()}]")
        picks = idx.tolist()
        text_b = self.text_b
        return TextDataset(
            name=self.name,
            text_a=tuple(self.text_a[i] for i in picks),
            text_b=None if text_b is None else tuple(text_b[i] for i in picks),
            labels=self.labels[idx],
            label_names=self.label_names,
        )
