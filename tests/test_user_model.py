"""`nd.train` on a user-built NFDM: checkpoints, exact resume, EMA and the likelihood phase, and
loading it back with `nd.load_run(run_dir, like=model)`."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jaxtyping import Array, Float
from typer.testing import CliRunner

import nfdm_de as nd
from nfdm_de.cli.main import app


class ScaledInterpolant(nd.AbstractGaussianForwardProcess):
    """A forward process the library does not have: the linear mean path with a learned
    per-dimension log-scale correction t (1 - t) a."""

    correction: Float[Array, " dim"]
    delta: float = 0.01

    def mean_and_log_scale(self, x, t):
        t = jnp.asarray(t, x.dtype)
        base = jnp.log(t + (1 - t) * self.delta)
        return (1 - t) * x, base + t * (1 - t) * self.correction.astype(x.dtype)


def build(key, dim=2):
    k_pred, k_vol = jr.split(key)
    return nd.NFDM(
        ScaledInterpolant(jnp.zeros(dim)),
        nd.mlp_predictor(dim, width=8, depth=1, key=k_pred),
        nd.LearnedVolatility(key=k_vol),
    )


CONFIG = nd.TrainConfig(
    data="two-moons",
    optim=nd.OptimConfig(lr=3e-3, warmup=2, ema_decay=0.9),
    steps=8,
    likelihood_steps=2,
    batch_size=32,
    num_train=512,
    save_every=3,
    log_every=1,
)


def _leaves(model):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("user") / "straight"
    result = nd.train(CONFIG, str(run_dir), model=build(jr.key(0)))
    return run_dir, result


def test_user_model_trains_through_both_phases_and_loads_like_itself(straight):
    run_dir, result = straight
    assert result.steps == 10 and np.isfinite(result.final_loss)
    run = nd.load_run(str(run_dir), like=build(jr.key(5)))  # any values: replaced
    assert run.step == 10 and isinstance(run.model.forward, ScaledInterpolant)
    # The forward process trained: its correction moved away from zero.
    assert float(jnp.max(jnp.abs(run.raw_model.forward.correction))) > 0
    # EMA and raw weights differ, and the likelihood phase ran (logged as such).
    assert any(
        np.max(np.abs(a - b)) > 0
        for a, b in zip(_leaves(run.model), _leaves(run.raw_model), strict=True)
    )
    phases = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert '"phase": "likelihood"' in phases[-1]


def test_user_model_resumes_exactly(straight, tmp_path):
    run_dir, _ = straight
    stopped = tmp_path / "stopped"
    nd.train(CONFIG, str(stopped), model=build(jr.key(0)), stop_at=3)
    nd.train(CONFIG, str(stopped), model=build(jr.key(9)), resume=True)
    a, b = (
        nd.load_run(str(stopped), like=build(jr.key(0))),
        nd.load_run(str(run_dir), like=build(jr.key(0))),
    )
    for x, y in zip(_leaves((a.model, a.raw_model)), _leaves((b.model, b.raw_model)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_user_model_runs_need_their_model(straight, tmp_path):
    run_dir, _ = straight
    with pytest.raises(ValueError, match="user-built model") as error:
        nd.load_run(str(run_dir))
    assert "like=model" in str(error.value)
    with pytest.raises(ValueError, match="user-built model"):
        nd.train(CONFIG, str(run_dir), resume=True)
    result = CliRunner().invoke(app, ["nll", "--run-dir", str(run_dir), "--data", "two-moons"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "user-built model" in lines[0]


def test_user_model_bad_input(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        nd.train(CONFIG, str(tmp_path / "a"), model=build(jr.key(0), dim=3))
    bridge = dataclasses.replace(CONFIG, source="eight-gaussians")
    with pytest.raises(ValueError, match="bridge"):
        nd.train(bridge, str(tmp_path / "b"), model=build(jr.key(0)))
    # Not an NFDM: the ValueError names it (under the tests' runtime type checks, jaxtyping's
    # TypeError comes first).
    with pytest.raises((ValueError, TypeError), match="NFDM"):
        predictor = nd.mlp_predictor(2, key=jr.key(0))
        nd.train(CONFIG, str(tmp_path / "c"), model=predictor)  # pyright: ignore[reportArgumentType]
    assert not any((tmp_path / name).exists() for name in "abc")
