"""ΔΔ, dose trend, per-tag breakdown and the arm design, against scipy on fixed data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from analysis import design, load_run
from analysis import stats as S
from analysis._io import METRICS_SCHEMA, write_parquet_atomic

# several tests use level="unit" on purpose (pair-level references); its warning is tested in test_analysis_stats
pytestmark = pytest.mark.filterwarnings("ignore::analysis.stats.SeedsAsReplicatesWarning")

# per-arm shift of a fake quality score: sinks hurt more than random, more with k
SHIFT = {"base": 0.0, "noop": 0.0, "sink_k1": -0.010, "rand_k1": -0.002, "sink_k5": -0.030, "rand_k5": -0.004}


def _write_scores(run_dir, metric="clip_t", seed=0):
    """A 'unit' metric table with known values (no model involved)."""
    run = load_run(run_dir)
    rng = np.random.default_rng(seed)
    prompt_level = {p: rng.normal(0.30, 0.03) for p in run.units["prompt_id"].unique()}
    u = run.units
    values = [prompt_level[p] + SHIFT[a] + rng.normal(0, 0.004) for p, a in zip(u["prompt_id"], u["arm"])]
    rows = pd.DataFrame(
        {
            "unit_id": u["unit_id"], "shard_id": u["shard_id"], "prompt_id": u["prompt_id"], "seed_index": u["seed_index"], "arm": u["arm"],
            "metric": metric, "value": values, "random_weights": False, "backbone": "fixed-data",
        }
    )  # fmt: skip
    write_parquet_atomic(rows, run_dir / "tables" / "metrics" / f"metric={metric}" / "part-shard-00000.parquet",
                         METRICS_SCHEMA)  # fmt: skip
    return load_run(run_dir)


@pytest.fixture
def scored(fake_run):
    return _write_scores(fake_run(n_prompts=12, n_seeds=2, prompts_per_shard=12, with_sink_steps=False))


def _wide(run, metric="clip_t"):
    m = run.metrics[run.metrics["metric"] == metric]
    return m.pivot_table(index=["prompt_id", "seed_index"], columns="arm", values="value")


def test_design_finds_contrasts_and_dose_series(scored):
    names = {c.name for c in design.contrasts(scored.sweep)}
    assert names == {"sink_k1 − rand_k1", "sink_k5 − rand_k5"}
    series = {s.arms: s for s in design.dose_series(scored.sweep, "base")}
    assert series[("sink_k1", "sink_k5")].controls == ("rand_k1", "rand_k5")
    assert series[("rand_k1", "rand_k5")].controls == (None, None)


def test_design_reads_presets_of_the_paper_catalogue():
    sweep = yaml.safe_load(
        """
arms:
- {name: baseline, intervention: null}
- {name: top_k1, intervention: {preset: paper.m2, k: 1}}
- {name: random_k1, intervention: {preset: paper.m2_random, k: 1}}
- {name: top_k10, intervention: {preset: paper.m2, k: 10}}
- {name: random_k10, intervention: {preset: paper.m2_random, k: 10}}
- {name: other_layer, intervention: {preset: paper.m2_random, k: 1, layers: [6]}}
"""
    )
    from jobs.frozen_sweep import resolve
    from manifests import parse_sweep

    sweep = resolve(parse_sweep({"name": "t", "model": {"preset": "sd3-medium-random"}, "prompts": {"set": "geneval"}, **sweep}))
    pairs = {(c.sink, c.control) for c in design.contrasts(sweep)}
    assert pairs == {("top_k1", "random_k1"), ("top_k10", "random_k10")}  # layer-6 control does not match
    assert design.arm_k(sweep)["top_k10"] == 10


def test_delta_delta_against_scipy(scored):
    table = S.delta_delta_table(scored, ["clip_t"], level="unit", interval="percentile", n_resamples=2000,
                                seed=4).set_index("sink")  # fmt: skip
    w = _wide(scored)
    dd = (w["sink_k5"] - w["base"]) - (w["rand_k5"] - w["base"])
    row = table.loc["sink_k5"]
    assert row["n"] == 24 and row["mean"] == pytest.approx(dd.mean())
    assert row["p_t_two_sided"] == pytest.approx(sps.ttest_1samp(dd, 0).pvalue, rel=1e-10)
    assert row["p_t_less"] == pytest.approx(sps.ttest_1samp(dd, 0, alternative="less").pvalue, rel=1e-10)
    assert row["p_wilcoxon_less"] == pytest.approx(sps.wilcoxon(dd, alternative="less", method="exact").pvalue, rel=1e-10)
    assert row["expected"] == "less" and row["alternative"] == "less" and row["p_unadj"] == row["p_t_less"]
    ci = sps.bootstrap((dd.to_numpy(),), np.mean, n_resamples=2000, method="percentile",
                       rng=np.random.default_rng(4)).confidence_interval  # fmt: skip
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-12)
    assert row["dz"] == pytest.approx(dd.mean() / dd.std(ddof=1))
    assert bool(row["sink_specific"]) is True and row["verdict"] == "yes (lower)"  # −0.026 shift, n=24
    np.testing.assert_allclose(table["p_holm_metric"], multipletests(table["p_unadj"], method="holm")[1])
    # each contrast is alone at its k: Holm within k changes nothing
    np.testing.assert_allclose(table["p_holm_k"], table["p_unadj"])


def test_delta_delta_columns_add_up_on_unequal_arm_sets(scored):
    """The control misses some pairs and the sink others: Δ sink, Δ control and ΔΔ all use only the
    complete pairs, so mean Δ sink − mean Δ control = mean ΔΔ."""
    m = scored.metrics.copy()
    gone = ((m["arm"] == "rand_k1") & (m["prompt_id"].isin([0, 1]))) | (
        (m["arm"] == "sink_k1") & (m["prompt_id"] == 2) & (m["seed_index"] == 1))  # fmt: skip
    scored.metrics = m[~gone].reset_index(drop=True)
    row = S.delta_delta_table(scored, ["clip_t"]).set_index("sink").loc["sink_k1"]
    w = _wide(scored)
    complete = w[["base", "sink_k1", "rand_k1"]].dropna()
    ds = (complete["sink_k1"] - complete["base"]).groupby(level="prompt_id").mean()
    dc = (complete["rand_k1"] - complete["base"]).groupby(level="prompt_id").mean()
    assert row["n"] == 10 and row["n_dropped"] == 5  # 2 prompts × 2 seeds without control, 1 pair without sink
    assert row["mean_delta_sink"] == pytest.approx(ds.mean(), rel=1e-12)
    assert row["mean_delta_control"] == pytest.approx(dc.mean(), rel=1e-12)
    assert row["mean_delta_sink"] - row["mean_delta_control"] == pytest.approx(row["mean"], rel=1e-12)
    assert row["p_t_two_sided"] == pytest.approx(sps.ttest_1samp(ds - dc, 0).pvalue, rel=1e-10)
    # the per-arm table keeps each arm's own pairs (12 prompts for the sink arm)
    paired = S.paired_table(scored, ["clip_t"]).set_index("arm")
    assert paired.loc["sink_k1", "n"] == 12 and paired.loc["rand_k1", "n"] == 10


def test_verdict_uses_the_adjusted_p(scored):
    """A contrast whose one-sided p is below α but whose Holm-adjusted p is not is not sink-specific."""
    table = S.delta_delta_table(scored, ["clip_t"])
    p_min = float(table["p_unadj"].min())
    alpha = 1.5 * p_min  # Holm over the 2 contrasts doubles the smallest p
    strict = S.delta_delta_table(scored, ["clip_t"], alpha=alpha)
    row = strict.loc[strict["p_unadj"].idxmin()]
    assert row["p_unadj"] < alpha and row["p_adj"] == pytest.approx(2 * p_min) and row["ci_high"] < 0
    assert not row["sink_specific"] and row["verdict"] == "no (not significant)"


def test_paper_preset_tests_lpips_two_sided(scored):
    rng = np.random.default_rng(3)
    u = scored.units[scored.units["arm"] != "base"]
    shift = {"noop": 0.0, "sink_k1": 0.05, "rand_k1": 0.03, "sink_k5": 0.2, "rand_k5": 0.04}
    rows = pd.DataFrame({"unit_id": u["unit_id"], "prompt_id": u["prompt_id"], "seed_index": u["seed_index"],
                         "arm": u["arm"], "metric": "lpips", "value": [shift[a] + abs(rng.normal(0, 0.01)) for a in u["arm"]],
                         "random_weights": False, "backbone": "fixed-data"})  # fmt: skip
    scored.metrics = pd.concat([scored.metrics, rows], ignore_index=True)
    project = S.delta_delta_table(scored, ["lpips"]).set_index("sink")
    paper = S.delta_delta_table(scored, ["lpips"], settings="paper").set_index("sink")
    assert (project["alternative"] == "greater").all() and (paper["alternative"] == "two-sided").all()
    assert paper.loc["sink_k5", "p_unadj"] == pytest.approx(paper.loc["sink_k5", "p_t_two_sided"])
    assert paper.loc["sink_k5", "std"] == pytest.approx(paper.loc["sink_k5", "std"])
    w = _wide(scored, "lpips")
    dd = (w["sink_k5"] - w["rand_k5"]).groupby(level="prompt_id").mean().to_numpy()
    ref = sps.bootstrap((dd,), np.mean, n_resamples=1000, method="percentile", rng=np.random.default_rng(42))
    assert (paper.loc["sink_k5", "ci_low"], paper.loc["sink_k5", "ci_high"]) == pytest.approx(
        (ref.confidence_interval.low, ref.confidence_interval.high), rel=1e-12)  # fmt: skip
    assert paper.loc["sink_k5", "std"] == pytest.approx(np.std(dd))  # ddof 0
    assert bool(paper.loc["sink_k5", "sink_specific"])


def test_delta_delta_prompt_level_and_missing_values(scored):
    metrics = scored.metrics.copy()
    drop = metrics.index[(metrics["arm"] == "rand_k1") & (metrics["prompt_id"] == 0) & (metrics["seed_index"] == 1)]
    metrics.loc[drop, "value"] = np.nan
    scored.metrics = metrics
    table = S.delta_delta_table(scored, ["clip_t"], n_resamples=500).set_index("sink")
    w = _wide(scored)
    dd = ((w["sink_k1"] - w["base"]) - (w["rand_k1"] - w["base"])).dropna()
    per_prompt = dd.groupby(level="prompt_id").mean()
    assert table.loc["sink_k1", "n"] == 12 and table.loc["sink_k1", "n_dropped"] == 1
    assert table.loc["sink_k1", "p_t_two_sided"] == pytest.approx(sps.ttest_1samp(per_prompt, 0).pvalue, rel=1e-10)


def test_dose_trend_per_prompt(scored):
    table = S.dose_table(scored, ["clip_t"], level="unit")
    row = table[(table["arm_hi"] == "sink_k5") & (table["arm_lo"] == "sink_k1")].iloc[0]
    assert row["statistic"] == "ΔΔ" and row["field"] == "k"
    w = _wide(scored)
    d1 = (w["sink_k1"] - w["base"]) - (w["rand_k1"] - w["base"])
    d5 = (w["sink_k5"] - w["base"]) - (w["rand_k5"] - w["base"])
    trend = d5 - d1
    assert row["mean"] == pytest.approx(trend.mean())
    assert row["alternative"] == "less"
    assert row["p_unadj"] == pytest.approx(sps.ttest_1samp(trend, 0, alternative="less").pvalue, rel=1e-10)
    assert row["p_wilcoxon_two_sided"] == pytest.approx(sps.wilcoxon(trend, method="exact").pvalue, rel=1e-10)
    fam = table[table["series"] == row["series"]]
    np.testing.assert_allclose(fam["p_holm_series"], multipletests(fam["p_unadj"], method="holm")[1])
    assert row["p_adj"] == row["p_holm_series"] and bool(row["significant"]) is True
    rand = table[(table["arm_hi"] == "rand_k5")].iloc[0]
    assert rand["statistic"] == "Δ"
    assert rand["mean"] == pytest.approx(((w["rand_k5"] - w["base"]) - (w["rand_k1"] - w["base"])).mean())


def test_tag_breakdown(scored):
    table = S.tag_table(scored, ["clip_t"], level="unit", min_n=2)
    tags = set(scored.units["tag"])
    assert set(table["tag"]) == tags
    row = table[(table["arm"] == "sink_k1") & (table["tag"] == "counting")].iloc[0]
    w = _wide(scored)
    counting = scored.units.loc[scored.units["tag"] == "counting", "prompt_id"].unique()
    d = (w["sink_k1"] - w["base"]).loc[list(counting)]
    assert row["n"] == len(d) and row["p_t_two_sided"] == pytest.approx(sps.ttest_rel(
        w["sink_k1"].loc[list(counting)], w["base"].loc[list(counting)]).pvalue, rel=1e-10)  # fmt: skip
    fam = table[(table["arm"] == "sink_k1")]
    np.testing.assert_allclose(fam["p_holm_tags"], multipletests(fam["p_unadj"], method="holm")[1])
    # with the default minimum n, groups of 6 units give "too few" instead of an interval
    small = S.tag_table(scored, ["clip_t"])
    assert (small["ci_method"] == "too few (n < 10)").all() and small["ci_low"].isna().all()
