"""The version floors CI installs (.ci/floors.txt) are the floors pyproject.toml declares."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomllib (3.11+) or tomli")

ROOT = Path(__file__).resolve().parents[1]


def _declared_floors() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    extras = [spec for group in project["optional-dependencies"].values() for spec in group]
    for spec in project["dependencies"] + extras:
        match = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", spec)
        if match:
            floors[match.group(1).lower()] = match.group(2)
    return floors


def _pinned_floors() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_every_pinned_floor_is_the_declared_floor():
    declared, pinned = _declared_floors(), _pinned_floors()
    assert pinned, "no pins read from .ci/floors.txt"
    for name, version in pinned.items():
        floor = declared.get(name)
        assert floor == version, f"{name}: pyproject says >={floor}, CI tests {version}"


def test_every_declared_floor_is_tested_but_the_stated_exceptions():
    """pyproject.toml's comment names the exceptions: torch (the suite's own build), ruff, vllm (GPU only),
    the optuna sweeper."""
    untested = set(_declared_floors()) - set(_pinned_floors())
    assert untested == {"torch", "ruff", "vllm", "hydra-optuna-sweeper"}
