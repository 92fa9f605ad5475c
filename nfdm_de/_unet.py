"""A small U-Net conditioned on time, for images of shape (H, W, C) (channel-last, one example).

The same network serves as the data predictor (`out_channels = C`) and as the forward network of
`NeuralGaussian` (`out_channels = 2 C`, mean then log-scale corrections on the channel axis, with
a zero-initialised output convolution so training starts at the linear interpolant).

Layout, for `channel_mults = (m_0, ..., m_{L-1})` and `c_i = base_channels * m_i`:

    stem conv -> [ResBlock(c_i), downsample]_{i < L-1} -> ResBlock(c_{L-1})
              -> middle ResBlock
              -> [upsample, concat skip_i, ResBlock(c_i)]_{i = L-1 .. 0} -> norm, SiLU, conv

Every ResBlock scales and shifts its normalised activations by a projection of the time
embedding (Fourier features of t through a small MLP). Spatial sizes not divisible by 2^(L-1)
(e.g. 7x7 with three levels) are zero-padded on the bottom/right before the network and cropped
after it, so any H, W >= 1 works; 8x8, 28x28 and 32x32 need no padding with the default two
levels.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float

from ._custom_types import Key, Time
from ._forward import AnchorChoice, NeuralGaussian
from ._nn import FourierTimeFeatures, Predictor, PredictorSkipChoice, _bias


def _num_groups(channels: int, max_groups: int) -> int:
    # GroupNorm needs the group count to divide the channels: take the largest divisor that
    # does not exceed `max_groups`.
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


def _conv3x3(in_channels: int, out_channels: int, key: Key) -> eqx.nn.Conv2d:
    return eqx.nn.Conv2d(in_channels, out_channels, 3, padding=1, key=key)


class _ResBlock(eqx.Module):
    """GroupNorm -> SiLU -> conv -> GroupNorm -> time scale/shift -> SiLU -> conv, plus a skip
    path.

    Time enters as a scale and shift *after* the second normalisation: a shift added before it
    would be constant over space and removed by GroupNorm whenever a group is one channel wide.
    """

    norm1: eqx.nn.GroupNorm
    conv1: eqx.nn.Conv2d
    time_projection: eqx.nn.Linear
    norm2: eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d
    skip: eqx.nn.Conv2d | None

    def __init__(
        self, in_channels: int, out_channels: int, embed_size: int, max_groups: int, *, key: Key
    ):
        k1, k2, k3, k4 = jr.split(key, 4)
        self.norm1 = eqx.nn.GroupNorm(_num_groups(in_channels, max_groups), in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, k1)
        self.time_projection = eqx.nn.Linear(embed_size, 2 * out_channels, key=k2)
        self.norm2 = eqx.nn.GroupNorm(_num_groups(out_channels, max_groups), out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels, k3)
        if in_channels == out_channels:
            self.skip = None
        else:
            self.skip = eqx.nn.Conv2d(in_channels, out_channels, 1, key=k4)

    def __call__(self, h: Array, embedding: Array) -> Array:
        # h is channel-first (C, H, W), as Equinox's convolutions expect.
        out = self.conv1(jax.nn.silu(self.norm1(h)))
        scale, shift = jnp.split(self.time_projection(embedding)[:, None, None], 2)
        out = self.norm2(out) * (1 + scale) + shift
        out = self.conv2(jax.nn.silu(out))
        shortcut = h if self.skip is None else self.skip(h)
        return shortcut + out


class _Upsample(eqx.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution (no checkerboard artefacts
    of strided transposed convolutions)."""

    conv: eqx.nn.Conv2d

    def __init__(self, channels: int, *, key: Key):
        self.conv = _conv3x3(channels, channels, key)

    def __call__(self, h: Array) -> Array:
        return self.conv(jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))


class UNet(eqx.Module):
    """A time-conditioned U-Net: (x, t) -> y with x of shape (H, W, in_channels) and y of shape
    (H, W, out_channels), on one example (vmap over a batch).

    **Arguments:**

    - `in_channels`, `out_channels`: channel counts of input and output (last axis).
    - `base_channels`: width of the first level; level i has `base_channels * channel_mults[i]`.
    - `channel_mults`: one entry per resolution; `len(channel_mults) - 1` 2x downsamplings.
    - `num_frequencies`: Fourier time features (`FourierTimeFeatures`).
    - `max_groups`: the largest GroupNorm group count (reduced to divide each width).
    - `zero_init_output`: zero the final convolution, so the network starts as the zero map
      (used by `NeuralGaussian`, which then starts at the linear interpolant).
    - `key`: PRNG key for the initialisation.
    """

    time_features: FourierTimeFeatures
    time_mlp: tuple[eqx.nn.Linear, eqx.nn.Linear]
    stem: eqx.nn.Conv2d
    down_blocks: tuple[_ResBlock, ...]
    downsamples: tuple[eqx.nn.Conv2d, ...]
    middle: _ResBlock
    upsamples: tuple[_Upsample, ...]
    up_blocks: tuple[_ResBlock, ...]
    output_norm: eqx.nn.GroupNorm
    output: eqx.nn.Conv2d
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        base_channels: int = 16,
        channel_mults: Sequence[int] = (1, 2),
        num_frequencies: int = 8,
        max_groups: int = 8,
        zero_init_output: bool = False,
        key: Key,
    ):
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("base_channels", base_channels),
            ("max_groups", max_groups),
        ):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
        channel_mults = tuple(channel_mults)
        if not channel_mults or not all(isinstance(m, int) and m >= 1 for m in channel_mults):
            raise ValueError(
                f"`channel_mults` must be a non-empty sequence of positive integers; got "
                f"{channel_mults!r}."
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        widths = [base_channels * m for m in channel_mults]
        levels = len(widths)
        embed_size = 4 * base_channels
        keys = iter(jr.split(key, 4 * levels + 6))

        # Images keep the faster time features (up to 16 cycles per unit time).
        self.time_features = FourierTimeFeatures(num_frequencies, max_frequency=16.0)
        self.time_mlp = (
            eqx.nn.Linear(self.time_features.size, embed_size, key=next(keys)),
            eqx.nn.Linear(embed_size, embed_size, key=next(keys)),
        )
        self.stem = _conv3x3(in_channels, widths[0], next(keys))

        down_blocks, downsamples = [], []
        previous = widths[0]
        for i, width in enumerate(widths):
            down_blocks.append(_ResBlock(previous, width, embed_size, max_groups, key=next(keys)))
            if i < levels - 1:
                downsamples.append(
                    eqx.nn.Conv2d(width, width, 3, stride=2, padding=1, key=next(keys))
                )
            previous = width
        self.down_blocks = tuple(down_blocks)
        self.downsamples = tuple(downsamples)
        self.middle = _ResBlock(previous, previous, embed_size, max_groups, key=next(keys))

        # Built from the coarsest level up; `upsamples[i]` brings level i + 1 to level i.
        up_blocks, upsamples = [], []
        for i in reversed(range(levels)):
            if i < levels - 1:
                upsamples.append(_Upsample(previous, key=next(keys)))
            up_blocks.append(
                _ResBlock(previous + widths[i], widths[i], embed_size, max_groups, key=next(keys))
            )
            previous = widths[i]
        self.up_blocks = tuple(up_blocks)
        self.upsamples = tuple(upsamples)

        self.output_norm = eqx.nn.GroupNorm(_num_groups(widths[0], max_groups), widths[0])
        output = _conv3x3(widths[0], out_channels, next(keys))
        if zero_init_output:
            output = eqx.tree_at(
                lambda conv: (conv.weight, conv.bias),
                output,
                (jnp.zeros_like(output.weight), jnp.zeros_like(_bias(output))),
            )
        self.output = output

    @property
    def num_levels(self) -> int:
        return len(self.down_blocks)

    def __call__(
        self, x: Float[Array, "height width channels"], t: Time
    ) -> Float[Array, "height width out_channels"]:
        if x.ndim != 3 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"UNet expects one image of shape (height, width, {self.in_channels}); got "
                f"{x.shape}."
            )
        height, width, _ = x.shape
        features = self.time_features(jnp.asarray(t, x.dtype))
        embedding = self.time_mlp[1](jax.nn.silu(self.time_mlp[0](features)))

        # Pad so every downsampling halves an even size; cropped off again at the end.
        multiple = 2 ** (self.num_levels - 1)
        pad_h = -height % multiple
        pad_w = -width % multiple
        h = jnp.pad(jnp.moveaxis(x, -1, 0), ((0, 0), (0, pad_h), (0, pad_w)))

        h = self.stem(h)
        skips = []
        for i, block in enumerate(self.down_blocks):
            h = block(h, embedding)
            skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
        h = self.middle(h, embedding)
        # The coarsest level has no upsampling; each finer one starts with one.
        upsamples = (None, *self.upsamples)
        for block, upsample, skip in zip(self.up_blocks, upsamples, reversed(skips), strict=True):
            if upsample is not None:
                h = upsample(h)
            h = block(jnp.concatenate([h, skip], axis=0), embedding)
        h = self.output(jax.nn.silu(self.output_norm(h)))
        return jnp.moveaxis(h[:, :height, :width], 0, -1)


def _check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(n, int) and n >= 1 for n in shape):
        raise ValueError(
            f"`image_shape` must be (height, width, channels) of positive integers; got "
            f"{image_shape!r}."
        )
    return shape


def unet_predictor(
    image_shape: Sequence[int],
    *,
    base_channels: int = 16,
    channel_mults: Sequence[int] = (1, 2),
    num_frequencies: int = 8,
    delta: float = 0.01,
    skip: PredictorSkipChoice = PredictorSkipChoice.GAUSSIAN,
    key: Key,
) -> Predictor:
    """The reference predictor for images: `Predictor` around a `UNet` with C -> C channels."""
    _, _, channels = _check_image_shape(image_shape)
    network = UNet(
        channels,
        channels,
        base_channels=base_channels,
        channel_mults=channel_mults,
        num_frequencies=num_frequencies,
        key=key,
    )
    return Predictor(network=network, delta=delta, skip=skip)


def unet_neural_gaussian(
    image_shape: Sequence[int],
    *,
    base_channels: int = 16,
    channel_mults: Sequence[int] = (1, 2),
    num_frequencies: int = 8,
    delta: float = 0.01,
    anchor: AnchorChoice = AnchorChoice.LINEAR,
    key: Key,
) -> NeuralGaussian:
    """A `NeuralGaussian` for images: a `UNet` with C -> 2C channels (mean then log-scale
    corrections) and a zero-initialised output convolution, so it starts at its anchor path
    (the linear interpolant by default)."""
    _, _, channels = _check_image_shape(image_shape)
    network = UNet(
        channels,
        2 * channels,
        base_channels=base_channels,
        channel_mults=channel_mults,
        num_frequencies=num_frequencies,
        zero_init_output=True,
        key=key,
    )
    return NeuralGaussian(network=network, delta=delta, anchor=anchor)
