"""Packaging: pyproject.toml's lower bounds are exactly the versions .ci/min-versions installs
and tests, and the console script is the CLI's entry point."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_lower_bounds_are_the_tested_minimum_versions():
    bounds = {}
    for requirement in _pyproject()["project"]["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement)
        assert match, f"{requirement!r}: every dependency states its lowest version as name>=X"
        bounds[match.group(1).lower()] = match.group(2)
    pins = {}
    for line in (ROOT / ".ci" / "min-versions.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    pins.pop("jaxlib")  # jax's own dependency, pinned to match jax
    assert bounds == pins


def test_console_script_is_the_entry_point():
    import cli.main

    target = _pyproject()["project"]["scripts"]["nfdm-de"]
    module, function = target.split(":")
    assert module == "cli.main" and callable(getattr(cli.main, function))
