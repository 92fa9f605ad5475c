"""The inputs and figure of `nfdm-de sample`: a bridge's source points, the reference set and
the plot, each checked against the run."""

import os

TRAJECTORY_PATHS = 64


def bridge_sources(run, source, num: int, trajectories: bool):
    """(source points in model space, their count) for a bridge; (None, num) for an NFDM."""
    import jax.numpy as jnp
    import numpy as np

    import nfdm_de as nd

    dim = int(np.prod(run.model.data_shape))
    is_bridge = run.source_transform is not None
    if source is not None and not is_bridge:
        raise ValueError(
            "--source maps source points through a bridge, but the run holds an NFDM (train one "
            "with `nfdm-de train --data TARGET --source SOURCE`)."
        )
    if not is_bridge:
        if num * dim >= 2**31:
            raise ValueError(
                f"--num {num} x {dim} dimensions exceeds the 2**31 values one array can hold; "
                "sample in several calls with other --seed values."
            )
        if trajectories and dim != 2:
            raise ValueError(f"--trajectories needs 2-D data; the data have {dim} dimensions.")
        return None, num
    if source is None:
        raise ValueError(
            f"the run holds a bridge from {run.config.source!r}: give --source FILE.npy with the "
            "source points to map."
        )
    if trajectories:
        raise ValueError("--trajectories is not supported for bridges.")
    # A built-in set gives --num points of its test split; a file gives all of its points.
    name = os.fspath(source)
    if nd.is_dataset_name(name):
        points = nd.load_dataset(name, split="test", num=num)
    else:
        points = nd.load_dataset(name)
    if points.shape[1] != dim:
        raise ValueError(
            f"--source points have {points.shape[1]} dimensions per example; the bridge's data "
            f"have {dim}."
        )
    return run.source_transform.to_model(jnp.asarray(points, jnp.result_type(float))), len(points)


def reference_points(reference: str | None, num: int, run):
    """The --reference points as (N, D) vectors of the run's dimension, or None."""
    import numpy as np

    import nfdm_de as nd

    if reference is None:
        return None
    points = nd.load_dataset(reference, split="test", num=num)
    points = points.reshape(points.shape[0], -1)
    dim = int(np.prod(run.model.data_shape))
    if points.shape[1] != dim:
        raise ValueError(
            f"reference data have {points.shape[1]} dimensions per example; the model's data "
            f"have {dim}."
        )
    return points


def class_model(run, label: int | None):
    """The NFDM that `sample` draws from: the run's model, conditioned on class `label` for a
    class-conditional run (which needs one)."""
    import jax.numpy as jnp

    import nfdm_de as nd

    classes = run.config.model.num_classes
    if not isinstance(run.model, nd.NFDM):
        if label is not None:
            raise ValueError("--label draws from one class of a class-conditional NFDM run.")
        return run.model
    if classes is None:
        if label is not None:
            raise ValueError("--label needs a class-conditional run; this one is unconditional.")
        return run.model
    if label is None:
        raise ValueError(
            f"this run is class-conditional: give --label K, a class in [0, {classes})."
        )
    if not 0 <= label < classes:
        raise ValueError(f"--label must be a class in [0, {classes}); got {label}.")
    return run.model.conditioned(jnp.asarray(label, jnp.int32))


def draw(
    run, path, samples, reference, trajectories, key, settings, title, sources=None, model=None
) -> None:
    import nfdm_de as nd

    from ._plots import plot_samples

    paths = None
    if trajectories:
        count = min(samples.shape[0], TRAJECTORY_PATHS)
        model = run.model if model is None else model
        _, z, _ = nd.sample_trajectories(model, count, key=key, **settings)
        paths = run.to_data_units(z.reshape(-1, 2)).reshape(-1, count, 2)
    plot_samples(
        path,
        samples,
        title=title,
        reference=reference,
        trajectories=paths,
        num_levels=run.num_levels,
        sources=sources,
    )
