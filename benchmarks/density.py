"""Density benchmark (issue 5): held-out NLL gap to the true NLL on the known-density toy sets,
for NFDM (learnable Gaussian forward process; its variational bound and its ODE NLL) and the
fixed-forward baselines (VP, learned schedule, linear), all trained by `nfdm_de.train` with the
same budget (steps, batch, width, depth, learning rate).

    python benchmarks/density.py [--steps 3000] [--batch 256] [--width 128] [--depth 3]
        [--sets checkerboard,spirals,...] [--methods nfdm,vp,...] [--num-test 1000]
        [--bound-samples 128]

Prints a Markdown table: per set and method, the gap of the bound and of the ODE NLL (exact
trace, Dopri5 at rtol = atol = 1e-5), mean ± standard error over the held-out points, and the
training seconds. Then the mean gap per method over the sets, and NFDM against each baseline as
a paired difference over the same held-out points (NFDM minus baseline, mean ± s.e.; "lower" or
"higher" when the difference is beyond 2 s.e., else "tie"), per set and quantity.
"""

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
    train_nfdm,
    true_nll,
)

import nfdm_de as nd

DENSITY_METHODS = ("nfdm", "vp", "learned-schedule", "linear")


def main(argv=None):
    parser = budget_parser(
        __doc__, sets=",".join(DEFAULT_SETS[:5] + ("gmm-10d",)), methods=",".join(DENSITY_METHODS)
    )
    args = parser.parse_args(argv)
    budget = Budget(args.steps, args.batch, args.width, args.depth, args.lr, args.seed)
    sets = [s for s in args.sets.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in NFDM_METHODS:
            parser.error(f"unknown method {m!r}; expected some of {sorted(NFDM_METHODS)}")

    rows, means, per_point = [], {}, {}
    for name in sets:
        x = test_points(name, args.num_test)
        truth = true_nll(name, x)
        for method in methods:
            settings, which = NFDM_METHODS[method]
            run, train_seconds = train_nfdm(name, settings, budget)
            nll = nfdm_nll(run, x, which, seed=args.seed, bound_samples=args.bound_samples)
            cells = {}
            for q in ("bound", "ode"):
                if q in nll:
                    per_point[(name, method, q)] = np.asarray(nll[q])
                    cells[q] = gap(nll[q], truth)
                    means.setdefault((method, q), []).append(cells[q][0])
            eval_seconds = nll.get("ode_seconds", 0.0) + nll.get("bound_seconds", 0.0)
            row = (
                f"| {name} | {method} | {fmt(*cells['bound']) if 'bound' in cells else '—'} | "
                f"{fmt(*cells['ode']) if 'ode' in cells else '—'} | {train_seconds:.0f} | "
                f"{eval_seconds:.0f} |"
            )
            rows.append(row)
            print(row, file=sys.stderr, flush=True)

    print(
        f"\nBudget: {budget.steps} steps, batch {budget.batch}, width {budget.width}, depth "
        f"{budget.depth}, peak lr {budget.lr or nd.OptimConfig().lr} (cosine), seed "
        f"{budget.seed}; {args.num_test} held-out "
        "points per set. Gap = model NLL - true NLL (nats), mean ± s.e.\n"
    )
    print("| set | method | bound gap | ODE NLL gap | train s | eval s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| method | mean bound gap | mean ODE gap |")
    print("|---|---|---|")
    for method in methods:
        b = means.get((method, "bound"))
        o = means.get((method, "ode"))
        print(
            f"| {method} | {fmt(float(np.mean(b))) if b else '—'} | "
            f"{fmt(float(np.mean(o))) if o else '—'} |"
        )

    if "nfdm" in methods:
        print_paired(sets, [m for m in methods if m != "nfdm"], per_point)


def print_paired(sets, baselines, per_point):
    """NFDM minus each baseline per set and quantity, paired over the held-out points: the
    points' own spread cancels, so small differences that the per-method error bars hide show."""
    print("\n| set | quantity | " + " | ".join(f"NFDM − {b}" for b in baselines) + " |")
    print("|---|---|" + "---|" * len(baselines))
    wins = {}
    for name in sets:
        for q in ("bound", "ode"):
            mine = per_point.get((name, "nfdm", q))
            if mine is None:
                continue
            cells, lower_than_all = [], True
            for b in baselines:
                theirs = per_point.get((name, b, q))
                if theirs is None:
                    cells.append("—")
                    continue
                mean, se = gap(mine, theirs)
                verdict = "lower" if mean + 2 * se < 0 else "higher" if mean - 2 * se > 0 else "tie"
                lower_than_all &= mean < 0
                cells.append(f"{mean:+.3f} ± {se:.3f} ({verdict})")
            wins.setdefault(q, []).append(lower_than_all)
            print(f"| {name} | {q} | " + " | ".join(cells) + " |")
    for q, flags in wins.items():
        print(f"\nNFDM's {q} is the lowest of all methods on {sum(flags)} of {len(flags)} sets.")


if __name__ == "__main__":
    main()
