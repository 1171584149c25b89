"""pyproject.toml's dependency floors and `.ci/floors.txt`, the install `.ci/floors` runs the suite on, agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# The one pin that is not its floor: the registry's only CPU wheel (see the file's header).
TORCH_PIN = "2.13.0"


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[;\s]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared_floors() -> dict[str, Version | None]:
    """Each runtime dependency, with the version of its `>=` bound (None: declared without one)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors: dict[str, Version | None] = {}
    for dep in deps:
        found = re.search(r">=\s*([0-9][0-9.]*)", dep)
        floors[_name(dep)] = Version(found.group(1)) if found else None
    return floors


def pinned() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            found = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9.]*)", line)
            assert found, f".ci/floors.txt: {line!r} is not NAME==VERSION"
            pins[_name(found.group(1))] = Version(found.group(2))
    return pins


def test_every_declared_floor_is_pinned_at_its_floor_and_nothing_else_is_pinned() -> None:
    floors, pins = declared_floors(), pinned()
    expected = {name: version for name, version in floors.items() if version is not None}
    expected["torch"] = Version(TORCH_PIN)
    assert pins == expected


def test_the_floors_script_installs_under_the_pins_and_runs_the_suite() -> None:
    script = (ROOT / ".ci" / "floors").read_text()
    assert "-c .ci/floors.txt" in script and "-m pytest" in script
    assert (ROOT / ".ci" / "floors").stat().st_mode & 0o111


def test_the_package_says_the_release_pyproject_declares() -> None:
    import tadlora

    assert tadlora.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
