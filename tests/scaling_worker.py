"""Run by tests/test_scaling.py in a fresh interpreter (XLA flags must precede JAX's start).

    python tests/scaling_worker.py OUT_DIR CHUNKS

Trains a tiny run with the CLI, then samples and computes the NLL with `--chunks CHUNKS`, all
through the Typer app in this one process (one interpreter start instead of three), and writes
the commands' JSON lines and the bad-input checks to OUT_DIR/summary.json.
"""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from typer.testing import CliRunner  # noqa: E402

from nfdm_de.cli.main import app  # noqa: E402

TRAIN = [
    "train",
    "--data",
    "eight-gaussians",
    "--width",
    "16",
    "--depth",
    "1",
    "--forward-width",
    "16",
    "--forward-depth",
    "1",
    "--steps",
    "20",
    "--likelihood-steps",
    "0",
    "--batch-size",
    "32",
    "--lr",
    "3e-3",
    "--warmup",
    "5",
    "--schedule",
    "constant",
    "--log-every",
    "1",
    "--save-every",
    "10",
    "--keep",
    "2",
]


def invoke(args):
    result = CliRunner().invoke(app, args)
    lines = result.stdout.strip().splitlines()
    return {
        "exit_code": result.exit_code,
        "json": json.loads(lines[-1]) if result.exit_code == 0 and lines else None,
        "stderr": result.stderr,
    }


def main(out: str, chunks: str) -> None:
    run = os.path.join(out, "run")
    summary = {"train": invoke([*TRAIN, "--run-dir", run, "--json"])}
    summary["sample"] = invoke(
        [
            "sample",
            "--run-dir",
            run,
            "--num",
            "16",
            "--chunks",
            chunks,
            "--seed",
            "1",
            "--out",
            os.path.join(out, "samples.npy"),
            "--json",
        ]
    )
    summary["nll"] = invoke(
        [
            "nll",
            "--run-dir",
            run,
            "--data",
            "eight-gaussians",
            "--num",
            "12",
            "--method",
            "ode",
            "--chunks",
            chunks,
            "--per-example",
            os.path.join(out, "nll.npy"),
            "--json",
        ]
    )
    # Bad input: a global batch that does not divide over the devices; samples that do not
    # split into the independent solves.
    import jax

    if jax.device_count() > 1:
        summary["bad_batch"] = invoke(
            [*TRAIN, "--batch-size", "30", "--run-dir", os.path.join(out, "bad"), "--json"]
        )
    summary["bad_num"] = invoke(["sample", "--run-dir", run, "--num", "18", "--chunks", chunks])
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
