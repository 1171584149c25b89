"""The documentation's cross-references hold: every relative Markdown link names a file that exists and, with an
anchor, a heading of that file; every repository path the prose names exists. A reader who follows them lands
somewhere, after a heading is reworded or a file moved as before it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What a reader is sent through: the README, docs/ and the READMEs beside the code. (benchmarks/paper/** is written
# by the grid's own runs, benchmarks/results/*.md by the benchmark scripts: neither links anywhere.)
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted(ROOT.glob("benchmarks/**/README.md")),
    *sorted(ROOT.glob("node/**/README.md")),
]
# The repository's folders (a checkout may hold others: runs/, .venv/, which the docs name as what a command makes).
TOP_FOLDERS = ("benchmarks", "deploy", "docs", "examples", "node", "proto", "scripts", "tests")
# Paths the docs name that a documented command creates, not the repository.
MADE_BY_A_COMMAND = {"deploy/certs", "benchmarks/results/gpu/"}


def prose(text: str) -> str:
    """``text`` without its fenced code blocks (a `#` there is a shell comment, `[x](y)` is code)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercased, punctuation dropped (hyphens and underscores kept), spaces to
    hyphens; inline code and emphasis marks go with the punctuation."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of ``path``'s headings; a repeated heading's later ones get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", prose(path.read_text(encoding="utf-8")), flags=re.M):
        anchor = github_anchor(heading)
        found.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)
        seen[anchor] = seen.get(anchor, 0) + 1
    return found


def relative_links(path: Path) -> list[str]:
    """The targets of ``path``'s Markdown links and images that are not URLs."""
    targets = re.findall(r"\]\(([^)\s]+)\)", prose(path.read_text(encoding="utf-8")))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_the_anchor_rule_is_github_s() -> None:
    assert github_anchor("A slow link: sizing `--exchange-timeout`") == "a-slow-link-sizing---exchange-timeout"
    assert github_anchor("On disk (`--out`), after a crash") == "on-disk---out-after-a-crash"
    assert github_anchor("What results.json holds") == "what-resultsjson-holds"


def test_every_relative_link_and_anchor_in_the_docs_resolves() -> None:
    checked, broken = 0, []
    for doc in DOCS:
        for target in relative_links(doc):
            file, _, anchor = target.partition("#")
            resolved = (doc.parent / file).resolve() if file else doc
            checked += 1
            if not resolved.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading in {resolved.name})")
    assert checked >= 20, checked  # the extraction finds the links there are, so that this cannot pass on none
    assert not broken, "\n".join(broken)


def test_every_repository_path_the_docs_name_exists() -> None:
    """A path under one of the repository's top folders, in prose or in a command (`examples/own_method.py`,
    `benchmarks/sizing/probes/mnli-central.json`), exists: relative to the root, or to the document that names it.
    Placeholders (NAME, KEY, PRESET, globs, {a,b}) are not paths."""
    top = "|".join(TOP_FOLDERS)
    checked, missing = 0, []
    for doc in DOCS:
        for path in re.findall(rf"(?<![\w/.$-])((?:{top})/[\w./*{{}},<>-]*)", doc.read_text(encoding="utf-8")):
            path = path.rstrip(".,")
            if re.search(r"[A-Z]{3,}|[*<{,]", path) or path in MADE_BY_A_COMMAND:
                continue
            checked += 1
            if not (ROOT / path).exists() and not (doc.parent / path).exists():
                missing.append(f"{doc.relative_to(ROOT)}: {path}")
    assert checked >= 50, checked
    assert not missing, "\n".join(missing)


def test_the_readme_layout_names_every_module_of_the_daemon() -> None:
    """The README's Layout says what each module of `node/tadlora/node/` holds; a module added since is named there
    too (progress.py was not)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout") :].split("\n## ", 1)[0]
    modules = sorted(p.name for p in (ROOT / "node" / "tadlora" / "node").glob("*.py") if p.name != "__init__.py")
    assert modules, "no modules found"
    assert [m for m in modules if f"`{m}`" not in layout] == []
