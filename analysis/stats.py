"""Paired statistics: every number a report shows comes from here.

Conventions (docs/analysis.md has the full definitions):

* A pair is (prompt_id, seed_index); Δ = arm − baseline for per-image metrics, Δ = value for
  distance-to-baseline metrics (LPIPS), whose baseline is 0 by definition.
* ``level="prompt"`` (default) first averages Δ over a prompt's seeds, so n counts prompts and
  seeds are not treated as independent replicates; ``level="unit"`` keeps every pair.
* Pairs with a NaN on either side (or no partner) are dropped and counted in ``n_dropped``.
* Bootstrap: percentile interval of the resampled mean, ``np.random.default_rng(seed)``,
  10,000 resamples, resample matrix drawn as ``rng.integers(0, n, (n_resamples, n))`` — the
  same draws as ``scipy.stats.bootstrap(..., method="percentile", rng=default_rng(seed))``.
* Tests: paired t (``ttest_rel`` ≡ ``ttest_1samp(Δ, 0)``) and Wilcoxon signed-rank (scipy
  defaults: zero_method="wilcox", method="auto"), two-sided and both one-sided.
* std is the sample standard deviation (ddof=1); Cohen's d_z = mean(Δ) / std(Δ).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pandas as pd
from scipy import stats as sps

if TYPE_CHECKING:
    from .run import RunData

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0  # the sweep schema's analysis.bootstrap_seed default
DEFAULT_CONFIDENCE = 0.95
# Upper bound on resample-matrix entries held at once; larger jobs are drawn in row chunks,
# which yields exactly the same indices as one draw (the generator is consumed in order).
_MAX_BOOT_CELLS = 20_000_000


def bootstrap_means(
    x: np.ndarray, n_resamples: int = DEFAULT_RESAMPLES, seed: int | np.random.Generator = DEFAULT_SEED
) -> np.ndarray:
    """Means of ``n_resamples`` resamples (with replacement) of ``x``, vectorised."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"bootstrap expects a 1-d sample, got shape {x.shape}")
    n = x.size
    if n == 0:
        return np.full(n_resamples, np.nan)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    rows = max(1, _MAX_BOOT_CELLS // n)
    out = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, rows):
        m = min(rows, n_resamples - start)
        idx = rng.integers(0, n, (m, n))
        out[start : start + m] = x[idx].mean(axis=-1)
    return out


def bootstrap_ci(
    x: np.ndarray,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int | np.random.Generator = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (NaN for an empty sample)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return (np.nan, np.nan)
    alpha = (1 - confidence) / 2
    lo, hi = np.percentile(bootstrap_means(x, n_resamples, seed), [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def holm(pvalues: Iterable[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1). NaNs stay NaN and
    do not count towards the family size."""
    p = np.asarray(list(pvalues), dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def _wilcoxon(d: np.ndarray, alternative: str) -> tuple[float, float]:
    if d.size == 0 or np.all(d == 0):
        return (np.nan, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            res = sps.wilcoxon(d, alternative=alternative)
        except ValueError:
            return (np.nan, np.nan)
    return float(res.statistic), float(res.pvalue)


def _ttest(d: np.ndarray, alternative: str) -> tuple[float, float]:
    if d.size < 2 or np.all(d == d[0]):
        # zero variance: scipy returns nan (or inf) with a warning; report "not computable"
        return (np.nan, np.nan)
    res = sps.ttest_1samp(d, 0.0, alternative=alternative)
    return float(res.statistic), float(res.pvalue)


def describe_differences(
    d: np.ndarray,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, float]:
    """All statistics of one sample of paired differences (NaNs dropped and counted)."""
    d = np.asarray(d, dtype=np.float64)
    nan = np.isnan(d)
    d = d[~nan]
    n = int(d.size)
    mean = float(d.mean()) if n else np.nan
    std = float(d.std(ddof=1)) if n > 1 else np.nan
    lo, hi = bootstrap_ci(d, n_resamples, seed, confidence)
    t, p_t = _ttest(d, "two-sided")
    _, p_t_less = _ttest(d, "less")
    _, p_t_greater = _ttest(d, "greater")
    w, p_w = _wilcoxon(d, "two-sided")
    _, p_w_less = _wilcoxon(d, "less")
    _, p_w_greater = _wilcoxon(d, "greater")
    return {
        "n": n,
        "n_dropped": int(nan.sum()),
        "mean": mean,
        "std": std,
        "ci_low": lo,
        "ci_high": hi,
        "t": t,
        "p_t": p_t,
        "p_t_less": p_t_less,
        "p_t_greater": p_t_greater,
        "w": w,
        "p_wilcoxon": p_w,
        "p_wilcoxon_less": p_w_less,
        "p_wilcoxon_greater": p_w_greater,
        "dz": mean / std if n > 1 and std > 0 else np.nan,
    }


# ----------------------------------------------------------------------------- pairing
def metric_kind(metrics: pd.DataFrame, name: str, baseline: str) -> str:
    """``unit`` or ``pair`` for a metric in the table (registry first, else inferred: a metric
    with no baseline rows is a distance to the baseline)."""
    from .metrics.base import UnknownMetricError, metric_info

    try:
        return metric_info(name)["kind"]
    except UnknownMetricError:
        rows = metrics[metrics["metric"] == name]
        return "pair" if not (rows["arm"] == baseline).any() else "unit"


def higher_is_better(name: str) -> bool | None:
    from .metrics.base import UnknownMetricError, metric_info

    try:
        return bool(metric_info(name)["higher_is_better"])
    except UnknownMetricError:
        return None


def paired_values(
    units: pd.DataFrame, metrics: pd.DataFrame, metric: str, arm: str, baseline: str
) -> pd.DataFrame:
    """One row per unit of ``arm``: prompt_id, seed_index, tag, value_arm, value_base, delta.

    Units without a score or without a scored baseline partner keep NaN (they are dropped and
    counted by the statistics, never silently skipped).
    """
    kind = metric_kind(metrics, metric, baseline)
    rows = metrics.loc[metrics["metric"] == metric, ["unit_id", "value"]]
    val = units[["unit_id", "prompt_id", "seed_index", "arm", "tag"]].merge(rows, on="unit_id", how="left")
    a = val[val["arm"] == arm].drop(columns="arm").rename(columns={"value": "value_arm"})
    if kind == "pair":
        a = a.assign(value_base=0.0)
    else:
        b = val.loc[val["arm"] == baseline, ["prompt_id", "seed_index", "value"]].rename(
            columns={"value": "value_base"}
        )
        a = a.merge(b, on=["prompt_id", "seed_index"], how="left")
    a["delta"] = a["value_arm"] - a["value_base"]
    return a.sort_values(["prompt_id", "seed_index"]).reset_index(drop=True)


def per_prompt(pairs: pd.DataFrame, column: str = "delta") -> tuple[pd.DataFrame, int]:
    """Average the non-NaN pairs of each prompt; returns (frame, number of NaN pairs dropped)."""
    ok = pairs.dropna(subset=[column])
    dropped = len(pairs) - len(ok)
    cols = [c for c in ("value_arm", "value_base", column) if c in ok.columns]
    agg = ok.groupby("prompt_id", sort=True).agg({**{c: "mean" for c in cols}, "tag": "first"})
    return agg.reset_index(), dropped


def paired_frame(run: "RunData", metric: str, arm: str, baseline: str) -> pd.DataFrame:
    """:func:`paired_values` on a loaded run."""
    return paired_values(run.units, run.metrics, metric, arm, baseline)


def _sample(pairs: pd.DataFrame, level: str, column: str = "delta") -> tuple[np.ndarray, int, pd.DataFrame]:
    if level == "prompt":
        frame, dropped = per_prompt(pairs, column)
        return frame[column].to_numpy(dtype=np.float64), dropped, frame
    if level == "unit":
        d = pairs[column].to_numpy(dtype=np.float64)
        return d[~np.isnan(d)], int(np.isnan(d).sum()), pairs.dropna(subset=[column])
    raise ValueError(f"level must be 'prompt' or 'unit', got {level!r}")


def _weights_labels(run: "RunData", metric: str) -> dict[str, Any]:
    rows = run.metrics[run.metrics["metric"] == metric]
    return {
        "random_weights": bool(rows["random_weights"].fillna(False).astype(bool).any())
        or bool(run.units["random_weights"].fillna(False).astype(bool).any()),
        "backbone": ";".join(sorted(rows["backbone"].dropna().unique())),
    }


# ----------------------------------------------------------------------------- tables
def paired_table(
    run: "RunData",
    metrics: list[str] | None = None,
    *,
    baseline: str | None = None,
    level: str = "prompt",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> pd.DataFrame:
    """Δ vs baseline for every (metric, arm): n, mean Δ, CI, t, Wilcoxon, d_z, Holm-adjusted p
    (family = all arms of one metric)."""
    baseline = baseline or run.baseline
    names = metrics if metrics is not None else sorted(run.metrics["metric"].unique())
    rows = []
    for metric in names:
        kind = metric_kind(run.metrics, metric, baseline)
        arms = [a for a in run.arms if a != baseline]
        for arm in arms:
            pairs = paired_values(run.units, run.metrics, metric, arm, baseline)
            if pairs.empty:
                continue
            d, dropped, frame = _sample(pairs, level)
            res = describe_differences(d, n_resamples=n_resamples, seed=seed, confidence=confidence)
            res["n_dropped"] = dropped
            rows.append(
                {
                    "metric": metric,
                    "kind": kind,
                    "arm": arm,
                    "baseline": baseline,
                    "level": level,
                    "mean_arm": float(frame["value_arm"].mean()) if len(frame) else np.nan,
                    "mean_base": float(frame["value_base"].mean()) if len(frame) else np.nan,
                    **res,
                    **_weights_labels(run, metric),
                }
            )
    table = pd.DataFrame(rows, columns=_PAIRED_COLUMNS)
    return _add_holm(table, ["metric"])


_STAT_COLUMNS = [
    "n", "n_dropped", "mean", "std", "ci_low", "ci_high", "t", "p_t", "p_t_less", "p_t_greater",
    "w", "p_wilcoxon", "p_wilcoxon_less", "p_wilcoxon_greater", "dz",
]  # fmt: skip
_PAIRED_COLUMNS = ["metric", "kind", "arm", "baseline", "level", "mean_arm", "mean_base", *_STAT_COLUMNS,
                   "random_weights", "backbone"]  # fmt: skip


def _add_holm(table: pd.DataFrame, family: list[str], columns: tuple[str, ...] = ("p_t", "p_wilcoxon")) -> pd.DataFrame:
    table = table.copy()
    for col in columns:
        adj = np.full(len(table), np.nan)
        if len(table):
            values = table[col].to_numpy(dtype=np.float64)
            for pos in table.groupby(family, sort=False).indices.values():
                adj[pos] = holm(values[pos])
        table[f"{col}_holm"] = adj
    return table


# ----------------------------------------------------------------------------- ΔΔ, dose, tags
def _expected_alternative(metric: str) -> str | None:
    """One-sided direction in which removing sinks is expected to act: quality scores drop
    ("less"), distances to the baseline grow ("greater")."""
    hib = higher_is_better(metric)
    if hib is None:
        return None
    return "less" if hib else "greater"


def _p_expected(res: dict[str, float], alternative: str | None, test: str) -> float:
    if alternative is None:
        return np.nan
    return res[f"{test}_{alternative}"]


def delta_delta_values(
    units: pd.DataFrame, metrics: pd.DataFrame, metric: str, sink: str, control: str, baseline: str
) -> pd.DataFrame:
    """Per pair: ΔΔ = (sink − baseline) − (control − baseline); NaN if any of the three is missing."""
    s = paired_values(units, metrics, metric, sink, baseline)
    c = paired_values(units, metrics, metric, control, baseline)
    m = s.merge(c[["prompt_id", "seed_index", "delta"]], on=["prompt_id", "seed_index"], how="outer",
                suffixes=("_sink", "_control"))  # fmt: skip
    m["delta_delta"] = m["delta_sink"] - m["delta_control"]
    return m.sort_values(["prompt_id", "seed_index"]).reset_index(drop=True)


def delta_delta_table(
    run: "RunData",
    metrics: list[str] | None = None,
    *,
    level: str = "prompt",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """ΔΔ of every sink/control contrast (``analysis.design.contrasts``) and metric.

    Two-sided and one-sided tests; ``p_*_expected`` is the one-sided p in the direction expected
    if sinks matter (quality down / distance up). ``sink_specific``: mean ΔΔ in that direction,
    CI excludes 0 and the one-sided t p < ``alpha``. Holm: family = all contrasts of a metric
    (``*_holm``) and all contrasts of a metric at one k (``*_holm_k``).
    """
    from .design import contrasts

    baseline = run.baseline
    names = metrics if metrics is not None else sorted(run.metrics["metric"].unique())
    pairs = contrasts(run.sweep)
    rows = []
    for metric in names:
        alt = _expected_alternative(metric)
        for c in pairs:
            dd = delta_delta_values(run.units, run.metrics, metric, c.sink, c.control, baseline)
            if dd.empty:
                continue
            d, dropped, frame = _sample(dd.rename(columns={"delta_delta": "dd"}), level, "dd")
            res = describe_differences(d, n_resamples=n_resamples, seed=seed, confidence=confidence)
            res["n_dropped"] = dropped
            sign_ok = (res["mean"] < 0) if alt == "less" else (res["mean"] > 0) if alt == "greater" else False
            ci_excl = res["ci_low"] > 0 or res["ci_high"] < 0
            p_exp = _p_expected(res, alt, "p_t")
            rows.append(
                {
                    "metric": metric, "sink": c.sink, "control": c.control, "control_selection": c.control_selection,
                    "k": c.k, "level": level, "expected": alt or "",
                    "mean_delta_sink": float(np.nanmean(dd["delta_sink"])) if len(dd) else np.nan,
                    "mean_delta_control": float(np.nanmean(dd["delta_control"])) if len(dd) else np.nan,
                    **res,
                    "p_t_expected": p_exp, "p_wilcoxon_expected": _p_expected(res, alt, "p_wilcoxon"),
                    "sink_specific": bool(sign_ok and ci_excl and p_exp < alpha),
                    **_weights_labels(run, metric),
                }
            )  # fmt: skip
    table = pd.DataFrame(rows, columns=_DD_COLUMNS)
    table = _add_holm(table, ["metric"], ("p_t", "p_wilcoxon", "p_t_expected"))
    k_holm = _add_holm(table.assign(_k=table["k"].fillna(-1)), ["metric", "_k"], ("p_t", "p_t_expected"))
    table["p_t_holm_k"] = k_holm["p_t_holm"].to_numpy()
    table["p_t_expected_holm_k"] = k_holm["p_t_expected_holm"].to_numpy()
    return table


_DD_COLUMNS = ["metric", "sink", "control", "control_selection", "k", "level", "expected", "mean_delta_sink",
               "mean_delta_control", *_STAT_COLUMNS, "p_t_expected", "p_wilcoxon_expected", "sink_specific",
               "random_weights", "backbone"]  # fmt: skip


def dose_values(run: "RunData", metric: str, arm: str, control: str | None) -> pd.DataFrame:
    """Per pair dose value: ΔΔ against ``control`` if given, else Δ vs baseline."""
    if control is None:
        out = paired_values(run.units, run.metrics, metric, arm, run.baseline)
        return out[["prompt_id", "seed_index", "tag", "delta"]].rename(columns={"delta": "d"})
    dd = delta_delta_values(run.units, run.metrics, metric, arm, control, run.baseline)
    return dd[["prompt_id", "seed_index", "tag", "delta_delta"]].rename(columns={"delta_delta": "d"})


def dose_table(
    run: "RunData",
    metrics: list[str] | None = None,
    *,
    level: str = "prompt",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Dose trend per series and metric: per-prompt d(hi) − d(lo) for adjacent doses and for
    (lowest, highest), with bootstrap CI and t/Wilcoxon tests. For ``k`` the expected direction
    is the metric's (stronger removal: quality lower, distance larger); ``significant`` = mean in
    that direction, CI excludes 0, one-sided t p < ``alpha``. Holm within (metric, series)."""
    from .design import dose_series

    names = metrics if metrics is not None else sorted(run.metrics["metric"].unique())
    rows = []
    for metric in names:
        for series in dose_series(run.sweep, run.baseline):
            alt = _expected_alternative(metric) if series.field == "k" else None
            n = len(series.arms)
            steps = [(i, i + 1) for i in range(n - 1)] + ([(0, n - 1)] if n > 2 else [])
            label = " < ".join(series.arms)
            for lo, hi in steps:
                a = dose_values(run, metric, series.arms[hi], series.controls[hi])
                b = dose_values(run, metric, series.arms[lo], series.controls[lo])
                m = a.merge(b[["prompt_id", "seed_index", "d"]], on=["prompt_id", "seed_index"], how="outer",
                            suffixes=("_hi", "_lo"))  # fmt: skip
                m["trend"] = m["d_hi"] - m["d_lo"]
                d, dropped, _ = _sample(m, level, "trend")
                res = describe_differences(d, n_resamples=n_resamples, seed=seed, confidence=confidence)
                res["n_dropped"] = dropped
                p_exp = _p_expected(res, alt, "p_t")
                sign_ok = (res["mean"] < 0) if alt == "less" else (res["mean"] > 0) if alt == "greater" else False
                rows.append(
                    {
                        "metric": metric, "series": label, "field": series.field,
                        "statistic": "ΔΔ" if series.uses_delta_delta else "Δ",
                        "arm_lo": series.arms[lo], "arm_hi": series.arms[hi],
                        "dose_lo": series.values[lo], "dose_hi": series.values[hi], "level": level,
                        "expected": alt or "", **res, "p_t_expected": p_exp,
                        "p_wilcoxon_expected": _p_expected(res, alt, "p_wilcoxon"),
                        "significant": bool(sign_ok and (res["ci_low"] > 0 or res["ci_high"] < 0) and p_exp < alpha),
                        **_weights_labels(run, metric),
                    }
                )  # fmt: skip
    table = pd.DataFrame(rows, columns=_DOSE_COLUMNS)
    return _add_holm(table, ["metric", "series"], ("p_t", "p_t_expected"))


_DOSE_COLUMNS = ["metric", "series", "field", "statistic", "arm_lo", "arm_hi", "dose_lo", "dose_hi", "level",
                 "expected", *_STAT_COLUMNS, "p_t_expected", "p_wilcoxon_expected", "significant",
                 "random_weights", "backbone"]  # fmt: skip


def tag_table(
    run: "RunData",
    metrics: list[str] | None = None,
    *,
    level: str = "prompt",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> pd.DataFrame:
    """Δ vs baseline per (metric, arm, tag) using the units' ``tag`` (GenEval metadata).
    Holm within (metric, arm) over tags."""
    baseline = run.baseline
    names = metrics if metrics is not None else sorted(run.metrics["metric"].unique())
    rows = []
    for metric in names:
        for arm in [a for a in run.arms if a != baseline]:
            pairs = paired_values(run.units, run.metrics, metric, arm, baseline)
            pairs = pairs.assign(tag=pairs["tag"].fillna("(none)"))
            for tag, group in pairs.groupby("tag", sort=True):
                d, dropped, _ = _sample(group, level)
                res = describe_differences(d, n_resamples=n_resamples, seed=seed, confidence=confidence)
                res["n_dropped"] = dropped
                rows.append({"metric": metric, "arm": arm, "tag": tag, "level": level, **res, **_weights_labels(run, metric)})
    table = pd.DataFrame(rows, columns=["metric", "arm", "tag", "level", *_STAT_COLUMNS, "random_weights", "backbone"])
    return _add_holm(table, ["metric", "arm"])
