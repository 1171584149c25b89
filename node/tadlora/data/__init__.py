"""Datasets for tadlora: in-memory `TextDataset`s; loaders for GLUE, csv, jsonl and hub data
and the shipped ``builtin:sst2-small`` slice; `resolve_dataset` (a user's dataset string to
data); and client partitions (`make_shards`: IID, Dirichlet, the paper's label skew).
"""

from tadlora.data.dataset import TextDataset
from tadlora.data.glue import (
    GLUE_DIR_ENV,
    GLUE_TASKS,
    GlueTask,
    find_glue_dir,
    load_glue_tsv,
)
from tadlora.data.loaders import (
    BUILTIN_DATASETS,
    DATASET_SPLITS,
    check_dataset_spec,
    is_local_spec,
    load_csv,
    load_hub,
    load_jsonl,
    resolve_dataset,
)
from tadlora.data.splits import (
    SHARD_SCHEMES,
    label_skew_proportions,
    make_shards,
    split_dirichlet,
    split_iid,
    split_label_skew,
)

__all__ = [
    "BUILTIN_DATASETS",
    "DATASET_SPLITS",
    "GLUE_DIR_ENV",
    "GLUE_TASKS",
    "SHARD_SCHEMES",
    "GlueTask",
    "TextDataset",
    "check_dataset_spec",
    "find_glue_dir",
    "is_local_spec",
    "label_skew_proportions",
    "load_csv",
    "load_glue_tsv",
    "load_hub",
    "load_jsonl",
    "make_shards",
    "resolve_dataset",
    "split_dirichlet",
    "split_iid",
    "split_label_skew",
]
