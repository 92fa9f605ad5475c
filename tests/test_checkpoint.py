"""Checkpoints: round trip, keep-K, incompatibility messages, corruption, and SIGKILL safety."""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import TINY, _bit_identical

import nfdm_de as nd
from nfdm_de._checkpoint import FORMAT_VERSION

REPO = Path(__file__).resolve().parents[1]


def _tree(step: int):
    return {
        "a": jnp.full((3, 4), float(step)),
        "b": (jnp.arange(5, dtype=jnp.int32) + step, 2.5),
        "key": jax.random.key_data(jax.random.key(step)),
    }


def test_round_trip_and_keep(tmp_path):
    for step in (1, 2, 3, 4):
        nd.save_checkpoint(str(tmp_path), step, _tree(step), {"note": "x"}, keep=2)
    assert [s for s, _ in nd.list_checkpoints(str(tmp_path))] == [3, 4]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    path = nd.latest_checkpoint(str(tmp_path))
    like = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if eqx.is_array(a) else a, _tree(0)
    )
    header, tree = nd.load_checkpoint(path, like)
    assert header["step"] == 4 and header["note"] == "x"
    assert header["library_version"] == nd.__version__
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(_tree(4)), strict=True):
        np.testing.assert_array_equal(a, b)


def _rewrite_header(path, **changes):
    with open(path, "rb") as f:
        header = json.loads(f.readline())
        payload = f.read()
    header.update(changes)
    with open(path, "wb") as f:
        f.write(json.dumps(header).encode() + b"\n" + payload)


def test_incompatible_or_damaged_checkpoints(tmp_path):
    path = nd.save_checkpoint(str(tmp_path), 1, _tree(1), {})
    like = _tree(0)
    _rewrite_header(path, library_version="7.3.0")
    with pytest.raises(ValueError, match=r"nfdm-de 7\.3\.0.*incompatible"):
        nd.load_checkpoint(path, like)
    _rewrite_header(path, library_version=nd.__version__, format_version=99)
    with pytest.raises(ValueError, match="format version 99"):
        nd.load_checkpoint(path, like)
    _rewrite_header(path, format_version=1)
    with pytest.raises(ValueError, match="format version 1, written by an older.*retrain"):
        nd.load_checkpoint(path, like)
    _rewrite_header(path, format_version=FORMAT_VERSION)
    wrong = dict(like, a=jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"expected structure.*'a'.*shape"):
        nd.load_checkpoint(path, wrong)
    with pytest.raises(ValueError, match="more leaves"):
        nd.load_checkpoint(path, {"a": like["a"]})
    data = bytearray(Path(path).read_bytes())
    data[-3] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        nd.load_checkpoint(path, like)
    (tmp_path / "junk.eqx").write_bytes(b"\x00\x01 not json")
    with pytest.raises(ValueError, match="not an nfdm-de checkpoint"):
        nd.load_checkpoint(str(tmp_path / "junk.eqx"), like)


def test_load_run_without_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="holds no nfdm-de checkpoint"):
        nd.load_run(str(tmp_path))
    with pytest.raises(ValueError, match="holds no nfdm-de checkpoint"):
        nd.load_run(str(tmp_path / "missing"))


def test_resume_with_incompatible_config_names_the_field(tmp_path):
    nd.train(dataclasses.replace(TINY, steps=2, save_every=2), str(tmp_path))
    other = dataclasses.replace(TINY, model=dataclasses.replace(TINY.model, width=8))
    with pytest.raises(ValueError, match=r"model\.width: 16 \(stored\) vs 8 \(given\)"):
        nd.train(other, str(tmp_path), resume=True)
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        nd.train(TINY, str(tmp_path))
    # A checkpoint written by another library version is refused with both versions named.
    _rewrite_header(nd.latest_checkpoint(str(tmp_path / "checkpoints")), library_version="0.0.1")
    with pytest.raises(ValueError, match=r"nfdm-de 0\.0\.1.*installed nfdm-de"):
        nd.train(TINY, str(tmp_path), resume=True)


_SAVE_LOOP = """
import sys
import jax.numpy as jnp
import nfdm_de as nd
directory = sys.argv[1]
latest = nd.list_checkpoints(directory)
step = latest[-1][0] + 1 if latest else 1
while True:
    tree = {"big": jnp.full((1_000_000,), float(step)), "step": jnp.asarray(step)}
    nd.save_checkpoint(directory, step, tree, {"value": step}, keep=2)
    step += 1
"""


def _wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("subprocess did not get going")
        time.sleep(0.01)


def test_sigkill_while_saving_leaves_a_loadable_latest_checkpoint(tmp_path):
    """A process that does nothing but write 8 MB checkpoints is killed at random moments; after
    every kill the latest checkpoint loads and holds exactly what was saved under its step."""
    rng = random.Random(0)
    like = {"big": jnp.zeros((1_000_000,)), "step": jnp.asarray(0)}
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_ENABLE_X64="1")
    previous = 0
    for _ in range(3):
        process = subprocess.Popen(
            [sys.executable, "-c", _SAVE_LOOP, str(tmp_path)], env=env, cwd=REPO
        )
        try:
            _wait_for(
                lambda previous=previous: (
                    len(nd.list_checkpoints(str(tmp_path)))
                    and (nd.list_checkpoints(str(tmp_path))[-1][0] > previous + 1)
                )
            )
            time.sleep(rng.uniform(0.0, 0.3))
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
        found = nd.list_checkpoints(str(tmp_path))
        assert 1 <= len(found) <= 3  # keep = 2, plus one if killed between rename and cleanup
        step, path = found[-1]
        header, tree = nd.load_checkpoint(path, like)
        assert header["value"] == step == int(tree["step"])
        assert bool(jnp.all(tree["big"] == step))
        previous = step


@pytest.mark.slow
def test_sigkill_during_training_then_exact_resume(tmp_path):
    """`nfdm-de train` saving every step is killed; the run resumes from its latest checkpoint
    and continues bit-identically to a run that was never interrupted."""
    flat = {
        k: v
        for section in (TINY.to_dict(), TINY.to_dict()["model"], TINY.to_dict()["optim"])
        for k, v in section.items()
        if not isinstance(v, dict) and v is not None  # TOML has no null (source = None)
    }
    flat.update(steps=100_000, save_every=1, keep=2)
    config_file = tmp_path / "config.toml"
    config_file.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in flat.items()) + "\n")
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_ENABLE_X64="1")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nfdm_de.cli.main",
            "train",
            "--config",
            str(config_file),
            "--run-dir",
            str(run_dir),
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: len(nd.list_checkpoints(str(run_dir / "checkpoints"))) >= 2)
        time.sleep(random.Random(1).uniform(0.0, 0.5))
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    killed_at = nd.load_run(str(run_dir)).step
    assert killed_at >= 2
    config = nd.update_config(TINY, {"steps": 100_000, "save_every": 1, "keep": 2})
    target = killed_at + 3
    nd.train(
        dataclasses.replace(config, save_every=target), str(run_dir), resume=True, stop_at=target
    )
    straight = tmp_path / "straight"
    nd.train(dataclasses.replace(config, save_every=target), str(straight), stop_at=target)
    a, b = nd.load_run(str(run_dir)), nd.load_run(str(straight))
    assert a.step == b.step == target
    assert _bit_identical(a.raw_model, b.raw_model) and _bit_identical(a.model, b.model)
