"""summary.md / summary.parquet from a real run directory, and the number formats."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis import compute_metrics, load_run, write_summary
from analysis.report import report_settings
from analysis.stats import paired_table
from analysis.tables import fmt_ci, fmt_num, fmt_p, fmt_value


def test_summary_table_and_random_banner(shared_run):
    path = write_summary(shared_run, n_resamples=1000, seed=3)
    assert path == shared_run / "report" / "summary.md"
    text = path.read_text()
    assert "random-weight LPIPS backbone: numbers are not LPIPS" in text
    assert "random-weight model (tiny-sd3)" in text
    assert "Statistics: preset **project**" in text and "none below n = 10" in text
    header = next(ln for ln in text.splitlines() if ln.startswith("| arm"))
    for column in ("mean Δ", "95% hull of the t- and bootstrap-t intervals (1,000 resamples of prompts, seed 3)",
                   "Wilcoxon p (2-sided, unadjusted)", "p (unadjusted)", "p (Holm over all arms of the metric; verdict)",
                   "p (Holm over the arms of the metric at the same k)", "verdict"):
        assert column in header
    raw = pd.read_parquet(shared_run / "report" / "summary.parquet")
    run = load_run(shared_run)
    expected = paired_table(run, settings=report_settings(run, None, n_resamples=1000, seed=3))
    pd.testing.assert_frame_equal(raw, expected)
    row = raw.set_index("arm").loc["sink_k5"]
    line = next(ln for ln in text.splitlines() if ln.startswith("| sink_k5 "))
    assert fmt_num(row["mean"]) in line and fmt_p(row["p_unadj"]) in line
    assert "too few (n < 10)" in line  # 6 prompts: no interval, no verdict
    assert (shared_run / "report" / "summary.tex").read_text().count(r"\\") >= 6


def test_no_banner_without_random_weights(fake_run, tmp_path):
    import torch
    import torchvision

    from analysis.metrics.lpips import ALEXNET_FILE

    target = tmp_path / "weights" / "lpips" / ALEXNET_FILE
    target.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), target)
    run_dir = fake_run(n_prompts=3, n_seeds=1, prompts_per_shard=3, random_model=False)
    compute_metrics(run_dir, ["lpips"])
    text = write_summary(run_dir, n_resamples=200).read_text()
    assert "RANDOM" not in text and "| sink_k1 " in text and "| LPIPS " in text


def test_summary_before_any_metric(fake_run):
    run_dir = fake_run(n_prompts=2, prompts_per_shard=2)
    text = write_summary(run_dir, n_resamples=100).read_text()
    assert f"No metric values yet: run `orchestrate analyze {run_dir}`" in text


def test_report_settings_from_the_argument_and_the_sweep(fake_run):
    from analysis_fakerun import set_analysis

    run_dir = fake_run(n_prompts=2, n_seeds=1, prompts_per_shard=2, with_sink_steps=False)
    assert report_settings(load_run(run_dir)).name == "project"
    set_analysis(run_dir, bootstrap_resamples=1234, bootstrap_seed=9)
    run = load_run(run_dir)
    s = report_settings(run)
    assert (s.name, s.n_resamples, s.seed) == ("project", 1234, 9)
    s = report_settings(run, "paper", seed=1)
    assert (s.name, s.n_resamples, s.seed, s.ddof) == ("paper", 1000, 1, 0)  # the paper's resamples are fixed


@pytest.mark.parametrize("p, s", [(0.5, "0.5000"), (1e-5, "<1e-4"), (float("nan"), "—")])
def test_p_formatting(p, s):
    assert fmt_p(p) == s


def test_value_and_interval_formatting():
    assert fmt_value(2.1349e-6) == "2.13e-06" and fmt_value(0.020531) == "0.0205" and fmt_value(0.3124) == "0.312"
    assert fmt_num(2e-6) != "+0.0000"
    assert fmt_ci(float("nan"), float("nan"), method="too few (n < 10)") == "too few (n < 10)"
    assert fmt_ci(-0.01, 0.02) == "[-0.0100, +0.0200]"
