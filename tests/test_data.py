"""Specification of `tadlora.data`: loaders, dataset specs and client partitions."""

from __future__ import annotations

import json
import shutil
import sys
import types
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import pytest

from tadlora.data import (
    GLUE_DIR_ENV,
    TextDataset,
    check_dataset_spec,
    label_skew_proportions,
    load_csv,
    load_glue_tsv,
    load_hub,
    load_jsonl,
    make_shards,
    resolve_dataset,
    split_dirichlet,
    split_iid,
    split_label_skew,
)
from tadlora.workload import client_shards

SHARED_GLUE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "glue"


@pytest.fixture
def glue_dir() -> Path:
    if not SHARED_GLUE.is_dir():
        pytest.skip(f"real GLUE data not present at {SHARED_GLUE} (see shared/data/README.md)")
    return SHARED_GLUE.resolve()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


def assert_disjoint(shards: list[npt.NDArray[np.int64]]) -> None:
    joined = np.concatenate(shards)
    assert np.unique(joined).size == joined.size, "a sample was given to two clients"


# ----------------------------------------------------------------------------- GLUE files

# (file, rows, per-class counts in label-id order) as listed in shared/data/README.md
GLUE_FILES = [
    ("MNLI/train.tsv", 10471, (3565, 3470, 3436)),
    ("MNLI/dev_matched.tsv", 9815, (3479, 3123, 3213)),
    ("QNLI/train.tsv", 10293, (5173, 5120)),
    ("QNLI/dev.tsv", 5463, (2702, 2761)),
    ("RTE/train.tsv", 2490, (1249, 1241)),
    ("RTE/dev.tsv", 277, (146, 131)),
    ("SST-2/train.tsv", 67349, (29780, 37569)),
    ("SST-2/dev.tsv", 872, (428, 444)),
]


@pytest.mark.parametrize(("relpath", "rows", "counts"), GLUE_FILES)
def test_glue_files_load_with_the_documented_row_and_label_counts(
    glue_dir: Path, relpath: str, rows: int, counts: tuple[int, ...]
) -> None:
    ds = load_glue_tsv(glue_dir / relpath)  # task inferred from the folder name
    assert len(ds) == rows
    assert tuple(ds.label_counts()) == counts
    assert ds.is_pair == (not relpath.startswith("SST-2"))


def test_glue_label_ids_follow_the_hugging_face_order(glue_dir: Path) -> None:
    mnli = load_glue_tsv(glue_dir / "MNLI/dev_matched.tsv")
    assert mnli.label_names == ("entailment", "neutral", "contradiction")
    # First row verbatim, trailing space included: GLUE's text is never stripped.
    assert mnli.text_a[0] == "The new rights are nice enough"
    assert mnli.text_b is not None
    assert mnli.text_b[0] == "Everyone really likes the newest benefits "
    assert mnli.labels[0] == 1
    assert load_glue_tsv(glue_dir / "QNLI/dev.tsv").label_names == (
        "entailment",
        "not_entailment",
    )
    assert load_glue_tsv(glue_dir / "SST-2/dev.tsv").label_names == (
        "negative",
        "positive",
    )


def test_glue_task_is_inferred_from_header_and_labels_outside_a_task_folder(glue_dir: Path, tmp_path: Path) -> None:
    rte = shutil.copy(glue_dir / "RTE/dev.tsv", tmp_path / "a.tsv")
    mnli = shutil.copy(glue_dir / "MNLI/dev_matched.tsv", tmp_path / "b.tsv")
    assert load_glue_tsv(rte).label_names == ("entailment", "not_entailment")
    assert load_glue_tsv(mnli).num_classes == 3


def test_glue_spec_reads_from_the_env_dir_and_mnli_dev_is_dev_matched(
    glue_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(GLUE_DIR_ENV, str(glue_dir))
    dev = resolve_dataset("glue:MNLI", "dev")
    assert (len(dev), dev.name) == (9815, "glue:MNLI")
    assert len(resolve_dataset("glue:sst2", "dev")) == 872


def test_glue_spec_says_where_it_looked_when_the_data_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(GLUE_DIR_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        resolve_dataset("glue:RTE", "train")


def test_a_double_quote_inside_a_tsv_sentence_is_kept_verbatim(tmp_path: Path) -> None:
    path = write(
        tmp_path / "q.tsv",
        'sentence\tlabel\n"quoted" start , and a lone " here \t1\nplain \t0\n',
    )
    ds = load_glue_tsv(path)  # the header alone says SST-2
    assert ds.text_a == ('"quoted" start , and a lone " here ', "plain ")
    assert ds.labels.tolist() == [1, 0]


def test_malformed_glue_rows_name_the_file_and_line(tmp_path: Path) -> None:
    short = write(tmp_path / "short.tsv", "sentence\tlabel\nfine\t1\nno label here\n")
    with pytest.raises(ValueError, match=r"short\.tsv:3: expected 2"):
        load_glue_tsv(short, task="SST-2")
    odd = write(tmp_path / "odd.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"odd\.tsv:2: unknown RTE label 'maybe'"):
        load_glue_tsv(odd, task="rte")
    with pytest.raises(ValueError, match="cannot tell which GLUE task"):
        load_glue_tsv(write(tmp_path / "x.tsv", "foo\tlabel\na\t1\n"))


def glue_mnli_tsv(votes: int) -> str:
    """MNLI in GLUE's own layout: parse trees, the annotators' label1..label<votes>, gold_label last; no "label"."""
    parses = ["sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse", "sentence2_parse"]
    votes_header = [f"label{i}" for i in range(1, votes + 1)]
    lines = [["index", "promptID", "pairID", "genre", *parses, "sentence1", "sentence2", *votes_header, "gold_label"]]
    pairs = [("p0", "h0", "neutral"), ("p1", "h1", "contradiction"), ("p2", "h2", "entailment")]
    for i, (a, b, gold) in enumerate(pairs):
        lines.append([str(i), "1", f"{i}n", "fiction", "( p )", "( h )", "(R p)", "(R h)", a, b, *[gold] * votes, gold])
    return "".join("\t".join(line) + "\n" for line in lines)


def test_glue_s_own_mnli_files_with_a_gold_label_column_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "MNLI").mkdir()
    write(tmp_path / "MNLI" / "train.tsv", glue_mnli_tsv(votes=1))
    write(tmp_path / "MNLI" / "dev_matched.tsv", glue_mnli_tsv(votes=5))
    monkeypatch.setenv(GLUE_DIR_ENV, str(tmp_path))
    for split in ("train", "dev"):
        ds = resolve_dataset("glue:MNLI", split)
        assert (ds.text_a, ds.text_b, ds.labels.tolist()) == (("p0", "p1", "p2"), ("h0", "h1", "h2"), [1, 2, 0])
    # Outside a task folder the header says MNLI: of the four tasks only its GLUE files name the column gold_label.
    other = write(tmp_path / "other.tsv", glue_mnli_tsv(votes=5))
    assert resolve_dataset(str(other), "train").label_names == ("entailment", "neutral", "contradiction")


def test_a_glue_tsv_with_a_header_but_no_rows_is_refused(tmp_path: Path) -> None:
    # Loaded, it would be an empty dev set (accuracy 0/0) or a train set no client can be given a shard of.
    with pytest.raises(ValueError, match=r"dev\.tsv: no data rows"):
        load_glue_tsv(write(tmp_path / "dev.tsv", "sentence\tlabel\n"), task="SST-2")
    with pytest.raises(ValueError, match="no data rows"):
        load_glue_tsv(write(tmp_path / "blank.tsv", "sentence\tlabel\n\n\n"), task="SST-2")


def test_blank_lines_in_a_glue_tsv_hold_no_example_and_still_count_as_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "t.tsv", "sentence\tlabel\na \t1\n\nb \t0\n\n")
    ds = load_glue_tsv(path, task="SST-2")
    assert (ds.text_a, ds.labels.tolist()) == (("a ", "b "), [1, 0])
    with pytest.raises(ValueError, match=r"u\.tsv:4: unknown SST-2 label '7'"):
        load_glue_tsv(write(tmp_path / "u.tsv", "sentence\tlabel\na\t1\n\nb\t7\n"), task="SST-2")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("SST-2.tsv", "sentence\tlabel\r\ngood \t1\r\nbad \t0\r\n"),
        ("d.csv", "sentence,label\r\ngood ,1\r\nbad ,0\r\n"),
        ("d.jsonl", '{"sentence": "good ", "label": 1}\r\n{"sentence": "bad ", "label": 0}\r\n'),
    ],
    ids=["glue-tsv", "csv", "jsonl"],
)
def test_a_file_saved_with_a_utf8_bom_and_crlf_line_ends_loads_like_a_plain_one(
    tmp_path: Path, name: str, text: str
) -> None:
    # Excel's "CSV UTF-8" and Notepad write a BOM, which must not become part of the first column's name.
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    ds = load_glue_tsv(path, task="SST-2") if name.endswith(".tsv") else resolve_dataset(str(path), "train")
    assert (ds.text_a, ds.labels.tolist()) == (("good ", "bad "), [1, 0])


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("SST-2.tsv", "sentence\tlabel\nfine\t1\n \t0\n", r"SST-2\.tsv:3: 'sentence' is empty"),
        ("RTE.tsv", "index\tsentence1\tsentence2\tlabel\n0\tp\t\tentailment\n", r"RTE\.tsv:2: 'sentence2' is empty"),
        ("d.csv", "text,label\nfine,pos\n,neg\n", r"d\.csv:3: 'text' is empty"),
        ("d.jsonl", '{"text": "fine", "label": 1}\n{"text": "", "label": 0}\n', r"d\.jsonl:2: 'text' is empty"),
    ],
    ids=["sst2-blank", "rte-empty", "csv", "jsonl"],
)
def test_an_empty_text_is_refused_naming_file_line_and_column(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(ValueError, match=message):
        load_glue_tsv(path, task=path.stem) if name.endswith(".tsv") else resolve_dataset(str(path), "train")


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("d.tsv", "text\tlabel\ncaf\u00e9\t1\n"),
        ("d.csv", "text,label\ncaf\u00e9,1\n"),
        ("d.jsonl", '{"text": "caf\u00e9", "label": 1}\n'),
    ],
    ids=["tsv", "csv", "jsonl"],
)
def test_a_file_that_is_not_utf8_is_refused_naming_the_file(tmp_path: Path, name: str, body: str) -> None:
    path = tmp_path / name
    path.write_bytes(body.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{name}: not UTF-8 text"):
        resolve_dataset(str(path), "train")


# ------------------------------------------------------------------------------ csv / jsonl


def test_csv_with_string_labels_maps_them_to_sorted_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", 'text,label\n"hello, world",pos\nbad,neg\nok,pos\n')
    ds = load_csv(path, "text", "label")
    assert ds.text_a == ("hello, world", "bad", "ok")
    assert ds.text_b is None
    assert ds.label_names == ("neg", "pos")
    assert ds.labels.tolist() == [1, 0, 1]


def test_csv_label_names_fix_the_id_order_and_accept_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,b,y\np1,h1,pos\np2,h2,0\n")
    ds = load_csv(path, ["a", "b"], "y", label_names=["neg", "pos"])
    assert ds.text_b == ("h1", "h2")
    assert ds.labels.tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"d\.csv:3: label 'x'"):
        load_csv(write(path, "a,y\np,pos\nq,x\n"), "a", "y", label_names=["neg", "pos"])


def test_csv_integer_labels_are_ids(tmp_path: Path) -> None:
    ds = load_csv(write(tmp_path / "d.csv", "sentence,label\na,2\nb,0\n"))
    assert ds.label_names == ("0", "1", "2")
    assert ds.labels.tolist() == [2, 0]


def test_csv_errors_name_the_problem(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "text,label\na,1\n")
    with pytest.raises(ValueError, match="text column"):
        load_csv(path, "body", "label")
    with pytest.raises(ValueError, match="label column 'y'"):
        load_csv(path, "text", "y")
    with pytest.raises(ValueError, match="1 or 2 text columns"):
        load_csv(path, ["text", "text", "text"], "label")


@pytest.mark.parametrize(
    ("name", "spec_suffix"), [("d.csv", ""), ("SST-2/train.tsv", ""), ("plain.tsv", "?text=body&label=y")]
)
def test_a_field_longer_than_the_csv_module_reads_is_refused_naming_file_and_line(
    tmp_path: Path, name: str, spec_suffix: str
) -> None:
    # Python's csv module stops at fields over 131,072 characters with its own csv.Error, which is no ValueError:
    # it would escape the callers' handling (the simulator's CLI prints a ValueError's message, not a traceback).
    long = "a" * 140_000
    sep = "," if name.endswith(".csv") else "\t"
    header = f"body{sep}y" if spec_suffix else ("text,label" if name.endswith(".csv") else "sentence\tlabel")
    (tmp_path / name).parent.mkdir(exist_ok=True)
    path = write(tmp_path / name, f"{header}\nshort{sep}1\n{long}{sep}0\n")
    with pytest.raises(ValueError, match=rf"{name.rsplit('/', 1)[-1]}:3: .*field larger than field limit"):
        resolve_dataset(f"{path}{spec_suffix}", "train")


def test_integer_labels_counted_from_one_name_their_classes_without_a_phantom_class_zero(tmp_path: Path) -> None:
    # AG News, Yelp and Amazon polarity CSVs count their classes from 1: read as ids from 0, class "0" would be a
    # head output no example has, and the paper's label skew (90% of class "0" on three clients) could not be met.
    write(tmp_path / "train.csv", "text,label\n" + "".join(f"t{i},{1 + i % 2}\n" for i in range(200)))
    write(tmp_path / "dev.csv", "text,label\na,2\nb,1\n")
    spec = str(tmp_path / "train.csv")
    train, dev = resolve_dataset(spec, "train"), resolve_dataset(spec, "dev")
    assert train.label_names == dev.label_names == ("1", "2")
    assert train.labels.tolist()[:2] == [0, 1] and dev.labels.tolist() == [1, 0]
    shards = make_shards(train, "label-skew", 10, seed=0)
    assert np.bincount(train.labels[shards[0]], minlength=2).tolist() == [18, 2]  # [0.9, 0.1] of 20
    write(tmp_path / "dev.csv", "text,label\na,0\n")  # not one of train's classes: refused, not taken as id 0 ("1")
    with pytest.raises(ValueError, match=r"dev\.csv:2: label '0'"):
        resolve_dataset(spec, "dev")


def test_a_train_file_of_one_class_is_refused_naming_it_and_loads_with_its_classes_named(tmp_path: Path) -> None:
    # The model would refuse one label as "a classifier needs at least two labels", naming neither file nor fix.
    write(tmp_path / "train.csv", "text,label\na,pos\nb,pos\n")
    write(tmp_path / "dev.csv", "text,label\nc,neg\nd,pos\n")
    spec = str(tmp_path / "train.csv")
    with pytest.raises(ValueError, match=r"train\.csv' \(train\): one class only \('pos'\).*label_names="):
        resolve_dataset(spec, "train")
    named = f"{spec}?label_names=neg,pos"
    assert resolve_dataset(named, "train").labels.tolist() == [1, 1]
    assert resolve_dataset(named, "dev").labels.tolist() == [0, 1]


def test_labels_minus_one_and_one_are_refused_with_the_way_to_read_them_as_classes(tmp_path: Path) -> None:
    # -1/+1 is a common binary convention, and -1 is also the hub's "unlabelled": the refusal must say how to
    # read it as a class, which `label_names` does (matched by value).
    write(tmp_path / "train.csv", "text,label\na,-1\nb,1\n")
    with pytest.raises(ValueError, match=r"train\.csv:2: label -1 is negative.*label_names=-1,1"):
        resolve_dataset(str(tmp_path / "train.csv"), "train")
    train = resolve_dataset(f"{tmp_path / 'train.csv'}?label_names=-1,1", "train")
    assert train.label_names == ("-1", "1") and train.labels.tolist() == [0, 1]


def test_integer_label_names_match_by_value_never_as_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "text,label\na,01\nb,2\n")
    assert load_csv(path, label_names=["1", "2"]).labels.tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"d\.csv:2: label '0'"):
        load_csv(write(path, "text,label\na,0\n"), label_names=["1", "2"])


def test_integer_labels_spanning_more_ids_than_a_head_can_have_are_refused_without_allocating_them(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 10000000000}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: label 10000000000 .*class ids"):
        load_jsonl(path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_an_empty_label_is_refused_naming_file_and_line_not_made_a_class(tmp_path: Path, suffix: str) -> None:
    # An unlabelled row would otherwise become class "" and shift every other class's id ("0" -> 1, "1" -> 2).
    if suffix == ".csv":
        path = write(tmp_path / "d.csv", "text,label\na,0\nb, \nc,1\n")
    else:
        path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": ""}\n')
    with pytest.raises(ValueError, match=rf"d\{suffix}:\d: label '\s*' is empty"):
        resolve_dataset(str(path), "train")


def test_label_names_are_read_without_surrounding_spaces(tmp_path: Path) -> None:
    ds = load_csv(write(tmp_path / "d.csv", "text,label\na,pos\nb,pos \nc, neg\n"))
    assert ds.label_names == ("neg", "pos")
    assert ds.labels.tolist() == [1, 1, 0]


def test_a_column_named_twice_in_the_header_is_refused_when_it_is_read(tmp_path: Path) -> None:
    # dict(zip(header, row)) would keep the last of the two, where a GLUE reader keeps the first.
    with pytest.raises(ValueError, match=r"d\.csv: column 'text' appears 2 times in the header"):
        load_csv(write(tmp_path / "d.csv", "text,text,label\na,b,1\nc,d,0\n"))
    with pytest.raises(ValueError, match=r"d\.tsv: column 'sentence' appears 2 times in the header"):
        load_glue_tsv(write(tmp_path / "d.tsv", "sentence\tsentence\tlabel\na\tb\t1\n"), task="SST-2")
    assert load_csv(write(tmp_path / "e.csv", "note,text,note,label\nx,a,y,1\n")).text_a == ("a",)


def test_jsonl_reads_pairs_and_mixed_label_types(tmp_path: Path) -> None:
    lines = [
        {"premise": "p1", "hypothesis": "h1", "label": "entailment"},
        {"premise": "p2", "hypothesis": "h2", "label": "neutral"},
    ]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = load_jsonl(path)  # default columns: premise/hypothesis, label
    assert ds.text_a == ("p1", "p2")
    assert ds.text_b == ("h1", "h2")
    assert ds.label_names == ("entailment", "neutral")
    ints = write(tmp_path / "i.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    assert load_jsonl(ints).labels.tolist() == [1, 0]


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"d\.jsonl:2: invalid JSON"):
        load_jsonl(write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{oops\n'))
    with pytest.raises(ValueError, match=r"e\.jsonl:1: 'text' is 3, not a string"):
        load_jsonl(write(tmp_path / "e.jsonl", '{"text": 3, "label": 1}\n'))
    with pytest.raises(ValueError, match=r"f\.jsonl:2: label True"):
        load_jsonl(
            write(
                tmp_path / "f.jsonl",
                '{"text": "a", "label": "x"}\n{"text": "b", "label": true}\n',
            )
        )


def test_local_csv_spec_takes_columns_from_the_query_and_dev_from_a_sibling(
    tmp_path: Path,
) -> None:
    write(tmp_path / "train.csv", "body,stars\ngood,5\nbad,1\n")
    write(tmp_path / "validation.csv", "body,stars\nmeh,3\n")
    spec = f"{tmp_path / 'train.csv'}?text=body&label=stars"
    train, dev = resolve_dataset(spec, "train"), resolve_dataset(spec, "dev")
    assert (train.text_a, dev.text_a, train.name) == (("good", "bad"), ("meh",), spec)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".tsv"])
def test_local_dev_labels_take_the_train_file_s_ids_even_when_dev_lacks_a_class(tmp_path: Path, suffix: str) -> None:
    rows = {"train": [("a", "neg"), ("b", "neu"), ("c", "pos")], "dev": [("d", "pos"), ("e", "neg")]}
    for name, data in rows.items():
        if suffix == ".jsonl":
            text = "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in data)
        else:
            sep = "," if suffix == ".csv" else "\t"
            text = f"text{sep}label\n" + "".join(f"{t}{sep}{lab}\n" for t, lab in data)
        write(tmp_path / f"{name}{suffix}", text)
    spec = str(tmp_path / f"train{suffix}")
    train, dev = resolve_dataset(spec, "train"), resolve_dataset(spec, "dev")
    assert train.label_names == dev.label_names == ("neg", "neu", "pos")
    assert [dev.label_names[i] for i in dev.labels] == ["pos", "neg"]
    write(tmp_path / f"dev{suffix}", text.replace("neg", "maybe"))  # a class train never had
    with pytest.raises(ValueError, match="maybe"):
        resolve_dataset(spec, "dev")


def test_local_jsonl_spec_uses_default_columns(tmp_path: Path) -> None:
    write(
        tmp_path / "data.jsonl",
        '{"sentence": "x", "text_b": "y", "label": 0}\n{"sentence": "z", "text_b": "w", "label": 1}\n',
    )
    ds = resolve_dataset(str(tmp_path / "data.jsonl"), "train")
    assert (ds.text_a, ds.text_b) == (("x", "z"), ("y", "w"))


@pytest.mark.parametrize(
    ("header", "rows"),
    [("sentence\tlabel", ["good\tpos", "bad\tneg"]), ("sentence1\tsentence2\tlabel", ["a\tb\t0", "c\td\t1"])],
    ids=["sst2-header", "rte-header"],
)
def test_a_tsv_that_only_shares_a_glue_header_says_how_to_read_it_as_a_plain_tsv(
    tmp_path: Path, header: str, rows: list[str]
) -> None:
    # The first would be forced into SST-2's labels, the second fits no GLUE task: a spec cannot pass task=.
    path = write(tmp_path / "train.tsv", "\n".join([header, *rows]) + "\n")
    with pytest.raises(ValueError, match=r"read it as a plain TSV .*train\.tsv\?text=COL\[,COL2\]&label=COL"):
        resolve_dataset(str(path), "train")
    ds = resolve_dataset(f"{path}?label=label", "train")  # the plain reading the message points to
    assert len(ds) == 2 and ds.num_classes == 2


def test_a_local_glue_dev_file_is_read_as_the_train_file_s_task(tmp_path: Path) -> None:
    # Outside a task folder, RTE and MNLI are told apart by their labels: a dev file holding only "entailment"
    # (a small slice, say) cannot tell on its own, though train already did.
    header = "index\tsentence1\tsentence2\tlabel\n"
    write(tmp_path / "train.tsv", header + "0\ta\tb\tentailment\n1\tc\td\tnot_entailment\n")
    write(tmp_path / "dev.tsv", header + "0\te\tf\tentailment\n")
    spec = str(tmp_path / "train.tsv")
    dev = resolve_dataset(spec, "dev")
    assert dev.label_names == resolve_dataset(spec, "train").label_names == ("entailment", "not_entailment")
    assert dev.labels.tolist() == [0]


def test_local_spec_without_a_dev_sibling_says_what_it_looked_for(
    tmp_path: Path,
) -> None:
    write(tmp_path / "train.csv", "text,label\na,0\n")
    with pytest.raises(FileNotFoundError, match=r"dev\.csv.*validation\.csv"):
        resolve_dataset(str(tmp_path / "train.csv"), "dev")


# ---------------------------------------------------------------------------------- hub


def test_hub_without_the_datasets_package_asks_for_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(RuntimeError, match=r"pip install 'tadlora\[hub\]'.*reachable"):
        resolve_dataset("hub:glue/sst2", "train")


class _FakeSplit:
    column_names = ("sentence", "label", "idx")
    features: ClassVar[dict[str, Any]] = {"label": types.SimpleNamespace(names=["negative", "positive"])}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield {"sentence": "fine", "label": 1, "idx": 0}
        yield {"sentence": "awful", "label": 0, "idx": 1}


def test_hub_spec_maps_name_config_and_dev_split(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, str | None, str]] = []

    def load_dataset(name: str, config: str | None, split: str) -> _FakeSplit:
        calls.append((name, config, split))
        return _FakeSplit()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ds = resolve_dataset("hub:nyu-mll/glue/sst2", "dev")
    # train first: a dev split takes train's label names (its ids are the model's)
    assert calls == [("nyu-mll/glue", "sst2", "train"), ("nyu-mll/glue", "sst2", "validation")]
    assert (ds.text_a, ds.labels.tolist(), ds.label_names) == (
        ("fine", "awful"),
        [1, 0],
        ("negative", "positive"),
    )
    # The fake rows are not MNLI's, but only the split name asked for matters here.
    load_hub("glue", "mnli", "dev")
    assert calls[-1] == ("glue", "mnli", "validation_matched")


def test_hub_dev_labels_take_the_train_split_s_ids_when_the_label_is_not_a_class_label(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = {
        "train": [("a", "neg"), ("b", "neu"), ("c", "pos")],
        "validation": [("d", "pos"), ("e", "neg")],  # no "neu": its own sorted ids would be neg=0, pos=1
    }

    class Split:
        column_names = ("text", "label")
        features: ClassVar[dict[str, Any]] = {"label": types.SimpleNamespace()}  # a plain string Value

        def __init__(self, split: str) -> None:
            self.rows = rows[split]

        def __iter__(self) -> Iterator[dict[str, Any]]:
            return iter({"text": t, "label": lab} for t, lab in self.rows)

    def load_dataset(name: str, config: str | None, split: str) -> Split:
        return Split(split)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    train, dev = resolve_dataset("hub:reviews", "train"), resolve_dataset("hub:reviews", "dev")
    assert train.label_names == dev.label_names == ("neg", "neu", "pos")
    assert [dev.label_names[i] for i in dev.labels] == ["pos", "neg"]


def test_hub_class_label_ids_keep_their_class_even_when_the_class_names_are_digits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A ClassLabel of star ratings names id 0 "1": the id, not the digits of a name, says which class a row is.
    class Split:
        column_names = ("text", "label")
        features: ClassVar[dict[str, Any]] = {"label": types.SimpleNamespace(names=["1", "2", "3"])}

        def __iter__(self) -> Iterator[dict[str, Any]]:
            return iter([{"text": "a", "label": 2}, {"text": "b", "label": 0}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: Split()))
    for split in ("train", "dev"):
        ds = resolve_dataset("hub:stars", split)
        assert (ds.label_names, ds.labels.tolist()) == (("1", "2", "3"), [2, 0])


def test_hub_failures_become_runtime_errors_that_mention_reachability(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(RuntimeError, match=r"no route to host.*reachable"):
        load_hub("glue", "sst2")


# ------------------------------------------------------------------------- builtin, specs


def test_builtin_sst2_small_is_package_data_with_the_expected_sizes() -> None:
    folder = resources.files("tadlora.data") / "builtin" / "sst2_small"
    assert (folder / "train.tsv").is_file() and (folder / "README.md").is_file()
    train = resolve_dataset("builtin:sst2-small", "train")
    dev = resolve_dataset("builtin:sst2-small", "dev")
    assert (len(train), len(dev)) == (3000, 500)
    assert tuple(train.label_counts()) == (1362, 1638)
    assert tuple(dev.label_counts()) == (235, 265)
    assert train.label_names == ("negative", "positive")
    assert train.text_a[0] == "hide new secretions from the parental units "


def test_builtin_files_are_the_first_rows_of_glue_sst2(glue_dir: Path) -> None:
    folder = resources.files("tadlora.data") / "builtin" / "sst2_small"
    for name, rows in (("train.tsv", 3000), ("dev.tsv", 500)):
        full = (glue_dir / "SST-2" / name).read_text(encoding="utf-8").splitlines(keepends=True)
        assert (folder / name).read_text(encoding="utf-8") == "".join(full[: rows + 1])


@pytest.mark.parametrize(
    ("spec", "split", "message"),
    [
        ("builtin:sst2-small", "test", "split must be one of"),
        (
            "builtin:sst3",
            "train",
            "unknown builtin dataset 'sst3'; available: sst2-small",
        ),
        ("glue:CoLA", "train", "unknown GLUE task 'CoLA'; known tasks: MNLI"),
        ("data.parquet", "train", "unrecognised dataset spec"),
        ("s3:bucket", "train", "expected builtin:NAME"),
        ("train.csv?txt=a", "train", r"unknown option\(s\) \['txt'\]"),
        ("train.csv?label=a&label=b", "train", "exactly one label column"),
        ("hub:", "train", "expected hub:NAME"),
        ("hub:a/b/c/d", "train", "expected hub:NAME"),
    ],
)
def test_bad_dataset_specs_raise_value_errors_that_say_what_is_accepted(spec: str, split: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_dataset(spec, split)
    if split == "train":  # the spec's own form is wrong: said as well before anything is read (a node's exit 2)
        with pytest.raises(ValueError, match=message):
            check_dataset_spec(spec)


@pytest.mark.parametrize(
    "spec", ["builtin:sst2-small", "glue:sst2", "glue:MNLI", "/not/yet/mounted/train.jsonl?text=s&label=l",
             "data/dev.tsv", "hub:glue/sst2", "hub:org/name/"]
)  # fmt: skip
def test_a_well_formed_dataset_spec_passes_the_check_without_its_data_being_read(spec: str) -> None:
    check_dataset_spec(spec)  # no file, no hub, no GLUE directory is touched


# ---------------------------------------------------------------------------- TextDataset


def test_text_dataset_subset_keeps_order_and_metadata() -> None:
    ds = TextDataset("d", ("a", "b", "c"), ("x", "y", "z"), np.array([0, 1, 1]), ("n", "p"))
    sub = ds.subset(np.array([2, 0]))
    assert (sub.text_a, sub.text_b, sub.labels.tolist()) == (
        ("c", "a"),
        ("z", "x"),
        [1, 0],
    )
    assert (sub.name, sub.label_names, sub.num_classes) == ("d", ("n", "p"), 2)
    assert ds.label_counts().tolist() == [1, 2]
    with pytest.raises(IndexError):
        ds.subset([3])
    with pytest.raises(IndexError):
        ds.subset([-1])


def test_text_dataset_subset_refuses_a_boolean_mask_instead_of_reading_it_as_indices_zero_and_one() -> None:
    ds = TextDataset("d", ("a", "b", "c"), None, np.array([0, 1, 1]), ("n", "p"))
    with pytest.raises(TypeError, match="boolean mask"):
        ds.subset(ds.labels == 1)  # as indices it would be [0, 1, 1]: examples a, b, b
    assert ds.subset(np.flatnonzero(ds.labels == 1)).text_a == ("b", "c")
    assert len(ds.subset(np.array([], dtype=np.int64))) == 0


def test_text_dataset_labels_are_a_private_read_only_copy() -> None:
    labels = np.array([0, 1])
    ds = TextDataset("d", ("a", "b"), None, labels, ("n", "p"))
    labels[0] = 1
    assert ds.labels.tolist() == [0, 1]
    with pytest.raises(ValueError, match="read-only"):
        ds.labels[0] = 1


def test_text_dataset_refuses_inconsistent_fields() -> None:
    with pytest.raises(ValueError, match="2 labels for 1 texts"):
        TextDataset("d", ("a",), None, np.array([0, 1]), ("n", "p"))
    with pytest.raises(ValueError, match="text_b"):
        TextDataset("d", ("a",), ("x", "y"), np.array([0]), ("n", "p"))
    with pytest.raises(ValueError, match="outside"):
        TextDataset("d", ("a",), None, np.array([2]), ("n", "p"))


# -------------------------------------------------------------------------------- splits


def balanced_labels(num_classes: int, per_class: int, seed: int = 7) -> npt.NDArray[np.int64]:
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    return np.random.default_rng(seed).permutation(labels)


def test_label_skew_proportions_for_ten_clients_are_the_papers() -> None:
    binary = label_skew_proportions(10, 2)
    assert binary.tolist() == [[0.9, 0.1]] * 3 + [[0.1, 0.9]] * 3 + [[0.5, 0.5]] * 4
    mnli = label_skew_proportions(10, 3)
    expected = [[0.9, 0.05, 0.05]] * 4 + [[0.05, 0.9, 0.05]] * 3 + [[0.05, 0.05, 0.9]] * 3
    assert np.allclose(mnli, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("clients", "classes", "group_sizes"),
    [
        (7, 2, [2, 2, 3]),  # round(2.1) = 2 per skewed group, rest balanced
        (20, 2, [6, 6, 8]),
        (5, 2, [2, 2, 1]),  # round(1.5) rounds half up
        (7, 3, [3, 2, 2]),  # earlier groups take the extras
        (20, 3, [7, 7, 6]),
        (20, 4, [5, 5, 5, 5]),
    ],
)
def test_label_skew_proportions_generalise_by_the_documented_rule(
    clients: int, classes: int, group_sizes: list[int]
) -> None:
    props = label_skew_proportions(clients, classes)
    assert props.shape == (clients, classes)
    assert np.allclose(props.sum(axis=1), 1.0)
    dominant = [int(row.argmax()) if row.max() > 0.5 else -1 for row in props]
    groups = [dominant.count(c) for c in range(classes)]
    if classes == 2:
        groups.append(dominant.count(-1))
    assert groups == group_sizes
    assert dominant == sorted(dominant, key=lambda c: (c < 0, c)), "groups are consecutive"
    minor = 0.1 / (classes - 1)
    for row, c in zip(props, dominant, strict=True):
        if c >= 0:
            assert np.allclose(np.delete(row, c), minor)


@pytest.mark.parametrize(("clients", "classes"), [(10, 2), (10, 3), (7, 2), (20, 3)])
def test_label_skew_clients_get_equal_disjoint_shards_in_the_stated_mix(clients: int, classes: int) -> None:
    labels = balanced_labels(classes, 3000)
    shards = split_label_skew(labels, clients, seed=0)
    assert_disjoint(shards)
    n = shards[0].size
    assert all(s.size == n for s in shards)
    props = label_skew_proportions(clients, classes)
    for shard, expected in zip(shards, props, strict=True):
        fractions = np.bincount(labels[shard], minlength=classes) / n
        assert np.all(np.abs(fractions - expected) <= 1 / n + 1e-12)


@pytest.mark.parametrize(
    ("scheme", "share", "per_client"), [("label-skew@0.7", 0.7, None), ("label-skew@0.6:90", 0.6, 90)]
)
def test_label_skew_with_another_dominant_share_keeps_the_groups_and_changes_the_mix(
    scheme: str, share: float, per_client: int | None
) -> None:
    props = label_skew_proportions(10, 3, share)
    paper = label_skew_proportions(10, 3)
    assert (props.argmax(axis=1) == paper.argmax(axis=1)).all(), "the same 4/3/3 groups as the paper's split"
    assert np.allclose(props.max(axis=1), share) and np.allclose(props.sum(axis=1), 1.0)
    assert np.allclose(np.sort(props, axis=1)[:, :2], (1 - share) / 2)
    labels = balanced_labels(3, 3000)
    shards = make_shards(labels, scheme, 10, seed=0)
    assert_disjoint(shards)
    n = shards[0].size
    assert per_client is None or n == per_client
    for shard, expected in zip(shards, props, strict=True):
        assert np.all(np.abs(np.bincount(labels[shard], minlength=3) / n - expected) <= 1 / n + 1e-12)
    paper_shards = make_shards(labels, "label-skew", 10, seed=0)
    assert [s.tolist() for s in make_shards(labels, "label-skew@0.9", 10, seed=0)] == [s.tolist() for s in paper_shards]


def test_a_dominant_share_of_one_over_k_mixes_every_client_evenly() -> None:
    assert np.allclose(label_skew_proportions(10, 2, 0.5), 0.5)
    assert np.allclose(label_skew_proportions(9, 3, 1 / 3), 1 / 3)


@pytest.mark.filterwarnings("error")  # numpy's divide-by-zero RuntimeWarning included
def test_a_class_that_no_client_has_a_share_of_bounds_nothing_and_warns_of_nothing() -> None:
    labels = balanced_labels(3, 100)
    shards = make_shards(labels, "label-skew@1", 2, seed=0)  # two clients, one class each: the third is nobody's
    assert [sorted(set(labels[s].tolist())) for s in shards] == [[0], [1]]
    assert all(s.size == 100 for s in shards)


def test_a_capped_label_skew_keeps_its_dominant_share() -> None:
    labels = balanced_labels(3, 3000)
    texts = tuple(str(i) for i in range(labels.size))
    data = TextDataset(name="t", text_a=texts, text_b=None, labels=labels, label_names=("a", "b", "c"))
    for shard in client_shards(data, "label-skew@0.6", 10, seed=0, samples_per_client=100)[:4]:
        assert shard.size == 100
        assert np.bincount(labels[shard], minlength=3).tolist() == [60, 20, 20]


def test_a_label_skew_of_n_per_client_capped_lower_still_keeps_its_mix() -> None:
    # label-skew:100 with samples_per_client=10: a random 10 of each 100 would give [10, 0] or [7, 3], not [9, 1].
    labels = balanced_labels(2, 2000)
    texts = tuple(str(i) for i in range(labels.size))
    data = TextDataset(name="t", text_a=texts, text_b=None, labels=labels, label_names=("a", "b"))
    shards = client_shards(data, "label-skew:100", 10, seed=0, samples_per_client=10)
    assert [np.bincount(labels[s], minlength=2).tolist() for s in shards] == [[9, 1]] * 3 + [[1, 9]] * 3 + [[5, 5]] * 4
    assert client_shards(data, "label-skew:5", 10, seed=0, samples_per_client=10)[0].size == 5


@pytest.mark.parametrize("split", ["label-skew", "label-skew@0.6", "iid"])
def test_a_samples_per_client_cap_above_a_shard_s_size_leaves_the_shards_as_they_are(split: str) -> None:
    """--samples-per-client is a cap ("default: its whole shard"): one above what the split gives a client changes
    nothing, for a label skew too, whose natural size the class counts decide (here 120 of 2600 for 10 clients)."""
    labels = np.array([0] * 600 + [1] * 2000)
    data = TextDataset(name="t", text_a=tuple(map(str, range(2600))), text_b=None, labels=labels,
                       label_names=("a", "b"))  # fmt: skip
    uncapped = client_shards(data, split, 10, seed=0)
    for cap in (max(s.size for s in uncapped), 10_000):
        capped = client_shards(data, split, 10, seed=0, samples_per_client=cap)
        assert [s.tolist() for s in capped] == [s.tolist() for s in uncapped]


def test_label_skew_default_size_is_the_largest_that_exhausts_no_class() -> None:
    labels = np.array([0] * 600 + [1] * 2000)
    shards = split_label_skew(labels, 10, seed=0)
    n = shards[0].size
    # Class 0 is the scarce one: 3*0.9n + 3*0.1n + 4*0.5n = 5n of it are needed.
    assert n == 120
    assert np.sum(labels[np.concatenate(shards)] == 0) <= 600
    with pytest.raises(ValueError, match=r"at most 120"):
        make_shards(labels, f"label-skew:{n + 1}", 10, seed=0)
    assert all(s.size == 50 for s in make_shards(labels, "label-skew:50", 10, seed=0))


def test_a_label_skew_too_large_for_its_classes_says_how_to_fit() -> None:
    # 4 clients, 2 rows of each class: a client at [0.9, 0.1] needs more of one class than the split can give.
    labels = np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"class counts \[2, 2\] .* fewer clients or more rows, or another split"):
        split_label_skew(labels, 4, seed=0)


@pytest.mark.parametrize("scheme", ["iid", "label-skew", "dirichlet:0.5"])
def test_every_scheme_is_deterministic_for_a_seed_and_varies_with_it(
    scheme: str,
) -> None:
    labels = balanced_labels(3, 400)
    first = make_shards(labels, scheme, 10, seed=1)
    again = make_shards(labels, scheme, 10, seed=1)
    other = make_shards(labels, scheme, 10, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert all(s.dtype == np.int64 and np.all(np.diff(s) > 0) for s in first)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 100.0])
def test_dirichlet_shards_partition_the_dataset(alpha: float) -> None:
    labels = balanced_labels(2, 500)
    shards = split_dirichlet(labels, 10, alpha, seed=3)
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(labels.size))
    assert all(s.size >= 1 for s in shards)


def test_a_near_iid_dirichlet_split_gives_every_client_samples_when_a_class_has_fewer_than_the_clients() -> None:
    # Cut at the same near-uniform shares, every class's samples would land on the same clients and leave the
    # rest empty in every redraw; the refusal would even advise a larger alpha, which only makes it certain.
    labels = balanced_labels(10, 20)  # 20 of each class for 50 clients
    for alpha in (100.0, 1e6):
        shards = split_dirichlet(labels, 50, alpha, seed=0)
        assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(labels.size))
        assert min(s.size for s in shards) >= 1


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = balanced_labels(2, 2000)

    def spread(alpha: float) -> float:
        shards = split_dirichlet(labels, 10, alpha, seed=0)
        return float(np.mean([abs(labels[s].mean() - 0.5) for s in shards]))

    assert spread(0.1) > 0.2
    assert spread(1000.0) < 0.05


def test_iid_shards_partition_the_dataset_in_near_equal_sizes() -> None:
    shards = split_iid(np.zeros(103, dtype=np.int64), 10, seed=0)
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(103))
    assert {s.size for s in shards} == {10, 11}


def test_make_shards_accepts_a_dataset_and_uses_its_class_count() -> None:
    # Class 2 has no examples, yet the dataset declares 3 classes: the 3-class rule applies.
    ds = TextDataset("d", ("t",) * 400, None, np.array([0, 1] * 200), ("a", "b", "c"))
    with pytest.raises(ValueError, match=r"class counts \[200, 200, 0\]"):
        make_shards(ds, "label-skew", 4, seed=0)
    assert len(make_shards(ds, "iid", 4, seed=0)) == 4


@pytest.mark.parametrize(
    ("scheme", "clients", "message"),
    [
        (
            "shuffle",
            10,
            "unknown shard scheme 'shuffle'; expected one of iid, label-skew",
        ),
        ("iid:2", 10, "unknown shard scheme"),
        ("dirichlet", 10, "dirichlet needs a concentration"),
        ("dirichlet:abc", 10, "dirichlet needs a concentration"),
        ("dirichlet:0", 10, "alpha must be a positive number"),
        ("label-skew:ten", 10, "label-skew:N needs an integer"),
        ("label-skew:0", 10, "label-skew:N needs N >= 1 samples per client"),
        ("label-skew@most", 10, "label-skew@SHARE needs the dominant class's share"),
        ("label-skew@0.4", 10, r"must lie in \[1/2, 1\], got 0.4"),
        ("label-skew@1.5:20", 10, r"the dominant share must lie in \(0, 1\]"),
        ("iid", 0, "num_clients must be >= 1"),
        ("iid", 2000, "cannot give 2000 clients"),
    ],
)
def test_bad_shard_schemes_raise_value_errors(scheme: str, clients: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_shards(balanced_labels(2, 100), scheme, clients, seed=0)


@pytest.mark.parametrize(
    ("scheme", "parsed"),
    [
        ("iid", ("iid", None)),
        (" IID ", ("iid", None)),
        ("label-skew", ("label-skew", (0.9, None))),
        ("label-skew@0.7:50", ("label-skew", (0.7, 50))),
        ("dirichlet:0.5", ("dirichlet", 0.5)),
    ],
)
def test_a_shard_scheme_parses_without_data(scheme: str, parsed: tuple[str, object]) -> None:
    from tadlora.data.splits import parse_shard_scheme

    assert parse_shard_scheme(scheme) == parsed
    for bad in ("shuffle", "iid:2", "dirichlet:nan", "label-skew:-3", "label-skew@0"):
        with pytest.raises(ValueError, match="shard scheme"):
            parse_shard_scheme(bad)


def test_label_skew_default_size_counts_the_rounding_that_lets_a_class_give_more_than_its_share() -> None:
    """The largest n that exhausts no class, when a class is scarce: 4 clients over 3 classes (groups 2/1/1) have an
    exact share of 1.9n of class 0, 26.6 at n = 14, yet the rounded counts take 12 + 12 + 1 + 1 = 26, all there is
    (n = 15 would take 28). Each client's count may fall up to one below its share, so a bound of 26 / 1.9 < 14
    that leaves that out stops the search at 13."""
    labels = np.array([0] * 26 + [1] * 1000 + [2] * 1000)
    shards = split_label_skew(labels, 4, seed=0)
    assert {s.size for s in shards} == {14}
    assert np.sum(labels[np.concatenate(shards)] == 0) == 26
    with pytest.raises(ValueError, match="at most 14"):
        split_label_skew(labels, 4, seed=0, samples_per_client=15)


def test_label_skew_breaks_an_exact_rounding_tie_toward_the_lower_class_id() -> None:
    """45 samples at [0.7, 0.3] are 31.5 and 13.5, an exact tie; in floating point 0.7 * 45 is 31.499999999999996 and
    0.3 * 45 is 13.5, so without rounding away the float noise the leftover sample would go to class 1."""
    labels = np.repeat(np.arange(2), 1000)
    shards = split_label_skew(labels, 2, seed=0, samples_per_client=45, dominant_share=0.7)
    assert [np.bincount(labels[s], minlength=2).tolist() for s in shards] == [[32, 13], [14, 31]]


def test_dirichlet_deals_a_class_s_samples_in_a_shuffled_order_not_in_runs() -> None:
    """A dataset is often stored sorted (by source, length or date) within a class: cutting each class in stored
    order would give every client one slice of that order. One class, two clients: neither shard is a run."""
    shards = split_dirichlet(np.zeros(1000, np.int64), 2, 1.0, seed=0)
    for shard in shards:
        if shard.size > 1:
            assert shard[-1] - shard[0] + 1 > shard.size, "a contiguous run of indices"


def test_dirichlet_accepts_a_draw_that_gives_every_client_exactly_min_samples() -> None:
    # 4 samples for 4 clients: only a draw of one each meets min_samples = 1, and it must be accepted
    shards = split_dirichlet(np.array([0, 0, 1, 1]), 4, 1.0, seed=0, min_samples=1)
    assert sorted(s.size for s in shards) == [1, 1, 1, 1]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: split_iid([-1, 0, 1], 2, 0), "non-negative", id="negative-label"),
        pytest.param(
            lambda: split_label_skew([0, 1, 2] * 50, 2, 0, num_classes=2), "labels reach 2", id="label-past-classes"
        ),
        pytest.param(
            lambda: split_label_skew([0, 1] * 50, 2, 0, samples_per_client=0), "must be >= 1", id="no-samples"
        ),
    ],
)
def test_splits_refuse_labels_and_sizes_they_cannot_honour(call: Callable[[], object], message: str) -> None:
    """A negative class id, a label beyond ``num_classes`` and zero samples per client are refused, not split."""
    with pytest.raises(ValueError, match=message):
        call()
