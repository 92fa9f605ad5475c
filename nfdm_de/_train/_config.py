"""Typed run configuration and model construction from it.

Strings become these Enums only in `cli/`; the library takes the typed objects. The mapping from a
`ForwardChoice` to a forward process lives in ONE table (`_FORWARD_BUILDERS`), so adding a forward
process is one enum member plus one table line.
"""

import dataclasses
import enum
import math
from typing import Any

from .._forward import (
    AnchorChoice,
)
from .._nn import PredictorSkipChoice
from ._fields import (
    _check_enum,
    _check_known,
    _check_positive_int,
    _dataclass_from_dict,
    _flatten,
    _is_real,
    _to_jsonable,
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
      and thin structure (checkerboard edges, spirals) in few steps. None (the default) lets
      `resolve_input_octaves` choose by the data's dimension: 4 in low dimension, fewer above.
    - `forward_input_octaves`: the same for the learnable forward process's MLP (default 0).
    - `predictor_residual`: the predictor MLP's hidden layers as pre-normalised residual blocks
      (`TimeConditionedMLP.residual`). None (the default) lets `resolve_predictor_residual`
      choose by the data's dimension: residual from 5-D to 8-D, plain elsewhere.
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
    - `num_classes`: None for an unconditional model, or K for a class-conditional one: the
      predictor sees a learned embedding of the label in [0, K) (`ContextMLP`; vector data).
      `train` sets it from the data's labels.
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
    input_octaves: int | None = None
    forward_input_octaves: int = 0
    predictor_residual: bool | None = None
    forward_anchor: AnchorChoice = AnchorChoice.MIXED
    predictor_skip: PredictorSkipChoice = PredictorSkipChoice.GAUSSIAN
    num_classes: int | None = None

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
        if self.num_classes is not None:
            _check_positive_int("num_classes", self.num_classes)
        octaves = self.input_octaves
        if octaves is not None and not (isinstance(octaves, int) and 0 <= octaves <= 16):
            raise ValueError(
                f"`input_octaves` must be an integer in [0, 16] (or None: by the data's "
                f"dimension); got {self.input_octaves!r}."
            )
        if self.predictor_residual is not None and not isinstance(self.predictor_residual, bool):
            raise ValueError(
                f"`predictor_residual` must be true, false or None (by the data's dimension); got "
                f"{self.predictor_residual!r}."
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
    # default) lets `resolve_likelihood_phase` choose once the data is known: steps // 15 where
    # the phase applies and is affordable, else 0.
    likelihood_steps: int | None = None
    # None (the default): `resolve_likelihood_phase` chooses by the data's dimension.
    likelihood_lr: float | None = None
    likelihood_tol: float = 3e-3
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
        if self.likelihood_lr is not None and not (
            _is_real(self.likelihood_lr)
            and math.isfinite(self.likelihood_lr)
            and self.likelihood_lr > 0
        ):
            raise ValueError(
                f"`likelihood_lr` must be a finite number > 0 (or None: automatic); got "
                f"{self.likelihood_lr!r}."
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
        model = d.pop("model", {})
        if isinstance(model, dict):
            model = {"num_classes": None, **model}  # a config without it is unconditional
        model = _dataclass_from_dict(ModelConfig, model, "model")
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
