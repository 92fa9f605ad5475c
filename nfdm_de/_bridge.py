"""Bridges: a learned diffusion process between two data distributions.

**The forward map.** For a target point x (the data, t = 0) and a source point c (t = 1),

    z_t = F(eps, t, x, c) = mu(x, c, t) + sigma(x, c, t) * eps,       eps ~ N(0, I)
    mu        = (1 - t) x + t c + t (1 - t) NN_mu(x, c, t)
    log sigma = log(delta + 4 s t (1 - t)) + t (1 - t) NN_sigma(x, c, t)

with s = `noise` (the noise scale at mid-bridge at initialisation). The t(1 - t) gate switches the
network off at both ends, so **by construction** F(eps, 0, x, c) = x + delta eps and
F(eps, 1, x, c) = c + delta eps: the process starts at the target point and ends at the source
point, each up to the delta-sized decoder noise. The output layer is zero-initialised, so
training starts at the fixed bridge mu = (1 - t) x + t c, sigma = delta + 4 s t (1 - t) (a
Brownian-bridge-like bump of noise that vanishes, to delta, at both ends; a polynomial rather
than sqrt(t (1 - t)) so that d log sigma / dt stays finite at the ends).

For a fixed c, (eps, t, x) -> F is a Gaussian forward process (docs/math.md, "The forward
process") except for its t = 1 boundary; `ConditionedBridge` is that process (an
`AbstractGaussianForwardProcess`) and reuses its closed-form velocity f(z, t, x) and score
s(z, t, x).

**The generative model.** Given the source point c, the generative process starts at
z_1 ~ p(z_1 | c) = N(c, delta^2 I) and runs the SDE dz = f^B(z, t, x_hat(z, t, c)) dt + g dw_bar
(or its probability-flow ODE) down to t = 0; the predictor sees the source point:
x_hat(z, t, c) = (1 - t) z + (t + delta) NN(z, c, t). The decoder is p(x | z_0) = N(x; z_0,
delta^2 I) as in the unconditional model.

**The objective** (docs/math.md, "The bound" and "Bridges": the bound with every distribution
conditioned on c). For each pair (x, c), -log p(x | c) <= L_diff + L_prior + L_rec with

    L_diff  = E_{t, eps} 1/(2 g^2) || f^B(z_t, t, x) - f^B(z_t, t, x_hat(z_t, t, c)) ||^2,
    L_prior = KL(q(z_1 | x, c) || p(z_1 | c)) = KL(N(c, delta^2 I) || N(c, delta^2 I)) = 0,
    L_rec   = D/2 (log(2 pi delta^2) + 1),

where f and f^B are the conditional fields of `ConditionedBridge(c)`. The prior term vanishes
identically because the forward process ends exactly at the generative start; this is why the
end point is c + delta eps rather than c. So the per-pair loss is `example_loss` of the NFDM
conditioned on c, unchanged.

**Pairs.** Training draws x from the target and c from the source **independently** (the
product coupling p(x) p(c)). Minimising E_{p(x) p(c)}[bound on -log p_theta(x | c)] is maximum
likelihood of p_theta(x | c) under pairs whose true conditional is p(x | c) = p(x), so the
optimum maps *every* source point (through its delta-ball) to the whole target distribution:
the pushforward of the source through the learned dynamics is the target, which is what a bridge
must do, but the map is not the optimal-transport map. A coupling (e.g. minibatch OT pairs)
would give straighter, source-dependent paths; it needs no change here other than how batches
are paired, and is not implemented.

Consequence for sampling: with the ODE, the whole target spread is produced by stretching the
delta-ball around c, so the ODE is stiff near t = 1 (|d log sigma / dt| ~ 4 s / delta there);
use an adaptive solver (the default) or the SDE.
"""

import math

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float

from ._custom_types import Data, Key, Network, Scalar, Time
from ._forward import AbstractGaussianForwardProcess, _check_delta
from ._loss import LossBreakdown, example_loss, stratified_times
from ._model import NFDM, AbstractDiffusionModel
from ._nn import TimeConditionedMLP
from ._sample import _generative_solve
from ._solve import SolveStats, stepping, timed
from ._train._build import _VOLATILITY_BUILDERS, check_model_config
from ._train._config import ForwardChoice, ModelConfig
from ._volatility import (
    AbstractVolatility,
)


class NeuralBridge(eqx.Module):
    """The bridge family of the module docstring: mean and log-scale of q(z_t | x, c).

    `network` maps (concat(x, c), t) to 2D outputs (mean then log-scale corrections), or is None
    for the fixed bridge (NN = 0).
    """

    network: TimeConditionedMLP | None
    delta: float = 0.01
    noise: float = 1.0

    def __check_init__(self):
        _check_delta(self.delta)
        if not (isinstance(self.noise, int | float) and self.noise > 0):
            raise ValueError(f"`noise` must be a number > 0; got {self.noise!r}.")

    def mean_and_log_scale(self, x: Data, t: Time, source: Data) -> tuple[Data, Data]:
        if source.shape != x.shape:
            raise ValueError(
                f"the source point must have the target point's shape {x.shape}; got "
                f"{source.shape}."
            )
        t = jnp.asarray(t, x.dtype)
        gate = t * (1 - t)
        mu = (1 - t) * x + t * source
        log_sigma = jnp.broadcast_to(jnp.log(self.delta + 4 * self.noise * gate), x.shape)
        if self.network is not None:
            mean_correction, log_scale_correction = jnp.split(
                self.network(jnp.concatenate([x, source]), t), 2
            )
            mu = mu + gate * mean_correction
            log_sigma = log_sigma + gate * log_scale_correction
        return mu, log_sigma

    def transform(self, eps: Data, t: Time, x: Data, source: Data) -> Data:
        """z = F(eps, t, x, c)."""
        mu, log_sigma = self.mean_and_log_scale(x, t, source)
        return mu + jnp.exp(log_sigma) * eps

    def condition(self, source: Data) -> "ConditionedBridge":
        """The forward process q(z_t | x, c) for the fixed source point c = `source`."""
        return ConditionedBridge(bridge=self, source=source, delta=self.delta)


class ConditionedBridge(AbstractGaussianForwardProcess):
    """`NeuralBridge` with its source point fixed: a Gaussian forward process in (eps, t, x)
    with F(eps, 0, x) = x + delta eps and F(eps, 1, x) = c + delta eps."""

    bridge: NeuralBridge
    source: Data
    delta: float

    def mean_and_log_scale(self, x: Data, t: Time) -> tuple[Data, Data]:
        return self.bridge.mean_and_log_scale(x, t, self.source.astype(x.dtype))


class BridgePredictor(eqx.Module):
    """x_hat(z, t, c) = (1 - t) z + (t + delta) NN(concat(z, c), t)."""

    network: Network
    delta: float = 0.01

    def __call__(self, z: Data, t: Time, source: Data) -> Data:
        t = jnp.asarray(t, z.dtype)
        out = self.network(jnp.concatenate([z, source.astype(z.dtype)]), t)
        return (1 - t) * z + (t + self.delta) * out

    def condition(self, source: Data) -> "_ConditionedPredictor":
        return _ConditionedPredictor(self, source)


class _ConditionedPredictor(eqx.Module):
    predictor: Network
    source: Data

    def __call__(self, z: Data, t: Time) -> Data:
        return self.predictor(z, t, self.source)


class BridgeModel(AbstractDiffusionModel):
    """A bridge: forward family, source-aware predictor x_hat(z, t, c), volatility g(t).

    `conditioned(c)` is the ordinary `NFDM` for one source point c, so the loss, the fields and
    the solvers of the unconditional model apply unchanged (see the module docstring).
    """

    forward: NeuralBridge
    predictor: Network
    volatility: AbstractVolatility
    data_shape: tuple[int, ...] = eqx.field(static=True)

    def conditioned(self, source: Data) -> NFDM:
        """The NFDM of q(. | x, c) and p(. | c) for the source point c = `source`."""
        predictor = (
            self.predictor.condition(source)
            if hasattr(self.predictor, "condition")
            else _ConditionedPredictor(self.predictor, source)
        )
        return NFDM(
            self.forward.condition(source),
            predictor,
            self.volatility,
            data_shape=self.data_shape,
        )


def neural_bridge(
    data_size: int,
    *,
    width: int = 128,
    depth: int = 3,
    learnable: bool = True,
    noise: float = 1.0,
    delta: float = 0.01,
    key: Key,
) -> NeuralBridge:
    """A `NeuralBridge` for vectors of size D with a zero-initialised MLP (2D -> 2D), or the
    fixed bridge (`learnable=False`)."""
    network = None
    if learnable:
        network = TimeConditionedMLP(
            2 * data_size, 2 * data_size, width=width, depth=depth, zero_init_output=True, key=key
        )
    return NeuralBridge(network, delta=delta, noise=noise)


def bridge_predictor(
    data_size: int, *, width: int = 128, depth: int = 3, delta: float = 0.01, key: Key
) -> BridgePredictor:
    """The reference source-aware predictor: an MLP on concat(z, c) (2D -> D)."""
    network = TimeConditionedMLP(2 * data_size, data_size, width=width, depth=depth, key=key)
    return BridgePredictor(network, delta=delta)


def bridge_loss(
    model: BridgeModel,
    x: Float[Array, " batch dim"],
    source: Float[Array, " source_batch source_dim"],
    *,
    key: Key,
    curvature_weight: float = 0.0,
) -> tuple[Scalar, LossBreakdown]:
    """The batch objective of the module docstring: mean over pairs (x_i, c_i) of
    `example_loss` of the NFDM conditioned on c_i, stratified times."""
    if x.shape != source.shape or x.shape[1:] != model.data_shape:
        raise ValueError(
            f"bridge_loss needs target and source batches of one shape (batch, "
            f"{', '.join(map(str, model.data_shape))}); got {x.shape} and {source.shape}."
        )
    t_key, eps_key = jr.split(key)
    t = stratified_times(x.shape[0], x.dtype, key=t_key)
    eps = jr.normal(eps_key, x.shape, x.dtype)
    per_example = jax.vmap(
        lambda x_i, c_i, t_i, eps_i: example_loss(
            model.conditioned(c_i), x_i, t_i, eps_i, curvature_weight=curvature_weight
        )
    )(x, source, t, eps)
    mean = jax.tree.map(jnp.mean, per_example)
    return mean.total, mean


@eqx.filter_jit
def _bridge_core(model, key, source, solver, settings, sde, brownian_tol):
    noise_key, brownian_key = jr.split(key)
    z1 = source + model.delta * jr.normal(noise_key, source.shape, source.dtype)
    keys = jr.split(brownian_key, source.shape[0])

    def one(c, z, k):
        ys, rep = _generative_solve(
            model.conditioned(c),
            k,
            z[None],
            solver,
            settings,
            sde,
            brownian_tol,
            dfx.SaveAt(t1=True),
        )
        return ys[0, 0], rep

    return jax.vmap(one)(source, z1, keys)


def bridge_sample(
    model: BridgeModel,
    source: Float[Array, " num dim"],
    *,
    key: Key,
    solver: dfx.AbstractSolver = dfx.Tsit5(),
    steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    sde: bool = False,
    max_steps: int = 4096,
    brownian_tol: float = 1e-3,
) -> tuple[Float[Array, " num dim"], SolveStats]:
    """Map source points (model space) to target points: start at z_1 = c + delta eps and solve
    the generative ODE (or SDE, `sde=True`) of the NFDM conditioned on c down to t = 0.

    Each point is solved on its own (vmapped), since each has its own source condition. Solver
    settings as in `nd.sample`. Returns `(z_0, stats)` in the target's model space.
    """
    source = jnp.asarray(source)
    if source.ndim != 2 or source.shape[1:] != model.data_shape:
        raise ValueError(
            f"source points must have shape (num, {', '.join(map(str, model.data_shape))}); got "
            f"{source.shape}."
        )
    settings = stepping(solver, steps=steps, rtol=rtol, atol=atol, max_steps=max_steps, sde=sde)
    return timed(
        _bridge_core,
        model,
        key,
        source,
        solver,
        settings,
        sde,
        brownian_tol,
        num=source.shape[0],
        solver=solver,
        settings=settings,
        per_example=True,
    )


def bridge_reconstruction_nll(model: BridgeModel) -> float:
    """D/2 (log(2 pi delta^2) + 1), as for the unconditional model."""
    return 0.5 * math.prod(model.data_shape) * (math.log(2 * math.pi * model.delta**2) + 1.0)


# `--forward` for a bridge: the learned bridge family or the fixed one (NN = 0).
_BRIDGE_FORWARDS = {ForwardChoice.NEURAL_GAUSSIAN: True, ForwardChoice.LINEAR: False}


# Settings of the NFDM's networks that the bridge family (`neural_bridge`, `bridge_predictor`)
# has no counterpart for.
_UNUSED_BY_BRIDGES = (
    "forward_width",
    "forward_depth",
    "input_octaves",
    "forward_input_octaves",
    "predictor_residual",
    "forward_anchor",
    "predictor_skip",
    "channels",
)


def build_bridge_model(config: ModelConfig, data_shape: tuple[int, ...], key: Key) -> BridgeModel:
    """The `BridgeModel` described by `config` (forward `neural-gaussian`: the learned bridge;
    `linear`: the fixed bridge) for vectors of shape `data_shape`."""
    data_shape = tuple(int(n) for n in data_shape)
    if len(data_shape) != 1 or data_shape[0] < 1:
        raise ValueError(f"bridges support vector data of shape (D,); got {data_shape}.")
    if config.forward not in _BRIDGE_FORWARDS:
        raise ValueError(
            f"a bridge (--source) uses the bridge family: forward 'neural-gaussian' (learned) or "
            f"'linear' (fixed); got '{config.forward.value}'."
        )
    learnable = _BRIDGE_FORWARDS[config.forward]
    check_model_config(config, forward_is_learnable=learnable)
    defaults = ModelConfig()
    unused = [
        name for name in _UNUSED_BY_BRIDGES if getattr(config, name) != getattr(defaults, name)
    ]
    if unused:
        raise ValueError(
            f"a bridge (--source) does not use {', '.join(unused)}: its networks are the "
            "reference MLPs of --width and --depth; leave those settings at their defaults."
        )
    size = data_shape[0]
    forward_key, predictor_key, volatility_key = jr.split(key, 3)
    forward = neural_bridge(
        size,
        width=config.width,
        depth=config.depth,
        learnable=learnable,
        delta=config.delta,
        key=forward_key,
    )
    predictor = bridge_predictor(
        size, width=config.width, depth=config.depth, delta=config.delta, key=predictor_key
    )
    volatility = _VOLATILITY_BUILDERS[config.volatility](config, volatility_key)
    return BridgeModel(forward, predictor, volatility, data_shape=data_shape)
