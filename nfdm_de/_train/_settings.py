"""Flat settings (CLI flags, TOML keys) applied to a `TrainConfig`, and the automatic choices
made once the data are known."""

import dataclasses
from typing import Any

from ._config import ModelConfig, OptimConfig, TraceChoice, TrainConfig
from ._fields import _coerce

# Where each flat setting (a CLI flag or a TOML key) lives in the nested TrainConfig.
FLAT_SETTINGS: dict[str, str | None] = {
    **{f.name: None for f in dataclasses.fields(TrainConfig) if f.name not in ("model", "optim")},
    **{f.name: "model" for f in dataclasses.fields(ModelConfig)},
    **{f.name: "optim" for f in dataclasses.fields(OptimConfig)},
}


def update_config(base: TrainConfig, settings: dict[str, Any]) -> TrainConfig:
    """`base` with flat `settings` (names as in `FLAT_SETTINGS`) applied, coerced and checked."""
    nested: dict[str | None, dict[str, Any]] = {None: {}, "model": {}, "optim": {}}
    for name, value in settings.items():
        if name not in FLAT_SETTINGS:
            raise ValueError(f"unknown setting {name!r}; expected some of {sorted(FLAT_SETTINGS)}.")
        section = FLAT_SETTINGS[name]
        cls = {None: TrainConfig, "model": ModelConfig, "optim": OptimConfig}[section]
        nested[section][name] = _coerce(cls, name, value)
    model = dataclasses.replace(base.model, **nested["model"])
    optim = dataclasses.replace(base.optim, **nested["optim"])
    return dataclasses.replace(base, model=model, optim=optim, **nested[None])


# The automatic likelihood phase (`likelihood_steps=None`) runs on continuous vector data of at
# most this many dimensions: a step's cost grows with D (measured: 300 steps took 400-800 s on
# 2-D sets and 430 s with Hutchinson's trace on the 10-D mixture, on 2 CPU cores).
AUTO_LIKELIHOOD_MAX_DIM = 16


# The automatic phase has steps // LIKELIHOOD_STEPS_DIVISOR steps. On eight-gaussians after
# 3,000 simulation-free steps, at likelihood_tol 3e-3, the held-out ODE gap (2,000 points) was
# 0.0112 and 0.0136 nats (seeds 0 and 1) after 200 phase steps, 0.0136 and 0.0172 after 150; 300
# steps (at 1e-3) gave 0.0120 on seed 0 in 50% more time.
LIKELIHOOD_STEPS_DIVISOR = 15


# The likelihood phase's peak rate (`likelihood_lr=None`): AUTO_LIKELIHOOD_LR[0] for vector data
# of at most AUTO_EXACT_TRACE_MAX_DIM dimensions, AUTO_LIKELIHOOD_LR[1] above. Held-out ODE gaps
# after the 333-step phase of a 5,000-step run (3e-3 vs 1e-2): shapes-8d 1.936 vs 1.865 (seed 0;
# 233 vs 310 s); shapes-16d 5.645 vs 5.268 and 5.710 vs 5.500 (seeds 0, 1; 84 vs 150 s). The 2-D
# sets keep 3e-3 (eight-gaussians' default recipe: 0.011 and 0.014).
AUTO_LIKELIHOOD_LR = (3e-3, 1e-2)


# `likelihood_trace=auto` uses the exact divergence up to this dimension (it costs D JVPs, and
# adds no noise) and Hutchinson's estimator above (one JVP; on the 10-D mixture it matched the
# exact trace's gap in 4.6x less time).
AUTO_EXACT_TRACE_MAX_DIM = 4


# The model settings that None leaves to be chosen from the data (the labels' classes, then the
# predictor's input features and blocks by the dimension); a run directory stores them resolved.
DATA_RESOLVED_MODEL_SETTINGS = ("num_classes", "input_octaves", "predictor_residual")


# The predictor's Fourier input features (`ModelConfig.input_octaves=None`) by the data's
# dimension D: (largest D, octaves), the first row with D <= its bound applies. The features are
# sin/cos of each coordinate, so they help where the data's fine structure is aligned with the
# axes, which is what low-dimensional sets are: 4 octaves on the 2-D toy sets. On the rotated
# products of 2-D shapes (5,000 steps, batch 256, held-out ODE gap, seeds 0 and 1) they hurt
# instead: at 8-D, 2.90 nats with 4 octaves, 2.62 with 2, 2.74 with none; at 16-D, 6.42 with 4,
# 6.23 with 2, 6.00 with none. On gmm-10d (seed 0): 0.112 with 4, 0.087 with 1, 0.072 with none.
AUTO_INPUT_OCTAVES = ((4, 4), (8, 2))


def auto_input_octaves(dim: int) -> int:
    """The predictor's input octaves for vector data of dimension `dim` (`AUTO_INPUT_OCTAVES`;
    0 above its last bound)."""
    return next((octaves for bound, octaves in AUTO_INPUT_OCTAVES if dim <= bound), 0)


def input_octaves_for(config: ModelConfig, data_shape: tuple[int, ...]) -> int:
    """`config.input_octaves`, or when it is None (automatic) the value for examples of shape
    `data_shape`: `auto_input_octaves(D)` for vectors, 0 for images (U-Nets take no features)."""
    if config.input_octaves is not None:
        return config.input_octaves
    return auto_input_octaves(data_shape[0]) if len(data_shape) == 1 else 0


def resolve_input_octaves(config: ModelConfig, data_shape: tuple[int, ...]) -> ModelConfig:
    """`config` with its input octaves made concrete for examples of shape `data_shape`."""
    return dataclasses.replace(config, input_octaves=input_octaves_for(config, data_shape))


# The predictor MLP is residual (`ModelConfig.predictor_residual=None`) for vector data of a
# dimension in this closed range, plain elsewhere. Held-out ODE gaps, 5,000 steps, batch 256, the
# default input octaves (residual vs plain): shapes-8d 2.19 vs 2.67 and 2.07 vs 2.57 (seeds 0,
# 1); the same construction with 3 and 2 shapes (seed 0): 6-D 1.29 vs 1.49, 4-D 0.67 vs 0.58;
# gmm-10d 0.053 vs 0.072; shapes-16d 6.06 vs 6.04; shapes-32d 13.88 vs 12.84; eight-gaussians
# 0.059 vs 0.046 and 0.064 vs 0.048 (bounds equal).
AUTO_RESIDUAL_DIMS = (5, 8)


def predictor_residual_for(config: ModelConfig, data_shape: tuple[int, ...]) -> bool:
    """`config.predictor_residual`, or when it is None (automatic) whether vector data of shape
    `data_shape` lie in `AUTO_RESIDUAL_DIMS`; images (U-Nets) False."""
    if config.predictor_residual is not None:
        return config.predictor_residual
    low, high = AUTO_RESIDUAL_DIMS
    return len(data_shape) == 1 and low <= data_shape[0] <= high


def resolve_predictor_residual(config: ModelConfig, data_shape: tuple[int, ...]) -> ModelConfig:
    """`config` with `predictor_residual` made concrete for examples of shape `data_shape`."""
    residual = predictor_residual_for(config, data_shape)
    return dataclasses.replace(config, predictor_residual=residual)


def resolve_likelihood_phase(
    config: TrainConfig, data_shape: tuple[int, ...], *, discrete: bool
) -> TrainConfig:
    """`config` with its automatic likelihood-phase settings made concrete for data whose
    examples have shape `data_shape` (`discrete`: integer-valued data, e.g. digits).

    `likelihood_steps=None` becomes `steps // LIKELIHOOD_STEPS_DIVISOR` for continuous vector
    data of dimension <= `AUTO_LIKELIHOOD_MAX_DIM`, for an NFDM (no bridge) without a curvature
    penalty (NFDM-OT is trained for straight few-step paths, which the phase does not
    preserve), and 0 otherwise.
    `likelihood_trace=auto` becomes exact up to `AUTO_EXACT_TRACE_MAX_DIM` dimensions, else
    Hutchinson, and `likelihood_lr=None` the rate of `AUTO_LIKELIHOOD_LR` for the dimension
    (both when there is a phase). Explicit values are kept.
    """
    is_vector = len(data_shape) == 1
    steps = config.likelihood_steps
    if steps is None:
        applies = (
            is_vector
            and data_shape[0] <= AUTO_LIKELIHOOD_MAX_DIM
            and not discrete
            and config.source is None
            and config.model.curvature == 0
        )
        steps = config.steps // LIKELIHOOD_STEPS_DIVISOR if applies else 0
    trace, lr = config.likelihood_trace, config.likelihood_lr
    # Without a phase the trace and the rate are moot: left as given, so such a config
    # round-trips unchanged.
    small = is_vector and data_shape[0] <= AUTO_EXACT_TRACE_MAX_DIM
    if trace is TraceChoice.AUTO and steps > 0:
        trace = TraceChoice.EXACT if small else TraceChoice.HUTCHINSON
    if lr is None and steps > 0:
        lr = AUTO_LIKELIHOOD_LR[0] if small else AUTO_LIKELIHOOD_LR[1]
    return dataclasses.replace(
        config, likelihood_steps=steps, likelihood_trace=trace, likelihood_lr=lr
    )
