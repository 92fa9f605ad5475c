"""Image data end to end through the CLI: digits as 8x8x1 images (train -> nll -> sample --plot),
training on IDX and CIFAR-10 files the test writes, the dequantization offset with a per-pixel
affine map, and bad image input (one line on stderr, exit 1).

Tiny U-Nets (2 base channels) and a handful of steps: these check the plumbing (shapes, the
network chosen by the data's shape, the transform fitted on training data, bits/dim accounting),
not model quality (that is `benchmarks/digits_bpd.py`).
"""

import gzip
import json
import math
import struct

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from typer.testing import CliRunner

import nfdm_de as nd
from nfdm_de._evaluate import BOUND_TIME_POWER
from nfdm_de.cli.main import app

runner = CliRunner()
TINY = ["--steps", "3", "--batch-size", "16", "--channels", "2", "--warmup", "1"]


def _invoke_json(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _fails_cleanly(args, match):
    result = runner.invoke(app, args)
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def _write_idx(path, images):
    """An IDX3 unsigned-byte file (gzip when the name ends in .gz)."""
    header = struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">3I", *images.shape)
    raw = header + images.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)


def _write_cifar_batch(path, images, labels):
    """CIFAR-10 binary records: one label byte, then 3x32x32 channel-first bytes."""
    records = [
        np.concatenate([[label], image.transpose(2, 0, 1).reshape(-1)]).astype(np.uint8)
        for image, label in zip(images, labels, strict=True)
    ]
    path.write_bytes(b"".join(r.tobytes() for r in records))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "digits-images"
    summary = _invoke_json(
        ["train", "--data", "digits-images", "--run-dir", str(run_dir), "--json", *TINY]
    )
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    return run_dir


def test_digits_images_run_is_an_image_run(digits_run):
    run = nd.load_run(str(digits_run))
    assert run.model.data_shape == (8, 8, 1)
    assert run.num_levels == 17
    # The CLI chose U-Nets by the data's shape.
    assert isinstance(run.model.predictor.network, nd.UNet)
    assert isinstance(run.model.forward.network, nd.UNet)
    assert run.config.model.channels == 2
    # The affine map was fitted on the dequantized *training* images only.
    train = nd.load_dataset("digits-images", split="train")
    test = nd.load_dataset("digits-images", split="test")
    assert train.shape == (1438, 8, 8, 1) and test.shape == (359, 8, 8, 1)
    y = (train + 0.5) / 17
    assert run.transform.shift.shape == (8, 8, 1)
    np.testing.assert_allclose(run.transform.shift, y.mean(), rtol=1e-12)
    np.testing.assert_allclose(run.transform.scale, y.std(), rtol=1e-12)
    y_test = (test + 0.5) / 17
    assert abs(y_test.mean() - y.mean()) > 1e-6  # so the check above could tell them apart


def test_digits_images_nll_reports_bits_per_dim(digits_run):
    num, samples = 8, 2
    out = _invoke_json(
        [
            "nll",
            "--run-dir",
            str(digits_run),
            "--data",
            "digits-images",
            "--method",
            "bound",
            "--num",
            str(num),
            "--bound-samples",
            str(samples),
            "--json",
        ]
    )
    assert out["discrete"] is True and out["dims"] == 64 and out["num"] == num
    assert math.isfinite(out["nll"]) and math.isfinite(out["bpd"])
    assert out["bpd"] == pytest.approx(out["nll"] / (64 * math.log(2)), rel=1e-12)
    # The same number from the library: the run's transform as the dequantizer, whose offset
    # sum log(1/scale) - D log K is part of the reported NLL.
    run = nd.load_run(str(digits_run))
    scale = 1.0 / run.transform.scale
    deq = nd.Dequantization(num_levels=17, scale=scale, shift=-run.transform.shift * scale)
    x = nd.load_dataset("digits-images", split="test", num=num)
    x = jnp.asarray(np.rint(x).astype(np.int32))
    bound, _ = nd.variational_bound(
        run.model,
        x,
        key=jr.fold_in(jr.key(0), 0),
        num_samples=samples,
        dequantization=deq,
        # The CLI's mesh (every device), so this call runs the function the CLI compiled.
        mesh=nd.data_mesh(),
        time_power=BOUND_TIME_POWER,
    )
    assert out["nll"] == pytest.approx(float(jnp.mean(bound.value)), rel=1e-10)
    offset = 64 * math.log(float(scale[0, 0, 0])) - 64 * math.log(17)
    assert deq.offset((8, 8, 1)) == pytest.approx(offset, rel=1e-12)


def test_digits_images_sample_plot(digits_run, tmp_path):
    out = _invoke_json(
        [
            "sample",
            "--run-dir",
            str(digits_run),
            "--num",
            "4",
            "--solver",
            "euler",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "s.npy"),
            "--plot",
            str(tmp_path / "grid.png"),
            "--json",
        ]
    )
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (4, 8, 8, 1)
    assert np.all(samples == np.rint(samples)) and samples.min() >= 0 and samples.max() <= 16
    png = (tmp_path / "grid.png").read_bytes()
    assert out["plot"] == str(tmp_path / "grid.png") and png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_train_on_idx_file(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 9, 9), dtype=np.uint8)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _write_idx(path, images)
    run_dir = tmp_path / "run"
    args = ["train", "--data", str(path), "--run-dir", str(run_dir), "--json", *TINY]
    # The deterministic linear model: the cheapest to compile, for both training and the ODE.
    summary = _invoke_json([*args, "--forward", "linear", "--volatility", "zero"])
    assert math.isfinite(summary["final_loss"])
    run = nd.load_run(str(run_dir))
    assert run.model.data_shape == (9, 9, 1) and run.num_levels == 256
    y = (images.astype(np.float64) + 0.5) / 256
    np.testing.assert_allclose(run.transform.shift, y.mean(), rtol=1e-12)
    # D = 81 > 64: the ODE NLL uses Hutchinson unless told otherwise.
    out = _invoke_json(
        ["nll", "--run-dir", str(run_dir), "--data", str(path), "--method", "ode"]
        + ["--solver", "euler", "--steps", "2", "--num", "4", "--json"]
    )
    assert out["trace"] == "hutchinson" and out["dims"] == 81 and math.isfinite(out["bpd"])
    assert out["bpd"] == pytest.approx(out["nll"] / (81 * math.log(2)), rel=1e-12)


@pytest.mark.slow
def test_train_on_cifar_batch(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    directory = tmp_path / "cifar-10-batches-bin"
    directory.mkdir()
    _write_cifar_batch(directory / "data_batch_1.bin", images, rng.integers(0, 10, 16))
    _write_cifar_batch(directory / "test_batch.bin", images[:4], rng.integers(0, 10, 4))
    run_dir = tmp_path / "run"
    summary = _invoke_json(
        ["train", "--data", str(directory), "--run-dir", str(run_dir), "--json", *TINY]
        + ["--forward", "linear", "--steps", "1"]
    )
    assert math.isfinite(summary["final_loss"])
    run = nd.load_run(str(run_dir))
    assert run.model.data_shape == (32, 32, 3) and run.num_levels == 256
    # Fitted on the training batch, not on test_batch.bin.
    y = (images.astype(np.float64) + 0.5) / 256
    np.testing.assert_allclose(run.transform.shift, y.mean(), rtol=1e-12)
    assert nd.load_dataset(str(directory), split="test").shape == (4, 32, 32, 3)


def test_vectors_stay_vectors(tmp_path):
    # Rank-2 float files are vectors: the MLP, as before.
    assert not nd.is_image_source("digits")
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=(10, 3)))
    assert not nd.is_image_source(str(tmp_path / "v.npy"))
    np.save(tmp_path / "im.npy", np.zeros((10, 4, 4), np.uint8))
    assert nd.is_image_source(str(tmp_path / "im.npy"))
    # Built abstractly: the network's type is the check, not its initial values.
    model = eqx.filter_eval_shape(nd.build_model, nd.ModelConfig(width=4, depth=1), (3,), jr.key(0))
    assert isinstance(model.predictor.network, nd.TimeConditionedMLP)


def test_offset_with_per_pixel_scale_by_hand():
    # log P(x) >= E log p(s) + sum_d log scale_d - D log K with s = scale (x + u)/K + shift.
    scale = np.full((2, 2, 1), 2.0)
    scale[0, 0, 0] = 4.0
    deq = nd.Dequantization(num_levels=4, scale=jnp.asarray(scale), shift=-1.0)
    expected = 3 * math.log(2.0) + math.log(4.0) - 4 * math.log(4)
    assert deq.offset((2, 2, 1)) == pytest.approx(expected, abs=1e-12)


# --- bad input ----------------------------------------------------------------------------------


def test_images_of_mixed_shapes(tmp_path):
    mixed = np.empty(2, dtype=object)
    mixed[0], mixed[1] = np.zeros((8, 8), np.uint8), np.zeros((7, 7), np.uint8)
    np.save(tmp_path / "mixed.npy", mixed, allow_pickle=True)
    _fails_cleanly(
        ["train", "--data", str(tmp_path / "mixed.npy"), "--run-dir", str(tmp_path / "r")],
        "mixed shapes",
    )
    assert not (tmp_path / "r").exists()


def test_image_values_outside_range(tmp_path, digits_run):
    np.save(tmp_path / "big.npy", np.full((4, 8, 8), 300, np.int16))
    _fails_cleanly(
        ["train", "--data", str(tmp_path / "big.npy"), "--run-dir", str(tmp_path / "r")],
        "0..255",
    )
    # Bytes are fine as images, but outside the 17 levels of the digits run being scored.
    np.save(tmp_path / "bytes.npy", np.full((4, 8, 8, 1), 200, np.uint8))
    _fails_cleanly(
        ["nll", "--run-dir", str(digits_run), "--data", str(tmp_path / "bytes.npy")],
        "num_levels=17",
    )
    # And images of another shape than the run's.
    np.save(tmp_path / "other.npy", np.zeros((4, 9, 9, 1), np.uint8))
    _fails_cleanly(
        ["nll", "--run-dir", str(digits_run), "--data", str(tmp_path / "other.npy")],
        "(8, 8, 1)",
    )


def test_truncated_idx_and_cifar(tmp_path):
    images = np.zeros((5, 8, 8), np.uint8)
    _write_idx(tmp_path / "x-idx3-ubyte", images)
    raw = (tmp_path / "x-idx3-ubyte").read_bytes()
    (tmp_path / "x-idx3-ubyte").write_bytes(raw[:-10])
    _fails_cleanly(
        ["train", "--data", str(tmp_path / "x-idx3-ubyte"), "--run-dir", str(tmp_path / "r")],
        "x-idx3-ubyte",
    )
    _write_cifar_batch(tmp_path / "data_batch_1.bin", np.zeros((2, 32, 32, 3)), [0, 1])
    raw = (tmp_path / "data_batch_1.bin").read_bytes()
    (tmp_path / "data_batch_1.bin").write_bytes(raw[:-100])
    _fails_cleanly(
        ["train", "--data", str(tmp_path / "data_batch_1.bin"), "--run-dir", str(tmp_path / "r")],
        "3073",
    )
    assert not (tmp_path / "r").exists()
