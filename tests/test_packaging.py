"""Packaging: pyproject.toml's lower bounds are exactly the versions .ci/min-versions installs
and tests, the console script is the CLI's entry point, and the built wheel installs everything
under `nfdm_de` (the CLI as `nfdm_de.cli`, with `py.typed`) so that a user's own `cli` package
cannot shadow it."""

import os
import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

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
    import nfdm_de.cli.main

    target = _pyproject()["project"]["scripts"]["nfdm-de"]
    module, function = target.split(":")
    assert module == "nfdm_de.cli.main" and callable(getattr(nfdm_de.cli.main, function))


def _build_wheel(out: Path) -> Path:
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*command, "-w", str(out), str(ROOT)], check=True, timeout=300)
    (wheel,) = out.glob("nfdm_de-*.whl")
    return wheel


def _fresh_venv(path: Path) -> Path:
    """A new environment holding only what `pip` installs into it; the dependencies come from the
    test environment's site-packages through a plain path entry (its .pth files are not read)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow
def test_wheel_installs_the_cli_inside_the_package(tmp_path):
    wheel = _build_wheel(tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert "nfdm_de/cli/main.py" in names and "nfdm_de/py.typed" in names
    assert not [n for n in names if n.split("/")[0] not in ("nfdm_de",) and ".dist-info" not in n]

    python = _fresh_venv(tmp_path / "venv")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
    subprocess.run([*install, str(wheel)], check=True, timeout=300)
    user_project = tmp_path / "project"  # a user's own `cli` package on the path
    (user_project / "cli").mkdir(parents=True)
    (user_project / "cli" / "__init__.py").write_text("OWNER = 'user'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    console = python.parent / "nfdm-de"
    for command in ([str(console), "--version"], [str(python), "-m", "nfdm_de.cli", "--help"]):
        done = subprocess.run(
            command, cwd=user_project, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
    assert done.stdout and "train" in done.stdout
    where = subprocess.run(
        [str(python), "-c", "import cli, nfdm_de.cli.main as m; print(cli.OWNER, m.__file__)"],
        cwd=user_project,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert where[0] == "user" and Path(where[1]).is_relative_to(tmp_path / "venv")
