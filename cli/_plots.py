"""Figures of `nfdm-de sample --plot`: a scatter for 2-D data (with generative paths coloured by
time), an image grid for images. The format is the one the file's extension names."""

import math

import numpy as np


def plot_samples(
    path: str,
    samples: np.ndarray,
    *,
    title: str,
    reference: np.ndarray | None = None,
    trajectories: np.ndarray | None = None,
    num_levels: int | None = None,
    sources: np.ndarray | None = None,
) -> None:
    """Draw `samples` (data units) to `path`; `trajectories` is (times, paths, 2) from t = 1
    (noise) to t = 0 (data); `sources` are a bridge's source points, row i mapped to
    `samples[i]` (2-D: drawn with lines pairing the first of them)."""
    import nfdm_de as nd

    if samples.ndim == 4:  # images (N, H, W, C), integer levels
        channels = samples.shape[-1]
        if channels not in (1, 3):
            raise ValueError(f"--plot draws images with 1 or 3 channels; got {channels}.")
        grid = np.rint(samples[: min(64, samples.shape[0])]).astype(np.uint8)
        nd.save_image_grid(
            grid, path, num_levels=num_levels or 256, title=title, pixels_per_cell=10
        )
        return
    dim = samples.shape[1]
    if dim == 2:
        fig = _scatter(samples, reference, trajectories, title, sources)
    elif math.isqrt(dim) ** 2 == dim:
        fig = _square_images(samples, math.isqrt(dim), title)
    else:
        raise ValueError(
            f"--plot draws 2-D data (a scatter) or square images; the data have {dim} dimensions."
        )
    nd.save_figure(fig, path, dpi=120)


# Pairing lines drawn for a bridge: source point -> mapped point.
PAIRING_LINES = 64


def _scatter(samples, reference, trajectories, title, sources=None):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    if reference is not None:
        ax.scatter(*reference[:, :2].T, s=2, alpha=0.3, c="tab:gray", label="reference data")
    if sources is not None:
        count = min(PAIRING_LINES, len(sources))
        for start, end in zip(sources[:count], samples[:count], strict=True):
            ax.plot(*np.stack([start, end]).T, lw=0.5, alpha=0.5, c="0.4")
        ax.plot([], [], lw=0.5, c="0.4", label=f"pairings ({count} shown)")
        ax.scatter(*sources.T, s=2, alpha=0.5, c="tab:orange", label="source points")
    label = "mapped points" if sources is not None else "samples"
    ax.scatter(*samples.T, s=2, alpha=0.5, c="tab:blue", label=label)
    if trajectories is not None:
        times = np.linspace(1.0, 0.0, trajectories.shape[0])
        for k in range(trajectories.shape[1]):
            ax.plot(*trajectories[:, k].T, lw=0.5, alpha=0.35, c="0.4")
        points = ax.scatter(
            trajectories[..., 0].ravel(),
            trajectories[..., 1].ravel(),
            c=np.repeat(times, trajectories.shape[1]),
            cmap="viridis",
            s=3,
        )
        fig.colorbar(points, ax=ax, shrink=0.8, label="time t (1 = noise, 0 = data)")
        ax.scatter(
            *trajectories[0].T,
            marker="o",
            s=14,
            facecolors="none",
            edgecolors="k",
            label="path start (t = 1)",
        )
        ax.scatter(*trajectories[-1].T, marker="x", s=14, c="tab:red", label="path end (t = 0)")
    ax.set(title=title, xlabel="x1", ylabel="x2")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(loc="upper right", markerscale=3, fontsize=7)
    fig.tight_layout()
    return fig


def _square_images(samples, side, title):
    from matplotlib.figure import Figure

    count = min(64, samples.shape[0])
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(cols, rows + 0.4))
    for k in range(rows * cols):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.axis("off")
        if k < count:
            ax.imshow(samples[k].reshape(side, side), cmap="gray")
    fig.suptitle(title, fontsize=9)
    return fig
