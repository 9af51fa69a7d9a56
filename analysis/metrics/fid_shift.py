"""FID-shift: Fréchet distance between an arm's image set and its *paired* baseline set.

Features are clean-fid's "clean" mode: PIL bicubic resize to 299² without quantisation, then
the TorchScript InceptionV3 (pool3, 2048-d) that clean-fid uses, loaded from a local file with
``InceptionV3W(folder, download=False)``. Features are computed per shard (one part file each)
and reduced to one number per arm when every shard is featurised. Only pairs present in both
sets enter (matched by prompt_id and seed_index), so both sets have the same n.

Fréchet distance: ‖μ₁−μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁'Σ₂')^½) with Σ' = Σ + εI (ε = 1e-6, added
always, as the paper's FID-shift did), sample covariances (ddof=1), ``scipy.linalg.sqrtm``.
At n < 2048 the covariance is singular and FID is strongly biased upwards: compare an arm's
value with the calibration values (baseline vs baseline under another seed/guidance/steps/
scheduler) from :func:`fid_calibration`, never with published FIDs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..weights import find_weight
from .base import Metric, random_label, seeded_init

INCEPTION_FILE = "inception-2015-12-05.pt"
_SET_COLUMNS = ["metric", "mode", "arm", "reference", "n", "value", "random_weights", "backbone"]
EPS = 1e-6


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = EPS) -> float:
    """FID between two feature matrices (rows = images)."""
    from scipy import linalg

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature matrices must be 2-d with equal width, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    mu1, mu2 = a.mean(0), b.mean(0)
    eye = np.eye(a.shape[1]) * eps
    s1 = np.cov(a, rowvar=False) + eye
    s2 = np.cov(b, rowvar=False) + eye
    covmean = linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        if np.max(np.abs(covmean.imag)) > 1e-3 * max(1.0, np.max(np.abs(covmean.real))):
            raise ValueError(f"FID: sqrtm has a large imaginary part ({np.max(np.abs(covmean.imag)):.3g})")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def inception_path() -> Path:
    """Local clean-fid Inception: the sinkscope layout, else clean-fid's own temp-dir location."""
    return find_weight(
        "fid_shift",
        INCEPTION_FILE,
        also=[Path(tempfile.gettempdir()) / INCEPTION_FILE],
        what="clean-fid TorchScript InceptionV3",
    )


def _tiny_extractor():
    """Random conv stand-in for InceptionV3 (same input contract: 299² images in [0, 255])."""
    from torch import nn

    class TinyFeatures(nn.Module):
        out_dim = 64

        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, 7, stride=4), nn.ReLU(), nn.Conv2d(16, 64, 5, stride=4), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )  # fmt: skip

        def forward(self, x):
            return self.net((x - 128.0) / 128.0)

    return TinyFeatures()


class FIDShiftMetric(Metric):
    name = "fid_shift"
    kind = "set"
    higher_is_better = False
    default_batch_size = 16

    def configure(self, feature_extractor: Any = None, extractor_name: str | None = None) -> None:
        """``feature_extractor``: any torch module mapping (B, 3, 299, 299) floats in [0, 255] to
        (B, d) features (clean-fid's ``custom_feat_extractor`` idea); ``extractor_name`` labels it."""
        if feature_extractor is not None and not extractor_name:
            raise ValueError("a custom feature_extractor needs an extractor_name (stored as the backbone)")
        self.extractor = feature_extractor
        self.extractor_name = extractor_name

    @property
    def backbone(self) -> str:
        if self.extractor is not None:
            label = f"custom:{self.extractor_name}"
            return random_label(label) if self.random_weights else label
        if self.random_weights:
            return random_label("tiny-conv-features(64)")
        return "clean-fid:inception-2015-12-05(clean)"

    def _load(self) -> None:
        from cleanfid.resize import build_resizer

        if self.extractor is not None:
            model = self.extractor
        elif self.random_weights:
            with seeded_init():
                model = _tiny_extractor()
        else:
            from cleanfid.inception_torchscript import InceptionV3W

            path = inception_path()
            model = InceptionV3W(str(path.parent), download=False, resize_inside=False)
        self.model = model.to(self.device).eval()
        self.resize = build_resizer("clean")

    def features(self, images: list) -> np.ndarray:
        import torch

        self.load()
        batch = []
        for im in images:
            arr = self.resize(np.asarray(im.convert("RGB"), dtype=np.uint8))  # float32 HxWx3 in [0, 255]
            batch.append(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)))
        with torch.inference_mode():
            feats = self.model(torch.stack(batch).to(self.device))
        return feats.reshape(len(images), -1).double().cpu().numpy()

    def reduce(self, feats: pd.DataFrame, base: str) -> pd.DataFrame:
        """One FID per arm against the paired baseline set."""
        check_backbone(feats, self.backbone)
        rows = []
        base_rows = feats[feats["arm"] == base].set_index(["prompt_id", "seed_index"])
        for arm in sorted(set(feats["arm"]) - {base}):
            arm_rows = feats[feats["arm"] == arm].set_index(["prompt_id", "seed_index"])
            keys = arm_rows.index.intersection(base_rows.index).sort_values()
            a = np.stack(arm_rows.loc[keys, "feature"].to_numpy()) if len(keys) else np.empty((0, 1))
            b = np.stack(base_rows.loc[keys, "feature"].to_numpy()) if len(keys) else np.empty((0, 1))
            rows.append(self._row("paired", arm, base, len(keys), frechet_distance(a, b) if len(keys) else np.nan))
        return pd.DataFrame(rows, columns=_SET_COLUMNS)

    def _row(self, mode: str, arm: str, reference: str, n: int, value: float) -> dict[str, Any]:
        return {
            "metric": self.name, "mode": mode, "arm": arm, "reference": reference, "n": int(n),
            "value": float(value), "random_weights": self.random_weights, "backbone": self.backbone,
        }  # fmt: skip


def check_backbone(feats: pd.DataFrame, backbone: str) -> None:
    found = set(feats["backbone"].unique())
    if found and found != {backbone}:
        raise ValueError(
            f"fid_shift: features come from {sorted(found)}, expected {backbone!r}; "
            "recompute them (compute_metrics(..., force=True))"
        )


def _set_matrix(feats: pd.DataFrame, arm: str, seed_index: int | None = None) -> pd.DataFrame:
    rows = feats[feats["arm"] == arm]
    if seed_index is not None:
        rows = rows[rows["seed_index"] == seed_index]
    return rows.set_index(["prompt_id", "seed_index"])


def fid_calibration(
    reference_run: str | Path,
    others: dict[str, str | Path] | None = None,
    *,
    arm: str | None = None,
    seed_split: bool = True,
    random_weights: bool | None = None,
    device: str | None = None,
    options: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """FID of the reference run's baseline set against other baseline sets, to calibrate FID-shift.

    ``others`` maps a label (e.g. ``"cfg 6.5"``) to another run directory whose baseline was made
    with changed guidance, steps, scheduler or seeds; sets are paired by prompt (prompt_id,
    seed_index). With ``seed_split`` and ≥2 seeds per prompt in the reference run, seed 0 vs seed 1
    of the same prompts is added too. Missing features are computed first (same backbone for all).
    Rows are written to ``tables/set_metrics/metric=fid_shift/part-calibration.parquet``.
    """
    from .._io import FEATURES_SCHEMA, SET_METRICS_SCHEMA, read_table, write_parquet_atomic
    from ..run import baseline_arm, load_run
    from .compute import compute_metrics, features_dir, resolve_random_weights, set_metric_dir

    reference_run = Path(reference_run)
    ref = load_run(reference_run)
    rw = resolve_random_weights(ref, random_weights)
    metric = FIDShiftMetric(random_weights=rw, device=device, **(options or {}))
    runs = {"reference": reference_run, **{k: Path(v) for k, v in (others or {}).items()}}
    sets: dict[str, tuple[pd.DataFrame, str]] = {}
    for label, run_dir in runs.items():
        compute_metrics(run_dir, ["fid_shift"], random_weights=rw, device=device,
                        options={"fid_shift": options} if options else None)  # fmt: skip
        data = load_run(run_dir)
        feats = read_table(features_dir(run_dir, "fid_shift"), FEATURES_SCHEMA).to_pandas()
        feats = feats[feats["unit_id"].isin(data.units["unit_id"])]
        check_backbone(feats, metric.backbone)
        sets[label] = (feats, arm or baseline_arm(data.sweep))
    ref_feats, ref_arm = sets["reference"]
    ref_name = f"{reference_run.name}:{ref_arm}"
    rows = []
    for label, (feats, other_arm) in sets.items():
        if label == "reference":
            continue
        a, b = _set_matrix(ref_feats, ref_arm), _set_matrix(feats, other_arm)
        keys = a.index.intersection(b.index).sort_values()
        value = frechet_distance(np.stack(a.loc[keys, "feature"]), np.stack(b.loc[keys, "feature"])) if len(keys) else np.nan
        rows.append(metric._row("calibration", f"{label}:{other_arm}", ref_name, len(keys), value))
    if seed_split and ref_feats["seed_index"].nunique() >= 2:
        s0 = _set_matrix(ref_feats, ref_arm, 0).reset_index(level="seed_index")
        s1 = _set_matrix(ref_feats, ref_arm, 1).reset_index(level="seed_index")
        keys = s0.index.intersection(s1.index).sort_values()
        value = frechet_distance(np.stack(s0.loc[keys, "feature"]), np.stack(s1.loc[keys, "feature"])) if len(keys) else np.nan
        rows.append(metric._row("calibration", f"seed_index=1:{ref_arm}", f"{ref_name}(seed_index=0)", len(keys), value))
    table = pd.DataFrame(rows, columns=SET_METRICS_SCHEMA.names)
    write_parquet_atomic(table, set_metric_dir(reference_run, "fid_shift") / "part-calibration.parquet", SET_METRICS_SCHEMA)
    return table
