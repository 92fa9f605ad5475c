"""Training: model construction, schedule, EMA, loss falls, exact resume, divergence."""

import dataclasses
import functools
import json
import math

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import nfdm_de as nd

# One tiny configuration shared by the tests (and the CLI tests), so the step compiles once.
TINY = nd.TrainConfig(
    data="eight-gaussians",
    model=nd.ModelConfig(width=16, depth=1),
    optim=nd.OptimConfig(lr=3e-3, warmup=5, ema_decay=0.9, weight_decay=0.01),
    steps=40,
    batch_size=32,
    num_train=512,
    save_every=10,
    log_every=10,
    likelihood_steps=0,  # the simulation-free loop only; the phase has its own tests
)


def _leaves(tree):
    return jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))


def _bit_identical(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


@pytest.mark.parametrize("forward", list(nd.ForwardChoice))
@pytest.mark.parametrize("volatility", list(nd.VolatilityChoice))
def test_build_model_every_choice(forward, volatility, getkey):
    learnable = forward in (
        nd.ForwardChoice.NEURAL_GAUSSIAN,
        nd.ForwardChoice.LEARNED_SCHEDULE,
        nd.ForwardChoice.NEURAL_FLOW,
    )
    config = nd.ModelConfig(forward=forward, volatility=volatility, width=8, depth=1)
    # Built abstractly (every construction step traced, no initial values computed): the checks
    # are on the model's type and structure, not its numbers.
    build = functools.partial(eqx.filter_eval_shape, nd.build_model)
    if volatility is nd.VolatilityChoice.ZERO and learnable:
        with pytest.raises(ValueError, match="curvature"):
            build(config, (3,), getkey())
        config = dataclasses.replace(config, curvature=0.5)
    model = build(config, (3,), getkey())
    assert isinstance(model, nd.NFDM) and model.data_shape == (3,)
    assert model.is_deterministic == (volatility is nd.VolatilityChoice.ZERO)


def test_build_model_rejects_bad_shapes(getkey):
    with pytest.raises(ValueError, match="vector data"):
        nd.build_model(nd.ModelConfig(), (2, 2), getkey())


def test_config_validation_and_round_trip():
    for bad in (dict(steps=0), dict(batch_size=0), dict(steps=-3), dict(keep=0)):
        with pytest.raises(ValueError, match="positive integer"):
            nd.TrainConfig(**bad)
    with pytest.raises(ValueError, match="`steps` must be int; got 'x'"):
        nd.update_config(TINY, {"steps": "x"})
    updated = nd.update_config(TINY, {"forward": "linear", "lr": 1, "steps": 7})
    assert updated.model.forward is nd.ForwardChoice.LINEAR and updated.optim.lr == 1.0
    assert updated.steps == 7 and updated.model.width == TINY.model.width
    with pytest.raises(ValueError, match="unknown forward 'flow'"):
        nd.TrainConfig.from_dict({"model": {"forward": "flow"}})
    with pytest.raises(ValueError, match="unknown config key"):
        nd.TrainConfig.from_dict({"stepz": 3})
    assert nd.TrainConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY


def test_learning_rate_schedule():
    optim = nd.OptimConfig(lr=1.0, warmup=10, final_lr_fraction=0.1)
    cosine = nd.learning_rate_schedule(optim, 110)
    assert cosine(0) == 0 and math.isclose(cosine(5), 0.5) and math.isclose(cosine(10), 1.0)
    assert math.isclose(cosine(60), 0.55) and math.isclose(cosine(110), 0.1)
    assert math.isclose(cosine(500), 0.1)
    constant = nd.learning_rate_schedule(
        dataclasses.replace(optim, schedule=nd.ScheduleChoice.CONSTANT), 110
    )
    assert math.isclose(constant(5), 0.5) and constant(10) == constant(100) == 1.0


def test_optimizer_is_clipped_adamw(getkey):
    """make_optimizer then -lr * update equals optax's clip + adamw, over several steps."""
    import optax

    params = {"w": jax.random.normal(getkey(), (3, 4)), "b": jnp.ones(4)}
    ours = nd.make_optimizer(TINY.optim)
    reference = optax.chain(
        optax.clip_by_global_norm(TINY.optim.clip),
        optax.adamw(0.01, weight_decay=TINY.optim.weight_decay),
    )
    p_ours, p_ref = params, params
    s_ours, s_ref = ours.init(params), reference.init(params)
    for _ in range(3):
        grads = jax.tree.map(lambda a: 5.0 * jax.random.normal(getkey(), a.shape), params)
        u_ours, s_ours = ours.update(grads, s_ours, p_ours)
        p_ours = optax.apply_updates(p_ours, jax.tree.map(lambda u: -0.01 * u, u_ours))
        # optax's Adam raises a Python float to its int32 step count, which strict promotion
        # refuses; `make_optimizer` scopes the same, so `ours` runs strict.
        with jax.numpy_dtype_promotion("standard"):
            u_ref, s_ref = reference.update(grads, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u_ref)
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def _step_inputs(config):
    """A fresh state of `config`, a batch and the step options, as `train` passes them (the state
    replicated and the batch sharded over the data mesh, the run's time power): the steps the
    tests below compile for TINY are the ones `train(TINY, ...)` compiles."""
    mesh = nd.data_mesh()
    state = nd.replicate(nd.init_train_state(config, (2,)), mesh)
    batch = nd.shard_batch(nd.load_dataset("eight-gaussians", num=config.batch_size), mesh)
    options = dict(
        curvature_weight=0.0,
        ema_decay=config.optim.ema_decay,
        num_levels=None,
        time_power=config.model.time_power,
    )
    return state, batch, options


def test_step_ema(getkey):
    """After one step from initialisation the EMA is d * init + (1 - d) * new with the warmed-up
    decay d = min(ema_decay, (1 + 0) / (10 + 0)) = 0.1."""
    state, batch, options = _step_inputs(TINY)
    new, breakdown, grad_norm = nd.train_step(
        state,
        batch,
        jnp.asarray(0),
        jnp.asarray(0.01, batch.dtype),
        nd.make_optimizer(TINY.optim),
        **options,
    )
    assert np.isfinite(float(breakdown.total)) and float(grad_norm) > 0
    assert not _bit_identical(new.model, state.model)
    for e, p0, p1 in zip(
        _leaves(new.ema_model), _leaves(state.model), _leaves(new.model), strict=True
    ):
        np.testing.assert_allclose(e, 0.1 * p0 + 0.9 * p1, rtol=1e-12, atol=1e-14)


def test_forward_network_lr_scale_scales_only_the_forward_network(getkey):
    """One AdamW update with `forward_network_lr_scale` 0.5 is the default update halved on the
    forward process's network and identical everywhere else (its anchor weight included)."""
    model = nd.build_model(TINY.model, (2,), getkey())
    params = eqx.filter(model, eqx.is_inexact_array)
    # One random draw for every gradient leaf: a draw per leaf would compile one random-number
    # kernel per parameter shape.
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    grads = unravel(jax.random.normal(getkey(), flat.shape, flat.dtype))
    full = nd.make_optimizer(TINY.optim)
    half = nd.make_optimizer(dataclasses.replace(TINY.optim, forward_network_lr_scale=0.5))

    @jax.jit
    def updates(grads, params):  # both first updates, compiled together
        return (
            full.update(grads, full.init(params), params)[0],
            half.update(grads, half.init(params), params)[0],
        )

    u_full, u_half = updates(grads, params)
    network_full, network_half = _leaves(u_full.forward.network), _leaves(u_half.forward.network)
    assert network_full and all(float(jnp.max(jnp.abs(a))) > 0 for a in network_full)
    for a, b in zip(network_full, network_half, strict=True):
        np.testing.assert_allclose(b, 0.5 * a, rtol=1e-12, atol=0)
    assert u_full.forward.anchor_logit is not None
    np.testing.assert_array_equal(u_half.forward.anchor_logit, u_full.forward.anchor_logit)
    assert _bit_identical(u_half.predictor, u_full.predictor)
    assert _bit_identical(u_half.volatility, u_full.volatility)


def test_forward_network_lr_scale_zero_freezes_the_network(tmp_path):
    """Trained with scale 0, the forward network ends bit-identical to its initialisation (its
    output stays zero: the path is the anchor mixture) while w and the predictor move."""
    config = dataclasses.replace(
        TINY,
        optim=dataclasses.replace(TINY.optim, forward_network_lr_scale=0.0),
        steps=10,
        save_every=10,
    )
    nd.train(config, str(tmp_path))
    initial = nd.init_train_state(config, (2,)).model
    trained = nd.load_run(str(tmp_path)).raw_model
    assert _bit_identical(trained.forward.network, initial.forward.network)
    assert float(trained.forward.anchor_logit) != float(initial.forward.anchor_logit)
    assert not _bit_identical(trained.predictor, initial.predictor)


def test_forward_network_lr_scale_validation():
    with pytest.raises(ValueError, match="`forward_network_lr_scale` must be a finite"):
        nd.OptimConfig(forward_network_lr_scale=float("nan"))
    with pytest.raises(ValueError, match="`forward_network_lr_scale` must be a finite"):
        nd.OptimConfig(forward_network_lr_scale=-0.5)
    for forward in ("linear", "vp", "learned-schedule", "neural-flow"):
        with pytest.raises(ValueError, match="applies to the network of the learnable Gaussian"):
            nd.update_config(TINY, {"forward": forward, "forward_network_lr_scale": 0.0})
    with pytest.raises(ValueError, match="with source 'two-moons'"):
        nd.update_config(TINY, {"source": "two-moons", "forward_network_lr_scale": 0.0})
    stored = TINY.to_dict()
    del stored["optim"]["forward_network_lr_scale"]
    with pytest.raises(ValueError, match="lacks \\['forward_network_lr_scale'\\] in 'optim'"):
        nd.TrainConfig.from_dict(stored)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    result = nd.train(TINY, str(run_dir))
    return run_dir, result


def test_training_lowers_the_loss(straight_run):
    run_dir, result = straight_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    for r in records:
        assert set(r) >= {"loss", "diffusion", "prior", "reconstruction", "curvature", "lr"}
        assert math.isclose(
            r["loss"], r["diffusion"] + r["prior"] + r["reconstruction"], rel_tol=1e-9
        )
    # The first interval starts at initialisation; by the end the loss has clearly fallen.
    assert records[-1]["loss"] < 0.7 * records[0]["loss"], records
    # final_loss and final_terms are those of the last step (not the interval's mean).
    assert result.steps == 40 and result.final_loss != records[-1]["loss"]
    last = result.final_terms
    assert math.isclose(
        result.final_loss, last["diffusion"] + last["prior"] + last["reconstruction"], rel_tol=1e-9
    )
    steps = [s for s, _ in nd.list_checkpoints(str(run_dir / "checkpoints"))]
    assert steps == [20, 30, 40]  # keep = 3


def test_resume_is_bit_identical(straight_run, tmp_path):
    run_dir, _ = straight_run
    nd.train(TINY, str(tmp_path), stop_at=20)
    assert nd.load_run(str(tmp_path)).step == 20
    nd.train(TINY, str(tmp_path), resume=True)
    straight, resumed = nd.load_run(str(run_dir)), nd.load_run(str(tmp_path))
    assert resumed.step == straight.step == 40
    assert _bit_identical(straight.model, resumed.model)  # EMA weights
    assert _bit_identical(straight.raw_model, resumed.raw_model)
    # The optimiser state and data order too: the metrics logs agree exactly.
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 4
    straight_losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").open()]
    resumed_losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").open()]
    assert straight_losses == resumed_losses


def test_load_run(straight_run):
    run_dir, _ = straight_run
    run = nd.load_run(str(run_dir))
    # The stored config is TINY with its automatic predictor settings made concrete (2-D data:
    # 4 input octaves, plain hidden layers).
    model = dataclasses.replace(TINY.model, input_octaves=4, predictor_residual=False)
    resolved = dataclasses.replace(TINY, model=model)
    assert run.config == resolved and run.dataset == "eight-gaussians" and run.step == 40
    assert run.num_levels is None and isinstance(run.transform, nd.AffineDataTransform)
    x = nd.load_dataset("eight-gaussians", split="train", num=512)
    np.testing.assert_allclose(run.transform.shift, x.mean(axis=0), rtol=1e-12)
    z = jnp.zeros(2)
    assert eqx.filter_jit(run.model.velocity)(z, 0.5).shape == (2,)
    assert not _bit_identical(run.model, run.raw_model)
    # The default mixed anchor's weight is a trained parameter (it started at exactly 0.5).
    forward = run.raw_model.forward
    assert forward.anchor is nd.AnchorChoice.MIXED and abs(float(forward.vp_weight) - 0.5) > 1e-5


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # An absurd step size: the first update is finite (+-1e300), the next loss overflows.
    config = dataclasses.replace(
        TINY, optim=dataclasses.replace(TINY.optim, lr=1e300, warmup=0), save_every=1, log_every=1
    )
    with pytest.raises(nd.TrainingDiverged, match="non-finite.*step 2.*step_00000001"):
        nd.train(config, str(tmp_path))
    assert [s for s, _ in nd.list_checkpoints(str(tmp_path / "checkpoints"))] == [1]
    run = nd.load_run(str(tmp_path))
    assert run.step == 1 and all(bool(jnp.all(jnp.isfinite(a))) for a in _leaves(run.raw_model))


def test_digits_dequantised_training(tmp_path):
    config = dataclasses.replace(TINY, data="digits", steps=2, save_every=2, log_every=1)
    result = nd.train(config, str(tmp_path))
    run = nd.load_run(str(tmp_path))
    assert run.num_levels == 17 and run.model.data_shape == (64,)
    assert np.isfinite(result.final_loss)
    # One scalar affine map for every pixel (docs/math.md, "Bits/dim": s = a y + b).
    assert float(jnp.ptp(run.transform.scale)) == 0 and float(run.transform.log_det()) == (
        pytest.approx(-64 * math.log(float(run.transform.scale[0])))
    )


def test_extending_a_finished_constant_schedule_run_is_exact(tmp_path):
    """--schedule constant: 20 steps, then resume to 40 == 40 straight (bit for bit)."""
    constant = dataclasses.replace(
        TINY, optim=dataclasses.replace(TINY.optim, schedule=nd.ScheduleChoice.CONSTANT)
    )
    nd.train(dataclasses.replace(constant, steps=20), str(tmp_path / "a"))
    nd.train(constant, str(tmp_path / "a"), resume=True)
    nd.train(constant, str(tmp_path / "b"))
    a, b = nd.load_run(str(tmp_path / "a")), nd.load_run(str(tmp_path / "b"))
    assert a.step == b.step == 40 and a.config == b.config
    model = nd.resolve_predictor_residual(nd.resolve_input_octaves(TINY.model, (2,)), (2,))
    assert a.config == dataclasses.replace(constant, model=model)
    assert _bit_identical(a.model, b.model) and _bit_identical(a.raw_model, b.raw_model)


# The likelihood objective's check below runs on the linear forward process: its ODE solve
# compiles in about half the time of the learnable process's, and `CompiledTrainStep` only
# flattens and rebuilds the state around `train_step`, whatever the model.
LINEAR_TINY = dataclasses.replace(
    TINY, model=dataclasses.replace(TINY.model, forward=nd.ForwardChoice.LINEAR)
)


def test_compiled_train_step_matches_train_step_and_refuses_another_layout(getkey):
    """`CompiledTrainStep` (what `train` runs) computes exactly `train_step`, for the
    simulation-free and the likelihood objective, and names a state of another layout."""
    optimizer = nd.make_optimizer(TINY.optim)
    likelihood = {"likelihood": nd.LikelihoodSolve(tol=1e-3), "bound_weight": 0.5}
    for config, extra in ((TINY, {}), (LINEAR_TINY, likelihood)):
        state, batch, options = _step_inputs(config)
        lr = jnp.asarray(0.01, batch.dtype)
        compiled = nd.CompiledTrainStep(state, optimizer, **options, **extra)
        ours, theirs = state, state
        for step in range(2):
            ours, terms, norm = compiled(ours, batch, jnp.asarray(step), lr)
            theirs, want_terms, want_norm = nd.train_step(
                theirs, batch, jnp.asarray(step), lr, optimizer, **options, **extra
            )
        assert _bit_identical(ours, theirs)
        assert float(terms.total) == float(want_terms.total) and float(norm) == float(want_norm)
        assert not _bit_identical(ours.model, state.model)
        # Another state of the same layout (another seed) reuses the compiled function.
        reseeded = nd.init_train_state(dataclasses.replace(config, seed=config.seed + 1), (2,))
        again = nd.CompiledTrainStep(reseeded, optimizer, **options, **extra)
        assert again._jitted is compiled._jitted
    other = nd.init_train_state(
        dataclasses.replace(
            TINY, model=dataclasses.replace(TINY.model, width=TINY.model.width + 1)
        ),
        (2,),
    )
    with pytest.raises(ValueError, match="layout"):
        compiled(other, batch, jnp.asarray(0), lr)


def test_progress_reports_compilation_then_rate_and_eta(tmp_path):
    """The log says when the compiled step has run; the bar's steps/s counts from then, and it
    shows the time left in the phase."""
    import io

    messages, bar = [], io.StringIO()
    config = dataclasses.replace(TINY, steps=20, save_every=20, log_every=10)
    nd.train(config, tmp_path / "run", progress=bar, log=messages.append)
    assert any(m.startswith("compiled the training step; step 1 done in") for m in messages)
    lines = bar.getvalue().strip().splitlines()
    assert lines[-1].startswith("[#########################] 20/20") and "ETA 0m00s" in lines[-1]
    assert all(float(line.split("steps/s")[0].split()[-1]) > 0 for line in lines)


def test_progress_sink_receives_every_phase_and_a_final_report(tmp_path):
    """`train(progress=sink)` hands any `ProgressSink` structured reports: steps in order, the
    loss terms at logged steps, the phase, the time left in it, and one final report."""

    class Recorder:
        def __init__(self):
            self.reports, self.closed = [], 0

        def update(self, report):
            self.reports.append(report)

        def close(self):
            self.closed += 1

    sink = Recorder()
    config = dataclasses.replace(TINY, steps=10, likelihood_steps=2, save_every=12, log_every=5)
    nd.train(config, tmp_path / "run", progress=sink)
    reports = sink.reports
    assert sink.closed == 1 and reports and all(isinstance(r, nd.ProgressReport) for r in reports)
    assert [r.step for r in reports] == sorted(r.step for r in reports)
    assert reports[-1].final and reports[-1].step == reports[-1].total == 12
    assert {r.phase for r in reports} == {"simulation-free", "likelihood"}
    logged = [r for r in reports if r.step in (5, 10)]
    assert all(set(r.terms) == {"diffusion", "reconstruction"} for r in logged)
    assert all(r.phase_end == 10 for r in reports if r.phase == "simulation-free")
    assert all(r.seconds_left is None or r.seconds_left >= 0 for r in reports)


def test_cli_progress_displays():
    """The CLI's rich bar shows the phase, steps, loss terms, steps/s and ETA on a terminal;
    the examples counter of `nll` prints lines elsewhere."""
    import io

    from rich.console import Console

    from nfdm_de.cli._progress import ExamplesProgress, RichTrainProgress

    out = io.StringIO()
    display = RichTrainProgress(Console(file=out, force_terminal=True, width=160))
    report = nd.ProgressReport(5, 12, "simulation-free", 1.5, {"diffusion": 2.0}, 40.0, 0.1, 10)
    display.update(report)
    display.update(dataclasses.replace(report, step=12, phase="likelihood", final=True))
    display.close()
    text = out.getvalue()
    for piece in ("likelihood", "12/12", "loss 1.5000", "diffusion 2.0000", "40.0 steps/s"):
        assert piece in text, piece
    assert "ETA 0m00s (phase)" in text
    lines = io.StringIO()
    with ExamplesProgress("nll", 4, Console(file=lines, force_terminal=False)) as bar:
        bar.update(2)
        bar.update(2)
    assert [line.split(",")[0] for line in lines.getvalue().splitlines()] == [
        "nll: 2/4 examples",
        "nll: 4/4 examples",
    ]
