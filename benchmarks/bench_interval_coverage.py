"""Coverage of 95% intervals for the mean of paired differences: which one the report uses by default.

    python benchmarks/bench_interval_coverage.py [--reps 2000] [--resamples 2000] [--ns 5 10 20 64] [--json out.json]

For every (distribution, n) it draws ``--reps`` samples of n deltas with a known mean and counts how often
each interval method contains that mean. Methods: the t-interval (``ttest_1samp(...).confidence_interval``),
the percentile bootstrap and BCa (``scipy.stats.bootstrap``) and the studentized bootstrap
(bootstrap-t, ``analysis.stats.studentized_bootstrap_interval``). Distributions: normal, two skewed ones
(gamma with shape 2, skewness 1.4; exponential, skewness 2) and a heavy-tailed one (Student t, 3 df).
Prints one table of coverages (nominal 0.95) with the Monte-Carlo standard error, and the median width
relative to the t-interval. Seeded: the same command prints the same numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

from pathlib import Path

import numpy as np
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DISTRIBUTIONS = {
    # name: (draw(rng, shape) -> deltas, true mean)
    "normal": (lambda rng, shape: rng.normal(0.0, 1.0, shape), 0.0),
    "skewed (gamma k=2)": (lambda rng, shape: rng.gamma(2.0, 1.0, shape), 2.0),
    "skewed (exponential)": (lambda rng, shape: rng.exponential(1.0, shape), 1.0),
    "heavy-tailed (t, 3 df)": (lambda rng, shape: rng.standard_t(3, shape), 0.0),
}
METHODS = ("t", "percentile", "BCa", "bootstrap-t", "t ∪ bootstrap-t")


_cache: dict[str, np.ndarray] = {}


def intervals(samples: np.ndarray, method: str, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[reps, 2] interval bounds, one row per sample (row of ``samples``)."""
    if method == "t":
        ci = sps.ttest_1samp(samples, 0.0, axis=-1).confidence_interval(0.95)
        return np.stack([ci.low, ci.high], axis=-1)
    if method == "bootstrap-t":
        from analysis.stats import studentized_bootstrap_interval

        return np.array([studentized_bootstrap_interval(row, resamples, rng, 0.95) for row in samples])
    if method == "t ∪ bootstrap-t":  # reuses the two intervals above (computed first, same draws)
        t, bt = _cache["t"], _cache["bootstrap-t"]
        return np.stack([np.minimum(t[:, 0], bt[:, 0]), np.maximum(t[:, 1], bt[:, 1])], axis=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sps.bootstrap((samples,), np.mean, n_resamples=resamples, method=method, axis=-1, vectorized=True,
                            confidence_level=0.95, rng=rng, batch=max(1, 2_000_000 // samples.size))  # fmt: skip
    return np.stack([res.confidence_interval.low, res.confidence_interval.high], axis=-1)


def run(reps: int, resamples: int, ns: list[int], seed: int = 0) -> list[dict]:
    rows = []
    for d_i, (name, (draw, true_mean)) in enumerate(DISTRIBUTIONS.items()):
        for n in ns:
            rng = np.random.default_rng([seed, d_i, n])
            samples = draw(rng, (reps, n))
            widths = {}
            row = {"distribution": name, "n": n, "reps": reps, "resamples": resamples}
            for method in METHODS:
                ci = _cache[method] = intervals(samples, method, resamples, rng)
                covered = (ci[:, 0] <= true_mean) & (true_mean <= ci[:, 1])
                row[method] = float(covered.mean())
                widths[method] = np.median(ci[:, 1] - ci[:, 0])
            row["mc_se"] = float(np.sqrt(0.95 * 0.05 / reps))
            for method in METHODS:
                row[f"width_{method}_vs_t"] = float(widths[method] / widths["t"])
            rows.append(row)
            print(f"  {name:<24} n={n:<3} " + "  ".join(f"{m} {row[m]:.3f}" for m in METHODS), file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| distribution | n | " + " | ".join(METHODS) + " | " + " | ".join(f"width {m} / t" for m in METHODS[1:])
            + " |\n|---|---:|" + "---:|" * (2 * len(METHODS) - 1) + "\n")
    body = "".join(
        f"| {r['distribution']} | {r['n']} | " + " | ".join(f"{r[m]:.3f}" for m in METHODS) + " | "
        + " | ".join(f"{r[f'width_{m}_vs_t']:.2f}" for m in METHODS[1:]) + " |\n"
        for r in rows
    )
    return head + body


def worst_deviation(rows: list[dict], n_min: int = 10) -> str:
    """Per method, the largest |coverage − 0.95| over distributions at n ≥ ``n_min`` (the selection rule)."""
    lines = [f"worst |coverage − 0.95| at n ≥ {n_min}:"]
    for method in METHODS:
        worst = max((r for r in rows if r["n"] >= n_min), key=lambda r: abs(r[method] - 0.95))
        lines.append(f"  {method:<12} {abs(worst[method] - 0.95):.3f} ({worst['distribution']}, n={worst['n']})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2000, help="simulated samples per (distribution, n)")
    ap.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples per interval")
    ap.add_argument("--ns", type=int, nargs="+", default=[5, 10, 20, 64])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=str, default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    start = time.perf_counter()
    rows = run(args.reps, args.resamples, args.ns, args.seed)
    print(markdown(rows))
    print(worst_deviation(rows))
    print(f"Monte-Carlo standard error of a coverage near 0.95: {rows[0]['mc_se']:.4f}; "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
