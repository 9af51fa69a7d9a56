"""LPIPS metric and compute_metrics as a shard job, on real PNGs with a random AlexNet trunk."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from analysis import MissingWeightsError, compute_metrics, load_run
from analysis._io import METRICS_SCHEMA
from analysis.metrics import UnknownMetricError, get_metric_class
from analysis.metrics.lpips import ALEXNET_FILE, LPIPSMetric


def _noise_image(seed, size=(64, 64)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def random_lpips():
    return LPIPSMetric(random_weights=True, device="cpu").load()


def test_identical_images_score_zero_and_different_images_positive(random_lpips):
    a, b, c = _noise_image(1), _noise_image(2), _noise_image(3)
    d = random_lpips.score_pairs([a, a, b], [a.copy(), b, c])
    assert d[0] == pytest.approx(0.0, abs=1e-7)
    assert d[1] > 0.01 and d[2] > 0.01


def test_lpips_is_symmetric_and_batch_independent(random_lpips):
    imgs = [_noise_image(i) for i in range(5)]
    refs = [_noise_image(10 + i) for i in range(5)]
    fwd = random_lpips.score_pairs(imgs, refs)
    bwd = random_lpips.score_pairs(refs, imgs)
    np.testing.assert_allclose(fwd, bwd, rtol=1e-5)
    single = np.concatenate([random_lpips.score_pairs([i], [r]) for i, r in zip(imgs, refs)])
    np.testing.assert_allclose(fwd, single, rtol=1e-5)


def test_random_trunk_is_the_same_in_every_job():
    x, y = [_noise_image(5)], [_noise_image(6)]
    first = LPIPSMetric(random_weights=True, device="cpu").score_pairs(x, y)
    second = LPIPSMetric(random_weights=True, device="cpu").score_pairs(x, y)
    assert first[0] == second[0]


def test_full_resolution_and_size_mismatch(random_lpips):
    wide = [_noise_image(7, (96, 48))]
    assert random_lpips.score_pairs(wide, [_noise_image(8, (96, 48))])[0] > 0
    with pytest.raises(ValueError, match="differ in size"):
        random_lpips.score_pairs(wide, [_noise_image(8, (64, 64))])


def test_missing_trunk_names_file_and_place(tmp_path):
    metric = LPIPSMetric(random_weights=False, device="cpu")
    with pytest.raises(MissingWeightsError) as err:
        metric.load()
    msg = str(err.value)
    assert ALEXNET_FILE in msg
    assert str(tmp_path / "weights" / "lpips" / ALEXNET_FILE) in msg
    assert "hub/checkpoints" in msg


def test_local_trunk_file_is_loaded(tmp_path):
    import torch
    import torchvision

    torch.manual_seed(123)
    state = torchvision.models.alexnet(weights=None).state_dict()
    target = tmp_path / "weights" / "lpips" / ALEXNET_FILE
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    metric = LPIPSMetric(random_weights=False, device="cpu").load()
    assert "RANDOM" not in metric.backbone
    torch.testing.assert_close(getattr(metric.model.net.slice1, "0").weight, state["features.0.weight"])
    torch.testing.assert_close(getattr(metric.model.net.slice5, "10").bias, state["features.10.bias"])
    # a file that is not an AlexNet state dict is refused with its name
    torch.save({"features.0.weight": state["features.0.weight"]}, target)
    with pytest.raises(ValueError, match=ALEXNET_FILE):
        LPIPSMetric(random_weights=False, device="cpu").load()


def test_compute_metrics_writes_labelled_parts(shared_run):
    run = load_run(shared_run)
    parts = sorted((shared_run / "tables" / "metrics" / "metric=lpips").iterdir())
    assert [p.name for p in parts] == ["part-shard-00000.parquet", "part-shard-00001.parquet"]
    assert pq.read_schema(parts[0]).remove_metadata().equals(METRICS_SCHEMA)
    m = run.metrics
    # every non-baseline unit, none of the baseline's
    assert set(m["unit_id"]) == set(run.units.loc[run.units["arm"] != "base", "unit_id"])
    assert m["random_weights"].all() and m["backbone"].str.contains("RANDOM").all()
    by_arm = m.groupby("arm")["value"]
    assert (m.loc[m["arm"] == "noop", "value"].abs() < 1e-7).all()  # identical images
    assert by_arm.min()[["sink_k1", "rand_k1", "sink_k5", "rand_k5"]].gt(0).all()
    # more pixel noise → larger distance, arm by arm on average
    means = by_arm.mean()
    assert means["sink_k5"] > means["sink_k1"] > means["rand_k1"] > means["noop"]


def test_pairing_uses_same_prompt_and_seed(shared_run):
    run = load_run(shared_run)
    row = run.metrics[run.metrics["arm"] == "sink_k1"].iloc[3]
    unit = run.units.set_index("unit_id").loc[row["unit_id"]]
    base_id = f"p{row['prompt_id']:05d}-s{row['seed_index']:03d}-base"
    metric = LPIPSMetric(random_weights=True, device="cpu")
    direct = metric.score_pairs([run.image(row["unit_id"])], [run.image(base_id)])[0]
    assert unit["prompt_id"] == row["prompt_id"]
    assert direct == pytest.approx(row["value"], rel=1e-6)


def test_rerun_recomputes_only_missing_or_stale_parts(fake_run):
    run_dir = fake_run(n_prompts=4, n_seeds=1, prompts_per_shard=2)
    first = compute_metrics(run_dir, ["lpips"], random_weights=True)
    assert len(first) == 2
    assert compute_metrics(run_dir, ["lpips"], random_weights=True) == []
    first[0].unlink()
    again = compute_metrics(run_dir, ["lpips"], random_weights=True)
    assert again == [first[0]]
    # a regenerated shard (newer units part) makes its metric part stale
    units_part = run_dir / "tables" / "units" / "part-shard-00001.parquet"
    later = time.time() + 5
    os.utime(units_part, (later, later))
    assert compute_metrics(run_dir, ["lpips"], random_weights=True) == [first[1]]
    # switching to real weights must not reuse random-weight scores (and fails: no file)
    with pytest.raises(MissingWeightsError):
        compute_metrics(run_dir, ["lpips"], random_weights=False)


def test_single_shard_job_and_auto_random_mode(fake_run):
    run_dir = fake_run(n_prompts=4, n_seeds=1, prompts_per_shard=2)
    # random_weights=None: the run's images come from a random model → random backbones
    out = compute_metrics(run_dir, ["lpips"], shard=1)
    assert [p.name for p in out] == ["part-shard-00001.parquet"]
    run = load_run(run_dir)
    assert set(run.metrics["prompt_id"]) == {2, 3} and run.metrics["random_weights"].all()
    with pytest.raises(ValueError, match="shard 7 has no finished units"):
        compute_metrics(run_dir, ["lpips"], shard=7)


def test_real_model_run_requires_real_weights(fake_run):
    run_dir = fake_run(n_prompts=2, n_seeds=1, prompts_per_shard=2, random_model=False)
    with pytest.raises(MissingWeightsError, match=ALEXNET_FILE):
        compute_metrics(run_dir, ["lpips"])


def test_missing_baseline_pair_gives_nan_with_warning(fake_run):
    run_dir = fake_run(n_prompts=2, n_seeds=1, prompts_per_shard=2)
    # drop one baseline unit from the units table (as if its image had never been recorded)
    part = run_dir / "tables" / "units" / "part-shard-00000.parquet"
    t = pq.read_table(part)
    keep = [u != "p00001-s000-base" for u in t.column("unit_id").to_pylist()]
    pq.write_table(t.filter(keep), part)
    with pytest.warns(UserWarning, match="no finished 'base' pair"):
        compute_metrics(run_dir, ["lpips"], random_weights=True)
    m = load_run(run_dir).metrics
    assert m.loc[m["prompt_id"] == 1, "value"].isna().all()
    assert m.loc[m["prompt_id"] == 0, "value"].notna().all()


def test_unknown_metric_lists_registered():
    with pytest.raises(UnknownMetricError, match="lpips"):
        get_metric_class("nope")


def test_sweep_flag_turns_on_random_metric_weights(fake_run):
    from analysis_fakerun import set_analysis

    run_dir = fake_run(n_prompts=1, n_seeds=1, prompts_per_shard=1, random_model=False)
    set_analysis(run_dir, random_metric_weights=True)
    compute_metrics(run_dir, ["lpips"])
    assert load_run(run_dir).metrics["random_weights"].all()
