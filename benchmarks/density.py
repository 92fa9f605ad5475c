"""Density benchmark: held-out NLL gap to the true NLL on the known-density toy sets,
for NFDM (learnable Gaussian forward process; its variational bound and its ODE NLL) and the
fixed-forward baselines (VP, learned schedule, linear), all trained by `nfdm_de.train` with the
same budget (steps, batch, width, depth, learning rate).

    python benchmarks/density.py [--steps 3000] [--batch 256] [--width 128] [--depth 3]
        [--sets checkerboard,spirals,...] [--methods nfdm,vp,...] [--num-test 1000]
        [--bound-samples 128] [--seeds 0,1,2,3] [--likelihood-steps 300] [--jsonl FILE]
        [--save-points DIR]

Prints a Markdown table: per training seed, set and method, the gap of the bound and of the ODE
NLL (exact trace, Dopri5 at rtol = atol = 1e-5), mean ± standard error over the held-out points,
and the training seconds. Then the mean gap per method over the sets and seeds, and NFDM against
each baseline as a paired difference over the same held-out points (NFDM minus baseline), per
set and quantity: the mean over seeds and points of the per-point difference, with an s.e. that
counts both the held-out points (shared by all seeds) and the seed-to-seed spread (see
`paired_over_seeds`); "lower" or "higher" when the difference is beyond 2 s.e., else "tie".

`--likelihood-steps N` also reports every method after an N-step likelihood phase (rows
`<method>+ml`, the recipe `nfdm-de train` defaults to on small vector data), and compares
`nfdm+ml` with each `<baseline>+ml` the same way. `--jsonl FILE` appends one JSON record per
seed, set, method and quantity. `--save-points DIR` also saves each per-point gap array as
`DIR/<set>_<method>_s<seed>_<quantity>.npy`, so runs split over processes (say one seed each)
can be compared afterwards with `paired_over_seeds(..., load_points(DIR))`.
"""

import json
import math
import os
import re
import sys

import numpy as np
from _density_common import (
    DEFAULT_SETS,
    NFDM_METHODS,
    Budget,
    budget_parser,
    fmt,
    gap,
    nfdm_nll,
    test_points,
    train_nfdm_with_phase,
    true_nll,
)

import nfdm_de as nd

DENSITY_METHODS = ("nfdm", "vp", "learned-schedule", "linear")


def _seeds(args, parser) -> list[int]:
    if args.seeds is None:
        return [args.seed]
    try:
        seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers; got {args.seeds!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds must list distinct integers; got {args.seeds!r}")
    return seeds


def main(argv=None):
    parser = budget_parser(
        __doc__, sets=",".join(DEFAULT_SETS[:5] + ("gmm-10d",)), methods=",".join(DENSITY_METHODS)
    )
    parser.add_argument(
        "--seeds",
        default=None,
        help="comma-separated training seeds, results averaged over them (overrides --seed)",
    )
    parser.add_argument(
        "--save-points",
        default=None,
        metavar="DIR",
        help="also save every per-point gap array here (see load_points)",
    )
    args = parser.parse_args(argv)
    seeds = _seeds(args, parser)
    if args.save_points is not None:
        os.makedirs(args.save_points, exist_ok=True)
    sets = [s for s in args.sets.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in NFDM_METHODS:
            parser.error(f"unknown method {m!r}; expected some of {sorted(NFDM_METHODS)}")
    if args.likelihood_steps < 0:
        parser.error(f"--likelihood-steps must be >= 0; got {args.likelihood_steps}")

    rows, means, per_point = [], {}, {}
    labels = []  # methods, then their "+ml" variants, in the order first seen
    for seed in seeds:
        budget = Budget(args.steps, args.batch, args.width, args.depth, args.lr, seed)
        for name in sets:
            x = test_points(name, args.num_test)
            truth = true_nll(name, x)
            for method in methods:
                settings, which = NFDM_METHODS[method]
                runs = train_nfdm_with_phase(name, settings, budget, args.likelihood_steps)
                for suffix, run, train_seconds in runs:
                    label = method + suffix
                    if label not in labels:
                        labels.append(label)
                    nll = nfdm_nll(run, x, which, seed=seed, bound_samples=args.bound_samples)
                    eval_seconds = nll.get("ode_seconds", 0.0) + nll.get("bound_seconds", 0.0)
                    cells = {}
                    for q in ("bound", "ode"):
                        if q not in nll:
                            continue
                        per_point[(seed, name, label, q)] = np.asarray(nll[q]) - truth
                        if args.save_points is not None:
                            np.save(
                                _points_file(args.save_points, seed, name, label, q),
                                per_point[(seed, name, label, q)],
                            )
                        cells[q] = gap(nll[q], truth)
                        means.setdefault((label, q), []).append(cells[q][0])
                        if args.jsonl:
                            record = dict(seed=seed, set=name, method=label, nll=q)
                            record.update(gap=cells[q][0], stderr=cells[q][1])
                            record.update(train_s=train_seconds, eval_s=eval_seconds)
                            with open(args.jsonl, "a") as f:
                                f.write(json.dumps(record) + "\n")
                    row = (
                        f"| {seed} | {name} | {label} | "
                        f"{fmt(*cells['bound']) if 'bound' in cells else '—'} | "
                        f"{fmt(*cells['ode']) if 'ode' in cells else '—'} | "
                        f"{train_seconds:.0f} | {eval_seconds:.0f} |"
                    )
                    rows.append(row)
                    print(row, file=sys.stderr, flush=True)

    print(
        f"\nBudget: {args.steps} steps, batch {args.batch}, width {args.width}, depth "
        f"{args.depth}, peak lr {args.lr or nd.OptimConfig().lr} (cosine), training seed(s) "
        f"{','.join(map(str, seeds))}"
        + (f", likelihood phase {args.likelihood_steps} steps (+ml)" * bool(args.likelihood_steps))
        + f"; {args.num_test} held-out points per set. Gap = model NLL - true NLL (nats), "
        "mean ± s.e.\n"
    )
    print("| seed | set | method | bound gap | ODE NLL gap | train s | eval s |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n| method | mean bound gap | mean ODE gap |   (over sets and {len(seeds)} seed(s))")
    print("|---|---|---|")
    for label in labels:
        b = means.get((label, "bound"))
        o = means.get((label, "ode"))
        print(
            f"| {label} | {fmt(float(np.mean(b))) if b else '—'} | "
            f"{fmt(float(np.mean(o))) if o else '—'} |"
        )

    for suffix in ("", "+ml") if args.likelihood_steps else ("",):
        if "nfdm" + suffix in labels:
            baselines = [m + suffix for m in methods if m != "nfdm" and m + suffix in labels]
            print_paired(seeds, sets, "nfdm" + suffix, baselines, per_point)
    print_never_beaten(seeds, sets, labels, per_point)


def _points_file(directory: str, seed: int, name: str, label: str, q: str) -> str:
    return os.path.join(directory, f"{name}_{label}_s{seed}_{q}.npy")


def load_points(directory: str) -> dict:
    """The per-point gap arrays `--save-points` wrote, keyed like `paired_over_seeds` expects:
    (seed, set, method, quantity) -> array."""
    pattern = re.compile(
        r"^(?P<name>.+)_(?P<label>[^_]+)_s(?P<seed>-?\d+)_(?P<q>bound|ode|exact)\.npy$"
    )
    out = {}
    for entry in sorted(os.listdir(directory)):
        match = pattern.match(entry)
        if match:
            key = (int(match["seed"]), match["name"], match["label"], match["q"])
            out[key] = np.load(os.path.join(directory, entry))
    return out


def paired_over_seeds(
    seeds, name, mine, theirs, q, per_point, their_q=None
) -> tuple[float, float] | None:
    """`mine` minus `theirs` on set `name`, paired over the held-out points and averaged over the
    training seeds: (mean, standard error). None when either is missing for some seed. Both are
    compared in quantity `q` unless `their_q` names the other's (a peer's `exact` NLL).

    Every seed is scored on the *same* held-out points, so the per-seed errors are not
    independent: the points' share of the error is common to all seeds and does not shrink with
    their number. The standard error therefore adds two estimated variances, that of the
    seed-averaged per-point difference over the points (held-out sampling and the bound's Monte
    Carlo noise) / n, and that of the per-seed means over the seeds (training-seed variation)
    / S. (The Monte Carlo part enters both, so this errs on the wide side.)"""
    rows = []
    for seed in seeds:
        a = per_point.get((seed, name, mine, q))
        b = per_point.get((seed, name, theirs, q if their_q is None else their_q))
        if a is None or b is None:
            return None
        rows.append(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return mean_over_seeds(np.stack(rows))


def mean_over_seeds(difference: np.ndarray) -> tuple[float, float]:
    """(mean, standard error) of per-point values of shape (seeds, points) scored on the same
    points by every seed, as `paired_over_seeds` explains."""
    num_seeds = difference.shape[0]
    finite = np.isfinite(difference).all(axis=0)
    if finite.any():
        difference = difference[:, finite]
    seed_averaged = difference.mean(axis=0)
    variance = seed_averaged.var(ddof=1) / seed_averaged.size if seed_averaged.size > 1 else 0.0
    if num_seeds > 1:
        variance += difference.mean(axis=1).var(ddof=1) / num_seeds
    return float(seed_averaged.mean()), math.sqrt(variance)


def never_beaten(seeds, sets, methods, q, per_point) -> dict[str, list[str]]:
    """For each method, the sets on which no other method is lower beyond two standard errors
    (paired over the points, averaged over the seeds): the sets it is lowest on or tied for
    lowest. A set missing any method's run is left out."""
    out = {m: [] for m in methods}
    for name in sets:
        for m in methods:
            results = [
                paired_over_seeds(seeds, name, m, o, q, per_point) for o in methods if o != m
            ]
            if any(r is None for r in results):
                continue
            if all(mean - 2 * se <= 0 for mean, se in results):
                out[m].append(name)
    return out


def print_never_beaten(seeds, sets, methods, per_point):
    """Per quantity, how many sets each method is lowest on or statistically tied for lowest
    on (no method below it beyond two standard errors): the per-set count without the coin
    flips that ranking tied point estimates makes."""
    for q in ("bound", "ode"):
        measured = [m for m in methods if (seeds[0], sets[0], m, q) in per_point]
        if len(measured) < 2:
            continue
        counts = never_beaten(seeds, sets, measured, q, per_point)
        cells = ", ".join(f"{m} {len(counts[m])}" for m in measured)
        print(f"\n{q}: sets where no other method is lower beyond 2 s.e., of {len(sets)}: {cells}")


def print_paired(seeds, sets, mine, baselines, per_point):
    """`mine` minus each baseline per set and quantity, paired over the held-out points (the
    points' own spread cancels, so small differences that the per-method error bars hide show)
    and averaged over the seeds."""
    print("\n| set | quantity | " + " | ".join(f"{mine} − {b}" for b in baselines) + " |")
    print("|---|---|" + "---|" * len(baselines))
    lowest, significant = {}, {}
    for name in sets:
        for q in ("bound", "ode"):
            if (seeds[0], name, mine, q) not in per_point:
                continue
            cells, below_all, below_all_2se, complete = [], True, True, True
            for b in baselines:
                result = paired_over_seeds(seeds, name, mine, b, q, per_point)
                if result is None:
                    # A missing baseline cannot be beaten: the set is left out of the count.
                    cells.append("—")
                    complete = False
                    continue
                mean, se = result
                verdict = "lower" if mean + 2 * se < 0 else "higher" if mean - 2 * se > 0 else "tie"
                below_all &= mean < 0
                below_all_2se &= verdict == "lower"
                cells.append(f"{mean:+.3f} ± {se:.3f} ({verdict})")
            if complete:
                lowest.setdefault(q, []).append(below_all)
                significant.setdefault(q, []).append(below_all_2se)
            print(f"| {name} | {q} | " + " | ".join(cells) + " |")
    for q, flags in lowest.items():
        print(
            f"\n{mine}'s {q} is the lowest of all methods on {sum(flags)} of {len(flags)} sets "
            f"(by point estimate; sets with every baseline measured); below every baseline "
            f"beyond 2 s.e. on {sum(significant[q])} of {len(flags)}."
        )


if __name__ == "__main__":
    main()
