"""Paired statistics checked against scipy, statsmodels and explicit re-computations on fixed data."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import DescrStatsW

from analysis import load_run
from analysis import stats as S


@pytest.fixture
def sample():
    rng = np.random.default_rng(7)
    base = rng.normal(0.3, 0.02, 40)
    arm = base + rng.normal(-0.004, 0.01, 40)
    return arm, base


# ----------------------------------------------------------------------------- intervals
def test_t_interval_matches_statsmodels():
    d = np.random.default_rng(1).normal(0.1, 1, 17)
    lo, hi = S.t_interval(d, 0.95)
    ref = DescrStatsW(d).tconfint_mean(alpha=0.05)
    assert (lo, hi) == pytest.approx(ref, rel=1e-12)
    s = S.resolve_settings("project", interval="t", min_n=2)
    assert S.mean_interval(d, s)[:2] == pytest.approx(ref, rel=1e-12)


def test_percentile_bootstrap_draws_are_the_explicit_resamples():
    """The percentile interval is the quantiles of means of rng.integers(0, n, (B, n)) rows."""
    x = np.random.default_rng(1).normal(size=25)
    lo, hi = S.bootstrap_interval(x, "percentile", n_resamples=500, seed=3)
    idx = np.random.default_rng(3).integers(0, x.size, (500, x.size))
    loop = np.array([np.mean([x[j] for j in row]) for row in idx])
    np.testing.assert_allclose((lo, hi), np.percentile(loop, [2.5, 97.5]), rtol=1e-12)


def test_bca_matches_scipy_and_batching_changes_nothing(monkeypatch):
    x = np.random.default_rng(2).gamma(2.0, 1.0, 30)
    ref = sps.bootstrap((x,), np.mean, n_resamples=2000, method="BCa", rng=np.random.default_rng(5)).confidence_interval
    got = S.bootstrap_interval(x, "bca", n_resamples=2000, seed=5)
    assert got == pytest.approx((ref.low, ref.high), rel=1e-12)
    monkeypatch.setattr(S, "_MAX_BOOT_CELLS", 30 * 7)  # 7 resamples per batch, last batch ragged
    assert S.bootstrap_interval(x, "bca", n_resamples=2000, seed=5) == pytest.approx(got, rel=1e-12)


def test_studentized_bootstrap_by_definition():
    x = np.random.default_rng(3).exponential(1.0, 12)
    lo, hi = S.studentized_bootstrap_interval(x, n_resamples=400, seed=9)
    idx = np.random.default_rng(9).integers(0, x.size, (400, x.size))
    se = x.std(ddof=1) / np.sqrt(x.size)
    t_star = [(x[r].mean() - x.mean()) / (x[r].std(ddof=1) / np.sqrt(x.size)) for r in idx]
    q_lo, q_hi = np.quantile(t_star, [0.025, 0.975])
    assert (lo, hi) == pytest.approx((x.mean() - q_hi * se, x.mean() - q_lo * se), rel=1e-12)


def test_default_interval_is_the_hull_of_t_and_bootstrap_t():
    x = np.random.default_rng(4).exponential(1.0, 14)
    s = S.PRESETS["project"]
    assert s.interval == "hull"
    t_lo, t_hi = DescrStatsW(x).tconfint_mean(alpha=0.05)
    b_lo, b_hi = S.studentized_bootstrap_interval(x, s.n_resamples, s.seed)
    lo, hi, method = S.mean_interval(x, s)
    assert method == "hull" and (lo, hi) == pytest.approx((min(t_lo, b_lo), max(t_hi, b_hi)), rel=1e-12)


def test_intervals_are_seeded():
    x = np.random.default_rng(3).normal(size=30)
    for method in ("percentile", "bca"):
        assert S.bootstrap_interval(x, method, seed=5) == S.bootstrap_interval(x, method, seed=5)
        assert S.bootstrap_interval(x, method, seed=5) != S.bootstrap_interval(x, method, seed=6)


def test_too_few_units_give_no_interval_and_no_verdict():
    s = S.resolve_settings(min_n=10)
    res = S.describe_differences(np.arange(1.0, 10.0), s)  # n = 9
    assert np.isnan(res["ci_low"]) and res["ci_method"] == "too few (n < 10)"
    assert not np.isnan(res["p_t_two_sided"])  # the test itself is still reported
    row = {**res, "p_adj": 1e-6}
    assert S.decide(row, None, s) == (False, "too few (n = 9 < 10)")
    one = S.describe_differences(np.array([0.3]), "paper")  # min_n 2: n = 1 is never an interval "[x, x]"
    assert np.isnan(one["ci_low"]) and one["ci_method"] == "too few (n < 2)"


# ----------------------------------------------------------------------------- tests
def test_describe_matches_scipy_tests(sample):
    arm, base = sample
    d = arm - base
    res = S.describe_differences(d, interval="t")
    t = sps.ttest_rel(arm, base)
    assert res["t"] == pytest.approx(t.statistic, rel=1e-10)
    assert res["p_t_two_sided"] == pytest.approx(t.pvalue, rel=1e-10)
    assert res["p_t_less"] == pytest.approx(sps.ttest_rel(arm, base, alternative="less").pvalue, rel=1e-10)
    assert res["p_t_greater"] == pytest.approx(sps.ttest_1samp(d, 0, alternative="greater").pvalue, rel=1e-10)
    w = sps.wilcoxon(d, method="exact")  # n = 40 distinct nonzero |Δ|: the exact null distribution
    assert res["wilcoxon_method"] == "exact"
    assert res["w"] == w.statistic and res["p_wilcoxon_two_sided"] == pytest.approx(w.pvalue, rel=1e-10)
    assert res["mean"] == pytest.approx(d.mean()) and res["std"] == pytest.approx(d.std(ddof=1))
    assert res["dz"] == pytest.approx(d.mean() / d.std(ddof=1))
    ci = DescrStatsW(d).tconfint_mean(alpha=0.05)
    assert (res["ci_low"], res["ci_high"]) == pytest.approx(ci, rel=1e-12)
    assert res["n"] == 40 and res["n_dropped"] == 0


def test_wilcoxon_exact_by_enumeration():
    d = np.array([0.3, -0.1, 0.25, 0.7, -0.05, 0.4, 0.15, 0.9])
    stat, p, method = S.wilcoxon_test(d, "greater")
    ranks = sps.rankdata(np.abs(d))
    r_plus = ranks[d > 0].sum()
    null = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=d.size)]
    assert method == "exact" and stat == r_plus
    assert p == pytest.approx(np.mean(np.array(null) >= r_plus), rel=1e-12)


def test_wilcoxon_ties_and_zeros_use_the_tie_corrected_normal_approximation():
    d = np.array([0.0, 0.0, 0.2, 0.2, -0.1, 0.3, 0.3, 0.3, -0.2, 0.5, 0.4, 0.1])
    stat, p, method = S.wilcoxon_test(d, "two-sided")
    assert method == "asymptotic"
    nz = d[d != 0]  # zero_method="wilcox": zeros dropped before ranking
    ranks = sps.rankdata(np.abs(nz))
    n = nz.size
    r_plus = ranks[nz > 0].sum()
    _, counts = np.unique(np.abs(nz), return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24 - (counts**3 - counts).sum() / 48
    z = (r_plus - n * (n + 1) / 4) / np.sqrt(var)  # no continuity correction
    assert p == pytest.approx(2 * sps.norm.sf(abs(z)), rel=1e-10)
    assert stat == min(r_plus, ranks[nz < 0].sum())
    ref = sps.wilcoxon(d, zero_method="wilcox", correction=False, method="asymptotic")
    assert p == pytest.approx(ref.pvalue, rel=1e-12)


def test_nan_pairs_are_dropped_and_counted(sample):
    arm, base = sample
    d = arm - base
    d_nan = d.copy()
    d_nan[[0, 5, 9]] = np.nan
    res = S.describe_differences(d_nan)
    clean = S.describe_differences(np.delete(d, [0, 5, 9]))
    assert res["n_dropped"] == 3 and res["n"] == 37
    for key in ("mean", "ci_low", "ci_high", "p_t_two_sided", "p_wilcoxon_two_sided"):
        assert res[key] == clean[key]


def test_constant_columns_are_detected_with_a_tolerance():
    nearly = np.nextafter(np.full(12, 0.1), 1.0) * (np.arange(12) % 2) + 0.1 * (1 - np.arange(12) % 2)
    assert np.ptp(nearly) > 0  # scipy alone would report t ≈ 1e16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's own "catastrophic cancellation" warning
        assert abs(sps.ttest_1samp(nearly, 0).statistic) > 1e14
    res = S.describe_differences(nearly)
    assert res["constant"] and np.isnan(res["t"]) and np.isnan(res["p_t_two_sided"]) and np.isnan(res["dz"])
    assert res["ci_method"] == "constant Δ"
    assert S.decide({**res, "p_adj": np.nan}, None, S.PRESETS["project"])[1] == "not testable (constant Δ)"
    varied = np.full(12, 0.1) + np.array([0.0, 1e-6] * 6)
    assert not S.is_constant(varied) and np.isfinite(S.describe_differences(varied)["t"])
    zeros = S.describe_differences(np.zeros(12))
    assert zeros["constant"] and np.isnan(zeros["p_t_two_sided"]) and np.isnan(zeros["p_wilcoxon_two_sided"])


def test_ddof_applies_to_std_and_dz_only(sample):
    d = sample[0] - sample[1]
    paper, project = S.describe_differences(d, "paper"), S.describe_differences(d)
    assert paper["std"] == pytest.approx(np.std(d)) and paper["dz"] == pytest.approx(d.mean() / np.std(d))
    assert paper["p_t_two_sided"] == project["p_t_two_sided"]


def test_empty_sample_does_not_crash():
    empty = S.describe_differences(np.array([]))
    assert empty["n"] == 0 and np.isnan(empty["ci_low"]) and np.isnan(empty["p_t_two_sided"])


# ----------------------------------------------------------------------------- Holm
def _holm_by_definition(p):
    """Holm via its definition: reject H_(i) iff p_(j) <= alpha/(m-j+1) for all j <= i;
    the adjusted p is the smallest alpha at which H_(i) is rejected."""
    m = len(p)
    order = np.argsort(p, kind="stable")
    adj = np.empty(m)
    for rank, i in enumerate(order):
        adj[i] = min(1.0, max((m - j) * p[order[j]] for j in range(rank + 1)))
    return adj


def test_holm_matches_statsmodels_and_definition():
    rng = np.random.default_rng(0)
    for m in (1, 2, 5, 20):
        p = rng.uniform(0, 0.2, m)
        np.testing.assert_allclose(S.holm(p), multipletests(p, method="holm")[1], rtol=1e-12)
        np.testing.assert_allclose(S.holm(p), _holm_by_definition(p))
    with_nan = S.holm([0.01, np.nan, 0.04])
    np.testing.assert_allclose(with_nan[[0, 2]], multipletests([0.01, 0.04], method="holm")[1])
    assert np.isnan(with_nan[1])


# ----------------------------------------------------------------------------- settings
def test_presets_and_validation():
    paper = S.PRESETS["paper"]
    assert (paper.n_resamples, paper.seed, paper.ddof, paper.interval) == (1000, 42, 0, "percentile")
    assert paper.holm_family == "k" and paper.distance_test == "two-sided"
    assert S.resolve_settings("paper", seed=7).seed == 7 and S.resolve_settings("paper", seed=None).seed == 42
    with pytest.raises(ValueError, match="interval='median'"):
        S.resolve_settings(interval="median")
    with pytest.raises(ValueError, match="unknown statistics preset 'papr'"):
        S.resolve_settings("papr")
    with pytest.raises(TypeError, match="unknown statistics setting"):
        S.resolve_settings(resamples=10)


# ----------------------------------------------------------------------------- tables on a run
def test_paired_table_matches_direct_scipy_on_lpips_run(shared_run):
    run = load_run(shared_run)
    with pytest.warns(S.SeedsAsReplicatesWarning, match="seeds of a prompt as independent"):
        table = S.paired_table(run, ["lpips"], level="unit", n_resamples=1000, seed=11, interval="percentile")
    assert set(table["arm"]) == {"noop", "sink_k1", "rand_k1", "sink_k5", "rand_k5"}
    row = table.set_index("arm").loc["sink_k1"]
    vals = run.metrics[run.metrics["arm"] == "sink_k1"].sort_values(["prompt_id", "seed_index"])["value"].to_numpy()
    assert row["n"] == len(vals) == 12
    assert row["mean"] == pytest.approx(vals.mean())
    assert row["p_t_two_sided"] == pytest.approx(sps.ttest_1samp(vals, 0).pvalue, rel=1e-10)
    assert row["p_unadj"] == row["p_t_two_sided"] and row["alternative"] == "two-sided"
    assert row["p_wilcoxon_two_sided"] == pytest.approx(sps.wilcoxon(vals, method="exact").pvalue, rel=1e-10)
    ref = sps.bootstrap((vals,), np.mean, n_resamples=1000, method="percentile", rng=np.random.default_rng(11))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(
        (ref.confidence_interval.low, ref.confidence_interval.high), rel=1e-12)  # fmt: skip
    # the noop arm's Δ is 0 everywhere: constant, not testable, and left out of the Holm family
    assert table.set_index("arm").loc["noop", "constant"] and np.isnan(table.set_index("arm").loc["noop", "p_adj"])
    p = table["p_unadj"].to_numpy()
    np.testing.assert_allclose(table["p_holm_metric"].to_numpy(), S.holm(p), equal_nan=True)
    assert (table["holm_family"] == "metric").all()
    np.testing.assert_allclose(table["p_adj"], table["p_holm_metric"], equal_nan=True)


def test_prompt_level_averages_seeds_first_and_does_not_warn(shared_run):
    run = load_run(shared_run)
    with warnings.catch_warnings():
        warnings.simplefilter("error", S.SeedsAsReplicatesWarning)
        table = S.paired_table(run, ["lpips"], n_resamples=500, seed=1).set_index("arm")
    m = run.metrics[run.metrics["arm"] == "rand_k1"]
    per_prompt = m.groupby("prompt_id")["value"].mean().to_numpy()
    assert table.loc["rand_k1", "n"] == 6 and table.loc["rand_k1", "level"] == "prompt"
    assert table.loc["rand_k1", "p_t_two_sided"] == pytest.approx(sps.ttest_1samp(per_prompt, 0).pvalue, rel=1e-10)


def test_holm_families_over_arms_and_within_k(shared_run):
    run = load_run(shared_run)
    table = S.paired_table(run, ["lpips"], settings="paper")
    assert (table["holm_family"] == "k").all() and (table["statistics"] == "paper").all()
    for k, fam in table.groupby(table["k"].fillna(-1)):
        np.testing.assert_allclose(fam["p_holm_k"], multipletests(fam["p_unadj"].dropna(), method="holm")[1]
                                   if fam["p_unadj"].notna().all() else S.holm(fam["p_unadj"]), equal_nan=True)  # fmt: skip
    np.testing.assert_allclose(table["p_adj"], table["p_holm_k"], equal_nan=True)
    at_k1 = table[table["k"] == 1].set_index("arm")
    np.testing.assert_allclose(at_k1.loc[["sink_k1", "rand_k1"], "p_holm_k"],
                               multipletests(at_k1.loc[["sink_k1", "rand_k1"], "p_unadj"], method="holm")[1])  # fmt: skip


def test_unit_metric_deltas_are_arm_minus_paired_baseline():
    units = pd.DataFrame(
        {
            "unit_id": [f"p{p}-{a}" for p, a in itertools.product(range(3), ["b", "x"])],
            "prompt_id": [0, 0, 1, 1, 2, 2], "seed_index": [0] * 6, "arm": ["b", "x"] * 3, "tag": ["t"] * 6,
        }
    )  # fmt: skip
    metrics = pd.DataFrame(
        {
            "unit_id": units["unit_id"], "metric": "custom", "value": [1.0, 1.5, 2.0, 1.0, np.nan, 3.0],
            "arm": units["arm"],
        }
    )  # fmt: skip
    pairs = S.paired_values(units, metrics, "custom", "x", "b")
    assert pairs["delta"].tolist()[:2] == [0.5, -1.0] and np.isnan(pairs["delta"].iloc[2])
