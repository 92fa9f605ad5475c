"""The optimiser and the learning-rate schedules of a run."""

import functools
import math
from collections.abc import Callable

import equinox as eqx
import jax
import optax

from ._config import OptimConfig, ScheduleChoice, TrainConfig


def learning_rate_schedule(config: OptimConfig, steps: int) -> Callable[[int], float]:
    """step -> learning rate: linear warm-up from 0 to `lr` over `warmup` steps, then a cosine
    decay reaching `final_lr_fraction * lr` at `steps` (or a constant rate). A cosine run
    shorter than its warm-up ends the warm-up at `steps - 1`; a constant rate does not depend on
    `steps`, so a run extended by `resume` equals one trained to the new length straight away.

    Computed on the host in plain Python and fed to the jitted step as a number, so the compiled
    step does not depend on the run length (resuming with more steps does not recompile).
    """
    # A cosine decay is shaped by the run's length, so a short run ends its warm-up early to
    # decay at all; a constant rate is not, so that resuming with more steps extends it exactly.
    if config.schedule is ScheduleChoice.CONSTANT:
        warmup = config.warmup
    else:
        warmup = min(config.warmup, max(steps - 1, 0))
    peak, end = config.lr, config.lr * config.final_lr_fraction

    def schedule(step: int) -> float:
        if step < warmup:
            return peak * step / warmup
        if config.schedule is ScheduleChoice.CONSTANT:
            return peak
        progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
        return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * progress))

    return schedule


def run_schedule(config: TrainConfig) -> Callable[[int], float]:
    """step -> learning rate over a whole run: `learning_rate_schedule` for the `steps`
    simulation-free steps, then for the likelihood phase a cosine decay from `likelihood_lr` to
    1% of it over `likelihood_steps` (no warm-up: the phase starts from a trained model)."""
    first = learning_rate_schedule(config.optim, config.steps)
    length = max(config.resolved_likelihood_steps, 1)
    # A run without a phase may leave its (moot) rate automatic.
    peak = 0.0 if config.likelihood_lr is None else config.likelihood_lr

    def schedule(step: int) -> float:
        if step < config.steps:
            return first(step)
        progress = min((step - config.steps) / length, 1.0)
        return 0.01 * peak + 0.5 * 0.99 * peak * (1 + math.cos(math.pi * progress))

    return schedule


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """Gradient clipping by global norm, then AdamW *without* its learning rate: the step
    multiplies the update by -lr(step) (see `learning_rate_schedule`), which is AdamW exactly.

    Cached: the same settings give the same object, so the jitted step (which takes the optimiser
    as a static argument) is not recompiled when a run is resumed in the same process."""
    return _optimizer(
        float(config.clip), float(config.weight_decay), float(config.forward_network_lr_scale)
    )


@functools.lru_cache(maxsize=32)
def _optimizer(
    clip: float, weight_decay: float, forward_network_lr_scale: float = 1.0
) -> optax.GradientTransformation:
    parts = [
        optax.clip_by_global_norm(clip),
        _standard_promotion(optax.scale_by_adam()),
        optax.add_decayed_weights(weight_decay),
    ]
    # Only when asked: an extra link would change the optimiser state's structure, and with it
    # every checkpoint saved before the option existed.
    if forward_network_lr_scale != 1.0:
        parts.append(_scale_forward_network(forward_network_lr_scale))
    return optax.chain(*parts)


def _standard_promotion(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` with its update traced under JAX's standard dtype promotion.

    optax's Adam raises its Python-float decay rates to its int32 step count (bias correction),
    which strict promotion refuses; under standard promotion, JAX's default, that is a float of
    the default dtype. Its state, and so every checkpoint's layout, is `inner`'s own."""

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return inner.update(updates, state, params)

    return optax.GradientTransformation(inner.init, update)


def _scale_forward_network(scale: float) -> optax.GradientTransformation:
    """Multiplies the updates of `model.forward.network` by `scale` (after AdamW's weight decay,
    so 0 freezes the network exactly). The config allows it for a `NeuralGaussian` only."""

    def update(updates, state, params=None):
        del params
        updates = eqx.tree_at(
            lambda model: model.forward.network,
            updates,
            replace_fn=lambda network: jax.tree.map(lambda u: scale * u, network),
        )
        return updates, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
