"""Batches for training: a seeded grain pipeline whose batch s is a pure function of (data,
seed, s), with a checkpointable iterator state."""

import grain
import numpy as np

try:  # The permutation grain's `shuffle` applies, one index at a time (a C++ function).
    from grain._src.python.experimental.index_shuffle.python import (
        index_shuffle_module as _grain_index_shuffle,
    )
except ImportError:  # another grain layout: `BatchStream` reads batches through grain instead
    _grain_index_shuffle = None


class _Gather:
    """grain map: a batch of row indices -> the rows (one numpy gather per batch), paired with
    their labels when there are labels."""

    def __init__(self, array: np.ndarray, labels: np.ndarray | None = None):
        self.array = array
        self.labels = labels

    def __call__(self, index: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        if self.labels is not None:
            return self.array[index], self.labels[index]
        return self.array[index]


class _Rows:
    """grain map: a global batch of row indices -> this process's part of it."""

    def __init__(self, rows: slice):
        self.rows = rows

    def __call__(self, index: np.ndarray) -> np.ndarray:
        return index[self.rows]


def batch_dataset(
    array: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    rows: slice | None = None,
    labels: np.ndarray | None = None,
) -> grain.MapDataset:
    """Infinite, seeded, reshuffled-every-epoch batches of rows of `array`.

    `MapDataset` is random access: batch `i` is a pure function of (array, seed, i), so the
    iterator state is the index of the next batch, and a resumed run sees the same data order.
    `rows` keeps only that slice of every global batch (one process's share in a multi-process
    run; only those rows are gathered). With `labels`, each batch is (rows, their labels).
    """
    if array.ndim < 2:
        raise ValueError(
            f"expected a training array of shape (N, D) or (N, H, W, C); got {array.shape}."
        )
    indices = grain.MapDataset.range(array.shape[0]).shuffle(seed=seed).repeat()
    batches = indices.batch(batch_size)
    if rows is not None:
        batches = batches.map(_Rows(rows))
    return batches.map(_Gather(array, labels))


class BatchStream:
    """The batches of `batch_dataset(array, batch_size=, seed=, rows=)` in order, with the
    iterator protocol and state (`{"next_index": i}`) of `iter(dataset.to_iter_dataset())`.

    grain's pipeline walks every example of a batch through its Python layers (shuffle, repeat,
    batch), which on a small CPU costs more per batch than a default train step, and its
    prefetch thread competes with the training loop for the cores. Here
    batch i's row indices are computed directly with the permutation grain's `shuffle` uses
    (per epoch e, seed + e), so the batches, and a run trained on them, are identical; a test
    checks that against grain's own iterator.

    With `labels` (one per row of `array`) every batch is the pair (rows, their labels).
    """

    def __init__(
        self,
        array: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        rows: slice | None = None,
        labels: np.ndarray | None = None,
    ):
        if labels is not None and labels.shape[0] != array.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {array.shape[0]} rows.")
        self._labels = labels
        self._array = array
        self._batch_size = batch_size
        self._seed = seed
        self._rows = rows
        self._next_index = 0

    def _indices(self, batch: int) -> np.ndarray:
        if _grain_index_shuffle is None:
            raise ValueError("grain's index_shuffle is unavailable: read batches through grain.")
        size = self._array.shape[0]
        indices = np.empty(self._batch_size, np.int64)
        for k, position in enumerate(
            range(batch * self._batch_size, (batch + 1) * self._batch_size)
        ):
            epoch, within = divmod(position, size)
            indices[k] = _grain_index_shuffle.index_shuffle(
                within, max_index=size - 1, seed=(self._seed + epoch) % 2**32, rounds=4
            )
        return indices if self._rows is None else indices[self._rows]

    def batch(self, index: int) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Batch `index` (random access)."""
        if _grain_index_shuffle is None:
            batch = self._fallback_dataset()[index]
            if batch is None:  # grain's type for a filtered-out element; these batches have none
                raise ValueError(f"grain returned no batch {index}.")
            return batch
        return _Gather(self._array, self._labels)(self._indices(index))

    def _fallback_dataset(self):
        # Built once, on first use, and only when grain's shuffle module could not be imported.
        if getattr(self, "_dataset", None) is None:
            self._dataset = batch_dataset(
                self._array,
                batch_size=self._batch_size,
                seed=self._seed,
                rows=self._rows,
                labels=self._labels,
            )
        return self._dataset

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        out = self.batch(self._next_index)
        self._next_index += 1
        return out

    def get_state(self) -> dict:
        return {"next_index": self._next_index}

    def set_state(self, state: dict) -> None:
        self._next_index = int(state["next_index"])
