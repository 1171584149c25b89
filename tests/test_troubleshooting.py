"""docs/troubleshooting.md quotes what a node prints, so that an operator can find the line they see. Each `code` span
in the "You see" column of its tables is checked against the code under node/tadlora/: a message the node no longer
says (reworded, removed) fails here, not in front of an operator searching for it.

A span is one of:
- a message, its variable parts written `...`: each piece between them must be in one string literal of the code
  (implicit concatenation joined, an f-string's {fields} and a %-format's %s, %d, ... cut as the `...` are), or
  run from the end of one literal's text before a field into the start of another literal (the message put into
  that field); a refusal reason in it (`FINGERPRINT_MISMATCH`) must be a `Reason`;
- a metric, `tadlora_NAME_total{LABEL="VALUE"}`: NAME registered, LABEL a string of the code and VALUE one too (or a
  `Reason`);
- a `tadlora-node status` field, `"KEY": VALUE`: KEY a key the status prints, a quoted VALUE a string of the code.
"""

from __future__ import annotations

import ast
import bisect
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from tadlora.node.wire import Reason

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "troubleshooting.md"
SOURCE = ROOT / "node" / "tadlora"
PLACEHOLDER = "..."
# What a %-format or an f-string field puts into a message: the page writes `...` there.
_FORMAT_FIELD = re.compile(r"\x00|%[-#0 +]*\d*(?:\.\d+)?[sdfgr]")
_METRIC = re.compile(r'tadlora_([a-z_]+?)(?:_total)?(?:\{([a-z_]+)="([^"]+)"\})?')
_STATUS_FIELD = re.compile(r'"([a-z_]+)": (.+)')
_REASON_NAMES = {reason.name for reason in Reason}
_EDGE = " :;,.()[]'\""  # what a piece may lose at its ends: the punctuation around a variable part
MIN_PIECE_CHARS = 10  # a span must hold a piece this long (or a reason code): `... runs ...` alone checks nothing


def you_see_spans(markdown: str) -> list[str]:
    """The `code` spans of the first column of every table whose first header is "You see"."""
    spans: list[str] = []
    in_table = False
    for line in markdown.splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        first = re.split(r"(?<!\\)\|", line)[1].strip()
        if first == "You see":
            in_table = True
        elif in_table and not re.fullmatch(r"[-: ]+", first):
            spans += re.findall(r"`([^`]+)`", first)
    return spans


def _text_of(node: ast.AST) -> str | None:
    """A string literal's text, an f-string's with "\x00" for each field; None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "\x00" for v in node.values)
    return None


@dataclass(frozen=True)
class Source:
    """The string literals of every module under node/tadlora/: whole; cut into pieces at their format fields; the
    pieces a field follows, reversed and sorted (to find a piece's head among their ends); and the literals' first
    pieces, sorted (to find its tail among their starts)."""

    whole: frozenset[str]
    pieces: tuple[str, ...]
    before_field_reversed: list[str]
    starts: list[str]


@cache
def source() -> Source:
    """What the code under node/tadlora/ says (`Source`), read once."""
    whole: set[str] = set()
    pieces: list[str] = []
    before_field: list[str] = []
    starts: list[str] = []
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            literal = _text_of(node)
            if literal is not None:
                whole.add(literal)
                cut = _FORMAT_FIELD.split(literal)
                pieces += cut
                before_field += [piece[::-1] for piece in cut[:-1]]
                starts.append(cut[0])
    return Source(frozenset(whole), tuple(pieces), sorted(before_field), sorted(starts))


def _has_prefix(ordered: list[str], prefix: str) -> bool:
    i = bisect.bisect_left(ordered, prefix)
    return i < len(ordered) and ordered[i].startswith(prefix)


def _said(piece: str, code: Source) -> bool:
    """Whether ``piece`` is in one of the code's pieces, or is one's end followed by the start of a literal (the
    message put into that field: `peer ... dropped: missed round` is "peer %s dropped: %s" % (j, f"missed round
    {t}...")). The punctuation at its ends may belong to the text a `...` stands for (`not a neighbour: ...:
    cluster`: the second ': ' is the log line's, 'cluster' the reason's)."""
    if any(text in segment for segment in code.pieces for text in (piece, piece.strip(_EDGE))):
        return True
    return any(
        _has_prefix(code.starts, piece[k:]) and _has_prefix(code.before_field_reversed, piece[:k][::-1])
        for k in range(1, len(piece))
    )


def problem_with(span: str) -> str | None:
    """Why the code no longer says ``span`` (see the module's docstring); None when it does."""
    code = source()
    if metric := _METRIC.fullmatch(span):
        name, label, value = metric.groups()
        if f"tadlora_{name}" not in code.whole:
            return f"no metric tadlora_{name} is registered"
        if label is not None and (label not in code.whole or (value not in code.whole and value not in _REASON_NAMES)):
            return f"the label {label}={value!r} is not in the code"
        return None
    if field := _STATUS_FIELD.fullmatch(span):
        key, value = field.groups()
        if key not in code.whole:
            return f"status has no key {key!r}"
        if value.startswith('"') and value.strip('"') not in code.whole:
            return f"no string {value} in the code"
        return None
    reasons = [word for word in re.findall(r"\b[A-Z][A-Z_]+\b", span) if word in _REASON_NAMES]
    for reason in reasons:  # a refusal's reason code comes from the `Reason` enum, not a string: a field here
        span = re.sub(rf"\b{reason}\b", PLACEHOLDER, span)
    wanted = [piece.strip() for piece in span.split(PLACEHOLDER) if piece.strip()]
    missing = [piece for piece in wanted if not _said(piece, code)]
    if missing:
        return f"not in the code: {missing}"
    if not reasons and not any(len(piece) >= MIN_PIECE_CHARS for piece in wanted):
        return f"too little to check: no piece of {MIN_PIECE_CHARS} characters"
    return None


def test_the_page_quotes_enough_to_be_checked() -> None:
    """The extraction finds the spans there are, so that the check below cannot pass on none."""
    spans = you_see_spans(PAGE.read_text(encoding="utf-8"))
    assert len(spans) >= 60, len(spans)
    assert any(_METRIC.fullmatch(s) for s in spans) and any(_STATUS_FIELD.fullmatch(s) for s in spans)


def test_every_message_the_troubleshooting_page_quotes_is_still_in_the_code() -> None:
    problems = [f"`{s}`: {why}" for s in you_see_spans(PAGE.read_text(encoding="utf-8")) if (why := problem_with(s))]
    assert not problems, "docs/troubleshooting.md quotes what the code no longer says:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "span",
    [
        "not a neighbour: ...: cluster ... is now ours (...)",  # a word changed
        "refused the handshake: FINGERPRINT_MISMATCHED: ...",  # no such reason: its text is then no literal
        'tadlora_exchanges_total{result="late"}',  # no such label value
        "tadlora_exchange_total",  # no such metric
        '"state": "waiting-for-peer"',  # no such state
        "... runs ...",  # nothing to check
    ],
)
def test_a_span_the_code_does_not_say_is_found(span: str) -> None:
    assert problem_with(span) is not None


@pytest.mark.parametrize(
    "span",
    [
        "not a neighbour: ...: cluster ... is not ours (...)",  # a log format and an f-string
        "refused the handshake: FINGERPRINT_MISMATCH: ... has model fingerprint ..., ...",
        "exchange with ... in round ... did not finish within --exchange-timeout (... s), and the pair is left out",
        "this node is too slow for the cluster",  # implicit concatenation across two lines of the source
        "peer ... dropped: missed round ... and does not answer (...)",  # a message put into another's field
        'tadlora_refusals_total{reason="SCHEDULE_MISMATCH"}',
        'tadlora_peer_drops_total{cause="unanswered"}',
        '"state": "waiting-for-peers"',
        '"candidates": []',
    ],
)
def test_a_span_the_code_says_passes(span: str) -> None:
    assert problem_with(span) is None
