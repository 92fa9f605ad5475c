"""A class-conditional NFDM on scikit-learn's digits: one row of samples per class.

    python examples/conditional_digits.py [--steps 3000] [--run-dir runs/conditional_digits]
        [--plot conditional_digits.png] [--smoke]

The digits' train split and their labels go into a `.npz` with `x` and `labels`; `train` on such
a file builds a class-conditional model (the predictor sees a learned embedding of the label,
`nfdm_de.ContextMLP`). `model.conditioned(k)` is then the NFDM of p(x | k). The same run from the
command line:

    nfdm-de train --data digits_train.npz --run-dir runs/conditional_digits
    nfdm-de sample --run-dir runs/conditional_digits --label 3 --plot three.png

The script checks the samples with a classifier fitted on the real training digits: the share
of class-k samples it assigns to class k.
"""

import argparse
import os

import jax.numpy as jnp
import jax.random as jr
import numpy as np
from sklearn.linear_model import LogisticRegression

import nfdm_de as nd


def write_labelled_split(path: str, split: str) -> None:
    x, labels = nd.digits_split(split)
    np.savez(path, x=x, labels=labels)


def samples_per_class(run: nd.LoadedRun, per_class: int, steps: int) -> np.ndarray:
    """(classes, per_class, 64) samples in data units, clipped to the pixel range [0, 16]."""
    classes = run.config.model.num_classes
    assert classes is not None and isinstance(run.model, nd.NFDM)
    rows = []
    for label in range(classes):
        model = run.model.conditioned(jnp.asarray(label, jnp.int32))
        z, _ = nd.sample(model, per_class, key=jr.key(label), steps=steps)
        rows.append(np.clip(np.asarray(run.to_data_units(z)), 0, 16))
    return np.stack(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--run-dir", default="runs/conditional_digits")
    parser.add_argument("--plot", default="conditional_digits.png")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.run_dir, exist_ok=True)
    data = os.path.join(args.run_dir, "digits_train.npz")
    write_labelled_split(data, "train")
    model = nd.ModelConfig(width=32, depth=1) if args.smoke else nd.ModelConfig()
    config = nd.TrainConfig(
        data=data,
        steps=30 if args.smoke else args.steps,
        batch_size=64 if args.smoke else 256,
        model=model,
        likelihood_steps=0,  # samples are the point here, not the ODE likelihood
        log_every=10 if args.smoke else 500,
        save_every=30 if args.smoke else 1000,
    )
    run_path = os.path.join(args.run_dir, "run")
    if os.path.isdir(run_path):
        print(f"loading {run_path}")
    else:
        result = nd.train(config, run_path, log=print)
        print(f"trained {result.steps} steps in {result.seconds:.0f} s")
    run = nd.load_run(run_path)
    per_class = 2 if args.smoke else 10
    images = samples_per_class(run, per_class, steps=8 if args.smoke else 64)

    x_train, y_train = nd.digits_split("train")
    classifier = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    predicted = classifier.predict(images.reshape(-1, 64)).reshape(images.shape[:2])
    hits = (predicted == np.arange(images.shape[0])[:, None]).mean(axis=1)
    print("class:    " + " ".join(f"{k:4d}" for k in range(len(hits))))
    print("accuracy: " + " ".join(f"{h:4.2f}" for h in hits) + f"   mean {hits.mean():.2f}")

    grid = images.transpose(1, 0, 2).reshape(-1, 8, 8)  # row r: sample r of every class
    nd.save_image_grid(
        np.rint(grid).astype(np.int32),
        args.plot,
        num_levels=17,
        columns=images.shape[0],
        title=f"class-conditional NFDM, digits 0-9 (step {run.step})",
        pixels_per_cell=8,
    )
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
