"""Paired statistics checked against scipy and against explicit re-computations."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis import load_run
from analysis import stats as S


@pytest.fixture
def sample():
    rng = np.random.default_rng(7)
    base = rng.normal(0.3, 0.02, 40)
    arm = base + rng.normal(-0.004, 0.01, 40)
    return arm, base


def test_bootstrap_matches_explicit_loop_with_same_generator():
    x = np.random.default_rng(1).normal(size=25)
    got = S.bootstrap_means(x, n_resamples=500, seed=3)
    rng = np.random.default_rng(3)
    idx = rng.integers(0, x.size, (500, x.size))
    loop = np.array([np.mean([x[j] for j in row]) for row in idx])
    np.testing.assert_allclose(got, loop, rtol=0, atol=1e-12)
    lo, hi = S.bootstrap_ci(x, n_resamples=500, seed=3)
    np.testing.assert_allclose((lo, hi), np.percentile(loop, [2.5, 97.5]), rtol=1e-12)


def test_bootstrap_matches_scipy_percentile_bootstrap():
    x = np.random.default_rng(2).normal(0.1, 1, 60)
    ref = sps.bootstrap(
        (x,), np.mean, n_resamples=10_000, method="percentile", rng=np.random.default_rng(42), vectorized=True
    ).confidence_interval
    lo, hi = S.bootstrap_ci(x, n_resamples=10_000, seed=42)
    assert lo == pytest.approx(ref.low, rel=1e-12) and hi == pytest.approx(ref.high, rel=1e-12)


def test_bootstrap_is_reproducible_and_seed_dependent():
    x = np.random.default_rng(3).normal(size=30)
    assert S.bootstrap_ci(x, seed=5) == S.bootstrap_ci(x, seed=5)
    assert S.bootstrap_ci(x, seed=5) != S.bootstrap_ci(x, seed=6)


def test_chunked_bootstrap_draws_the_same_resamples(monkeypatch):
    x = np.random.default_rng(4).normal(size=50)
    whole = S.bootstrap_means(x, 1000, seed=9)
    monkeypatch.setattr(S, "_MAX_BOOT_CELLS", 50 * 7)  # 7 resamples per chunk, last chunk ragged
    np.testing.assert_array_equal(S.bootstrap_means(x, 1000, seed=9), whole)


def test_describe_matches_scipy_tests(sample):
    arm, base = sample
    d = arm - base
    res = S.describe_differences(d, n_resamples=2000, seed=0)
    t = sps.ttest_rel(arm, base)
    assert res["t"] == pytest.approx(t.statistic, rel=1e-10)
    assert res["p_t"] == pytest.approx(t.pvalue, rel=1e-10)
    assert res["p_t_less"] == pytest.approx(sps.ttest_rel(arm, base, alternative="less").pvalue, rel=1e-10)
    assert res["p_t_greater"] == pytest.approx(sps.ttest_1samp(d, 0, alternative="greater").pvalue, rel=1e-10)
    w = sps.wilcoxon(arm, base)
    assert res["w"] == w.statistic and res["p_wilcoxon"] == pytest.approx(w.pvalue, rel=1e-10)
    assert res["p_wilcoxon_less"] == pytest.approx(sps.wilcoxon(d, alternative="less").pvalue, rel=1e-10)
    assert res["mean"] == pytest.approx(d.mean()) and res["std"] == pytest.approx(d.std(ddof=1))
    assert res["dz"] == pytest.approx(d.mean() / d.std(ddof=1))
    assert res["n"] == 40 and res["n_dropped"] == 0


def test_nan_pairs_are_dropped_and_counted(sample):
    arm, base = sample
    d = arm - base
    d_nan = d.copy()
    d_nan[[0, 5, 9]] = np.nan
    res = S.describe_differences(d_nan, n_resamples=1000, seed=1)
    clean = S.describe_differences(np.delete(d, [0, 5, 9]), n_resamples=1000, seed=1)
    assert res["n_dropped"] == 3 and res["n"] == 37
    for key in ("mean", "ci_low", "ci_high", "p_t", "p_wilcoxon"):
        assert res[key] == clean[key]


def test_degenerate_samples_do_not_crash():
    res = S.describe_differences(np.zeros(10), n_resamples=100)
    assert res["mean"] == 0 and np.isnan(res["p_t"]) and np.isnan(res["p_wilcoxon"])
    empty = S.describe_differences(np.array([]), n_resamples=100)
    assert empty["n"] == 0 and np.isnan(empty["ci_low"])


def _holm_by_definition(p):
    """Holm via its definition: reject H_(i) iff p_(j) <= alpha/(m-j+1) for all j <= i;
    the adjusted p is the smallest alpha at which H_(i) is rejected."""
    m = len(p)
    order = np.argsort(p, kind="stable")
    adj = np.empty(m)
    for rank, i in enumerate(order):
        adj[i] = min(1.0, max((m - j) * p[order[j]] for j in range(rank + 1)))
    return adj


def test_holm_matches_definition():
    rng = np.random.default_rng(0)
    for m in (1, 2, 5, 20):
        p = rng.uniform(0, 0.2, m)
        np.testing.assert_allclose(S.holm(p), _holm_by_definition(p))
    with_nan = S.holm([0.01, np.nan, 0.04])
    np.testing.assert_allclose(with_nan[[0, 2]], _holm_by_definition(np.array([0.01, 0.04])))
    assert np.isnan(with_nan[1])


def test_paired_table_matches_direct_scipy_on_lpips_run(shared_run):
    run = load_run(shared_run)
    table = S.paired_table(run, ["lpips"], level="unit", n_resamples=1000, seed=11)
    assert set(table["arm"]) == {"noop", "sink_k1", "rand_k1", "sink_k5", "rand_k5"}
    row = table.set_index("arm").loc["sink_k1"]
    vals = run.metrics[run.metrics["arm"] == "sink_k1"].sort_values(["prompt_id", "seed_index"])["value"].to_numpy()
    assert row["n"] == len(vals) == 12
    assert row["mean"] == pytest.approx(vals.mean())
    assert row["p_t"] == pytest.approx(sps.ttest_1samp(vals, 0).pvalue, rel=1e-10)
    assert row["p_wilcoxon"] == pytest.approx(sps.wilcoxon(vals).pvalue, rel=1e-10)
    assert (row["ci_low"], row["ci_high"]) == S.bootstrap_ci(vals, 1000, 11)
    # Holm within the metric family over the 5 arms (noop has no test: zero differences)
    p = table["p_t"].to_numpy()
    np.testing.assert_allclose(table["p_t_holm"].to_numpy(), S.holm(p), equal_nan=True)


def test_prompt_level_averages_seeds_first(shared_run):
    run = load_run(shared_run)
    table = S.paired_table(run, ["lpips"], level="prompt", n_resamples=500, seed=1).set_index("arm")
    m = run.metrics[run.metrics["arm"] == "rand_k1"]
    per_prompt = m.groupby("prompt_id")["value"].mean().to_numpy()
    assert table.loc["rand_k1", "n"] == 6
    assert table.loc["rand_k1", "p_t"] == pytest.approx(sps.ttest_1samp(per_prompt, 0).pvalue, rel=1e-10)


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
