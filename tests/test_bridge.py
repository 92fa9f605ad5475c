"""Bridges: exact end points, a Gaussian-to-Gaussian bridge with the exact
posterior-mean predictor, the loss, the CLI (train --source, sample --source, bad input) and the
example in smoke mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from typer.testing import CliRunner

import nfdm_de as nd
from nfdm_de.cli.main import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _perturbed_bridge(key, dim=2):
    bridge = nd.neural_bridge(dim, width=8, depth=1, key=key)
    # Move the zero-initialised output layer away from zero so the network really acts.
    layer = bridge.network.output
    w = 0.5 * jr.normal(jr.fold_in(key, 1), layer.weight.shape)
    b = 0.5 * jr.normal(jr.fold_in(key, 2), layer.bias.shape)
    return eqx.tree_at(lambda m: (m.network.output.weight, m.network.output.bias), bridge, (w, b))


def test_end_points_exact(getkey):
    bridge = _perturbed_bridge(getkey())
    x, c, eps = (jr.normal(getkey(), (2,)) for _ in range(3))
    np.testing.assert_allclose(bridge.transform(eps, 0.0, x, c), x + bridge.delta * eps, atol=1e-12)
    np.testing.assert_allclose(bridge.transform(eps, 1.0, x, c), c + bridge.delta * eps, atol=1e-12)
    # ... and in between the network acts: F differs from the fixed bridge.
    fixed = nd.NeuralBridge(None, delta=bridge.delta, noise=bridge.noise)
    assert (
        jnp.max(jnp.abs(bridge.transform(eps, 0.5, x, c) - fixed.transform(eps, 0.5, x, c))) > 1e-3
    )
    # The conditioned process's inverse, log-density and velocity agree with the family.
    process = bridge.condition(c)
    z = process.transform(eps, 0.3, x)
    np.testing.assert_allclose(process.inverse(z, 0.3, x), eps, atol=1e-10)
    h = 1e-5
    fd = (bridge.transform(eps, 0.3 + h, x, c) - bridge.transform(eps, 0.3 - h, x, c)) / (2 * h)
    np.testing.assert_allclose(process.velocity(z, 0.3, x), fd, atol=1e-6)


class BridgeOracle(eqx.Module):
    """E[x | z_t = z, c] for target x ~ N(m0, S0) independent of c, under the fixed bridge
    z = (1 - t) x + t c + s(t) eps: E[x | z, c] = m0 + a S0 (a^2 S0 + s^2 I)^{-1} (z - a m0 - t c),
    a = 1 - t. Every conditional field is affine in x, so this predictor gives the exact marginal
    fields and the model's t = 0 marginal given c is N(m0, S0 + delta^2 I) for every c."""

    bridge: nd.NeuralBridge
    mean: jnp.ndarray
    cov: jnp.ndarray

    def __call__(self, z, t, source):
        t = jnp.asarray(t, z.dtype)
        mu_source, log_s = self.bridge.mean_and_log_scale(jnp.zeros_like(z), t, source)
        a, s = 1 - t, jnp.exp(log_s[0])
        marginal = a**2 * self.cov + s**2 * jnp.eye(z.shape[0], dtype=z.dtype)
        return self.mean + a * self.cov @ jnp.linalg.solve(marginal, z - a * self.mean - mu_source)


@pytest.mark.parametrize("sde", [False, True])
def test_gaussian_bridge_moves_source_to_target_moments(sde):
    m0, m1 = jnp.array([1.0, -0.5]), jnp.array([-2.0, 1.5])
    s0 = jnp.array([[0.5, 0.3], [0.3, 0.8]])
    s1 = jnp.array([[1.5, -0.4], [-0.4, 0.4]])
    bridge = nd.NeuralBridge(None, delta=0.05, noise=0.5)
    volatility = nd.ConstantVolatility(1.0) if sde else nd.ZeroVolatility()
    model = nd.BridgeModel(bridge, BridgeOracle(bridge, m0, s0), volatility, data_shape=(2,))
    n = 2000
    source = m1 + jr.normal(jr.key(1), (n, 2)) @ jnp.linalg.cholesky(s1).T
    solver = dfx.Euler() if sde else dfx.Tsit5()
    steps = 400 if sde else None
    out, _ = nd.bridge_sample(model, source, key=jr.key(2), solver=solver, steps=steps, sde=sde)
    target_cov = s0 + bridge.delta**2 * jnp.eye(2)
    # Mean within 4 standard errors per coordinate.
    se_mean = jnp.sqrt(jnp.diag(target_cov) / n)
    assert jnp.all(jnp.abs(out.mean(0) - m0) < 4 * se_mean), (out.mean(0), m0)
    # Covariance entries within 4 standard errors: Var(S_ij hat) = (S_ii S_jj + S_ij^2) / n.
    cov = jnp.cov(out.T)
    d = jnp.diag(target_cov)
    se_cov = jnp.sqrt((d[:, None] * d[None, :] + target_cov**2) / n)
    # Euler-Maruyama with 400 steps adds O(dt) bias; allow it one more standard error.
    k = 5 if sde else 4
    assert jnp.all(jnp.abs(cov - target_cov) < k * se_cov), (cov, target_cov)
    # The source moments are far from the target's: the test could fail.
    assert jnp.all(jnp.abs(source.mean(0) - m0) > 1.0)


def test_bridge_loss_zero_diffusion_for_true_target_and_trains(getkey):
    bridge = _perturbed_bridge(getkey())
    predictor = nd.bridge_predictor(2, width=8, depth=1, key=getkey())
    model = nd.BridgeModel(bridge, predictor, nd.LearnedVolatility(key=getkey()), data_shape=(2,))
    x, c = jr.normal(getkey(), (8, 2)), 3 + jr.normal(getkey(), (8, 2))
    # Compiled, as training runs it: op by op, each small operation would compile on its own.
    value, terms = eqx.filter_jit(nd.bridge_loss)(model, x, c, key=getkey())
    assert jnp.isfinite(value) and terms.prior == 0
    assert terms.reconstruction == pytest.approx(nd.bridge_reconstruction_nll(model))
    grads = eqx.filter_jit(eqx.filter_grad(lambda m: nd.bridge_loss(m, x, c, key=jr.key(0))[0]))(
        model
    )
    flat = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in flat)
    assert float(jnp.abs(grads.predictor.network.output.weight).max()) > 0
    with pytest.raises(ValueError, match="one shape"):
        nd.bridge_loss(model, x, c[:, :1], key=getkey())


TINY = ["--steps", "10", "--batch-size", "32", "--width", "8", "--depth", "1"]


def _fails_cleanly(args, match):
    result = runner.invoke(app, args)
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_cli_train_sample_and_bad_input(tmp_path):
    source_file = tmp_path / "source.npy"
    np.save(source_file, nd.load_dataset("eight-gaussians", split="test", num=40))
    np.save(tmp_path / "wide.npy", np.zeros((10, 3)))
    run_dir = tmp_path / "bridge"
    result = runner.invoke(
        app,
        ["train", "--data", "two-moons", "--source", str(source_file), *TINY,
         "--run-dir", str(run_dir), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["source"] == str(source_file)
    run = nd.load_run(str(run_dir))
    assert isinstance(run.model, nd.BridgeModel) and run.source_transform is not None
    # The stored source transform standardises the source's training data.
    z = run.source_transform.to_model(jnp.asarray(np.load(source_file)))
    np.testing.assert_allclose(np.mean(z, 0), 0, atol=1e-8)
    out = tmp_path / "mapped.npy"
    result = runner.invoke(
        app,
        ["sample", "--run-dir", str(run_dir), "--source", str(source_file), "--steps", "8",
         "--out", str(out), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    mapped = np.load(out)
    assert mapped.shape == (40, 2) and np.all(np.isfinite(mapped))
    # A built-in set as the source: --num points of its test split, not the whole training set.
    result = runner.invoke(
        app,
        ["sample", "--run-dir", str(run_dir), "--source", "eight-gaussians", "--num", "12",
         "--steps", "8", "--out", str(out), "--plot", str(tmp_path / "bridge.svg"), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert np.load(out).shape == (12, 2) and json.loads(result.stdout.splitlines()[-1])["num"] == 12
    # The figure shows the source points, the mapped points and their pairings.
    figure = (tmp_path / "bridge.svg").read_text()
    assert all(label in figure for label in ("source points", "mapped points", "pairings"))

    _fails_cleanly(
        ["train", "--data", "two-moons", "--source", str(tmp_path / "wide.npy"), *TINY,
         "--run-dir", str(tmp_path / "bad")],
        "a bridge needs one dimension",
    )  # fmt: skip
    assert not (tmp_path / "bad").exists()
    _fails_cleanly(
        ["train", "--data", "two-moons", "--source", str(tmp_path / "nope.npy"), *TINY,
         "--run-dir", str(tmp_path / "bad")],
        "does not exist",
    )  # fmt: skip
    base = ["sample", "--run-dir", str(run_dir), "--steps", "4", "--out", str(tmp_path / "x.npy")]
    _fails_cleanly([*base, "--source", str(tmp_path / "wide.npy")], "3 dimensions")
    _fails_cleanly([*base, "--source", str(tmp_path / "nope.npy")], "does not exist")
    _fails_cleanly(base, "give --source")
    _fails_cleanly(["nll", "--run-dir", str(run_dir), "--data", "two-moons"], "holds a bridge")
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.slow
def test_example_smoke(tmp_path):
    out = tmp_path / "bridge.png"
    completed = subprocess.run(
        [sys.executable, "examples/bridge_2d.py", "--smoke", "--out", str(out),
         "--run-dir", str(tmp_path / "run")],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert out.stat().st_size > 0 and "energy distance" in completed.stdout


def test_settings_a_bridge_cannot_use_are_refused():
    # The bridge family's networks are the reference MLPs of width x depth: other network
    # settings have no counterpart and are refused by name rather than ignored.
    from nfdm_de._bridge import build_bridge_model

    config = nd.ModelConfig(width=8, depth=1, input_octaves=2, forward_width=16)
    with pytest.raises(ValueError, match="does not use forward_width, input_octaves"):
        eqx.filter_eval_shape(build_bridge_model, config, (2,), jr.key(0))
    model = eqx.filter_eval_shape(
        build_bridge_model, nd.ModelConfig(width=8, depth=1), (2,), jr.key(0)
    )
    assert isinstance(model, nd.BridgeModel) and model.delta == nd.ModelConfig().delta
