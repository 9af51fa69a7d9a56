"""Positive and negative controls in the toy world, through the real CLI (manifests/examples/toy_controls.yaml).

Positive: toy-sd3-planted makes one key (the CLIP start token) take most of the attention mass in block 3.
Identification must find it there in (nearly) every step, head and CFG branch, and not in block 2; removing it
must move the output more than removing a random key; the ΔΔ statistics must call it sink-specific.
Negative: random_a and random_b are the same random intervention with different draws; their ΔΔ is not called
different (a fixed, deterministic instance of benchmarks/bench_negative_control.py, which measures the rate).
"""

from pathlib import Path

import numpy as np
import pytest
import yaml

import analysis
from analysis.stats import delta_delta_table, delta_delta_values, describe_differences
from tests.conftest import run_cli
from workers.toy.controls import PLANT_LAYER, planted_key_index

SWEEP = Path(__file__).parents[2] / "manifests" / "examples" / "toy_controls.yaml"


@pytest.fixture(scope="module")
def controls_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("controls")
    sweep = yaml.safe_load(SWEEP.read_text())
    sweep["seeds"]["count"] = 1  # 12 prompts × 1 seed × 4 arms: the statistics pair per prompt (n = 12)
    sweep["output_root"] = str(root)
    path = root / "toy_controls.yaml"
    path.write_text(yaml.safe_dump(sweep))
    run_cli("submit", str(path))
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    run_cli("analyze", str(run_dir))
    return analysis.load_run(run_dir)


@pytest.mark.slow
def test_identification_finds_the_planted_sink_where_it_was_planted(controls_run):
    rows = controls_run.sink_steps.arrow(["layer", "topk_idx", "max_mass"], arm="baseline").to_pandas()
    planted = planted_key_index(num_image_tokens=64)
    top1 = rows["topk_idx"].map(lambda idx: int(idx[0]))
    at_layer = top1[rows["layer"] == PLANT_LAYER]
    assert len(at_layer) == 12 * 4 * 4 * 2  # units × steps × heads × CFG branches
    assert (at_layer == planted).mean() >= 0.95
    assert rows.loc[rows["layer"] == PLANT_LAYER, "max_mass"].median() > 0.5  # "most of the mass"
    assert (top1[rows["layer"] == PLANT_LAYER - 1] == planted).mean() < 0.5  # not planted in block 2


@pytest.mark.slow
def test_removing_the_planted_sink_moves_the_output_more_than_a_random_key_and_is_called_sink_specific(controls_run):
    lpips = controls_run.metrics[controls_run.metrics["metric"] == "lpips"]
    by_arm = lpips.groupby("arm")["value"].mean()
    assert by_arm["sink_k1"] > 2 * by_arm["random_a"]
    table = delta_delta_table(controls_run, ["lpips"], n_resamples=1000)
    row = table[(table["sink"] == "sink_k1") & (table["control"] == "random_a")].iloc[0]
    assert row["sink_specific"] and row["p_unadj"] < 0.05


@pytest.mark.slow
def test_the_same_random_intervention_with_other_draws_is_not_called_different(controls_run):
    run = controls_run
    for metric in ("lpips", "toy_geneval"):
        dd = delta_delta_values(run.units, run.metrics, metric, "random_a", "random_b", run.baseline)
        res = describe_differences(dd["delta_delta"].to_numpy(), n_resamples=1000)
        for p in (res["p_t_two_sided"], res["p_wilcoxon_two_sided"]):
            assert np.isnan(p) or p >= 0.05, (metric, res)
