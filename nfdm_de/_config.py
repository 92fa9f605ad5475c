"""Typed run configuration and model construction from it.

Strings become these Enums only in `cli/`; the library takes the typed objects. The mapping from a
`ForwardChoice` to a forward process lives in ONE table (`_FORWARD_BUILDERS`), so adding a forward
process is one enum member plus one table line.
"""

import dataclasses
import enum
import math
from collections.abc import Callable
from typing import Any

import jax.random as jr

from ._custom_types import Key
from ._flow import neural_flow
from ._forward import (
    AbstractForwardProcess,
    AnchorChoice,
    LearnedSchedule,
    LinearInterpolant,
    VariancePreserving,
    neural_gaussian,
)
from ._model import NFDM
from ._nn import PredictorSkipChoice, mlp_predictor
from ._unet import unet_neural_gaussian, unet_predictor
from ._volatility import (
    AbstractVolatility,
    ConstantVolatility,
    LearnedVolatility,
    ZeroVolatility,
)


class ForwardChoice(enum.Enum):
    """The built-in forward processes (docs/math.md, "The forward process")."""

    NEURAL_GAUSSIAN = "neural-gaussian"
    LINEAR = "linear"
    VP = "vp"
    LEARNED_SCHEDULE = "learned-schedule"
    NEURAL_FLOW = "neural-flow"


class VolatilityChoice(enum.Enum):
    """The built-in volatilities g(t)."""

    LEARNED = "learned"
    CONSTANT = "constant"
    ZERO = "zero"


class TraceChoice(enum.Enum):
    """The divergence estimator of the likelihood phase's ODE solves; AUTO picks one by the
    data's dimension (`resolve_likelihood_phase`)."""

    AUTO = "auto"
    EXACT = "exact"
    HUTCHINSON = "hutchinson"


class ScheduleChoice(enum.Enum):
    """Learning-rate shape after the linear warm-up."""

    COSINE = "cosine"
    CONSTANT = "constant"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that determines the model's architecture.

    - `forward`, `volatility`: which forward process and volatility (see the Enums).
    - `curvature`: weight lambda of the NFDM-OT curvature penalty (docs/math.md, "NFDM-OT").
    - `width`, `depth`: hidden width and number of hidden layers of the MLPs (vector data; the
      predictor's, and the forward network's too where `forward_width`/`forward_depth` are None).
    - `forward_width`, `forward_depth`: the learnable forward process's network (None: the same
      as the predictor's). The default 2x48 is smaller than the predictor because the forward
      network runs twice per example, each time with its time derivative (a JVP): about four
      network passes against the predictor's one, so an equal-size forward network makes a train
      step several times the baseline's; 2x48 keeps it under 2x (docs/results.md).
    - `channels`: base channel count of the U-Nets (image data; the MLP settings are unused).
    - `delta`: noise scale at t = 0 (the boundary condition F(eps, 0, x) = x + delta eps).
    - `volatility_value`: g for `constant`, the initial g for `learned`.
    - `input_octaves`: sin/cos of the predictor MLP's input at frequencies 1, 2, ..., 2^(n-1)
      (`FourierInputFeatures`; vector data, 0 = none). They let the predictor resolve sharp
      and thin structure (checkerboard edges, spirals) in few steps.
    - `forward_input_octaves`: the same for the learnable forward process's MLP (default 0).
    - `forward_anchor`: the path the learnable Gaussian forward process is gated around
      (`NeuralGaussian.anchor`): `linear`, `vp`, or the default `mixed`, a learned mixture of
      the two (starting halfway), which lets training pick the better of the two paths per
      data set.
    - `predictor_skip`: the predictor's skip connection (`Predictor`): `gaussian` (default) or
      `gaussian-full`, the posterior mean for standardised Gaussian data on the forward
      process's path, scaled so the network's target has unit size; or `linear`, (1 - t) z +
      (t + delta) NN. The two Gaussian skips differ for the learnable Gaussian process only:
      `gaussian` uses its anchor path, `gaussian-full` its path at the data mean, the
      network's log-scale correction included; `gaussian-full` suits long simulation-free
      runs and can make the likelihood phase's ODE stiffer (docs/training.md).
    - `time_power`: importance sampling of t in the objective, t = u^time_power with weights
      1/p(t) (1 = uniform; > 1 concentrates on small t, where the bound's integrand is largest).
      The default 3 lowers the variance of the loss estimate.
    """

    forward: ForwardChoice = ForwardChoice.NEURAL_GAUSSIAN
    volatility: VolatilityChoice = VolatilityChoice.LEARNED
    curvature: float = 0.0
    width: int = 128
    depth: int = 3
    forward_width: int | None = 48
    forward_depth: int | None = 2
    channels: int = 8
    delta: float = 0.01
    volatility_value: float = 1.0
    time_power: float = 3.0
    input_octaves: int = 4
    forward_input_octaves: int = 0
    forward_anchor: AnchorChoice = AnchorChoice.MIXED
    predictor_skip: PredictorSkipChoice = PredictorSkipChoice.GAUSSIAN

    def __post_init__(self):
        _check_enum("forward", self.forward, ForwardChoice)
        _check_enum("volatility", self.volatility, VolatilityChoice)
        _check_enum("forward_anchor", self.forward_anchor, AnchorChoice)
        _check_enum("predictor_skip", self.predictor_skip, PredictorSkipChoice)
        _check_positive_int("width", self.width)
        _check_positive_int("depth", self.depth)
        for name in ("forward_width", "forward_depth"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        _check_positive_int("channels", self.channels)
        if not (isinstance(self.input_octaves, int) and 0 <= self.input_octaves <= 16):
            raise ValueError(
                f"`input_octaves` must be an integer in [0, 16]; got {self.input_octaves!r}."
            )
        if not (_is_real(self.curvature) and math.isfinite(self.curvature) and self.curvature >= 0):
            raise ValueError(f"`curvature` must be a finite number >= 0; got {self.curvature!r}.")
        if not (_is_real(self.delta) and 0 < self.delta < 1):
            raise ValueError(f"`delta` must be a number in (0, 1); got {self.delta!r}.")
        if not (_is_real(self.volatility_value) and self.volatility_value > 0):
            raise ValueError(f"`volatility_value` must be > 0; got {self.volatility_value!r}.")
        if not (_is_real(self.time_power) and math.isfinite(self.time_power)):
            raise ValueError(f"`time_power` must be a finite number >= 1; got {self.time_power!r}.")
        if self.time_power < 1:
            raise ValueError(f"`time_power` must be a finite number >= 1; got {self.time_power!r}.")

    @property
    def resolved_forward_width(self) -> int:
        return self.width if self.forward_width is None else self.forward_width

    @property
    def resolved_forward_depth(self) -> int:
        return self.depth if self.forward_depth is None else self.forward_depth


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with a linear warm-up, then a cosine decay (to `final_lr_fraction * lr`) or a
    constant rate, and gradient clipping by global norm. `ema_decay` is the decay of the EMA
    weights used for evaluation. The peak rate 6e-3 is tuned for the default budget (3,000
    steps, batch 256, width 128) on the toy sets; lower it for longer runs or larger models."""

    lr: float = 6e-3
    warmup: int = 200
    schedule: ScheduleChoice = ScheduleChoice.COSINE
    final_lr_fraction: float = 0.01
    clip: float = 1.0
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    # Multiplies the updates of the learnable Gaussian forward process's network (not its anchor
    # weight): 0 freezes the network at its zero-initialised output, leaving the learned mixture
    # of the linear and VP paths; values below 1 make it a slower time scale than the rest.
    # (Its gradient still counts in the global-norm clipping, which comes first.)
    forward_network_lr_scale: float = 1.0

    def __post_init__(self):
        _check_enum("schedule", self.schedule, ScheduleChoice)
        if not (_is_real(self.lr) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"`lr` must be a finite number > 0; got {self.lr!r}.")
        if not (isinstance(self.warmup, int) and self.warmup >= 0):
            raise ValueError(f"`warmup` must be an integer >= 0; got {self.warmup!r}.")
        if not (_is_real(self.clip) and self.clip > 0):
            raise ValueError(f"`clip` must be > 0; got {self.clip!r}.")
        if not (_is_real(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"`weight_decay` must be >= 0; got {self.weight_decay!r}.")
        if not (_is_real(self.ema_decay) and 0 <= self.ema_decay < 1):
            raise ValueError(f"`ema_decay` must be in [0, 1); got {self.ema_decay!r}.")
        scale = self.forward_network_lr_scale
        if not (_is_real(scale) and math.isfinite(scale) and scale >= 0):
            raise ValueError(
                f"`forward_network_lr_scale` must be a finite number >= 0; got {scale!r}."
            )
        if not (_is_real(self.final_lr_fraction) and 0 <= self.final_lr_fraction <= 1):
            raise ValueError(
                f"`final_lr_fraction` must be in [0, 1]; got {self.final_lr_fraction!r}."
            )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The full, resolved configuration of a training run (stored in the run directory).

    `steps` is the total number of optimiser steps (and the horizon of the cosine schedule);
    `save_every`, `keep` and `log_every` only affect bookkeeping and may change on resume.
    """

    data: str = "rings"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    steps: int = 3000
    batch_size: int = 256
    seed: int = 0
    num_train: int = 50_000
    save_every: int = 1000
    keep: int = 3
    log_every: int = 100
    # A bridge (nfdm_de/_bridge.py) from this source distribution to `data`; None: an NFDM.
    source: str | None = None
    # The likelihood phase (nfdm_de/_ml.py): after `steps` simulation-free steps, this many
    # steps of maximum likelihood through the probability-flow ODE (vector data), with a fresh
    # Adam state, a cosine decay from `likelihood_lr`, and the EMA restarted. None (the
    # default) lets `resolve_likelihood_phase` choose once the data is known: steps // 10 where
    # the phase applies and is affordable, else 0.
    likelihood_steps: int | None = None
    likelihood_lr: float = 3e-3
    likelihood_tol: float = 1e-3
    # Examples per likelihood-phase step (None: `batch_size`). A step's cost is proportional to
    # it, and a smaller batch buys more steps of the phase for the same time.
    likelihood_batch: int | None = None
    # `exact`: D JVPs per evaluation; `hutchinson`: one probe's JVP (unbiased; for larger D);
    # `auto`: exact up to AUTO_EXACT_TRACE_MAX_DIM dimensions, Hutchinson above.
    likelihood_trace: TraceChoice = TraceChoice.AUTO
    # The phase minimises ODE NLL + this weight x the simulation-free bound (stochastic models).
    # The ODE NLL alone does not see the bound, which then drifts by nats; a small weight keeps
    # it (and SDE sampling) in place at no measurable cost to the ODE NLL (docs/training.md).
    likelihood_bound_weight: float = 0.01

    def __post_init__(self):
        if not (isinstance(self.data, str) and self.data):
            raise ValueError(f"`data` must be a dataset name or a file path; got {self.data!r}.")
        if self.source is not None and not (isinstance(self.source, str) and self.source):
            raise ValueError(
                f"`source` must be a dataset name or a file path (or None); got {self.source!r}."
            )
        _check_positive_int("steps", self.steps)
        _check_positive_int("batch_size", self.batch_size)
        _check_positive_int("num_train", self.num_train)
        _check_positive_int("save_every", self.save_every)
        _check_positive_int("keep", self.keep)
        _check_positive_int("log_every", self.log_every)
        if not (
            isinstance(self.seed, int)
            and not isinstance(self.seed, bool)
            and 0 <= self.seed < 2**63
        ):
            raise ValueError(f"`seed` must be an integer in [0, 2**63); got {self.seed!r}.")
        if self.likelihood_steps is not None and not (
            isinstance(self.likelihood_steps, int)
            and not isinstance(self.likelihood_steps, bool)
            and self.likelihood_steps >= 0
        ):
            raise ValueError(
                f"`likelihood_steps` must be an integer >= 0 (or None: automatic); got "
                f"{self.likelihood_steps!r}."
            )
        if not (
            _is_real(self.likelihood_lr)
            and math.isfinite(self.likelihood_lr)
            and self.likelihood_lr > 0
        ):
            raise ValueError(
                f"`likelihood_lr` must be a finite number > 0; got {self.likelihood_lr!r}."
            )
        _check_enum("likelihood_trace", self.likelihood_trace, TraceChoice)
        if not (
            _is_real(self.likelihood_bound_weight)
            and math.isfinite(self.likelihood_bound_weight)
            and self.likelihood_bound_weight >= 0
        ):
            raise ValueError(
                f"`likelihood_bound_weight` must be a finite number >= 0; got "
                f"{self.likelihood_bound_weight!r}."
            )
        if self.likelihood_batch is not None:
            _check_positive_int("likelihood_batch", self.likelihood_batch)
            if self.likelihood_batch > self.batch_size:
                raise ValueError(
                    f"`likelihood_batch` ({self.likelihood_batch}) must not exceed `batch_size` "
                    f"({self.batch_size}): the phase takes its examples from the same batches."
                )
        if not (_is_real(self.likelihood_tol) and 0 < self.likelihood_tol < 1):
            raise ValueError(
                f"`likelihood_tol` must be a number in (0, 1); got {self.likelihood_tol!r}."
            )
        if self.optim.forward_network_lr_scale != 1 and (
            self.model.forward is not ForwardChoice.NEURAL_GAUSSIAN or self.source is not None
        ):
            raise ValueError(
                "`forward_network_lr_scale` applies to the network of the learnable Gaussian "
                f"forward process (forward 'neural-gaussian', no source); got forward "
                f"{self.model.forward.value!r}"
                + (f" with source {self.source!r}" if self.source is not None else "")
                + "."
            )

    # Fields that may differ between a checkpoint and the run resuming it.
    # The likelihood phase's settings too: a finished run can be fine-tuned by resuming it with
    # more `likelihood_steps`.
    RESUMABLE_FIELDS = (
        "steps",
        "save_every",
        "keep",
        "log_every",
        "likelihood_steps",
        "likelihood_lr",
        "likelihood_tol",
        "likelihood_batch",
        "likelihood_trace",
        "likelihood_bound_weight",
    )

    @property
    def resolved_likelihood_steps(self) -> int:
        """`likelihood_steps` of a resolved config (a ValueError while it is automatic)."""
        if self.likelihood_steps is None:
            raise ValueError(
                "`likelihood_steps` is still automatic (None); resolve it for the data first "
                "(`resolve_likelihood_phase`)."
            )
        return self.likelihood_steps

    @property
    def total_steps(self) -> int:
        """Simulation-free steps plus likelihood-phase steps (of a resolved config)."""
        return self.steps + self.resolved_likelihood_steps

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready nested dict (Enums as their string values)."""
        return _to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Inverse of `to_dict`: every field must be present (a stored config is complete, so
        a missing one means another version of nfdm-de wrote it); unknown keys and values of
        the wrong type are errors too."""
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object of settings; got {d!r:.60}.")
        d = dict(d)
        _check_known(cls, d, "")
        model = _dataclass_from_dict(ModelConfig, d.pop("model", {}), "model")
        optim = _dataclass_from_dict(OptimConfig, d.pop("optim", {}), "optim")
        return _dataclass_from_dict(cls, d, "", model=model, optim=optim)


def config_differences(stored: TrainConfig, given: TrainConfig) -> list[str]:
    """`field: stored -> given` for every field (dotted for nested) that differs."""
    out = []
    a, b = _flatten(stored.to_dict()), _flatten(given.to_dict())
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            out.append(f"{name}: {a.get(name)!r} (stored) vs {b.get(name)!r} (given)")
    return out


# --- model construction -------------------------------------------------------------------------


def _vector_size(shape, what: str) -> int:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if len(shape) != 1:
        raise ValueError(f"the {what} forward process works on vectors; got data of shape {shape}.")
    return shape[0]


def _neural_gaussian(c: ModelConfig, shape, k: Key) -> AbstractForwardProcess:
    # Vectors (an int D, or the shape (D,)) get the MLP, images (H, W, C) the U-Net.
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if len(shape) == 3:
        return unet_neural_gaussian(
            shape,
            base_channels=c.channels,
            delta=c.delta,
            anchor=c.forward_anchor,
            key=k,
        )
    return neural_gaussian(
        shape[0],
        width=c.resolved_forward_width,
        depth=c.resolved_forward_depth,
        delta=c.delta,
        input_octaves=c.forward_input_octaves,
        anchor=c.forward_anchor,
        key=k,
    )


# The one place that maps a ForwardChoice to a forward process:
# (config, data shape (or size D), key) -> process.
_FORWARD_BUILDERS: dict[ForwardChoice, Callable[[ModelConfig, Any, Key], AbstractForwardProcess]]
_FORWARD_BUILDERS = {
    ForwardChoice.NEURAL_GAUSSIAN: _neural_gaussian,
    ForwardChoice.LINEAR: lambda c, d, k: LinearInterpolant(delta=c.delta),
    ForwardChoice.VP: lambda c, d, k: VariancePreserving(delta=c.delta),
    ForwardChoice.LEARNED_SCHEDULE: lambda c, d, k: LearnedSchedule(delta=c.delta, key=k),
    ForwardChoice.NEURAL_FLOW: lambda c, d, k: neural_flow(
        _vector_size(d, "neural-flow"), delta=c.delta, key=k
    ),
}

_VOLATILITY_BUILDERS: dict[VolatilityChoice, Callable[[ModelConfig, Key], AbstractVolatility]]
_VOLATILITY_BUILDERS = {
    VolatilityChoice.LEARNED: lambda c, k: LearnedVolatility(initial=c.volatility_value, key=k),
    VolatilityChoice.CONSTANT: lambda c, k: ConstantVolatility(c.volatility_value),
    VolatilityChoice.ZERO: lambda c, k: ZeroVolatility(),
}


def _is_learnable(module) -> bool:
    """Whether `module` holds trainable (floating-point array) leaves; works on the output of
    `eqx.filter_eval_shape` too (Python floats such as `delta` are not trainable)."""
    import jax
    import jax.numpy as jnp

    return any(
        hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)
        for leaf in jax.tree.leaves(module)
    )


def check_model_config(config: ModelConfig, *, forward_is_learnable: bool | None = None) -> None:
    """Refuse a deterministic model (`volatility=zero`) with a learnable forward process and no
    curvature penalty: that objective can be cheated by a degenerate noise schedule
    (docs/math.md, "The bound").

    `forward_is_learnable` defaults to building the forward process abstractly and looking for
    trainable arrays in it, so a new forward process needs no entry here.
    """
    if config.volatility is not VolatilityChoice.ZERO or config.curvature > 0:
        return
    if forward_is_learnable is None:
        import equinox as eqx

        forward = eqx.filter_eval_shape(_FORWARD_BUILDERS[config.forward], config, 2, jr.key(0))
        forward_is_learnable = _is_learnable(forward)
    if forward_is_learnable:
        raise ValueError(
            f"volatility 'zero' with the learnable forward process '{config.forward.value}' needs "
            "a curvature penalty > 0: without one the deterministic objective degenerates (the "
            "learned schedule collapses and injects all noise in a sliver of time; see "
            "docs/math.md, 'The bound'); "
            "use a fixed forward process (linear, vp) or set curvature > 0."
        )


def build_model(config: ModelConfig, data_shape: tuple[int, ...], key: Key) -> NFDM:
    """Build the NFDM described by `config` for examples of shape `data_shape`: vectors `(D,)`
    get MLP networks (`width`, `depth`), images `(H, W, C)` U-Nets (`channels`).

    Refuses a deterministic model (`volatility=zero`) with a learnable forward process and no
    curvature penalty: that objective can be cheated by a degenerate noise schedule
    (docs/math.md, "The bound").
    """
    if not isinstance(config, ModelConfig):
        raise ValueError(f"`config` must be a ModelConfig; got {type(config).__name__}.")
    data_shape = tuple(int(n) for n in data_shape)
    if len(data_shape) not in (1, 3) or min(data_shape) < 1:
        raise ValueError(
            "build_model supports vector data of shape (D,) and image data of shape (H, W, C); "
            f"got {data_shape}."
        )
    forward_key, predictor_key, volatility_key = jr.split(key, 3)
    forward = _FORWARD_BUILDERS[config.forward](config, data_shape, forward_key)
    check_model_config(config, forward_is_learnable=_is_learnable(forward))
    if len(data_shape) == 3:
        predictor = unet_predictor(
            data_shape,
            base_channels=config.channels,
            delta=config.delta,
            skip=config.predictor_skip,
            key=predictor_key,
        )
    else:
        predictor = mlp_predictor(
            data_shape[0],
            width=config.width,
            depth=config.depth,
            delta=config.delta,
            input_octaves=config.input_octaves,
            skip=config.predictor_skip,
            key=predictor_key,
        )
    volatility = _VOLATILITY_BUILDERS[config.volatility](config, volatility_key)
    return NFDM(forward, predictor, volatility, data_shape=data_shape)


# --- helpers ------------------------------------------------------------------------------------


def _is_real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_positive_int(name: str, value) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")


def _check_enum(name: str, value, enum_type) -> None:
    if not isinstance(value, enum_type):
        choices = ", ".join(m.value for m in enum_type)
        raise ValueError(f"`{name}` must be a {enum_type.__name__} ({choices}); got {value!r}.")


def _to_jsonable(obj):
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _coerce(cls, name: str, value):
    """A value from JSON/TOML/the command line, as the type of field `name` of `cls`: ints are
    accepted for floats, strings for Enums; anything else of the wrong type is a ValueError."""
    target = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    if isinstance(target, type) and issubclass(target, enum.Enum):
        if isinstance(value, target):
            return value
        try:
            return target(value)
        except ValueError:
            choices = ", ".join(m.value for m in target)
            raise ValueError(f"unknown {name} {value!r}; expected one of: {choices}.") from None
    if target is float and _is_real(value):
        return float(value)
    if target is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if target is str and isinstance(value, str):
        return value
    if target == int | None and (value is None or isinstance(value, int)):
        if not isinstance(value, bool):
            return value
    if target == int | None:
        raise ValueError(f"`{name}` must be a positive integer or None; got {value!r}.")
    if target in (int, float, str):
        raise ValueError(f"`{name}` must be {target.__name__}; got {value!r}.")
    return value


def _check_known(cls, d: dict, where: str) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {unknown}{f' in {where!r}' if where else ''}; "
            f"expected some of {sorted(fields)}."
        )


def _dataclass_from_dict(cls, d: dict, where: str, **already):
    if not isinstance(d, dict):
        raise ValueError(f"config section '{where}' must be a table; got {d!r}.")
    _check_known(cls, d, where)
    kwargs = dict(already)
    kwargs.update({name: _coerce(cls, name, value) for name, value in d.items()})
    missing = sorted({f.name for f in dataclasses.fields(cls)} - set(kwargs))
    if missing:
        raise ValueError(
            f"the stored config lacks {missing}{f' in {where!r}' if where else ''}: it was "
            "written by another version of nfdm-de; retrain the run with this one."
        )
    return cls(**kwargs)


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
# `likelihood_trace=auto` uses the exact divergence up to this dimension (it costs D JVPs, and
# adds no noise) and Hutchinson's estimator above (one JVP; on the 10-D mixture it matched the
# exact trace's gap in 4.6x less time).
AUTO_EXACT_TRACE_MAX_DIM = 4


def resolve_likelihood_phase(
    config: TrainConfig, data_shape: tuple[int, ...], *, discrete: bool
) -> TrainConfig:
    """`config` with its automatic likelihood-phase settings made concrete for data whose
    examples have shape `data_shape` (`discrete`: integer-valued data, e.g. digits).

    `likelihood_steps=None` becomes `steps // 10` for continuous vector data of dimension <=
    `AUTO_LIKELIHOOD_MAX_DIM`, for an NFDM (no bridge) without a curvature penalty (NFDM-OT is
    trained for straight few-step paths, which the phase does not preserve), and 0 otherwise.
    `likelihood_trace=auto` becomes exact up to `AUTO_EXACT_TRACE_MAX_DIM` dimensions, else
    Hutchinson (when there is a phase). Explicit values are kept.
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
        steps = config.steps // 10 if applies else 0
    trace = config.likelihood_trace
    # Without a phase the trace is moot: left as given, so such a config round-trips unchanged.
    if trace is TraceChoice.AUTO and steps > 0:
        small = is_vector and data_shape[0] <= AUTO_EXACT_TRACE_MAX_DIM
        trace = TraceChoice.EXACT if small else TraceChoice.HUTCHINSON
    return dataclasses.replace(config, likelihood_steps=steps, likelihood_trace=trace)
