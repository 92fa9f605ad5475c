"""nfdm-de against real density-estimation peers, side by side with the same budget.

    python benchmarks/peers.py [--steps 1500] [--batch 256] [--width 64] [--depth 3]
        [--sets checkerboard,spirals,two-moons,rings,gmm-10d] [--methods nfdm,...,maf,gmm]
        [--seconds S]     # equal wall-clock variant: every iterative method trains ~S seconds
        [--save-points DIR]  # also save each per-point gap array
    python benchmarks/peers.py --paired DIR   # runs saved there (several seeds), paired

Methods:
- nfdm-de: `nfdm` (learnable Gaussian forward process, learned g: its variational bound and its
  ODE NLL), `nfdm-ot` (learnable forward, g = 0, curvature penalty 1: ODE NLL), the fixed
  baselines `linear`, `vp`, `learned-schedule` (learned g: bound and ODE NLL) and
  `flow-matching` (linear path, g = 0: ODE NLL) — all trained by `nfdm_de.train`;
- peers: `maf`, flowjax's masked autoregressive flow with rational-quadratic splines (8 layers,
  8 knots on [-5, 5] in standardised units, MADE width = --width, 2 hidden layers), trained with
  the same steps, batch, AdamW-free Adam + warm-up/cosine schedule + clipping as nfdm-de; `gmm`,
  scikit-learn's `GaussianMixture` (full covariances, number of components chosen among
  8/16/32/64 on a validation split; EM, so no step budget applies). A peer whose package is
  missing is skipped with a message (`pip install nfdm-de[bench]`).

Same budget: steps, batch size, hidden width (and peak learning rate) are shared. With
`--seconds S` the step count of each iterative method is instead set from its measured
steady-state throughput so that training takes about S seconds.

Prints a Markdown table of held-out NLL gaps to the true NLL (nats, mean ± s.e. over the held-out
points) with training and evaluation seconds, then mean gaps per method over the sets.
"""

import json
import math
import os
import sys
import time

import numpy as np
from _density_common import (
    NFDM_METHODS,
    Budget,
    budget_parser,
    fmt,
    gap,
    nfdm_nll,
    steady_rate,
    test_points,
    train_nfdm_with_phase,
    true_nll,
)

import nfdm_de as nd

PEER_SETS = ("checkerboard", "spirals", "two-moons", "rings", "eight-gaussians", "gmm-10d")
DEFAULT_METHODS = ("nfdm", "nfdm-ot", "linear", "vp", "flow-matching", "maf", "gmm")
PEERS = ("maf", "coupling", "gmm", "fm-meta")


# --- peers --------------------------------------------------------------------------------------


def _standardise(train):
    mean, std = train.mean(0), np.maximum(train.std(0), 1e-6)
    return mean, std


def maf_lr(budget: Budget) -> float:
    """The MAF's peak rate: --lr when given, else 1e-3."""
    return 1e-3 if budget.lr is None else budget.lr


def have_flowjax() -> bool:
    try:
        import flowjax  # noqa: F401
        import paramax  # noqa: F401
    except ImportError:
        return False
    return True


def _spline_flow(kind, dim, width, key):
    """flowjax's masked autoregressive (`maf`) or coupling (`coupling`) flow with rational
    quadratic splines: 8 layers, 8 knots on [-5, 5], conditioners of 2 hidden layers."""
    import jax.numpy as jnp
    from flowjax.bijections import RationalQuadraticSpline
    from flowjax.distributions import Normal
    from flowjax.flows import coupling_flow, masked_autoregressive_flow

    build = masked_autoregressive_flow if kind == "maf" else coupling_flow
    return build(
        key,
        base_dist=Normal(jnp.zeros(dim)),
        transformer=RationalQuadraticSpline(knots=8, interval=5.0),
        flow_layers=8,
        nn_width=width,
        nn_depth=2,
    )


def train_maf(name, budget: Budget, steps: int | None = None, kind: str = "maf"):
    """Train a spline flow (`maf` or `coupling`); returns (log_prob function in data units,
    seconds, steps/s)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import optax
    import paramax

    steps = budget.steps if steps is None else steps
    train = nd.load_dataset(name, split="train", seed=budget.seed)
    mean, std = _standardise(train)
    z = jnp.asarray((train - mean) / std, jnp.float32)
    model_key, data_key = jr.split(jr.key(budget.seed))
    flow = _spline_flow(kind, train.shape[1], budget.width, model_key)
    is_leaf = lambda leaf: isinstance(leaf, paramax.NonTrainable)  # noqa: E731
    params, static = eqx.partition(flow, eqx.is_inexact_array, is_leaf=is_leaf)
    warmup = min(200, steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, maf_lr(budget), warmup, max(steps, warmup + 1), end_value=0.01 * maf_lr(budget)
    )
    optimiser = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = optimiser.init(params)

    @eqx.filter_jit
    def step(params, opt_state, key):
        batch = z[jr.randint(key, (budget.batch,), 0, z.shape[0])]

        def nll(p):
            return -jnp.mean(paramax.unwrap(eqx.combine(p, static)).log_prob(batch))

        value, grads = eqx.filter_value_and_grad(nll)(params)
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, value

    start = time.perf_counter()
    steady_start = None
    # flowjax and optax's schedules mix Python floats with integer counts: standard promotion
    # for the peer's code, also when this runs under the tests' strict promotion.
    with jax.numpy_dtype_promotion("standard"):
        for i in range(steps):
            params, opt_state, value = step(params, opt_state, jr.fold_in(data_key, i))
            if i == 0:
                jax.block_until_ready(value)
                steady_start = time.perf_counter()
        jax.block_until_ready(value)
    end = time.perf_counter()
    rate = (steps - 1) / max(end - steady_start, 1e-9)
    flow = paramax.unwrap(eqx.combine(params, static))
    log_det = float(np.sum(np.log(std)))
    log_prob = eqx.filter_jit(flow.log_prob)

    def data_log_prob(x):
        with jax.numpy_dtype_promotion("standard"):
            values = log_prob(jnp.asarray((x - mean) / std, jnp.float32))
        return np.asarray(values, np.float64) - log_det

    return data_log_prob, end - start, rate


def train_meta_flow_matching(name, budget: Budget, steps: int | None = None):
    """Meta's `flow_matching` (CondOT path, a 3-hidden-layer MLP of --width, Adam at the peak
    rate), with its exact-divergence likelihood (dopri5 at 1e-5); returns (log_prob in data
    units, seconds)."""
    from likelihood_speed import meta_flow_matching_nll, train_meta_flow_matching

    steps = budget.steps if steps is None else steps
    train = nd.load_dataset(name, split="train", seed=budget.seed)
    mean, std = _standardise(train)
    standard = ((train - mean) / std).astype(np.float32)
    start = time.perf_counter()
    model = train_meta_flow_matching(standard, steps, budget.width, budget.batch, maf_lr(budget))
    seconds = time.perf_counter() - start
    log_det = float(np.sum(np.log(std)))

    def data_log_prob(x):
        standard_x = ((x - mean) / std).astype(np.float32)
        return -meta_flow_matching_nll(model, standard_x, 1e-5).astype(np.float64) - log_det

    return data_log_prob, seconds


def train_gmm(name, budget: Budget):
    """GaussianMixture with the number of components picked on a validation split."""
    from sklearn.mixture import GaussianMixture

    train = nd.load_dataset(name, split="train", num=20_000, seed=budget.seed)
    fit, valid = train[:16_000], train[16_000:]
    start = time.perf_counter()
    best = None
    for k in (8, 16, 32, 64):
        gmm = GaussianMixture(k, covariance_type="full", random_state=budget.seed, max_iter=200)
        gmm.fit(fit)
        score = gmm.score(valid)
        if best is None or score > best[0]:
            best = (score, gmm)
    return best[1].score_samples, time.perf_counter() - start, best[1].n_components


# --- the table ----------------------------------------------------------------------------------


def print_paired(directory: str) -> None:
    """From the per-point gaps `--save-points` wrote to `directory` (any number of runs and
    seeds): each method's gap averaged over the seeds, and NFDM's ODE NLL gap (simulation-free,
    and after its likelihood phase where saved) minus each method's, paired over the held-out
    points, with standard errors that count the points and the seeds (`paired_over_seeds`)."""
    from density import load_points, mean_over_seeds, paired_over_seeds

    per_point = load_points(directory)
    seeds = sorted({key[0] for key in per_point})
    references = [m for m in ("nfdm", "nfdm+ml") if any(k[2] == m for k in per_point)]
    print(f"\nSeeds {seeds}; NLL gaps in nats, mean over the seeds ± s.e.\n")
    header = " | ".join(f"{r} ODE minus it" for r in references)
    print(f"| set | method | NLL | gap | {header} |")
    print("|---" * (4 + len(references)) + "|")
    for name in sorted({key[1] for key in per_point}):
        for method, q in sorted({(k[2], k[3]) for k in per_point if k[1] == name}):
            rows = [per_point.get((seed, name, method, q)) for seed in seeds]
            if any(r is None for r in rows):
                continue
            cells = [fmt(*mean_over_seeds(np.stack(rows)))]
            for reference in references:
                paired = paired_over_seeds(seeds, name, reference, method, "ode", per_point, q)
                same = (reference, "ode") == (method, q)
                cells.append("—" if paired is None or same else fmt(*paired))
            print(f"| {name} | {method} | {q} | " + " | ".join(cells) + " |")


def main(argv=None):
    parser = budget_parser(__doc__, sets=",".join(PEER_SETS), methods=",".join(DEFAULT_METHODS))
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="equal wall-clock variant: train each iterative method for about this many seconds",
    )
    parser.add_argument(
        "--save-points",
        default=None,
        metavar="DIR",
        help="also save every per-point gap array here, as <set>_<method>_s<seed>_<nll>.npy "
        "(density.load_points reads them back for paired comparisons)",
    )
    parser.add_argument(
        "--paired",
        default=None,
        metavar="DIR",
        help="print the seed-averaged and paired table of the points saved in DIR and exit",
    )
    args = parser.parse_args(argv)
    if args.paired is not None:
        print_paired(args.paired)
        return
    if args.save_points is not None:
        os.makedirs(args.save_points, exist_ok=True)
    budget = Budget(args.steps, args.batch, args.width, args.depth, args.lr, args.seed)
    sets = [s for s in args.sets.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in NFDM_METHODS and m not in PEERS:
            parser.error(f"unknown method {m!r}")
    for peer in ("maf", "coupling"):
        if peer in methods and not have_flowjax():
            print(
                f"skipping {peer}: flowjax is not installed (pip install 'nfdm-de[bench]')",
                file=sys.stderr,
            )
            methods.remove(peer)

    rows, means = [], {}

    def record(name, method, quantity, nll, truth, train_s, eval_s, steps_text):
        cell = gap(nll, truth)
        if args.save_points is not None:
            file = f"{name}_{method}_s{args.seed}_{quantity}.npy"
            np.save(os.path.join(args.save_points, file), np.asarray(nll) - np.asarray(truth))
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                result = dict(set=name, method=method, nll=quantity, gap=cell[0], stderr=cell[1])
                result.update(train_s=train_s, eval_s=eval_s, steps=steps_text)
                f.write(json.dumps(result) + "\n")
        rows.append(
            f"| {name} | {method} | {quantity} | {fmt(*cell)} | {steps_text} | {train_s:.0f} | "
            f"{eval_s:.1f} |"
        )
        means.setdefault((method, quantity), []).append(cell[0])
        print(rows[-1], file=sys.stderr, flush=True)

    for name in sets:
        x = test_points(name, args.num_test)
        truth = true_nll(name, x)
        for method in methods:
            if method == "gmm":
                score, train_s, k = train_gmm(name, budget)
                start = time.perf_counter()
                nll = -score(x)
                record(
                    name,
                    method,
                    "exact",
                    nll,
                    truth,
                    train_s,
                    time.perf_counter() - start,
                    f"EM, K={k}",
                )
                continue
            steps = budget.steps
            if method == "fm-meta":
                log_prob, train_s = train_meta_flow_matching(name, budget)
                start = time.perf_counter()
                nll = -log_prob(x)
                elapsed = time.perf_counter() - start
                record(name, method, "exact", nll, truth, train_s, elapsed, str(steps))
                continue
            if method in ("maf", "coupling"):
                if args.seconds is not None:
                    _, _, rate = train_maf(name, budget, steps=100, kind=method)
                    steps = max(int(args.seconds * rate), 10)
                log_prob, train_s, _ = train_maf(name, budget, steps=steps, kind=method)
                start = time.perf_counter()
                nll = -log_prob(x)
                record(
                    name,
                    method,
                    "exact",
                    nll,
                    truth,
                    train_s,
                    time.perf_counter() - start,
                    str(steps),
                )
                continue
            settings, which = NFDM_METHODS[method]
            if args.seconds is not None:
                rate = steady_rate(name, settings, budget)
                steps = max(int(args.seconds * rate), 10)
            b = Budget(steps, budget.batch, budget.width, budget.depth, budget.lr, budget.seed)
            extra_steps = 0 if args.seconds is not None else args.likelihood_steps
            for label, run, train_s in train_nfdm_with_phase(name, settings, b, extra_steps):
                nll = nfdm_nll(
                    run,
                    x,
                    which if not label else ("ode",),
                    seed=args.seed,
                    bound_samples=args.bound_samples,
                )
                for q in ("bound", "ode"):
                    if q in nll:
                        record(
                            name,
                            method + label,
                            q,
                            nll[q],
                            truth,
                            train_s,
                            nll[f"{q}_seconds"],
                            f"{steps} + {extra_steps}" if label else str(steps),
                        )

    what = (
        f"about {args.seconds:g} s of training each (steps from measured throughput)"
        if args.seconds is not None
        else f"{budget.steps} steps"
    )
    print(
        f"\nBudget: {what}, batch {budget.batch}, width {budget.width} (nfdm-de MLP depth "
        f"{budget.depth}; MAF: 8 layers of 2-hidden-layer MADE), peak lr "
        f"{budget.lr or nd.OptimConfig().lr} (MAF: {maf_lr(budget)}), seed "
        f"{budget.seed}; {args.num_test} held-out points per set. Gap = model NLL - true NLL "
        "(nats), mean ± s.e.\n"
    )
    print("| set | method | NLL | gap | steps | train s | eval s |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| method | NLL | mean gap over sets |")
    print("|---|---|---|")
    for (method, quantity), values in means.items():
        print(f"| {method} | {quantity} | {fmt(float(np.mean(values)))} |")
    _ = math


if __name__ == "__main__":
    main()
