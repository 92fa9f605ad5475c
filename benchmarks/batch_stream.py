"""Cost of reading one training batch: `BatchStream` (what `train` reads) against grain's public
`MapDataset` random access and its iterator, on the same seeded batches. Prints a Markdown table.

    PYTHONPATH=$PWD python benchmarks/batch_stream.py [--batches 500] [--batch-size 256]

The data are 50,000 2-D float32 points (the size of a built-in set's training split). All three
give identical batches (tests/test_data.py checks it); the times are per batch, the best of
three passes over `--batches` consecutive batches.
"""

import argparse
import time

import numpy as np

import nfdm_de as nd


def per_batch(read, batches: int) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        read(batches)
        best = min(best, (time.perf_counter() - start) / batches)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    data = np.random.default_rng(0).normal(size=(50_000, 2)).astype(np.float32)
    dataset = nd.batch_dataset(data, batch_size=args.batch_size, seed=0)
    stream = nd.BatchStream(data, batch_size=args.batch_size, seed=0)

    def by_stream(n):
        for i in range(n):
            stream.batch(i)

    def by_random_access(n):
        for i in range(n):
            dataset[i]

    def by_iterator(n):
        iterator = iter(dataset.to_iter_dataset())
        for _ in range(n):
            next(iterator)

    rows = [
        (
            "`BatchStream` (grain's permutation, computed directly)",
            per_batch(by_stream, args.batches),
        ),
        ("`grain.MapDataset` random access", per_batch(by_random_access, args.batches)),
        ("`grain.MapDataset` iterator", per_batch(by_iterator, args.batches)),
    ]
    print(f"| reader (batch {args.batch_size}) | ms per batch |\n|---|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds * 1e3:.2f} |")


if __name__ == "__main__":
    main()
