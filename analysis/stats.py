"""Paired statistics: every number a report shows comes from here.

Conventions (docs/analysis.md §6 has them choice by choice):

* A pair is (prompt_id, seed_index); Δ = arm − baseline for per-image metrics, Δ = value for
  distance-to-baseline metrics (LPIPS), whose baseline is 0 by definition.
* Every choice that changes a number lives in one :class:`StatsSettings`; two presets exist:
  ``"project"`` (the defaults) and ``"paper"`` (the paper's own choices, to recompute its tables
  like for like). Every table row records the settings it was computed with.
* ``level="prompt"`` (default) averages Δ over a prompt's seeds first: the prompt is the unit that
  is resampled and tested. ``level="unit"`` keeps every pair and warns when a prompt has several
  seeds (they are then treated as independent, which they are not).
* ΔΔ tables take Δ sink, Δ control and ΔΔ from the same complete (prompt, seed) pairs, so the
  columns add up: mean Δ sink − mean Δ control = mean ΔΔ.
* p-value columns name their test and side (``p_t_two_sided``, ``p_t_less``, ...); all of them are
  unadjusted. ``p_unadj`` is the declared decision test of the row (paired t, side in
  ``alternative``); ``p_holm_<family>`` are its Holm adjustments; verdicts use ``p_adj``, the
  adjustment of the declared family (``holm_family``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pandas as pd
from scipy import stats as sps

if TYPE_CHECKING:
    from .run import RunData

INTERVAL_METHODS = ("hull", "t", "bootstrap-t", "bca", "percentile")
HOLM_FAMILIES = ("metric", "k")
LEVELS = ("prompt", "unit")
# Explicit Wilcoxon options (scipy's defaults changed meaning between releases): zeros are dropped
# (Pratt's alternative is not used), no continuity correction, and the p-value is the exact
# null distribution when the nonzero |Δ| are distinct and at most this many, else the normal
# approximation with scipy's tie correction. Both computations are the same from scipy 1.11 on
# (benchmarks/RESULTS.md, "scipy floor").
WILCOXON_ZERO_METHOD = "wilcox"
WILCOXON_CORRECTION = False
WILCOXON_EXACT_MAX_N = 50
# Upper bound on resample-matrix entries scipy's bootstrap holds at once (its ``batch``).
_MAX_BOOT_CELLS = 20_000_000


class SeedsAsReplicatesWarning(UserWarning):
    """``level="unit"`` on a run with several seeds per prompt: the seeds are treated as independent."""


@dataclass(frozen=True)
class StatsSettings:
    """Every statistical choice of a table, in one place (see docs/analysis.md §6).

    ``interval``: ``"hull"`` (default: the smallest interval containing both the t-interval and the
    bootstrap-t interval; chosen by the coverage benchmark, benchmarks/RESULTS.md), ``"t"``,
    ``"bootstrap-t"``, ``"bca"`` or ``"percentile"`` (the last two through ``scipy.stats.bootstrap``). Below ``min_n`` units no interval is given ("too few") and no verdict
    is drawn. ``ddof`` is used for the reported std and d_z only (the t-test always uses n − 1).
    ``holm_family``: ``"metric"`` = all rows of one metric in a table (all arms, all contrasts; the
    paper's "global" family when the arms are its k × mode grid), ``"k"`` = the rows of one metric
    at one k (the paper's "within k over the modes"). ``distance_test``: side of the decision test
    for distance-to-baseline metrics (LPIPS) in ΔΔ and dose tables: ``"one-sided"`` in the
    expected direction (farther) or ``"two-sided"`` (the paper). A Δ is constant when its range
    is at most ``constant_rtol`` × its largest |Δ|.
    """

    name: str = "project"
    n_resamples: int = 10_000
    seed: int = 0
    confidence: float = 0.95
    interval: str = "hull"
    min_n: int = 10
    ddof: int = 1
    level: str = "prompt"
    holm_family: str = "metric"
    distance_test: str = "one-sided"
    alpha: float = 0.05
    constant_rtol: float = 1e-9

    def __post_init__(self) -> None:
        checks = {
            "interval": (self.interval in INTERVAL_METHODS, f"one of {INTERVAL_METHODS}"),
            "holm_family": (self.holm_family in HOLM_FAMILIES, f"one of {HOLM_FAMILIES}"),
            "level": (self.level in LEVELS, f"one of {LEVELS}"),
            "distance_test": (self.distance_test in ("one-sided", "two-sided"), "'one-sided' or 'two-sided'"),
            "confidence": (0 < self.confidence < 1, "a number in (0, 1)"),
            "alpha": (0 < self.alpha < 1, "a number in (0, 1)"),
            "n_resamples": (self.n_resamples >= 100, "an integer ≥ 100"),
            "min_n": (self.min_n >= 2, "an integer ≥ 2"),
            "ddof": (self.ddof in (0, 1), "0 or 1"),
            "constant_rtol": (self.constant_rtol >= 0, "a number ≥ 0"),
        }
        for key, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"statistics setting {key}={getattr(self, key)!r}: expected {expected}")

    @property
    def interval_label(self) -> str:
        """How the table's intervals are computed, in words (every table prints it)."""
        return interval_description(self.interval, self.n_resamples, self.seed, self.confidence, self.level)


def interval_description(interval: str, n_resamples: int, seed: int, confidence: float = 0.95, level: str = "prompt") -> str:
    """E.g. "95% t-interval" or "95% BCa bootstrap (10,000 resamples of prompts, seed 0)"."""
    pct = f"{confidence:.0%}"
    if interval == "t":
        return f"{pct} t-interval"
    kind = {"bca": "BCa bootstrap", "percentile": "percentile bootstrap", "bootstrap-t": "bootstrap-t",
            "hull": "hull of the t- and bootstrap-t intervals"}[interval]  # fmt: skip
    return f"{pct} {kind} ({n_resamples:,} resamples of {level}s, seed {seed})"


PRESETS: dict[str, StatsSettings] = {
    "project": StatsSettings(),
    "paper": StatsSettings(
        name="paper", n_resamples=1_000, seed=42, interval="percentile", min_n=2, ddof=0,
        holm_family="k", distance_test="two-sided",
    ),
}  # fmt: skip


def resolve_settings(settings: StatsSettings | str | None = None, **overrides: Any) -> StatsSettings:
    """A preset name or settings object, with the given (non-None) fields replaced."""
    if settings is None:
        base = PRESETS["project"]
    elif isinstance(settings, str):
        if settings not in PRESETS:
            raise ValueError(f"unknown statistics preset {settings!r}; expected one of {sorted(PRESETS)}")
        base = PRESETS[settings]
    elif isinstance(settings, StatsSettings):
        base = settings
    else:
        raise TypeError(f"settings must be a preset name or StatsSettings, got {type(settings).__name__}")
    known = {f.name for f in fields(StatsSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown statistics setting(s) {unknown}; expected some of {sorted(known)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(base, **changes) if changes else base


# ----------------------------------------------------------------------------- one sample
def is_constant(d: np.ndarray, rtol: float = PRESETS["project"].constant_rtol) -> bool:
    """True when the sample's range is at most ``rtol`` × its largest |value| (all zeros included):
    a t statistic of such a sample only measures rounding error."""
    d = np.asarray(d, dtype=np.float64)
    return bool(d.size > 0 and np.ptp(d) <= rtol * np.max(np.abs(d)))


def bootstrap_interval(
    d: np.ndarray, method: str = "bca", n_resamples: int = 10_000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """``scipy.stats.bootstrap`` interval of the mean (``method`` "bca" or "percentile"), seeded with
    ``np.random.default_rng(seed)``; resamples drawn in batches of at most ~20M entries."""
    d = np.asarray(d, dtype=np.float64)
    if d.size < 2:
        return (np.nan, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # degenerate BCa samples give NaN, reported as such
        res = sps.bootstrap(
            (d,), np.mean, n_resamples=n_resamples, method="BCa" if method == "bca" else "percentile",
            confidence_level=confidence, vectorized=True, rng=np.random.default_rng(seed),
            batch=max(1, _MAX_BOOT_CELLS // d.size),
        )  # fmt: skip
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def studentized_bootstrap_interval(
    d: np.ndarray, n_resamples: int = 10_000, seed: int | np.random.Generator = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Bootstrap-t interval of the mean: [m − q_hi·se, m − q_lo·se] with q the quantiles of
    (m* − m) / se* over resamples (se = s / √n, ddof 1).

    Written here because scipy.stats.bootstrap offers percentile, basic and BCa only. Resamples
    with se* = 0 (all draws equal; only at tiny n) give ±inf or NaN; NaNs are left out of the
    quantiles, infinities stay (they widen the interval, as they should).
    """
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    if n < 2:
        return (np.nan, np.nan)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    mean, se = d.mean(), d.std(ddof=1) / np.sqrt(n)
    rows = max(1, _MAX_BOOT_CELLS // n)
    t_star = np.empty(n_resamples)
    for start in range(0, n_resamples, rows):
        x = d[rng.integers(0, n, (min(rows, n_resamples - start), n))]
        with np.errstate(divide="ignore", invalid="ignore"):
            t_star[start : start + len(x)] = (x.mean(axis=1) - mean) / (x.std(axis=1, ddof=1) / np.sqrt(n))
    alpha = (1 - confidence) / 2
    q_lo, q_hi = np.nanquantile(t_star, [alpha, 1 - alpha])
    return float(mean - q_hi * se), float(mean - q_lo * se)


def t_interval(d: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """t-interval of the mean: mean ± t_{n−1} · s / √n (``ttest_1samp(...).confidence_interval``)."""
    d = np.asarray(d, dtype=np.float64)
    if d.size < 2:
        return (np.nan, np.nan)
    ci = sps.ttest_1samp(d, 0.0).confidence_interval(confidence)
    return float(ci.low), float(ci.high)


def mean_interval(d: np.ndarray, settings: StatsSettings) -> tuple[float, float, str]:
    """(low, high, method label) of the mean under ``settings``; NaN and "too few" below ``min_n``."""
    d = np.asarray(d, dtype=np.float64)
    if d.size < settings.min_n:
        return (np.nan, np.nan, f"too few (n < {settings.min_n})")
    if is_constant(d, settings.constant_rtol):
        return (float(d.mean()), float(d.mean()), "constant Δ")
    if settings.interval == "t":
        return (*t_interval(d, settings.confidence), "t")
    if settings.interval in ("bootstrap-t", "hull"):
        lo, hi = studentized_bootstrap_interval(d, settings.n_resamples, settings.seed, settings.confidence)
        if settings.interval == "hull":  # conservative where either alone under-covers (benchmarks/RESULTS.md)
            t_lo, t_hi = t_interval(d, settings.confidence)
            lo, hi = min(lo, t_lo), max(hi, t_hi)
    else:
        lo, hi = bootstrap_interval(d, settings.interval, settings.n_resamples, settings.seed, settings.confidence)
    return (lo, hi, settings.interval)


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


def wilcoxon_test(d: np.ndarray, alternative: str = "two-sided") -> tuple[float, float, str]:
    """Wilcoxon signed-rank test with every option explicit: (statistic, p, method).

    Zeros are dropped (``zero_method="wilcox"``), no continuity correction; ``method="exact"`` when
    the remaining |Δ| are distinct and at most :data:`WILCOXON_EXACT_MAX_N`, else
    ``"asymptotic"`` (normal approximation with the tie-corrected variance). NaN when no nonzero
    Δ remains.
    """
    d = np.asarray(d, dtype=np.float64)
    nonzero = d[d != 0]
    n = nonzero.size
    if n == 0:
        return (np.nan, np.nan, "")
    ties = np.unique(np.abs(nonzero)).size < n
    method = "exact" if n <= WILCOXON_EXACT_MAX_N and not ties else "asymptotic"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # scipy's "sample size too small for normal approximation"
        res = sps.wilcoxon(nonzero, zero_method=WILCOXON_ZERO_METHOD, correction=WILCOXON_CORRECTION,
                           alternative=alternative, method=method)  # fmt: skip
    return float(res.statistic), float(res.pvalue), method


def t_test(d: np.ndarray, alternative: str = "two-sided", rtol: float = PRESETS["project"].constant_rtol) -> tuple[float, float]:
    """One-sample t-test of Δ against 0 (≡ paired ``ttest_rel``); NaN for n < 2 or a constant Δ."""
    d = np.asarray(d, dtype=np.float64)
    if d.size < 2 or is_constant(d, rtol):
        return (np.nan, np.nan)
    res = sps.ttest_1samp(d, 0.0, alternative=alternative)
    return float(res.statistic), float(res.pvalue)


SIDES = ("two_sided", "less", "greater")


def describe_differences(d: np.ndarray, settings: StatsSettings | str | None = None, **overrides: Any) -> dict[str, Any]:
    """All statistics of one sample of paired differences (NaNs dropped and counted)."""
    s = resolve_settings(settings, **overrides)
    d = np.asarray(d, dtype=np.float64)
    nan = np.isnan(d)
    d = d[~nan]
    n = int(d.size)
    mean = float(d.mean()) if n else np.nan
    std = float(d.std(ddof=s.ddof)) if n > s.ddof else np.nan
    lo, hi, method = mean_interval(d, s)
    out: dict[str, Any] = {"n": n, "n_dropped": int(nan.sum()), "constant": is_constant(d, s.constant_rtol),
                           "mean": mean, "std": std, "ci_low": lo, "ci_high": hi, "ci_method": method}  # fmt: skip
    for side in SIDES:
        t, p = t_test(d, side.replace("_", "-"), s.constant_rtol)
        out.setdefault("t", t)
        out[f"p_t_{side}"] = p
    for side in SIDES:
        w, p, wmethod = wilcoxon_test(d, side.replace("_", "-"))
        out.setdefault("w", w)
        out[f"p_wilcoxon_{side}"] = p
    out["wilcoxon_method"] = wmethod
    out["dz"] = mean / std if n > 1 and std > 0 and not out["constant"] else np.nan
    return out


_STAT_COLUMNS = [
    "n", "n_dropped", "constant", "mean", "std", "ci_low", "ci_high", "ci_method", "t",
    "p_t_two_sided", "p_t_less", "p_t_greater", "w", "p_wilcoxon_two_sided", "p_wilcoxon_less",
    "p_wilcoxon_greater", "wilcoxon_method", "dz",
]  # fmt: skip
_SETTINGS_COLUMNS = ["statistics", "interval", "confidence", "n_resamples", "bootstrap_seed", "ddof", "alpha"]


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


def per_prompt(pairs: pd.DataFrame, column: str = "delta", keep: tuple[str, ...] = ("value_arm", "value_base")) -> tuple[pd.DataFrame, int]:
    """Average the complete pairs of each prompt (``column`` and every ``keep`` column present);
    returns (frame, number of pairs dropped for a NaN in ``column``)."""
    ok = pairs.dropna(subset=[column])
    dropped = len(pairs) - len(ok)
    cols = [c for c in (*keep, column) if c in ok.columns]
    agg = ok.groupby("prompt_id", sort=True).agg({**{c: "mean" for c in cols}, "tag": "first"})
    return agg.reset_index(), dropped


def paired_frame(run: "RunData", metric: str, arm: str, baseline: str) -> pd.DataFrame:
    """:func:`paired_values` on a loaded run."""
    return paired_values(run.units, run.metrics, metric, arm, baseline)


def _sample(pairs: pd.DataFrame, level: str, column: str = "delta", keep: tuple[str, ...] = ("value_arm", "value_base")
            ) -> tuple[np.ndarray, int, pd.DataFrame]:  # fmt: skip
    """The units that are tested: prompts (seeds averaged) or pairs; (values, dropped, frame)."""
    if level == "prompt":
        frame, dropped = per_prompt(pairs, column, keep)
        return frame[column].to_numpy(dtype=np.float64), dropped, frame
    if level == "unit":
        frame = pairs.dropna(subset=[column])
        return frame[column].to_numpy(dtype=np.float64), len(pairs) - len(frame), frame
    raise ValueError(f"level must be 'prompt' or 'unit', got {level!r}")


def _warn_unit_level(run: "RunData", settings: StatsSettings) -> None:
    if settings.level != "unit" or run.units.empty:
        return
    seeds = run.units.groupby(["arm", "prompt_id"])["seed_index"].nunique()
    if (seeds > 1).any():
        warnings.warn(
            f"{run.run_dir}: level='unit' with up to {int(seeds.max())} seeds per prompt treats the seeds of a "
            "prompt as independent replicates; intervals are too narrow and tests too liberal. "
            "Use level='prompt' (the default) unless the seeds are the unit of interest.",
            SeedsAsReplicatesWarning,
            stacklevel=3,
        )


def _weights_labels(run: "RunData", metric: str) -> dict[str, Any]:
    rows = run.metrics[run.metrics["metric"] == metric]
    return {
        "random_weights": bool(rows["random_weights"].fillna(False).astype(bool).any())
        or bool(run.units["random_weights"].fillna(False).astype(bool).any()),
        "backbone": ";".join(sorted(rows["backbone"].dropna().unique())),
    }


def _settings_labels(s: StatsSettings) -> dict[str, Any]:
    return {"statistics": s.name, "interval": s.interval, "confidence": s.confidence, "n_resamples": s.n_resamples,
            "bootstrap_seed": s.seed, "ddof": s.ddof, "alpha": s.alpha}  # fmt: skip


# ----------------------------------------------------------------------------- decisions
def expected_alternative(metric: str) -> str | None:
    """One-sided direction in which removing sinks is expected to act: quality scores drop
    ("less"), distances to the baseline grow ("greater"); None when the metric has no direction."""
    hib = higher_is_better(metric)
    if hib is None:
        return None
    return "less" if hib else "greater"


def decision_alternative(metric: str, kind: str, settings: StatsSettings) -> str:
    """Side of the decision test of a directional row (ΔΔ, k-dose): the expected direction, or
    two-sided for a metric without one and, under ``distance_test="two-sided"``, for distances."""
    alt = expected_alternative(metric)
    if alt is None or (kind == "pair" and settings.distance_test == "two-sided"):
        return "two-sided"
    return alt


def _p_of(res: dict[str, Any], alternative: str) -> float:
    return res[f"p_t_{alternative.replace('-', '_')}"]


def _direction_ok(mean: float, expected: str | None) -> bool:
    if expected == "less":
        return mean < 0
    if expected == "greater":
        return mean > 0
    return True


def decide(row: dict[str, Any] | pd.Series, expected: str | None, settings: StatsSettings) -> tuple[bool, str]:
    """(verdict, words) of a row from its adjusted p: significant when n ≥ ``min_n``, Δ is not
    constant, the mean lies in the expected direction (if any), the interval excludes 0 and
    ``p_adj`` < α."""
    n, mean, p_adj = int(row["n"]), float(row["mean"]), float(row["p_adj"])
    if n < settings.min_n:
        return False, f"too few (n = {n} < {settings.min_n})"
    if bool(row["constant"]):
        return False, "not testable (constant Δ)"
    if np.isnan(p_adj):
        return False, "not testable"
    if not _direction_ok(mean, expected):
        return False, "no (opposite direction)"
    ci_excludes = row["ci_low"] > 0 or row["ci_high"] < 0
    if ci_excludes and p_adj < settings.alpha:
        return True, f"yes ({'lower' if mean < 0 else 'higher'})"
    return False, "no (not significant)"


def _add_holm(table: pd.DataFrame, families: dict[str, list[str]], declared: str) -> pd.DataFrame:
    """``p_holm_<name>`` = Holm-adjusted ``p_unadj`` within each family (groups of ``columns``);
    ``p_adj`` = the declared family's."""
    table = table.copy()
    for name, by in families.items():
        adj = np.full(len(table), np.nan)
        if len(table):
            values = table["p_unadj"].to_numpy(dtype=np.float64)
            keys = table[by].astype(object).where(table[by].notna(), "—")
            for pos in keys.groupby(by, sort=False).indices.values():
                adj[pos] = holm(values[pos])
        table[f"p_holm_{name}"] = adj
    table["holm_family"] = declared
    table["p_adj"] = table[f"p_holm_{declared}"] if len(table) else np.nan
    return table


def _finish(table: pd.DataFrame, columns: list[str], families: dict[str, list[str]], declared: str,
            settings: StatsSettings, verdict_column: str) -> pd.DataFrame:  # fmt: skip
    """Holm columns, then the verdict of each row from its declared adjusted p."""
    table = _add_holm(pd.DataFrame(table, columns=columns), families, declared)
    verdicts = [decide(row, row["expected"] or None, settings) for _, row in table.iterrows()]
    table[verdict_column] = [v for v, _ in verdicts]
    table["verdict"] = [w for _, w in verdicts]
    return table


def _arm_ks(run: "RunData") -> dict[str, Any]:
    from .design import arm_k

    return arm_k(run.sweep)


# ----------------------------------------------------------------------------- tables
def paired_table(
    run: "RunData",
    metrics: list[str] | None = None,
    *,
    baseline: str | None = None,
    settings: StatsSettings | str | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """Δ vs baseline for every (metric, arm): n, mean Δ, interval, t and Wilcoxon p (unadjusted,
    both sides), d_z; decision = two-sided paired t, Holm within the metric (``p_holm_metric``)
    and within the metric at one k (``p_holm_k``); ``significant`` from ``p_adj``."""
    s = resolve_settings(settings, **overrides)
    _warn_unit_level(run, s)
    baseline = baseline or run.baseline
    names = metrics if metrics is not None else sorted(run.metrics["metric"].unique())
    ks = _arm_ks(run)
    rows = []
    for metric in names:
        kind = metric_kind(run.metrics, metric, baseline)
        for arm in [a for a in run.arms if a != baseline]:
            pairs = paired_values(run.units, run.metrics, metric, arm, baseline)
            if pairs.empty:
                continue
            d, dropped, frame = _sample(pairs, s.level)
            res = describe_differences(d, s)
            res["n_dropped"] = dropped
            rows.append(
                {
                    "metric": metric, "kind": kind, "arm": arm, "baseline": baseline, "k": ks.get(arm),
                    "level": s.level, "expected": "", "mean_arm": float(frame["value_arm"].mean()) if len(frame) else np.nan,
                    "mean_base": float(frame["value_base"].mean()) if len(frame) else np.nan, **res,
                    "alternative": "two-sided", "p_unadj": res["p_t_two_sided"],
                    **_settings_labels(s), **_weights_labels(run, metric),
                }
            )  # fmt: skip
    return _finish(rows, _PAIRED_COLUMNS, {"metric": ["metric"], "k": ["metric", "k"]}, s.holm_family, s, "significant")


_PAIRED_COLUMNS = ["metric", "kind", "arm", "baseline", "k", "level", "expected", "mean_arm", "mean_base",
                   *_STAT_COLUMNS, "alternative", "p_unadj", *_SETTINGS_COLUMNS, "random_weights", "backbone"]  # fmt: skip


def delta_delta_values(
    units: pd.DataFrame, metrics: pd.DataFrame, metric: str, sink: str, control: str, baseline: str
) -> pd.DataFrame:
    """Per pair: Δ sink, Δ control and ΔΔ = Δ sink − Δ control; all three NaN unless the pair is
    complete (sink, control and baseline scored), so every column averages the same pairs."""
    s = paired_values(units, metrics, metric, sink, baseline)
    c = paired_values(units, metrics, metric, control, baseline)
    m = s.merge(c[["prompt_id", "seed_index", "delta"]], on=["prompt_id", "seed_index"], how="outer",
                suffixes=("_sink", "_control"))  # fmt: skip
    incomplete = m["delta_sink"].isna() | m["delta_control"].isna()
    m.loc[incomplete, ["delta_sink", "delta_control"]] = np.nan
    m["delta_delta"] = m["delta_sink"] - m["delta_control"]
    return m.sort_values(["prompt_id", "seed_index"]).reset_index(drop=True)


def delta_delta_table(
    run: "RunData",
    metrics: list[str] | None = None,
    *,
    settings: StatsSettings | str | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """ΔΔ of every sink/control contrast (``analysis.design.contrasts``) and metric.

    Δ sink, Δ control and ΔΔ come from the same complete pairs. Decision test: paired t on ΔΔ,
    one-sided in the direction expected if sinks matter (quality down / distance up; see
    :func:`decision_alternative`), Holm within the metric (``p_holm_metric``) and within the metric
    at one k (``p_holm_k``). ``sink_specific``: see :func:`decide`.
    """
    from .design import contrasts

    s = resolve_settings(settings, **overrides)
    _warn_unit_level(run, s)
    baseline = run.baseline
    names = metrics if metrics is not None else sorted(run.metrics["metric"].unique())
    rows = []
    for metric in names:
        kind = metric_kind(run.metrics, metric, baseline)
        alt = decision_alternative(metric, kind, s)
        for c in contrasts(run.sweep):
            dd = delta_delta_values(run.units, run.metrics, metric, c.sink, c.control, baseline)
            if dd.empty:
                continue
            d, dropped, frame = _sample(dd, s.level, "delta_delta", keep=("delta_sink", "delta_control"))
            res = describe_differences(d, s)
            res["n_dropped"] = dropped
            rows.append(
                {
                    "metric": metric, "sink": c.sink, "control": c.control, "control_selection": c.control_selection,
                    "k": c.k, "level": s.level, "expected": expected_alternative(metric) or "",
                    "mean_delta_sink": float(frame["delta_sink"].mean()) if len(frame) else np.nan,
                    "mean_delta_control": float(frame["delta_control"].mean()) if len(frame) else np.nan,
                    **res, "alternative": alt, "p_unadj": _p_of(res, alt),
                    **_settings_labels(s), **_weights_labels(run, metric),
                }
            )  # fmt: skip
    return _finish(rows, _DD_COLUMNS, {"metric": ["metric"], "k": ["metric", "k"]}, s.holm_family, s, "sink_specific")


_DD_COLUMNS = ["metric", "sink", "control", "control_selection", "k", "level", "expected", "mean_delta_sink",
               "mean_delta_control", *_STAT_COLUMNS, "alternative", "p_unadj", *_SETTINGS_COLUMNS,
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
    settings: StatsSettings | str | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """Dose trend per series and metric: per-prompt d(hi) − d(lo) for adjacent doses and for
    (lowest, highest). For ``k`` the decision test is one-sided in the metric's expected direction
    (stronger removal: quality lower, distance larger), else two-sided; Holm within (metric,
    series) (``p_holm_series``); ``significant``: see :func:`decide`."""
    from .design import dose_series

    s = resolve_settings(settings, **overrides)
    _warn_unit_level(run, s)
    names = metrics if metrics is not None else sorted(run.metrics["metric"].unique())
    rows = []
    for metric in names:
        kind = metric_kind(run.metrics, metric, run.baseline)
        for series in dose_series(run.sweep, run.baseline):
            directional = series.field == "k"
            alt = decision_alternative(metric, kind, s) if directional else "two-sided"
            n = len(series.arms)
            steps = [(i, i + 1) for i in range(n - 1)] + ([(0, n - 1)] if n > 2 else [])
            label = " < ".join(series.arms)
            for lo, hi in steps:
                a = dose_values(run, metric, series.arms[hi], series.controls[hi])
                b = dose_values(run, metric, series.arms[lo], series.controls[lo])
                m = a.merge(b[["prompt_id", "seed_index", "d"]], on=["prompt_id", "seed_index"], how="outer",
                            suffixes=("_hi", "_lo"))  # fmt: skip
                m["trend"] = m["d_hi"] - m["d_lo"]
                d, dropped, _ = _sample(m, s.level, "trend")
                res = describe_differences(d, s)
                res["n_dropped"] = dropped
                rows.append(
                    {
                        "metric": metric, "series": label, "field": series.field,
                        "statistic": "ΔΔ" if series.uses_delta_delta else "Δ",
                        "arm_lo": series.arms[lo], "arm_hi": series.arms[hi],
                        "dose_lo": series.values[lo], "dose_hi": series.values[hi], "level": s.level,
                        "expected": (expected_alternative(metric) or "") if directional else "", **res,
                        "alternative": alt, "p_unadj": _p_of(res, alt),
                        **_settings_labels(s), **_weights_labels(run, metric),
                    }
                )  # fmt: skip
    return _finish(rows, _DOSE_COLUMNS, {"series": ["metric", "series"]}, "series", s, "significant")


_DOSE_COLUMNS = ["metric", "series", "field", "statistic", "arm_lo", "arm_hi", "dose_lo", "dose_hi", "level",
                 "expected", *_STAT_COLUMNS, "alternative", "p_unadj", *_SETTINGS_COLUMNS,
                 "random_weights", "backbone"]  # fmt: skip


def tag_table(
    run: "RunData",
    metrics: list[str] | None = None,
    *,
    settings: StatsSettings | str | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """Δ vs baseline per (metric, arm, tag) using the units' ``tag`` (GenEval metadata); decision
    = two-sided paired t, Holm within (metric, arm) over tags (``p_holm_tags``)."""
    s = resolve_settings(settings, **overrides)
    _warn_unit_level(run, s)
    baseline = run.baseline
    names = metrics if metrics is not None else sorted(run.metrics["metric"].unique())
    rows = []
    for metric in names:
        for arm in [a for a in run.arms if a != baseline]:
            pairs = paired_values(run.units, run.metrics, metric, arm, baseline)
            pairs = pairs.assign(tag=pairs["tag"].fillna("(none)"))
            for tag, group in pairs.groupby("tag", sort=True):
                d, dropped, _ = _sample(group, s.level)
                res = describe_differences(d, s)
                res["n_dropped"] = dropped
                rows.append({"metric": metric, "arm": arm, "tag": tag, "level": s.level, "expected": "", **res,
                             "alternative": "two-sided", "p_unadj": res["p_t_two_sided"],
                             **_settings_labels(s), **_weights_labels(run, metric)})  # fmt: skip
    columns = ["metric", "arm", "tag", "level", "expected", *_STAT_COLUMNS, "alternative", "p_unadj",
               *_SETTINGS_COLUMNS, "random_weights", "backbone"]  # fmt: skip
    return _finish(rows, columns, {"tags": ["metric", "arm"]}, "tags", s, "significant")
