"""The likelihood phase: maximum likelihood through the probability-flow ODE.

Oracles (float64): the Gaussian oracle model's exact t = 0 density N(m, S + delta^2 I) gives the
ODE NLL and its gradient with respect to m in closed form; a neural model's gradient is checked
against central finite differences. Then the phase inside `nd.train`: it lowers the held-out ODE
NLL, resumes bit-identically across the phase boundary, and refuses what it cannot do.
"""

import dataclasses
import json

import diffrax as dfx
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from gaussian_oracle import FORWARDS, gaussian_data, gaussian_log_prob, oracle_model
from test_train import _bit_identical

import nfdm_de as nd

TIGHT = nd.LikelihoodSolve(tol=1e-10, max_steps=4096)

# Compiled once per model structure, data shape and settings: the gradient checks below share
# one compiled ODE NLL gradient of the `neural` model at TIGHT.
_nll_grad = eqx.filter_jit(eqx.filter_grad(nd.ode_nll_loss))


@jax.jit
def _along(tree, direction):
    """The inner product of a gradient with a direction, summed over the leaves."""
    pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(direction), strict=True)
    return sum(jnp.vdot(g, d) for g, d in pairs)


@eqx.filter_jit
def _nll_along(model, direction, h, x, settings):
    """The ODE NLL at the parameters moved by `h` along `direction` (`h` traced: one compile)."""
    moved = eqx.apply_updates(model, jax.tree.map(lambda d: h * d, direction))
    return nd.ode_nll_loss(moved, x, settings)


@eqx.filter_jit
def _small_model_and_direction(key):
    """A small NFDM on 2-D data with standard normal noise of scale 0.3 added to every parameter
    (its zero-initialised output layers would hide terms), and a standard normal direction in
    its parameter space. Compiled: a single draw each instead of one per parameter shape."""
    model_key, noise_key, direction_key = jr.split(key, 3)
    config = nd.ModelConfig(width=8, depth=1, forward_width=8, forward_depth=1)
    params, static = eqx.partition(nd.build_model(config, (2,), model_key), eqx.is_inexact_array)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    moved = unravel(flat + 0.3 * jr.normal(noise_key, flat.shape, flat.dtype))
    return eqx.combine(moved, static), unravel(jr.normal(direction_key, flat.shape, flat.dtype))


@pytest.fixture(scope="module")
def neural():
    """The small NFDM, six points and a direction, shared by the gradient checks (and so is
    their compiled code)."""
    key, x_key = jr.split(jr.key(1))
    model, direction = _small_model_and_direction(key)
    return model, jr.normal(x_key, (6, 2)), direction


@pytest.mark.parametrize("forward_name", ["linear", "vp"])
@pytest.mark.parametrize("dim", [2, 5])
def test_ode_nll_matches_closed_form(forward_name, dim, getkey):
    mean, cov = gaussian_data(getkey(), dim)
    forward = FORWARDS[forward_name]()
    model = oracle_model(forward, mean, cov)
    marginal_cov = cov + forward.delta**2 * jnp.eye(dim)
    x = jr.multivariate_normal(getkey(), mean, marginal_cov, (10,))
    nll, num_steps = nd.ode_nll(model, x, TIGHT)
    expected = -gaussian_log_prob(x, mean, marginal_cov)
    assert np.max(np.abs(np.asarray(nll) - expected)) < 1e-6
    assert int(num_steps) > 0


def test_ode_nll_gradient_matches_closed_form(getkey):
    # d/dm mean_i -log N(x_i; m, C) = -C^{-1} (mean(x) - m): the gradient flows through the
    # predictor's parameters and every solver step.
    dim = 3
    mean, cov = gaussian_data(getkey(), dim)
    forward = FORWARDS["linear"]()
    model = oracle_model(forward, mean, cov)
    marginal_cov = np.asarray(cov + forward.delta**2 * jnp.eye(dim))
    x = jr.multivariate_normal(getkey(), mean + 0.3, marginal_cov, (16,))
    grads = _nll_grad(model, x, TIGHT)
    expected = -np.linalg.solve(marginal_cov, np.asarray(x).mean(0) - np.asarray(mean))
    np.testing.assert_allclose(np.asarray(grads.predictor.mean), expected, rtol=1e-5, atol=1e-7)


def test_ode_nll_gradient_matches_finite_differences(neural):
    model, x, direction = neural
    analytic = _along(_nll_grad(model, x, TIGHT), direction)

    def loss_along(h):
        return _nll_along(model, direction, jnp.asarray(h), x, TIGHT)

    # Central differences with Richardson extrapolation: O(h^4) truncation error.
    h = 1e-4

    def central(step):
        return (loss_along(step) - loss_along(-step)) / (2 * step)

    numeric = (4 * central(h / 2) - central(h)) / 3
    assert abs(float(analytic)) > 1e-3  # a direction the loss actually changes along
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-5)


@eqx.filter_jit
def _hutchinson_directional(model, x, settings, direction, keys):
    """The ODE NLL gradient along `direction`, one Hutchinson solve per key."""

    def one(key):
        return _along(eqx.filter_grad(nd.ode_nll_loss)(model, x, settings, key=key), direction)

    return jax.vmap(one)(keys)


def test_hutchinson_nll_and_gradient_are_unbiased(neural, getkey):
    # One Rademacher probe per solve: over many keys, the NLL's mean matches the closed form and
    # the gradient's mean (along a random direction) the exact-trace gradient, each within 4
    # standard errors of the key-to-key spread, which is itself non-zero.
    settings = nd.LikelihoodSolve(tol=1e-8, max_steps=4096, trace=nd.Hutchinson())
    mean, cov = gaussian_data(getkey(), 4)
    forward = FORWARDS["vp"]()
    oracle = oracle_model(forward, mean, cov)
    marginal_cov = cov + forward.delta**2 * jnp.eye(4)
    x = jr.multivariate_normal(getkey(), mean, marginal_cov, (3,))
    keys = jr.split(getkey(), 256)
    nll = jax.vmap(lambda k: nd.ode_nll(oracle, x, settings, key=k)[0])(keys)
    errors = np.asarray(nll).mean(axis=1) - (-gaussian_log_prob(x, mean, marginal_cov)).mean()
    stderr = errors.std(ddof=1) / np.sqrt(len(errors))
    assert stderr > 1e-3 and abs(errors.mean()) < 4 * stderr

    model, x, direction = neural
    exact = float(_along(_nll_grad(model, x, TIGHT), direction))
    estimates = np.asarray(_hutchinson_directional(model, x, settings, direction, keys[:32]))
    stderr = estimates.std(ddof=1) / np.sqrt(len(estimates))
    assert stderr > 0 and abs(estimates.mean() - exact) < 4 * stderr
    with pytest.raises(ValueError, match="needs a `key`"):
        nd.ode_nll(model, x, settings)


def test_unfinished_solve_is_nan_and_bad_input_raises(getkey):
    mean, cov = gaussian_data(getkey(), 2)
    model = oracle_model(FORWARDS["linear"](), mean, cov)
    x = jr.normal(getkey(), (4, 2))
    nll, _ = nd.ode_nll(model, x, nd.LikelihoodSolve(tol=1e-10, max_steps=2))
    assert np.all(np.isnan(np.asarray(nll)))
    with pytest.raises(ValueError, match="vector data only"):
        nd.ode_nll(model, x[:, :1], TIGHT)
    with pytest.raises(ValueError, match="tol"):
        nd.LikelihoodSolve(tol=0.0)
    with pytest.raises(ValueError, match="max_steps"):
        nd.LikelihoodSolve(max_steps=0)
    with pytest.raises(ValueError, match="not a supported ODE solver"):
        nd.LikelihoodSolve(solver=dfx.SRA1())


# --- the phase inside nd.train --------------------------------------------------------------

PHASED = nd.TrainConfig(
    data="two-moons",
    model=nd.ModelConfig(width=16, depth=2, forward_width=8, forward_depth=1),
    optim=nd.OptimConfig(lr=3e-3, warmup=10, ema_decay=0.9),
    steps=30,
    likelihood_steps=10,
    batch_size=64,
    num_train=1024,
    save_every=5,
    log_every=5,
)


# The phase on 16-row batches with Hutchinson's trace: cheaper steps than PHASED's.
SMALL_BATCHES = dataclasses.replace(
    PHASED, likelihood_batch=16, likelihood_trace=nd.TraceChoice.HUTCHINSON
)


@pytest.fixture(scope="module")
def phased_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("phased")
    nd.train(PHASED, str(run_dir))
    return run_dir


def test_phase_runs_logs_and_resumes_bit_identically(phased_run, tmp_path):
    records = [json.loads(line) for line in (phased_run / "metrics.jsonl").open()]
    phases = [r["phase"] for r in records]
    assert phases == ["simulation-free"] * 6 + ["likelihood"] * 2
    assert [r["step"] for r in records][-1] == 40
    # Likelihood-phase rows report the ODE NLL as the loss, the bound's terms (the phase keeps
    # a weight on the bound) and the phase's own learning rate.
    reconstruction = nd.load_run(str(phased_run)).model.reconstruction_nll()
    for r in records[6:]:
        assert np.isfinite(r["loss"]) and r["diffusion"] > 0
        assert r["reconstruction"] == pytest.approx(reconstruction, rel=1e-5)
    # The automatic phase rate for 2-D data.
    assert records[6]["lr"] <= nd.load_run(str(phased_run)).config.likelihood_lr == 3e-3
    # Stop at the boundary and inside the phase; resuming gives the straight run exactly.
    nd.train(PHASED, str(tmp_path), stop_at=30)
    nd.train(PHASED, str(tmp_path), resume=True, stop_at=35)
    nd.train(PHASED, str(tmp_path), resume=True)
    straight, resumed = nd.load_run(str(phased_run)), nd.load_run(str(tmp_path))
    assert straight.step == resumed.step == 40
    assert _bit_identical(straight.model, resumed.model)
    assert _bit_identical(straight.raw_model, resumed.raw_model)


def test_phase_lowers_held_out_ode_nll(tmp_path):
    # A finished run, then the same run resumed with a likelihood phase (fine-tuning an existing
    # run): its held-out ODE NLL, paired over the same points, falls by > 4 standard errors.
    base = dataclasses.replace(PHASED, steps=150, likelihood_steps=0, save_every=150)
    nd.train(base, str(tmp_path))
    x = jnp.asarray(nd.load_dataset("two-moons", split="test", num=400))

    def held_out_nll():
        run = nd.load_run(str(tmp_path))
        estimate, _ = nd.log_likelihood(run.model, run.transform.to_model(x), rtol=1e-6, atol=1e-6)
        return run.step, -np.asarray(estimate.value)

    step_before, before = held_out_nll()
    tuned = dataclasses.replace(base, likelihood_steps=60, likelihood_lr=3e-3)
    nd.train(tuned, str(tmp_path), resume=True)
    step_after, after = held_out_nll()
    assert (step_before, step_after) == (150, 210)
    difference = before - after
    stderr = difference.std(ddof=1) / np.sqrt(len(difference))
    assert difference.mean() > 4 * stderr > 0


def test_phase_objective_is_the_ode_nll_plus_the_weighted_bound():
    # One phase step with plain gradient descent moves the parameters by -lr x the objective's
    # gradient, so the step is affine in the bound's weight w: (update(0) + update(1)) / 2 =
    # update(1/2), to rounding (float64); w = 0 is the ODE NLL's own gradient step, and the
    # bound changes the step. An oracle by linearity, independent of how the step draws keys.
    with jax.enable_x64(True):
        config = dataclasses.replace(PHASED, steps=1, likelihood_steps=1)
        state = nd.init_train_state(config, (2,))
        batch = jnp.asarray(nd.load_dataset("two-moons", split="train", num=16), jnp.float64)
        descent = optax.identity()  # the raw gradient: train_step applies -lr itself
        solve = nd.LikelihoodSolve(tol=1e-6)
        state = eqx.tree_at(
            lambda s: s.opt_state,
            state,
            descent.init(eqx.filter(state.model, eqx.is_inexact_array)),
        )

        @eqx.filter_jit
        def steps_and_gradient(state, batch):
            # One compilation for the three steps and the gradient: they share most of their work.
            def update(weight):
                new, breakdown, _ = _descent_phase_step(
                    state, batch, descent, solve, time_power=3.0, bound_weight=weight
                )
                moved = jax.tree.map(
                    lambda a, b: a - b,
                    eqx.filter(new.model, eqx.is_inexact_array),
                    eqx.filter(state.model, eqx.is_inexact_array),
                )
                return jnp.concatenate([jnp.ravel(m) for m in jax.tree.leaves(moved)]), breakdown

            grads = eqx.filter_grad(nd.ode_nll_loss)(state.model, batch, solve, key=None)
            return update(0.0), update(1.0), update(0.5), grads

        (zero, nll_only), (one, with_bound), (half, _), grads = steps_and_gradient(state, batch)
        # w = 0 is the ODE NLL's own gradient step (exact trace: no key involved).
        nll_step = jnp.concatenate([-1e-2 * jnp.ravel(g) for g in jax.tree.leaves(grads)])
        np.testing.assert_allclose(zero, nll_step, rtol=0, atol=1e-12)
        assert jnp.max(jnp.abs(one - zero)) > 1e-6
        np.testing.assert_allclose(half, (zero + one) / 2, rtol=0, atol=1e-12)
        # Both report the same ODE NLL; only the weighted one reports the bound's terms.
        assert float(nll_only.total) == pytest.approx(float(with_bound.total), rel=1e-12)
        assert float(nll_only.diffusion) == 0 and float(with_bound.diffusion) > 0


def _descent_phase_step(state, batch, descent, solve, **options):
    """One likelihood-phase `train_step` on continuous data: step 3, learning rate 1e-2."""
    return nd.train_step(
        state,
        batch,
        jnp.asarray(3),
        jnp.asarray(1e-2),
        descent,
        curvature_weight=0.0,
        ema_decay=0.9,
        num_levels=None,
        likelihood=solve,
        **options,
    )


@pytest.mark.slow
def test_phase_step_reaches_a_neural_flow():
    # The phase differentiates the ODE NLL through a NeuralFlow's velocity and score (its
    # splines, their inverse and their time derivative). One phase step of plain gradient
    # descent on an NFDM with a two-layer coupling flow: its loss is the ODE NLL, its gradient is
    # finite, the step's length is lr x the gradient's norm, and it moves the couplings' output
    # layers (zero at initialisation). Slow: the step takes ~30 s to compile even at this size.
    model_key, flow_key = jr.split(jr.key(2))
    config = nd.ModelConfig(width=8, depth=1, forward_width=8, forward_depth=1)
    base = nd.build_model(config, (2,), model_key)
    flow = nd.neural_flow(2, width=8, depth=1, num_layers=2, unroll=False, key=flow_key)
    model = nd.NFDM(flow, base.predictor, base.volatility, data_shape=(2,))
    descent = optax.identity()  # the raw gradient: train_step applies -lr itself
    state = nd.init_train_state(dataclasses.replace(PHASED, model=config), (2,))
    state = eqx.tree_at(
        lambda s: (s.model, s.ema_model, s.opt_state),
        state,
        (model, model, descent.init(eqx.filter(model, eqx.is_inexact_array))),
    )
    batch = jnp.asarray(nd.load_dataset("two-moons", split="train", num=16), jnp.float64)
    solve = nd.LikelihoodSolve()

    @eqx.filter_jit
    def step(state, batch):
        new, breakdown, grad_norm = _descent_phase_step(state, batch, descent, solve)
        return new.model, breakdown, grad_norm, nd.ode_nll_loss(state.model, batch, solve)

    new, breakdown, grad_norm, nll = step(state, batch)
    assert np.isfinite(float(nll))
    assert float(breakdown.total) == pytest.approx(float(nll), rel=1e-12)
    moved = jax.tree.map(
        lambda a, b: np.asarray(a - b),
        eqx.filter(new, eqx.is_inexact_array),
        eqx.filter(model, eqx.is_inexact_array),
    )
    norm = np.sqrt(sum(np.sum(m**2) for m in jax.tree.leaves(moved)))
    assert np.isfinite(float(grad_norm))
    assert norm == pytest.approx(1e-2 * float(grad_norm), rel=1e-9)
    assert np.max(np.abs(moved.forward.conditioners.output.weight)) > 0


def test_phase_with_small_hutchinson_batches_resumes_bit_identically(phased_run, tmp_path):
    nd.train(SMALL_BATCHES, str(tmp_path / "straight"))
    nd.train(SMALL_BATCHES, str(tmp_path / "resumed"), stop_at=35)
    nd.train(SMALL_BATCHES, str(tmp_path / "resumed"), resume=True)
    straight = nd.load_run(str(tmp_path / "straight"))
    resumed = nd.load_run(str(tmp_path / "resumed"))
    full = nd.load_run(str(phased_run))
    assert straight.step == resumed.step == 40
    assert _bit_identical(straight.raw_model, resumed.raw_model)
    # The first phase is the same run; only the likelihood steps saw the 16-row batches.
    leaves = lambda run: jax.tree.leaves(eqx.filter(run.raw_model, eqx.is_inexact_array))
    pairs = zip(leaves(straight), leaves(full), strict=True)
    assert any(not np.array_equal(a, b) for a, b in pairs)
    with pytest.raises(ValueError, match="likelihood_batch"):
        dataclasses.replace(PHASED, likelihood_batch=0)
    with pytest.raises(ValueError, match="must not exceed `batch_size`"):
        dataclasses.replace(PHASED, likelihood_batch=65)
    with pytest.raises(ValueError, match="unknown likelihood_trace 'exakt'"):
        nd.update_config(PHASED, {"likelihood_trace": "exakt"})


def test_phase_refuses_what_it_cannot_do(phased_run, tmp_path):
    with pytest.raises(ValueError, match="likelihood_steps"):
        dataclasses.replace(PHASED, likelihood_steps=-1)
    with pytest.raises(ValueError, match="likelihood_lr"):
        dataclasses.replace(PHASED, likelihood_lr=0.0)
    with pytest.raises(ValueError, match="likelihood_tol"):
        dataclasses.replace(PHASED, likelihood_tol=1.5)
    for weight in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="likelihood_bound_weight"):
            dataclasses.replace(PHASED, likelihood_bound_weight=weight)
    with pytest.raises(ValueError, match="vector data"):
        nd.train(dataclasses.replace(PHASED, data="digits-images"), str(tmp_path / "images"))
    with pytest.raises(ValueError, match="bridge"):
        nd.train(dataclasses.replace(PHASED, source="eight-gaussians"), str(tmp_path / "bridge"))
    assert not (tmp_path / "images").exists() and not (tmp_path / "bridge").exists()
    # Once the phase has begun, the first phase's length is fixed.
    with pytest.raises(ValueError, match="cannot change --steps"):
        nd.train(dataclasses.replace(PHASED, steps=35), str(phased_run), resume=True)


def test_automatic_phase_settings_follow_the_data():
    auto = nd.TrainConfig(steps=3000)
    assert auto.likelihood_steps is None and auto.likelihood_trace is nd.TraceChoice.AUTO
    resolve = nd.resolve_likelihood_phase
    two_d = resolve(auto, (2,), discrete=False)
    assert (two_d.likelihood_steps, two_d.likelihood_trace) == (200, nd.TraceChoice.EXACT)
    ten_d = resolve(auto, (10,), discrete=False)
    assert (ten_d.likelihood_steps, ten_d.likelihood_trace) == (200, nd.TraceChoice.HUTCHINSON)
    # The phase's rate: 3e-3 up to 4-D, 1e-2 above.
    rates = [resolve(auto, (d,), discrete=False).likelihood_lr for d in (2, 4, 5, 8, 16)]
    assert rates == [3e-3, 3e-3, 1e-2, 1e-2, 1e-2]
    assert resolve(dataclasses.replace(auto, steps=40), (2,), discrete=False).likelihood_steps == 2
    # No phase where it does not apply or is too costly; the (moot) trace is left as given.
    off = [
        (auto, (64,), False),  # too many dimensions
        (auto, (1, 8, 8), False),  # images
        (auto, (2,), True),  # integer-valued data
        (dataclasses.replace(auto, source="rings"), (2,), False),  # a bridge
        (nd.update_config(auto, {"curvature": 1.0}), (2,), False),  # NFDM-OT
    ]
    for config, shape, discrete in off:
        resolved = resolve(config, shape, discrete=discrete)
        assert resolved == dataclasses.replace(config, likelihood_steps=0), (shape, discrete)
    # Explicit settings are kept as given.
    explicit = dataclasses.replace(
        auto, likelihood_steps=7, likelihood_trace=nd.TraceChoice.EXACT, likelihood_lr=5e-4
    )
    assert resolve(explicit, (10,), discrete=False) == explicit
    with pytest.raises(ValueError, match="still automatic"):
        _ = auto.total_steps


def test_default_config_trains_with_a_phase_and_stores_it(phased_run, tmp_path):
    # `phased_run` first: the same shapes, so this run reuses its compiled steps.
    automatic = dataclasses.replace(
        PHASED, likelihood_steps=None, likelihood_trace=nd.TraceChoice.AUTO
    )
    messages = []
    result = nd.train(automatic, str(tmp_path), log=messages.append)
    assert "30 simulation-free, then 2 likelihood-phase steps with the exact trace" in messages[0]
    stored = nd.read_run_config(str(tmp_path))
    # A fifteenth of the 30 simulation-free steps, exact trace in 2-D: resolved in the run's
    # config.
    assert (stored.likelihood_steps, stored.likelihood_trace) == (2, nd.TraceChoice.EXACT)
    assert result.steps == nd.load_run(str(tmp_path)).step == 32
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert records[-1]["phase"] == "likelihood" and records[-1]["step"] == 32


def test_phase_divergence_names_the_phase_and_keeps_the_last_good_checkpoint(tmp_path):
    # An absurd rate in the likelihood phase: the next solve blows up (or runs out of steps).
    # The phase of SMALL_BATCHES (compiled by the test that resumes it): a cheaper failing solve.
    nd.train(dataclasses.replace(SMALL_BATCHES, likelihood_steps=0), str(tmp_path))
    absurd = dataclasses.replace(SMALL_BATCHES, likelihood_steps=20, likelihood_lr=1e4)
    with pytest.raises(nd.TrainingDiverged, match="likelihood-lr"):
        nd.train(absurd, str(tmp_path), resume=True)
    assert nd.load_run(str(tmp_path)).step == 30  # the last good checkpoint is untouched
