"""Reference networks: time features, an MLP conditioned on time, the x_hat predictor."""

import enum
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float

from ._custom_types import Context, Data, Key, Network, Scalar, Time

# The highest time frequency (cycles per unit time) of the vector networks' time features. It
# sets how finely an adaptive ODE solve steps in t: on eight-gaussians (3,000 simulation-free
# steps) the likelihood ODE took 211 evaluations per example with 4 against 301 with 16, and
# both the ODE and bound gaps were lower (docs/training.md, "The likelihood phase").
TIME_MAX_FREQUENCY = 4.0


class FourierTimeFeatures(eqx.Module):
    """t -> [t, sin(2 pi f_k t), cos(2 pi f_k t)] with fixed geometric frequencies f_k from 0.5
    to `max_frequency` cycles per unit time.

    Fixed (not learned) so that the features of t = 0 and t = 1 stay well separated; geometric
    frequencies give the networks both slow and fast functions of time.
    """

    # Static Python floats: not parameters, and free of any array dtype, so a checkpoint written
    # in one float precision loads in the other.
    frequencies: tuple[float, ...] = eqx.field(static=True)

    def __init__(self, num_frequencies: int = 8, max_frequency: float = TIME_MAX_FREQUENCY):
        if num_frequencies < 1:
            raise ValueError(f"`num_frequencies` must be >= 1; got {num_frequencies}.")
        if not max_frequency > 0.5:
            raise ValueError(f"`max_frequency` must be > 0.5; got {max_frequency}.")
        ratio = (max_frequency / 0.5) ** (1 / max(num_frequencies - 1, 1))
        self.frequencies = tuple(0.5 * ratio**k for k in range(num_frequencies))

    @property
    def size(self) -> int:
        return 1 + 2 * len(self.frequencies)

    def __call__(self, t: Time) -> Float[Array, " features"]:
        # Under jit the unused derivative is dropped.
        return self.value_and_time_derivative(t)[0]

    def value_and_time_derivative(
        self, t: Time
    ) -> tuple[Float[Array, " features"], Float[Array, " features"]]:
        """The features and their derivative in t, [1, w_k cos(w_k t), -w_k sin(w_k t)]."""
        t = jnp.asarray(t)
        omega = 2 * math.pi * jnp.asarray(self.frequencies, t.dtype)
        sin, cos = jnp.sin(omega * t), jnp.cos(omega * t)
        value = jnp.concatenate([t[None], sin, cos])
        derivative = jnp.concatenate([jnp.ones((1,), t.dtype), omega * cos, -omega * sin])
        return value, derivative


class FourierInputFeatures(eqx.Module):
    """x -> [x, sin(f_k x_d), cos(f_k x_d)] for every coordinate d and octave f_k = 2^k
    (k = 0, ..., num_octaves - 1; radians per unit of the standardised data).

    A plain MLP on low-dimensional coordinates is biased towards smooth functions of its input
    ("spectral bias"), so thin structure (rings and spirals of width ~0.05 in standardised
    units) is learned slowly; fixed sinusoids of the input give it the high frequencies directly.
    """

    frequencies: tuple[float, ...] = eqx.field(static=True)

    def __init__(self, num_octaves: int):
        if num_octaves < 1:
            raise ValueError(f"`num_octaves` must be >= 1; got {num_octaves}.")
        self.frequencies = tuple(float(2**k) for k in range(num_octaves))

    def size(self, in_size: int) -> int:
        return in_size * (1 + 2 * len(self.frequencies))

    def __call__(self, x: Float[Array, " in_size"]) -> Float[Array, " features"]:
        angles = (jnp.asarray(self.frequencies, x.dtype)[:, None] * x[None, :]).reshape(-1)
        return jnp.concatenate([x, jnp.sin(angles), jnp.cos(angles)])


class TimeConditionedMLP(eqx.Module):
    """An MLP on vectors: (x, t) -> y, with Fourier time features concatenated to the input and
    added to every hidden layer (so time information does not wash out with depth).

    `input_octaves` > 0 expands the input x with `FourierInputFeatures` first.

    `residual` makes every hidden layer after the first a pre-normalised residual block,
    h <- h + silu(W rms(h) + P features), and feeds the output layer rms(h), where rms(h) =
    h / sqrt(mean(h^2) + 1e-6). On the rotated 8-D shapes it cut the held-out gap by half a nat
    at the same steps; it was even at 10-D and 16-D and worse at 2-D and 32-D (docs/training.md,
    "Predictor architecture").
    """

    time_features: FourierTimeFeatures
    input_features: FourierInputFeatures | None
    layers: tuple[eqx.nn.Linear, ...]
    time_projections: tuple[eqx.nn.Linear, ...]
    output: eqx.nn.Linear
    in_size: int = eqx.field(static=True)
    out_size: int = eqx.field(static=True)
    residual: bool = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        out_size: int,
        *,
        width: int = 128,
        depth: int = 3,
        num_frequencies: int = 8,
        zero_init_output: bool = False,
        input_octaves: int = 0,
        residual: bool = False,
        key: Key,
    ):
        for name, value in (("in_size", in_size), ("out_size", out_size), ("width", width)):
            if value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value}.")
        if depth < 1:
            raise ValueError(f"`depth` (number of hidden layers) must be >= 1; got {depth}.")
        if not isinstance(residual, bool):
            raise ValueError(f"`residual` must be True or False; got {residual!r}.")
        self.in_size = in_size
        self.out_size = out_size
        self.residual = residual
        self.time_features = FourierTimeFeatures(num_frequencies)
        if input_octaves < 0:
            raise ValueError(f"`input_octaves` must be >= 0; got {input_octaves}.")
        input_features = FourierInputFeatures(input_octaves) if input_octaves else None
        self.input_features = input_features
        features_in = in_size if input_features is None else input_features.size(in_size)
        keys = jr.split(key, 2 * depth + 1)
        sizes = [features_in + self.time_features.size] + [width] * depth
        self.layers = tuple(
            eqx.nn.Linear(sizes[i], sizes[i + 1], key=keys[i]) for i in range(depth)
        )
        self.time_projections = tuple(
            eqx.nn.Linear(self.time_features.size, width, use_bias=False, key=keys[depth + i])
            for i in range(depth)
        )
        output = eqx.nn.Linear(width, out_size, key=keys[-1])
        if zero_init_output:
            output = eqx.tree_at(
                lambda layer: (layer.weight, layer.bias),
                output,
                (jnp.zeros_like(output.weight), jnp.zeros_like(_bias(output))),
            )
        self.output = output

    def _check_vector(self, x: Array) -> None:
        if x.shape != (self.in_size,):
            raise ValueError(
                f"TimeConditionedMLP expects a vector of shape ({self.in_size},); got {x.shape}."
            )

    def __call__(self, x: Float[Array, " in_size"], t: Time) -> Float[Array, " out_size"]:
        self._check_vector(x)
        features = self.time_features(jnp.asarray(t, x.dtype))
        inputs = x if self.input_features is None else self.input_features(x)
        h = jnp.concatenate([inputs, features])
        h = jax.nn.silu(self.layers[0](h) + self.time_projections[0](features))
        for layer, projection in zip(self.layers[1:], self.time_projections[1:], strict=True):
            if self.residual:
                h = h + jax.nn.silu(layer(_rms_normalise(h)) + projection(features))
            else:
                h = jax.nn.silu(layer(h) + projection(features))
        return self.output(_rms_normalise(h) if self.residual else h)

    def value_and_time_derivative(
        self, x: Float[Array, " in_size"], t: Time
    ) -> tuple[Float[Array, " out_size"], Float[Array, " out_size"]]:
        """(y, dy/dt) at (x, t), the derivative written out layer by layer.

        Equal to `jax.jvp(lambda s: self(x, s), (t,), (1,))` (tested to float64 rounding), but
        cheaper to differentiate: only the time columns of the first layer carry a tangent, the
        features' derivative is closed form, and every product is written vector @ W^T, which
        vectorises over a batch without transposing activations. A learnable forward process
        needs this derivative twice per training example, so its cost is a visible part of a
        train step.
        """
        self._check_vector(x)
        if self.residual:
            t = jnp.asarray(t, x.dtype)
            return jax.jvp(lambda s: self(x, s), (t,), (jnp.ones_like(t),))
        features, features_rate = self.time_features.value_and_time_derivative(
            jnp.asarray(t, x.dtype)
        )
        inputs = x if self.input_features is None else self.input_features(x)
        num_inputs = inputs.shape[0]
        # The first layer sees [inputs, features]; only its time columns (with the projection)
        # carry a tangent, so the two parts are multiplied apart.
        layer, projection = self.layers[0], self.time_projections[0]
        time_weight = layer.weight[:, num_inputs:] + projection.weight
        pre = inputs @ layer.weight[:, :num_inputs].T + features @ time_weight.T + _bias(layer)
        pre_rate = features_rate @ time_weight.T
        h, rate = _silu_and_rate(pre, pre_rate)
        for layer, projection in zip(self.layers[1:], self.time_projections[1:], strict=True):
            pre = h @ layer.weight.T + _bias(layer) + features @ projection.weight.T
            pre_rate = rate @ layer.weight.T + features_rate @ projection.weight.T
            h, rate = _silu_and_rate(pre, pre_rate)
        return h @ self.output.weight.T + _bias(self.output), rate @ self.output.weight.T


def _rms_normalise(h: Array) -> Array:
    """h / sqrt(mean(h^2) + 1e-6): the normalisation of the residual blocks."""
    return h * jax.lax.rsqrt(jnp.mean(h**2) + 1e-6)


def _silu_and_rate(pre: Array, pre_rate: Array) -> tuple[Array, Array]:
    """silu(a) and its time derivative silu'(a) da/dt, given a = `pre` and da/dt = `pre_rate`."""
    gate = jax.nn.sigmoid(pre)
    # silu(a) = a sigmoid(a); silu'(a) = sigmoid(a) (1 + a (1 - sigmoid(a))).
    return pre * gate, pre_rate * (gate * (1 + pre * (1 - gate)))


def _bias(layer: eqx.nn.Linear | eqx.nn.Conv) -> Array:
    """The bias of a layer built with one (Equinox types it as optional)."""
    if layer.bias is None:
        raise ValueError("expected a linear layer with a bias; this one has use_bias=False.")
    return layer.bias


class ContextMLP(eqx.Module):
    """NN(z, t, c): a `TimeConditionedMLP` on [z, e(c)], where the context c is a class label
    (`num_classes` set: e(c) is row c of a learned table of `embedding_size` columns) or a
    vector of `context_size` entries (e(c) = c).

    The network of a conditional `Predictor`, so the modules serve as conditional diffusion
    blocks: `NFDM.conditioned(c)` is the model of p(x | c).
    """

    network: TimeConditionedMLP
    embedding: Float[Array, "classes size"] | None
    num_classes: int | None = eqx.field(static=True)
    context_size: int = eqx.field(static=True)

    def __init__(
        self,
        data_size: int,
        *,
        num_classes: int | None = None,
        context_size: int | None = None,
        embedding_size: int = 16,
        width: int = 128,
        depth: int = 3,
        input_octaves: int = 0,
        residual: bool = False,
        key: Key,
    ):
        if (num_classes is None) == (context_size is None):
            raise ValueError("ContextMLP takes exactly one of `num_classes` and `context_size`.")
        for name, value in (
            ("num_classes", num_classes),
            ("context_size", context_size),
            ("embedding_size", embedding_size),
        ):
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
        embedding_key, network_key = jr.split(key)
        self.num_classes = num_classes
        if num_classes is not None:
            self.embedding = jr.normal(embedding_key, (num_classes, embedding_size))
            self.context_size = embedding_size
        else:
            assert context_size is not None
            self.embedding = None
            self.context_size = context_size
        self.network = TimeConditionedMLP(
            data_size + self.context_size,
            data_size,
            width=width,
            depth=depth,
            input_octaves=input_octaves,
            residual=residual,
            key=network_key,
        )

    @property
    def in_size(self) -> int:
        """The size of z (what `NFDM` reads to infer the data shape)."""
        return self.network.in_size - self.context_size

    def example_context(self) -> Context:
        """A context of the right shape and dtype (class 0, or the zero vector)."""
        if self.num_classes is not None:
            return jnp.zeros((), jnp.int32)
        return jnp.zeros((self.context_size,), jnp.result_type(float))

    def __call__(self, z: Data, t: Time, context: Context | None = None) -> Data:
        if context is None:
            raise ValueError(
                "this network is conditional: condition the model on a context first "
                "(`model.conditioned(c)`, `nfdm-de sample --label K`)."
            )
        context = jnp.asarray(context)
        if self.embedding is not None:
            if context.shape != () or not jnp.issubdtype(context.dtype, jnp.integer):
                raise ValueError(
                    f"a class-conditional network takes one integer label per example; got an "
                    f"array of shape {context.shape} and dtype {context.dtype}."
                )
            features = self.embedding[context].astype(z.dtype)
        else:
            if context.shape != (self.context_size,):
                raise ValueError(
                    f"this network takes a context vector of shape ({self.context_size},) per "
                    f"example; got {context.shape}."
                )
            features = context.astype(z.dtype)
        return self.network(jnp.concatenate([z, features]), t)


class PredictorSkipChoice(enum.Enum):
    """The skip connection of a `Predictor`."""

    GAUSSIAN = "gaussian"  # posterior mean on the forward process's reference path
    GAUSSIAN_FULL = "gaussian-full"  # ... on its path at the data mean (`skip_path`)
    LINEAR = "linear"  # (1 - t) z + (t + delta) NN(z, t)


def linear_reference_path(t: Time, delta: float) -> tuple[Scalar, Scalar]:
    """(a, sigma) = (1 - t, t + (1 - t) delta): the linear interpolant z = a x + sigma eps."""
    t = jnp.asarray(t)
    return 1 - t, t + (1 - t) * delta


class Predictor(eqx.Module):
    """The data predictor x_hat(z, t) = c_skip(t) z + c_out(t) NN(z, t).

    `skip` = "gaussian" (the default) or "gaussian-full": with (a, sigma) the coefficients of a
    Gaussian path z = a x + sigma eps (which `NFDM` passes in; the linear path when called
    without one),

        c_skip = a / (a^2 + sigma^2),   c_out = sigma / sqrt(a^2 + sigma^2),

    so the skip term alone is the posterior mean E[x | z] for standardised Gaussian data on that
    path, and the network's target, the remaining error, has about unit scale at every t. At
    t = 0 the prediction is exact up to O(delta); at t = 1 the network carries all of it.
    Matching the skip to each process's own path lets every path's predictor learn faster.

    The two differ only in the path `NFDM` passes: for "gaussian" the forward process's
    `reference_path` (the learnable process's anchor, its network's correction left out), for
    "gaussian-full" its `skip_path`, the path at the data mean x = 0 with the network's
    log-scale correction included. The learned correction can shift the whole schedule, which
    "gaussian-full" follows; it suits long simulation-free runs, and can make the likelihood
    phase's ODE stiffer, so it is not the default (docs/training.md). Called directly, the two
    agree.

    `skip` = "linear" is the parameterisation (1 - t) z + (t + delta) NN(z, t), which runs
    stored without a `predictor_skip` setting load with.
    """

    network: Network
    delta: float = 0.01
    skip: PredictorSkipChoice = eqx.field(default=PredictorSkipChoice.GAUSSIAN, static=True)

    def __check_init__(self):
        if not (isinstance(self.delta, int | float) and 0.0 < self.delta < 1.0):
            raise ValueError(f"`delta` must be a float in (0, 1); got {self.delta!r}.")
        if not isinstance(self.skip, PredictorSkipChoice):
            choices = ", ".join(f"PredictorSkipChoice.{s.name}" for s in PredictorSkipChoice)
            raise ValueError(f"`skip` must be one of {choices}; got {self.skip!r}.")

    def example_context(self) -> Context | None:
        """A context of the right shape for a conditional network (`ContextMLP`), else None."""
        example = getattr(self.network, "example_context", None)
        return None if example is None else example()

    def __call__(
        self,
        z: Data,
        t: Time,
        reference_path: tuple[Array, Array] | None = None,
        context: Context | None = None,
    ) -> Data:
        t = jnp.asarray(t, z.dtype)
        out = self.network(z, t) if context is None else self.network(z, t, context)
        if out.shape != z.shape:
            raise ValueError(
                f"Predictor network must return the data's shape {z.shape}; got {out.shape}."
            )
        if self.skip is PredictorSkipChoice.LINEAR:
            return (1 - t) * z + (t + self.delta) * out
        if reference_path is None:
            reference_path = linear_reference_path(t, self.delta)
        a, sigma = (jnp.asarray(c, z.dtype) for c in reference_path)
        norm = a**2 + sigma**2
        return (a / norm) * z + (sigma / jnp.sqrt(norm)) * out


def mlp_predictor(
    data_size: int,
    *,
    width: int = 128,
    depth: int = 3,
    delta: float = 0.01,
    input_octaves: int = 0,
    residual: bool = False,
    skip: PredictorSkipChoice = PredictorSkipChoice.GAUSSIAN,
    num_classes: int | None = None,
    context_size: int | None = None,
    key: Key,
) -> Predictor:
    """The reference predictor for vectors: `Predictor` around a `TimeConditionedMLP`, or
    around a `ContextMLP` when `num_classes` (class labels) or `context_size` (vectors) is given.
    `input_octaves` and `residual` as in `TimeConditionedMLP`.
    """
    if num_classes is None and context_size is None:
        network = TimeConditionedMLP(
            data_size,
            data_size,
            width=width,
            depth=depth,
            input_octaves=input_octaves,
            residual=residual,
            key=key,
        )
    else:
        network = ContextMLP(
            data_size,
            num_classes=num_classes,
            context_size=context_size,
            width=width,
            depth=depth,
            input_octaves=input_octaves,
            residual=residual,
            key=key,
        )
    return Predictor(network=network, delta=delta, skip=skip)


class MonotoneUnitInterval(eqx.Module):
    """A learned increasing bijection h of [0, 1] with h(0) = 0 and h(1) = 1 exactly.

    h(t) = (m(t) - m(0)) / (m(1) - m(0)) with m(t) = t + sum_k w_k sigmoid(a_k (t - c_k)) and
    w_k, a_k > 0, so m is strictly increasing. The w_k start near zero: h(t) ~= t at
    initialisation.
    """

    raw_weights: Float[Array, " hidden"]
    raw_slopes: Float[Array, " hidden"]
    centres: Float[Array, " hidden"]

    def __init__(self, hidden: int = 16, *, key: Key):
        if hidden < 1:
            raise ValueError(f"`hidden` must be >= 1; got {hidden}.")
        self.raw_weights = jnp.full((hidden,), -6.0)
        self.raw_slopes = jnp.full((hidden,), math.log(math.expm1(8.0)))
        self.centres = jr.uniform(key, (hidden,))

    def _unnormalised(self, t: Array) -> Array:
        weights = jax.nn.softplus(self.raw_weights).astype(t.dtype)
        slopes = jax.nn.softplus(self.raw_slopes).astype(t.dtype)
        return t + jnp.sum(weights * jax.nn.sigmoid(slopes * (t - self.centres.astype(t.dtype))))

    def __call__(self, t: Time) -> Scalar:
        t = jnp.asarray(t)
        m0 = self._unnormalised(jnp.zeros_like(t))
        m1 = self._unnormalised(jnp.ones_like(t))
        return (self._unnormalised(t) - m0) / (m1 - m0)
