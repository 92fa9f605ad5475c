"""A learnable non-Gaussian forward process: conditional spline couplings on the noise.

    z = F(eps, t, x) = mu(x, t) + sigma(x, t) * G(eps; t, x)

`G` is a stack of coupling layers acting on the noise. Each layer transforms one part of the
coordinates by a monotone rational-quadratic spline whose knots come from a network that sees the
other part, the data point `x` and the time `t`; its raw outputs are multiplied by the gate
t (1 - t), and a spline with all-zero raw parameters is the identity *bit for bit* (see
`_spline_forward`). So G(., 0, x) = G(., 1, x) = identity exactly and the Gaussian anchor
(mu, sigma) (a `NeuralGaussian` or the `LinearInterpolant`) supplies the boundary conditions
F(eps, 0, x) = x + delta * eps and F(eps, 1, x) = eps (docs/math.md, "The forward process").

Why rational-quadratic splines (Durkan et al., 2019) rather than affine couplings: an affine
coupling is Gaussian in each transformed coordinate given the others, and for D = 1 (nothing to
condition on) a stack of affine maps is just another Gaussian. A monotone spline can bend a
one-dimensional marginal into skewed, heavy- or light-tailed and multimodal shapes, its inverse is
closed form (one quadratic per coordinate), and its log-derivative is cheap and exact. Outside
[-bound, bound] the spline is the identity, with slope 1 at the end knots so it is C^1.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Int

from ._custom_types import Data, Key, Scalar, Time
from ._forward import (
    AbstractForwardProcess,
    AbstractGaussianForwardProcess,
    LinearInterpolant,
    _check_delta,
    neural_gaussian,
    standard_normal_log_prob,
)
from ._nn import TimeConditionedMLP

# Keep bins and slopes away from zero so the spline stays well conditioned when trained.
_MIN_BIN = 1e-3
_MIN_SLOPE = 1e-3
# softplus(_SLOPE_SHIFT) = 1: a raw slope parameter of zero means slope one.
_SLOPE_SHIFT = math.log(math.e - 1.0)


def _knots(raw: Array, bound: float) -> tuple[Array, Array]:
    """Knot positions (n, K + 1) on [-bound, bound] and bin sizes (n, K) from raw sizes (n, K)."""
    num_bins = raw.shape[-1]
    sizes = _MIN_BIN + (1 - _MIN_BIN * num_bins) * jax.nn.softmax(raw, axis=-1)
    # A cumulative sum as a product with a triangular matrix: K is small, and this compiles to
    # far less than a scan.
    upper = jnp.triu(jnp.ones((num_bins, num_bins - 1), raw.dtype))
    inner = 2 * bound * jnp.matmul(sizes, upper, precision=jax.lax.Precision.HIGHEST) - bound
    ends = jnp.full((*raw.shape[:-1], 1), bound, raw.dtype)
    # The end knots are pinned to -bound and +bound exactly.
    knots = jnp.concatenate([-ends, inner, ends], axis=-1)
    return knots, knots[..., 1:] - knots[..., :-1]


def _slopes(raw: Array) -> Array:
    """Slopes (n, K + 1) at the knots: the inner ones from raw (n, K - 1), the end ones 1.

    The ratio is exactly one when `raw` is zero (x / x = 1 in IEEE arithmetic).
    """
    one = _MIN_SLOPE + jax.nn.softplus(jnp.asarray(_SLOPE_SHIFT, raw.dtype))
    inner = (_MIN_SLOPE + jax.nn.softplus(raw + _SLOPE_SHIFT)) / one
    ends = jnp.ones((*raw.shape[:-1], 1), raw.dtype)
    return jnp.concatenate([ends, inner, ends], axis=-1)


class _Bins(eqx.Module):
    """The bin of each coordinate: input knot, output knot, widths, heights, end slopes."""

    x_k: Array
    y_k: Array
    w: Array
    h: Array
    d_k: Array
    d_k1: Array


def _bins(params: Array, values: Array, bound: float, *, from_output: bool) -> _Bins:
    """Select the bin containing each value (in input or output space) from raw parameters."""
    num_bins = (params.shape[-1] + 1) // 3
    knots_x, widths = _knots(params[..., :num_bins], bound)
    knots_y, heights = _knots(params[..., num_bins : 2 * num_bins], bound)
    slopes = _slopes(params[..., 2 * num_bins :])
    knots = knots_y if from_output else knots_x
    k = jnp.sum(values[..., None] >= knots[..., 1:-1], axis=-1)
    # Select with a one-hot mask rather than a gather, all six quantities at once: K is small,
    # and masks differentiate and batch into simple elementwise code.
    one_hot = (k[..., None] == jnp.arange(num_bins)).astype(params.dtype)
    table = jnp.stack(
        [knots_x[..., :-1], knots_y[..., :-1], widths, heights, slopes[..., :-1], slopes[..., 1:]]
    )
    return _Bins(*jnp.sum(one_hot * table, axis=-1))


def _correction(xi: Array, s: Array, b: _Bins) -> tuple[Array, Array]:
    """The rational-quadratic part of the spline beyond its chord, and its denominator.

    Within a bin, with xi in [0, 1] and s = h / w the bin's mean slope, the spline is
    y = y_k + h xi + h C(xi) with
    C(xi) = xi (1 - xi) ((d_k - s) - (d_k + d_k1 - 2 s) xi) / (s + (d_k + d_k1 - 2 s) xi (1 - xi)),
    which is algebraically the usual form y_k + h (s xi^2 + d_k xi (1 - xi)) / denominator.
    """
    xi1 = xi * (1 - xi)
    curvature = b.d_k + b.d_k1 - 2 * s
    denominator = s + curvature * xi1
    return xi1 * ((b.d_k - s) - curvature * xi) / denominator, denominator


def _log_slope(xi: Array, s: Array, denominator: Array, b: _Bins) -> Array:
    """log dy/de of the spline inside a bin."""
    numerator = b.d_k1 * xi**2 + 2 * s * xi * (1 - xi) + b.d_k * (1 - xi) ** 2
    return 2 * jnp.log(s) + jnp.log(numerator) - 2 * jnp.log(denominator)


def _spline_forward(params: Array, e: Array, bound: float) -> tuple[Array, Array]:
    """y = spline(e) elementwise and log dy/de; identity outside [-bound, bound].

    Written as y = e + (y_k - x_k) + (h - w) xi + h C(xi) (since x_k + w xi = e): with zero raw
    parameters widths equal heights, knots coincide and every slope is one, so each added term is
    exactly zero and y == e bit for bit, which makes the boundary conditions exact.
    """
    inside = jnp.abs(e) < bound
    e_in = jnp.clip(e, -bound, bound)
    b = _bins(params, e_in, bound, from_output=False)
    xi = (e_in - b.x_k) / b.w
    s = b.h / b.w
    c, denominator = _correction(xi, s, b)
    y = e_in + (b.y_k - b.x_k) + (b.h - b.w) * xi + b.h * c
    log_slope = _log_slope(xi, s, denominator, b)
    return jnp.where(inside, y, e), jnp.where(inside, log_slope, 0.0)


def _spline_inverse(params: Array, y: Array, bound: float) -> tuple[Array, Array]:
    """e = spline^{-1}(y) elementwise and log de/dy (one quadratic per coordinate)."""
    inside = jnp.abs(y) < bound
    y_in = jnp.clip(y, -bound, bound)
    b = _bins(params, y_in, bound, from_output=True)
    s = b.h / b.w
    rise = y_in - b.y_k
    curvature = b.d_k + b.d_k1 - 2 * s
    qa = b.h * (s - b.d_k) + rise * curvature
    qb = b.h * b.d_k - rise * curvature
    qc = -s * rise
    discriminant = jnp.maximum(qb**2 - 4 * qa * qc, 0.0)
    # The root in [0, 1], in the form that stays accurate when qa -> 0 (a linear bin).
    xi = 2 * qc / (-qb - jnp.sqrt(discriminant))
    c, denominator = _correction(xi, s, b)
    # e = x_k + w xi, written around y so that the identity spline returns y bit for bit.
    e = y_in + (b.x_k - b.y_k) + (b.w - b.h) * xi - b.h * c
    log_slope = _log_slope(xi, s, denominator, b)
    return jnp.where(inside, e, y), jnp.where(inside, -log_slope, 0.0)


def _coupling_masks(data_size: int, num_layers: int) -> np.ndarray:
    """Which coordinates each layer transforms: alternately the even and the odd ones for D >= 2
    (each conditioned on the rest); for D = 1 the one coordinate, conditioned on (x, t) alone."""
    if data_size == 1:
        return np.ones((num_layers, 1), bool)
    index = np.arange(data_size)
    return np.stack([(index + layer) % 2 == 0 for layer in range(num_layers)])


def _slots(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the indices the splines act on, padded to a common count H = max |B_l| with
    distinct conditioning coordinates (which get zero parameters, so stay unchanged bit for bit):
    the layers then share one shape and run in a `lax.scan`, and the splines run on H, not D,
    coordinates (half the work for D = 2)."""
    width = int(masks.sum(axis=1).max())
    slots, valid = [], []
    for mask in masks:
        transformed = np.flatnonzero(mask)
        padding = np.flatnonzero(~mask)[: width - transformed.size]
        slots.append(np.concatenate([transformed, padding]))
        valid.append(np.arange(width) < transformed.size)
    return np.stack(slots).astype(np.int32), np.stack(valid)


class NeuralFlow(AbstractForwardProcess):
    """A learnable non-Gaussian forward process (docs/math.md, "The forward process").

        F(eps, t, x) = anchor.transform(G(eps; t, x), t, x),   G = layer_L o ... o layer_1

    Layer l is a coupling: with `masks[l]` marking the coordinates it transforms (B, the rest A),

        e_B -> spline(e_B; t (1 - t) NN_l(e_A, x, t)),   e_A unchanged,

    with a monotone rational-quadratic spline per coordinate (`num_bins` bins on
    [-bound, bound], the identity outside). The gate t (1 - t) makes every layer the identity
    at t = 0 and t = 1 bit for bit, so the Gaussian `anchor` (a `NeuralGaussian` or the
    `LinearInterpolant`) carries the boundary conditions. With the builder `neural_flow` every
    output layer starts at zero, so training starts exactly at the linear interpolant; a
    `NeuralGaussian` anchor makes the family contain the Gaussian NFDM.

    **Arguments:**

    - `anchor`: an `AbstractGaussianForwardProcess`; `delta` is taken from it.
    - `conditioners`: one `TimeConditionedMLP` per layer, *stacked* (every array has a leading
      axis of length L, as built by `eqx.filter_vmap`), mapping the concatenation of
      (e with the transformed coordinates zeroed, x) of size 2D to H * (3 num_bins - 1) raw
      spline parameters, H = the most coordinates any layer transforms (see `_slots`).
    - `masks`: boolean (L, D), True where layer l transforms; at least one per layer.
    - `num_bins`, `bound`: the splines' bins on [-bound, bound].
    - `unroll`: unroll the `lax.scan` over layers (faster steps, compile time growing with L).

    Acts on vectors of shape (D,), D >= 1. `transform`, `inverse` and `log_det_inverse` define the
    process; `velocity_and_score` is overridden only to share work between the two fields (one
    inverse pass with a reverse-mode gradient for the score, one forward pass with a time JVP for
    the velocity); it computes the same quantities as the base class's generic autodiff path.
    """

    anchor: AbstractGaussianForwardProcess
    conditioners: TimeConditionedMLP
    masks: Bool[Array, "layers size"]
    slots: Int[Array, "layers slots"]
    valid: Bool[Array, "layers slots"]
    num_bins: int = eqx.field(static=True)
    bound: float = eqx.field(static=True)
    unroll: bool = eqx.field(static=True)
    delta: float = eqx.field(static=True)

    def __init__(
        self,
        anchor: AbstractGaussianForwardProcess,
        conditioners: TimeConditionedMLP,
        masks: Bool[ArrayLike, "layers size"],
        *,
        num_bins: int = 8,
        bound: float = 4.0,
        unroll: bool = True,
    ):
        if not isinstance(anchor, AbstractGaussianForwardProcess):
            raise ValueError(
                f"`anchor` must be an AbstractGaussianForwardProcess; got {type(anchor).__name__}."
            )
        if not (isinstance(num_bins, int) and 2 <= num_bins < 1 / _MIN_BIN):
            raise ValueError(f"`num_bins` must be an integer in [2, 1000); got {num_bins!r}.")
        if not (isinstance(bound, int | float) and bound > 0):
            raise ValueError(f"`bound` must be a positive number; got {bound!r}.")
        masks = np.asarray(masks, bool)
        if masks.ndim != 2 or not masks.any(axis=1).all():
            raise ValueError(
                "`masks` must be a boolean array (layers, D) with at least one transformed "
                f"coordinate per layer; got shape {masks.shape} with "
                f"{masks.sum(axis=-1).tolist()} per layer."
            )
        num_layers, data_size = masks.shape
        slots, valid = _slots(masks)
        expected = (2 * data_size, slots.shape[1] * (3 * num_bins - 1))
        got = (conditioners.in_size, conditioners.out_size)
        if got != expected:
            raise ValueError(
                f"NeuralFlow conditioners must map size {expected[0]} to {expected[1]} for "
                f"D = {data_size}, {slots.shape[1]} transformed coordinates per layer and "
                f"{num_bins} bins; got {got[0]} to {got[1]}."
            )
        arrays = jax.tree.leaves(eqx.filter(conditioners, eqx.is_array))
        leading = {leaf.shape[0] if leaf.ndim else None for leaf in arrays}
        if leading != {num_layers}:
            raise ValueError(
                f"NeuralFlow conditioners must be stacked over the {num_layers} layers of "
                f"`masks` (a leading axis on every array); got leading sizes {leading}."
            )
        self.anchor = anchor
        self.conditioners = conditioners
        self.masks = jnp.asarray(masks)
        self.slots = jnp.asarray(slots)
        self.valid = jnp.asarray(valid)
        self.num_bins = num_bins
        self.bound = float(bound)
        self.unroll = bool(unroll)
        self.delta = anchor.delta

    @property
    def num_layers(self) -> int:
        return self.masks.shape[0]

    def _check(self, a: Array, name: str) -> None:
        size = self.masks.shape[1]
        if a.shape != (size,):
            raise ValueError(
                f"NeuralFlow acts on vectors of shape ({size},); `{name}` has shape {a.shape}."
            )

    def _layer(self, conditioner, layer, e, t, x, *, inverse: bool):
        mask, slots, valid = layer
        inputs = jnp.concatenate([jnp.where(mask, 0.0, e), x])
        raw = conditioner(inputs, t).reshape(slots.shape[0], 3 * self.num_bins - 1)
        # Zero parameters give the identity spline bit for bit: the gate switches every layer
        # off at both ends, and padding slots stay unchanged.
        params = jnp.where(valid[:, None], t * (1 - t) * raw, 0.0)
        spline = _spline_inverse if inverse else _spline_forward
        values, log_slope = spline(params, e[slots], self.bound)
        e = e.at[slots].set(values, unique_indices=True)
        return e, jnp.sum(jnp.where(valid, log_slope, 0.0))

    def _flow_forward(self, eps: Array, t: Array, x: Array) -> Array:
        dynamic, static = eqx.partition(self.conditioners, eqx.is_array)

        def layer(e, inputs):
            conditioner = eqx.combine(inputs[0], static)
            return self._layer(conditioner, inputs[1:], e, t, x, inverse=False)[0], None

        layers = (dynamic, self.masks, self.slots, self.valid)
        u, _ = jax.lax.scan(layer, eps, layers, unroll=self.unroll)
        return u

    def _flow_inverse(self, u: Array, t: Array, x: Array) -> tuple[Array, Array]:
        dynamic, static = eqx.partition(self.conditioners, eqx.is_array)

        def layer(e, inputs):
            conditioner = eqx.combine(inputs[0], static)
            return self._layer(conditioner, inputs[1:], e, t, x, inverse=True)

        layers = (dynamic, self.masks, self.slots, self.valid)
        eps, log_dets = jax.lax.scan(layer, u, layers, reverse=True, unroll=self.unroll)
        return eps, jnp.sum(log_dets)

    def _inverse_and_log_det(self, z: Array, t: Array, x: Array) -> tuple[Array, Array]:
        u = self.anchor.inverse(z, t, x)
        eps, log_det = self._flow_inverse(u, t, x)
        return eps, log_det + self.anchor.log_det_inverse(z, t, x)

    def _transform(self, eps: Array, t: Array, x: Array) -> Array:
        return self.anchor.transform(self._flow_forward(eps, t, x), t, x)

    def _log_prob(self, z: Array, t: Array, x: Array) -> Array:
        eps, log_det = self._inverse_and_log_det(z, t, x)
        return standard_normal_log_prob(eps) + log_det

    def _velocity_and_score(self, z: Array, t: Array, x: Array) -> tuple[Array, Array]:
        # z = mu + sigma * u with u = G(eps): the anchor's moments and their rates in one JVP.
        mu, log_sigma, dmu, dlog_sigma = self.anchor._moments_and_rates(x, t)
        sigma = jnp.exp(log_sigma)
        u = (z - mu) / sigma

        def log_density(u):
            eps, log_det = self._flow_inverse(u, t, x)
            return standard_normal_log_prob(eps) + log_det, eps

        # The anchor's log-determinant, -sum(log sigma), does not depend on z.
        grad_u, eps = jax.grad(log_density, has_aux=True)(u)
        score = grad_u / sigma
        _, du = jax.jvp(lambda s: self._flow_forward(eps, s, x), (t,), (jnp.ones_like(t),))
        velocity = dmu + dlog_sigma * (z - mu) + sigma * du
        return velocity, score

    # The public methods compile their bodies (with `t` as a traced array, so new times do not
    # recompile): the spline layers are many small operations, which are slow op by op.

    def transform(self, eps: Data, t: Time, x: Data) -> Data:
        self._check(eps, "eps")
        return _compiled(self._transform, eps, jnp.asarray(t, eps.dtype), x)

    def inverse(self, z: Data, t: Time, x: Data) -> Data:
        self._check(z, "z")
        return _compiled(self._inverse_and_log_det, z, jnp.asarray(t, z.dtype), x)[0]

    def log_det_inverse(self, z: Data, t: Time, x: Data) -> Scalar:
        self._check(z, "z")
        return _compiled(self._inverse_and_log_det, z, jnp.asarray(t, z.dtype), x)[1]

    def log_prob(self, z: Data, t: Time, x: Data) -> Scalar:
        self._check(z, "z")
        return _compiled(self._log_prob, z, jnp.asarray(t, z.dtype), x)

    def velocity_and_score(self, z: Data, t: Time, x: Data) -> tuple[Data, Data]:
        self._check(z, "z")
        return _compiled(self._velocity_and_score, z, jnp.asarray(t, z.dtype), x)


@eqx.filter_jit
def _compiled(method, *args):
    return method(*args)


@eqx.filter_jit
def _stacked_conditioners(keys, in_size, out_size, width, depth):
    # One compiled construction (sizes are static) instead of many small operations.
    def make(key):
        return TimeConditionedMLP(
            in_size, out_size, width=width, depth=depth, zero_init_output=True, key=key
        )

    return eqx.filter_vmap(make)(keys)


def neural_flow(
    data_size: int,
    *,
    width: int = 64,
    depth: int = 2,
    num_layers: int = 4,
    num_bins: int = 8,
    bound: float = 4.0,
    learn_anchor: bool = True,
    anchor_width: int | None = None,
    anchor_depth: int | None = None,
    unroll: bool = True,
    delta: float = 0.01,
    key: Key,
) -> NeuralFlow:
    """A `NeuralFlow` for vectors of size `data_size` with reference networks.

    - `width`, `depth`: each coupling conditioner's MLP (hidden width, number of hidden layers).
    - `num_layers`: coupling layers. For D >= 2 they alternate between the even and the odd
      coordinates (each conditioned on the rest, x and t); for D = 1 every layer transforms the
      one coordinate conditioned on (x, t) alone.
    - `num_bins`, `bound`: spline bins on [-bound, bound]; the identity outside.
    - `learn_anchor`: a `NeuralGaussian` anchor (an MLP of `anchor_width` x `anchor_depth`,
      default `width` x `depth`) when true; the fixed `LinearInterpolant` when false.
    - `unroll`: unroll the loop over layers (faster steps) or keep a `lax.scan` (compile time
      independent of `num_layers`; the tests use this). The same mathematics either way.
    - `delta`: the noise scale at t = 0.

    Every output layer starts at zero: the process starts exactly at the linear interpolant.
    """
    _check_delta(delta)
    for name, value in (("data_size", data_size), ("num_layers", num_layers)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
    if not (isinstance(num_bins, int) and 2 <= num_bins < 1 / _MIN_BIN):
        raise ValueError(f"`num_bins` must be an integer in [2, 1000); got {num_bins!r}.")
    anchor_key, layers_key = jr.split(key)
    if learn_anchor:
        anchor = neural_gaussian(
            data_size,
            width=width if anchor_width is None else anchor_width,
            depth=depth if anchor_depth is None else anchor_depth,
            delta=delta,
            key=anchor_key,
        )
    else:
        anchor = LinearInterpolant(delta=delta)

    masks = _coupling_masks(data_size, num_layers)
    num_slots = int(masks.sum(axis=1).max())
    conditioners = _stacked_conditioners(
        jr.split(layers_key, num_layers),
        2 * data_size,
        num_slots * (3 * num_bins - 1),
        width,
        depth,
    )
    return NeuralFlow(anchor, conditioners, masks, num_bins=num_bins, bound=bound, unroll=unroll)
