"""FID-shift: Fréchet distance, clean-fid feature pipeline, sharded features, calibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from analysis import MissingWeightsError, compute_metrics, load_run
from analysis.metrics.fid_shift import INCEPTION_FILE, FIDShiftMetric, fid_calibration, frechet_distance


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")  # inside clean-fid
def test_frechet_matches_clean_fid_and_is_a_distance():
    from cleanfid.fid import frechet_distance as clean_fd

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 6)), rng.normal(0.4, 1.3, size=(400, 6))
    ref = clean_fd(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-5)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8)
    assert abs(frechet_distance(a, a)) < 1e-6
    # closed form for a pure mean shift with equal covariances: ||Δμ||²
    assert frechet_distance(a, a + 2.0) == pytest.approx(4.0 * 6, rel=1e-6)
    assert np.isnan(frechet_distance(a[:1], b[:1]))
    with pytest.raises(ValueError, match="equal width"):
        frechet_distance(a, b[:, :3])


def test_features_follow_clean_fid_pipeline(tmp_path):
    from cleanfid.fid import get_files_features

    metric = FIDShiftMetric(random_weights=True, device="cpu").load()
    rng = np.random.default_rng(3)
    paths = []
    for i, size in enumerate([(64, 64), (50, 80)]):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    ours = metric.features([Image.open(p) for p in paths])
    ref = get_files_features([str(p) for p in paths], model=metric.model, num_workers=0, batch_size=2,
                             device=torch.device("cpu"), mode="clean", verbose=False)  # fmt: skip
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_missing_inception_names_file(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path / "no-tmp"))
    with pytest.raises(MissingWeightsError, match=INCEPTION_FILE):
        FIDShiftMetric(device="cpu").load()


class _FakeLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.proj = torch.nn.Linear(48, 2048)

    def forward(self, x):
        return self.proj(self.pool(x).flatten(1))


class _FakeInception(torch.nn.Module):
    """Same interface as clean-fid's TorchScript file: .layers(x) → (B, 2048)."""

    def __init__(self):
        super().__init__()
        self.layers = _FakeLayers()

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # clean-fid's Inception file is TorchScript
def test_local_torchscript_inception_is_used(tmp_path):
    target = tmp_path / "weights" / "fid_shift" / INCEPTION_FILE
    target.parent.mkdir(parents=True)
    torch.manual_seed(0)
    scripted = torch.jit.script(_FakeInception())
    scripted.save(str(target))
    metric = FIDShiftMetric(device="cpu")
    assert metric.backbone == "clean-fid:inception-2015-12-05(clean)"
    img = Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))
    feats = metric.features([img])
    assert feats.shape == (1, 2048)
    # clean-fid's wrapper normalises (x − 128) / 128 before .layers
    expected = scripted.layers(torch.full((1, 3, 299, 299), (200 - 128) / 128)).detach().numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5)


def test_custom_extractor_needs_a_name():
    with pytest.raises(ValueError, match="extractor_name"):
        FIDShiftMetric(feature_extractor=torch.nn.Identity())
    m = FIDShiftMetric(random_weights=True, feature_extractor=torch.nn.Identity(), extractor_name="identity")
    assert m.backbone == "RANDOM-INIT(seed=0):custom:identity"


def test_sharded_features_then_one_value_per_arm(fake_run):
    run_dir = fake_run(n_prompts=4, n_seeds=2, prompts_per_shard=2)
    first = compute_metrics(run_dir, ["fid_shift"], random_weights=True, shard=0)
    assert [p.name for p in first] == ["part-shard-00000.parquet"]
    assert load_run(run_dir).set_metrics.empty  # not reduced from a single shard job
    compute_metrics(run_dir, ["fid_shift"], random_weights=True, shard=1)
    final = compute_metrics(run_dir, ["fid_shift"], random_weights=True)
    assert [p.name for p in final] == ["part-paired.parquet"]
    assert compute_metrics(run_dir, ["fid_shift"], random_weights=True) == []
    sm = load_run(run_dir).set_metrics.set_index("arm")
    assert sorted(sm.index) == ["noop", "rand_k1", "rand_k5", "sink_k1", "sink_k5"]
    assert (sm["n"] == 8).all() and (sm["reference"] == "base").all() and sm["random_weights"].all()
    assert abs(sm.loc["noop", "value"]) < 1e-6  # identical images
    assert sm.loc["sink_k5", "value"] > sm.loc["rand_k1", "value"] > 0
    # the stored value is the Fréchet distance of the stored, paired features
    import pandas as pd

    f = pd.read_parquet(run_dir / "tables" / "features" / "metric=fid_shift")
    key = ["prompt_id", "seed_index"]
    a = f[f["arm"] == "sink_k1"].sort_values(key)
    b = f[f["arm"] == "base"].sort_values(key)
    direct = frechet_distance(np.stack(a["feature"]), np.stack(b["feature"]))
    assert sm.loc["sink_k1", "value"] == pytest.approx(direct, rel=1e-10)


def test_calibration_against_other_runs_and_seed_split(tmp_path):
    from analysis_fakerun import FakeRunSpec, make_run

    arms = [{"name": "baseline", "intervention": None}]
    ref = make_run(tmp_path / "a", FakeRunSpec(n_prompts=3, n_seeds=2, arms=arms, baseline=None, with_sink_steps=False))
    other = make_run(tmp_path / "b", FakeRunSpec(n_prompts=3, n_seeds=1, arms=arms, baseline=None,
                                                 noise={"baseline": 30.0}, with_sink_steps=False))  # fmt: skip
    table = fid_calibration(ref, {"cfg 6.5": other}, random_weights=True)
    assert table["mode"].eq("calibration").all()
    rows = table.set_index("arm")
    assert rows.loc["cfg 6.5:baseline", "n"] == 3  # paired by (prompt_id, seed_index=0)
    assert rows.loc["seed_index=1:baseline", "n"] == 3
    assert rows["value"].gt(0).all()
    stored = load_run(ref).set_metrics
    assert set(stored["arm"]) == set(table["arm"])
