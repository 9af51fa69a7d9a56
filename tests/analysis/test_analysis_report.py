"""summary.md / summary.parquet from a real run directory."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis import compute_metrics, load_run, write_summary
from analysis.stats import paired_table
from analysis.tables import fmt_ci, fmt_num, fmt_p


def test_summary_table_and_random_banner(shared_run):
    path = write_summary(shared_run, n_resamples=1000, seed=3)
    assert path == shared_run / "report" / "summary.md"
    text = path.read_text()
    assert "random-weight LPIPS backbone: numbers are not LPIPS" in text
    assert "random-weight model (tiny-sd3)" in text
    header = "| arm | metric | n | mean Δ | 95% CI | t p-value | Wilcoxon p |"
    assert header in text
    raw = pd.read_parquet(shared_run / "report" / "summary.parquet")
    expected = paired_table(load_run(shared_run), n_resamples=1000, seed=3)
    pd.testing.assert_frame_equal(raw, expected)
    row = raw.set_index("arm").loc["sink_k5"]
    line = next(ln for ln in text.splitlines() if ln.startswith("| sink_k5 |"))
    assert fmt_num(row["mean"]) in line and fmt_ci(row["ci_low"], row["ci_high"]) in line
    assert fmt_p(row["p_t"]) in line
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
    assert "RANDOM" not in text and "| sink_k1 | LPIPS |" in text


def test_summary_before_any_metric(fake_run):
    text = write_summary(fake_run(n_prompts=2, prompts_per_shard=2), n_resamples=100).read_text()
    assert "No metric values yet" in text


@pytest.mark.parametrize("p, s", [(0.5, "0.5000"), (1e-5, "<1e-4"), (float("nan"), "—")])
def test_p_formatting(p, s):
    assert fmt_p(p) == s
