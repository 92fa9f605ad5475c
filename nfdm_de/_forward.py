"""Forward (noising) processes: z_t = F(eps, t, x), invertible in eps.

The hierarchy follows Equinox's abstract/final pattern:

    AbstractForwardProcess                  generic: velocity and score by autodiff
    └── AbstractGaussianForwardProcess      F = mu + sigma * eps: closed forms
        ├── NeuralGaussian                  learnable (NFDM)
        ├── LinearInterpolant               fixed flow-matching path
        ├── VariancePreserving              fixed cosine VP path
        └── LearnedSchedule                 learned monotone time warp of the VP path (VDM-style)

Every process satisfies the boundary conditions F(eps, 0, x) = x + delta * eps and
F(eps, 1, x) = eps by construction.
"""

import abc
import enum
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float

from ._custom_types import Data, Key, Network, Scalar, Time
from ._nn import MonotoneUnitInterval, TimeConditionedMLP, linear_reference_path


def standard_normal_log_prob(eps: Array) -> Array:
    """log N(eps; 0, I) of one example (any shape)."""
    return -0.5 * jnp.sum(eps**2) - 0.5 * eps.size * math.log(2 * math.pi)


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, int | float) and 0.0 < delta < 1.0):
        raise ValueError(
            f"`delta` must be a float in (0, 1) (the noise scale at t = 0); got {delta!r}."
        )


class AbstractForwardProcess(eqx.Module):
    """A forward process q(z_t | x) defined as the push-forward of N(0, I) through F(., t, x).

    A subclass defines `transform` (F), `inverse` (F^{-1}) and `log_det_inverse`; velocity and
    score then follow by autodiff. Subclasses with closed forms override `velocity_and_score` for
    speed (as the Gaussian family does).

    All methods act on one example: `z`, `eps` and `x` share one shape; `t` is a scalar.
    """

    delta: eqx.AbstractVar[float]

    @abc.abstractmethod
    def transform(self, eps: Data, t: Time, x: Data) -> Data:
        """z = F(eps, t, x). Must satisfy F(eps, 0, x) = x + delta * eps and F(eps, 1, x) = eps."""

    @abc.abstractmethod
    def inverse(self, z: Data, t: Time, x: Data) -> Data:
        """eps = F^{-1}(z, t, x)."""

    @abc.abstractmethod
    def log_det_inverse(self, z: Data, t: Time, x: Data) -> Scalar:
        """log |det dF^{-1}/dz| at (z, t, x)."""

    def log_prob(self, z: Data, t: Time, x: Data) -> Scalar:
        """log q(z_t = z | x) = log N(F^{-1}(z); 0, I) + log |det dF^{-1}/dz|."""
        return standard_normal_log_prob(self.inverse(z, t, x)) + self.log_det_inverse(z, t, x)

    def sample(self, t: Time, x: Data, *, key: Key) -> Data:
        """Draw z_t ~ q(z_t | x)."""
        return self.transform(jr.normal(key, x.shape, x.dtype), t, x)

    def velocity(self, z: Data, t: Time, x: Data) -> Data:
        """Conditional ODE drift f(z, t, x) = dF/dt at eps = F^{-1}(z, t, x)."""
        return self.velocity_and_score(z, t, x)[0]

    def score(self, z: Data, t: Time, x: Data) -> Data:
        """Conditional score grad_z log q(z | x)."""
        return self.velocity_and_score(z, t, x)[1]

    def velocity_and_score(self, z: Data, t: Time, x: Data) -> tuple[Data, Data]:
        """Both conditional fields at once (override for speed where closed forms exist)."""
        t = jnp.asarray(t, z.dtype)
        eps = self.inverse(z, t, x)
        _, velocity = jax.jvp(lambda s: self.transform(eps, s, x), (t,), (jnp.ones_like(t),))
        score = jax.grad(self.log_prob)(z, t, x)
        return velocity, score

    def transform_and_fields(self, eps: Data, t: Time, x: Data) -> tuple[Data, Data, Data]:
        """(z, f(z, t, x), s(z, t, x)) at z = F(eps, t, x), sharing work between the three.

        Cheaper than `transform` followed by `velocity_and_score`: the velocity is the tangent of
        the same forward-mode pass that computes z, and no inverse is needed.
        """
        t = jnp.asarray(t, eps.dtype)
        z, velocity = jax.jvp(lambda s: self.transform(eps, s, x), (t,), (jnp.ones_like(t),))
        score = jax.grad(self.log_prob)(z, t, x)
        return z, velocity, score

    def backward_drift(self, z: Data, t: Time, x: Data, g: Scalar) -> Data:
        """f^B = f - g^2/2 * s: the drift of the reverse-time conditional SDE."""
        velocity, score = self.velocity_and_score(z, t, x)
        return velocity - 0.5 * g**2 * score

    def reference_path(self, t: Time) -> tuple[Scalar, Scalar]:
        """(a(t), sigma(t)) of the data-independent Gaussian path z = a x + sigma eps that this
        process follows or is built around; the library's `Predictor` is preconditioned on it.

        The default is the linear path; a process closer to another path overrides it.
        """
        return linear_reference_path(t, self.delta)

    def skip_path(self, t: Time, like: Data) -> tuple[Array, Array]:
        """(a(t), sigma(t)) for the predictor's `gaussian-full` skip on data shaped like `like`:
        the path this process follows at the standardised data's mean, x = 0.

        The default is `reference_path(t)`, which is exact for every data-independent Gaussian
        path; a process whose path is corrected by a network (`NeuralGaussian`) overrides it.
        """
        return self.reference_path(t)


class AbstractGaussianForwardProcess(AbstractForwardProcess):
    """F(eps, t, x) = mu(x, t) + sigma(x, t) * eps, with closed-form velocity and score.

    A subclass defines `mean_and_log_scale(x, t) -> (mu, log_sigma)`, both shaped like `x`, with
    mu(x, 0) = x, log_sigma(x, 0) = log(delta), mu(x, 1) = 0 and log_sigma(x, 1) = 0.
    """

    @abc.abstractmethod
    def mean_and_log_scale(self, x: Data, t: Time) -> tuple[Data, Data]:
        """(mu(x, t), log sigma(x, t)) of the Gaussian marginal q(z_t | x)."""

    def _moments_and_rates(self, x: Data, t: Time) -> tuple[Data, Data, Data, Data]:
        # One forward-mode pass gives the moments and their time derivatives together.
        t = jnp.asarray(t, x.dtype)
        (mu, log_sigma), (dmu, dlog_sigma) = jax.jvp(
            lambda s: self.mean_and_log_scale(x, s), (t,), (jnp.ones_like(t),)
        )
        return mu, log_sigma, dmu, dlog_sigma

    def transform(self, eps: Data, t: Time, x: Data) -> Data:
        mu, log_sigma = self.mean_and_log_scale(x, t)
        return mu + jnp.exp(log_sigma) * eps

    def inverse(self, z: Data, t: Time, x: Data) -> Data:
        mu, log_sigma = self.mean_and_log_scale(x, t)
        return (z - mu) * jnp.exp(-log_sigma)

    def log_det_inverse(self, z: Data, t: Time, x: Data) -> Scalar:
        _, log_sigma = self.mean_and_log_scale(x, t)
        return -jnp.sum(jnp.broadcast_to(log_sigma, z.shape))

    def velocity_and_score(self, z: Data, t: Time, x: Data) -> tuple[Data, Data]:
        mu, log_sigma, dmu, dlog_sigma = self._moments_and_rates(x, t)
        velocity = dmu + dlog_sigma * (z - mu)
        score = -(z - mu) * jnp.exp(-2 * log_sigma)
        return velocity, score

    def transform_and_fields(self, eps: Data, t: Time, x: Data) -> tuple[Data, Data, Data]:
        mu, log_sigma, dmu, dlog_sigma = self._moments_and_rates(x, t)
        sigma = jnp.exp(log_sigma)
        z = mu + sigma * eps
        return z, dmu + dlog_sigma * sigma * eps, -eps / sigma


def _linear_log_scale(t: Array, delta: float) -> Array:
    """log of the linear schedule sigma(t) = t + (1 - t) * delta."""
    return jnp.log(t + (1 - t) * delta)


class LinearInterpolant(AbstractGaussianForwardProcess):
    """The fixed flow-matching path: mu = (1 - t) x, sigma = t + (1 - t) delta."""

    delta: float = 0.01

    def __check_init__(self):
        _check_delta(self.delta)

    def mean_and_log_scale(self, x: Data, t: Time) -> tuple[Data, Data]:
        t = jnp.asarray(t, x.dtype)
        return (1 - t) * x, jnp.broadcast_to(_linear_log_scale(t, self.delta), x.shape)


def _vp_coefficients(h: Array, delta: float) -> tuple[Array, Array]:
    """(alpha, log sigma) of the cosine variance-preserving path at warped time h in [0, 1].

    alpha = cos(pi h / 2) and sigma^2 = 1 - (1 - delta^2) alpha^2, so that sigma(0) = delta and
    sigma(1) = 1 exactly, and alpha^2 + sigma^2 = 1 + delta^2 alpha^2 (variance preserving up to
    delta^2).
    """
    alpha = jnp.cos(0.5 * math.pi * h)
    return alpha, 0.5 * jnp.log(1 - (1 - delta**2) * alpha**2)


def _vp_moments(h: Array, x: Array, delta: float) -> tuple[Array, Array]:
    """Cosine variance-preserving moments (mu, log sigma) at warped time h (`_vp_coefficients`)."""
    alpha, log_sigma = _vp_coefficients(h, delta)
    return alpha * x, jnp.broadcast_to(log_sigma, x.shape)


def _vp_reference_path(h: Array, delta: float) -> tuple[Array, Array]:
    alpha, log_sigma = _vp_coefficients(h, delta)
    return alpha, jnp.exp(log_sigma)


class VariancePreserving(AbstractGaussianForwardProcess):
    """A fixed cosine variance-preserving path (see `_vp_moments`)."""

    delta: float = 0.01

    def __check_init__(self):
        _check_delta(self.delta)

    def mean_and_log_scale(self, x: Data, t: Time) -> tuple[Data, Data]:
        return _vp_moments(jnp.asarray(t, x.dtype), x, self.delta)

    def reference_path(self, t: Time) -> tuple[Scalar, Scalar]:
        return _vp_reference_path(jnp.asarray(t), self.delta)


class LearnedSchedule(AbstractGaussianForwardProcess):
    """A learned, data-independent noise schedule (VDM-style).

    The cosine VP path run on a learned monotone clock h(t) with h(0) = 0 and h(1) = 1; the
    signal-to-noise ratio is therefore monotone in t, and initialisation gives h(t) = t, i.e. the
    `VariancePreserving` baseline.
    """

    clock: MonotoneUnitInterval
    delta: float = 0.01

    def __init__(self, *, delta: float = 0.01, hidden: int = 16, key: Key):
        _check_delta(delta)
        self.delta = delta
        self.clock = MonotoneUnitInterval(hidden=hidden, key=key)

    def mean_and_log_scale(self, x: Data, t: Time) -> tuple[Data, Data]:
        h = self.clock(jnp.asarray(t, x.dtype))
        return _vp_moments(h.astype(x.dtype), x, self.delta)

    def reference_path(self, t: Time) -> tuple[Scalar, Scalar]:
        t = jnp.asarray(t)
        return _vp_reference_path(self.clock(t).astype(t.dtype), self.delta)


class AnchorChoice(enum.Enum):
    """The path a `NeuralGaussian` is gated around: a fixed one (linear, VP) or a learned
    mixture of the two."""

    LINEAR = "linear"
    VP = "vp"
    MIXED = "mixed"  # a learned mixture of the two (NeuralGaussian.anchor_logit)


class NeuralGaussian(AbstractGaussianForwardProcess):
    """The learnable Gaussian forward process of NFDM.

        mu        = (1 - t) x + t (1 - t) NN_mu(x, t)
        log sigma = log(t + (1 - t) delta) + t (1 - t) NN_sigma(x, t)

    The t(1 - t) gate switches the network off at both ends, so the boundary conditions hold
    exactly. The network's output layer is zero-initialised: training starts at the linear
    interpolant and moves away only where that lowers the loss (docs/math.md, "The forward
    process").

    `network` maps (x, t) to an array shaped like `x` but with twice the last axis: the mean
    correction then the log-scale correction, concatenated on the last axis.

    `anchor` = `AnchorChoice.VP` replaces the linear path above by the cosine VP path of
    `VariancePreserving` (mu = alpha(t) x + gate NN_mu, log sigma = log sigma_vp(t) + gate
    NN_sigma): the same family, started from the fixed path with the better bound.

    `anchor` = `AnchorChoice.MIXED` learns the anchor too: with w = sigmoid(`anchor_logit`) (a
    learnable scalar, 0 by default: w = 0.5), mu's base is (1 - w) (1 - t) x + w alpha(t) x and log
    sigma's base is (1 - w) log sigma_linear + w log sigma_vp. Every w keeps both boundary
    conditions, and the family contains the linear path (w = 0) and the VP path (w = 1)
    exactly, which an MLP correction t(1 - t) NN(x, t) can only approximate (it would have to
    learn x h(t)).
    """

    network: Network
    delta: float = 0.01
    anchor: AnchorChoice = eqx.field(default=AnchorChoice.LINEAR, static=True)
    anchor_logit: Float[Array, ""] | None = None

    def __post_init__(self):
        # The mixed anchor starts halfway between the linear and the VP path (w = 0.5).
        if self.anchor is AnchorChoice.MIXED and self.anchor_logit is None:
            self.anchor_logit = jnp.zeros(())

    def __check_init__(self):
        _check_delta(self.delta)
        if not isinstance(self.anchor, AnchorChoice):
            choices = ", ".join(f"AnchorChoice.{a.name}" for a in AnchorChoice)
            raise ValueError(f"`anchor` must be one of {choices}; got {self.anchor!r}.")
        if self.anchor is not AnchorChoice.MIXED and self.anchor_logit is not None:
            raise ValueError(
                "`anchor_logit` (the learnable weight of the VP path) belongs to the "
                f"AnchorChoice.MIXED anchor only; got {self.anchor}."
            )

    @property
    def vp_weight(self) -> Float[Array, ""] | None:
        """w in the mixed anchor (0 = linear path, 1 = VP); None for a fixed anchor."""
        return None if self.anchor_logit is None else jax.nn.sigmoid(self.anchor_logit)

    def _corrections(self, out: Array, x: Data) -> tuple[Array, Array]:
        expected = (*x.shape[:-1], 2 * x.shape[-1])
        if out.shape != expected:
            raise ValueError(
                f"NeuralGaussian network must return shape {expected} (mean and log-scale "
                f"corrections for data of shape {x.shape}); it returned {out.shape}."
            )
        mean_correction, log_scale_correction = jnp.split(out, 2, axis=-1)
        return mean_correction, log_scale_correction

    def mean_and_log_scale(self, x: Data, t: Time) -> tuple[Data, Data]:
        t = jnp.asarray(t, x.dtype)
        mean_correction, log_scale_correction = self._corrections(self.network(x, t), x)
        gate = t * (1 - t)
        base_mu, base_log_sigma = _anchor_moments(self.anchor, self.vp_weight, t, x, self.delta)
        return base_mu + gate * mean_correction, base_log_sigma + gate * log_scale_correction

    def _moments_and_rates(self, x: Data, t: Time) -> tuple[Data, Data, Data, Data]:
        if not isinstance(self.network, TimeConditionedMLP):
            return super()._moments_and_rates(x, t)
        # The reference MLP writes its time derivative out (`value_and_time_derivative`), which
        # is cheaper to differentiate in training than a forward-mode pass through it.
        t = jnp.asarray(t, x.dtype)
        out, out_rate = self.network.value_and_time_derivative(x, t)
        mean_correction, log_scale_correction = self._corrections(out, x)
        mean_rate, log_scale_rate = self._corrections(out_rate, x)
        (base_mu, base_log_sigma), (base_mu_rate, base_log_sigma_rate) = jax.jvp(
            lambda s: _anchor_moments(self.anchor, self.vp_weight, s, x, self.delta),
            (t,),
            (jnp.ones_like(t),),
        )
        gate, gate_rate = t * (1 - t), 1 - 2 * t
        return (
            base_mu + gate * mean_correction,
            base_log_sigma + gate * log_scale_correction,
            base_mu_rate + gate_rate * mean_correction + gate * mean_rate,
            base_log_sigma_rate + gate_rate * log_scale_correction + gate * log_scale_rate,
        )

    def reference_path(self, t: Time) -> tuple[Scalar, Scalar]:
        """The anchor path's coefficients (the network's correction left out)."""
        t = jnp.asarray(t)
        one = jnp.ones((), t.dtype)
        a, log_sigma = _anchor_moments(self.anchor, self.vp_weight, t, one, self.delta)
        return a, jnp.exp(log_sigma)

    def skip_path(self, t: Time, like: Data) -> tuple[Array, Array]:
        """The anchor's a(t) and the learned sigma(x = 0, t), elementwise: the network's
        log-scale correction at the standardised data's mean is included.

        The network can learn a log-scale correction that hardly depends on x but moves the
        whole schedule; a skip built on the anchor's sigma then does not match the path, and
        this one does (the `gaussian-full` skip, not the default; docs/training.md). The mean
        correction is left out, so the skip stays a multiple of z.
        """
        like = jnp.asarray(like)
        t = jnp.asarray(t, like.dtype)
        a, _ = self.reference_path(t)
        _, log_sigma = self.mean_and_log_scale(jnp.zeros_like(like), t)
        return a, jnp.exp(log_sigma)


def _anchor_moments(anchor: AnchorChoice, vp_weight, t: Array, x: Array, delta: float):
    """(mu, log sigma) of the anchor path: only the paths the anchor needs are evaluated."""
    if anchor is AnchorChoice.VP:
        return _vp_moments(t, x, delta)
    linear_mu, linear_log_sigma = (1 - t) * x, _linear_log_scale(t, delta)
    if anchor is AnchorChoice.LINEAR:
        return linear_mu, linear_log_sigma
    vp_mu, vp_log_sigma = _vp_moments(t, x, delta)
    w = jnp.asarray(vp_weight, x.dtype)
    return (1 - w) * linear_mu + w * vp_mu, (1 - w) * linear_log_sigma + w * vp_log_sigma


def neural_gaussian(
    data_size: int,
    *,
    width: int = 128,
    depth: int = 3,
    delta: float = 0.01,
    input_octaves: int = 0,
    anchor: AnchorChoice = AnchorChoice.LINEAR,
    key: Key,
) -> NeuralGaussian:
    """A `NeuralGaussian` with the reference MLP (zero-initialised output layer) for vectors;
    `input_octaves` as in `TimeConditionedMLP`."""
    network = TimeConditionedMLP(
        data_size,
        2 * data_size,
        width=width,
        depth=depth,
        zero_init_output=True,
        input_octaves=input_octaves,
        key=key,
    )
    return NeuralGaussian(network=network, delta=delta, anchor=anchor)
