"""Metrics as jobs: score one shard of the units table, write one part file, skip what is done.

Part files are named after the shard (``part-shard-00012.parquet``), so a rerun overwrites its
own part and never duplicates rows. A part is recomputed when it is missing, unreadable, does
not cover exactly the shard's units, was made with another backbone or weight mode, or is older
than the shard's units part (the shard was regenerated).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from jobs import runformat as rf
from jobs.compaction import covered_parts
from jobs.rundir import RunDir

from .._io import FEATURES_SCHEMA, METRICS_SCHEMA, SET_METRICS_SCHEMA, write_parquet_atomic
from ..run import RunData, RunDirError, baseline_arm, load_run
from .base import Metric, get_metric_class

log = logging.getLogger("sinkscope.analysis")


def metric_dir(run_dir: Path, name: str) -> Path:
    return RunDir(run_dir).table_dir("metrics", ("metric", name))


def features_dir(run_dir: Path, name: str) -> Path:
    return RunDir(run_dir).table_dir("features", ("metric", name))


def set_metric_dir(run_dir: Path, name: str) -> Path:
    return RunDir(run_dir).table_dir("set_metrics", ("metric", name))


def resolve_random_weights(run: RunData, random_weights: bool | None) -> bool:
    """``None`` → random metric backbones when the sweep sets ``analysis.random_metric_weights``
    or every image came from a random model (the offline demo); real runs then need real weights
    and fail clearly without them."""
    if random_weights is not None:
        return bool(random_weights)
    if run.sweep["analysis"]["random_metric_weights"]:
        return True
    flags = run.units["random_weights"]
    return bool(len(flags) and flags.fillna(False).astype(bool).all())


def compute_metrics(
    run_dir: str | Path,
    metrics: Iterable[str] = ("lpips",),
    random_weights: bool | None = None,
    shard: int | None = None,
    *,
    device: str | None = None,
    batch_size: int | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    force: bool = False,
) -> list[Path]:
    """Score the finished units of ``run_dir`` (one shard if ``shard`` is given) and return the
    part files written by this call. Each metric model is loaded at most once per call, and only
    if some part is missing. With ``shard=None`` set metrics (FID-shift) are also reduced to one
    number per arm once every shard has its features.
    """
    run_dir = Path(run_dir)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    options = options or {}
    unknown_opts = set(options) - set(metrics)
    if unknown_opts:
        raise ValueError(f"options given for metrics not requested: {sorted(unknown_opts)}")
    run = load_run(run_dir)
    if run.units.empty:
        raise RunDirError(f"{run_dir}: no finished units to score (tables/units is empty or no shard is done)")
    base = baseline_arm(run.sweep)
    rw = resolve_random_weights(run, random_weights)
    present = sorted(int(s) for s in run.units["shard_id"].unique())
    if shard is not None:
        if int(shard) not in present:
            raise RunDirError(
                f"{run_dir}: shard {shard} has no finished units (done shards with units: {present})"
            )
        shards = [int(shard)]
    else:
        shards = present

    written: list[Path] = []
    for name in metrics:
        cls = get_metric_class(name)
        metric = cls(random_weights=rw, device=device, batch_size=batch_size, **options.get(name, {}))
        for sid in shards:
            units = run.units[run.units["shard_id"] == sid]
            path = _part_path(run_dir, metric, sid)
            targets = _targets(metric, units, base)
            if not force and _part_is_current(path, targets["unit_id"], metric, rw, RunDir(run_dir), sid):
                log.info("%s shard %05d: up to date", name, sid)
                continue
            log.info("%s shard %05d: scoring %d units", name, sid, len(targets))
            table = _score(metric, run, targets, base)
            schema = FEATURES_SCHEMA if metric.kind == "set" else METRICS_SCHEMA
            written.append(write_parquet_atomic(table, path, schema))
        if metric.kind == "set" and shard is None:
            out = _reduce_set_metric(run, metric, base, force=force or bool(written))
            if out is not None:
                written.append(out)
    return written


def _part_path(run_dir: Path, metric: Metric, shard_id: int) -> Path:
    folder = features_dir(run_dir, metric.name) if metric.kind == "set" else metric_dir(run_dir, metric.name)
    return folder / rf.part_name(shard_id)


def _targets(metric: Metric, units: pd.DataFrame, base: str) -> pd.DataFrame:
    if metric.kind == "pair":
        units = units[units["arm"] != base]
    return units.sort_values(["prompt_id", "seed_index", "arm"]).reset_index(drop=True)


def _part_is_current(path: Path, unit_ids: pd.Series, metric: Metric, rw: bool, run: RunDir, shard_id: int) -> bool:
    units_part = run.part_path("units", shard_id)
    if not path.exists():
        # compacted (jobs.compaction): current unless the shard's units were regenerated since (a units part is back)
        return shard_id in covered_parts(path.parent) and not units_part.exists()
    try:
        done = pq.read_table(path, columns=["unit_id", "backbone", "random_weights"]).to_pandas()
    except Exception as exc:  # unreadable part: redo it
        log.warning("%s unreadable (%s): recomputing", path, exc)
        return False
    if set(done["unit_id"]) != set(unit_ids) or len(done) != len(unit_ids):
        return False
    if not (done["backbone"] == metric.backbone).all() or not (done["random_weights"] == metric.random_weights).all():
        return False
    if units_part.exists() and units_part.stat().st_mtime > path.stat().st_mtime:
        return False
    return True


def _open_images(run: RunData, rel_paths: list[str]) -> list:
    from PIL import Image

    images = []
    for rel in rel_paths:
        path = run.run_dir / rel
        if not path.exists():
            raise FileNotFoundError(f"image {path} listed in tables/units is missing")
        with Image.open(path) as im:
            images.append(rf.scored_frame(im).convert("RGB"))  # a video unit: its scored frame
    return images


def _score(metric: Metric, run: RunData, targets: pd.DataFrame, base: str) -> pd.DataFrame:
    metric.load()
    n = len(targets)
    bs = metric.batch_size
    if metric.kind == "unit":
        values = np.empty(n, dtype=np.float64)
        for s in range(0, n, bs):
            chunk = targets.iloc[s : s + bs]
            values[s : s + len(chunk)] = metric.score_images(
                _open_images(run, chunk["image_path"].tolist()), chunk["prompt"].fillna("").tolist()
            )
    elif metric.kind == "pair":
        ref = run.units[run.units["arm"] == base].set_index(["prompt_id", "seed_index"])["image_path"]
        keys = list(zip(targets["prompt_id"], targets["seed_index"]))
        ref_paths = [ref.get(k) for k in keys]
        missing = [targets["unit_id"].iloc[i] for i, p in enumerate(ref_paths) if p is None]
        if missing:
            warnings.warn(
                f"{metric.name}: {len(missing)} units have no finished {base!r} pair (e.g. {missing[0]}); "
                "their value is NaN",
                stacklevel=3,
            )
        values = np.full(n, np.nan, dtype=np.float64)
        ok = np.array([p is not None for p in ref_paths])
        idx = np.flatnonzero(ok)
        for s in range(0, len(idx), bs):
            sel = idx[s : s + bs]
            imgs = _open_images(run, targets["image_path"].iloc[sel].tolist())
            refs = _open_images(run, [ref_paths[i] for i in sel])
            values[sel] = metric.score_pairs(imgs, refs)
    elif metric.kind == "set":
        feats: list[np.ndarray] = []
        for s in range(0, n, bs):
            chunk = targets.iloc[s : s + bs]
            feats.extend(np.asarray(metric.features(_open_images(run, chunk["image_path"].tolist())), dtype=np.float32))
        return pd.DataFrame(
            {
                "unit_id": targets["unit_id"].to_numpy(),
                "shard_id": targets["shard_id"].to_numpy(),
                "prompt_id": targets["prompt_id"].to_numpy(),
                "seed_index": targets["seed_index"].to_numpy(),
                "arm": targets["arm"].to_numpy(),
                "feature": [f.tolist() for f in feats],
                "random_weights": metric.random_weights,
                "backbone": metric.backbone,
            }
        )
    else:
        raise TypeError(f"metric {metric.name!r} has unknown kind {metric.kind!r}")
    return pd.DataFrame(
        {
            "unit_id": targets["unit_id"].to_numpy(),
            "shard_id": targets["shard_id"].to_numpy(),
            "prompt_id": targets["prompt_id"].to_numpy(),
            "seed_index": targets["seed_index"].to_numpy(),
            "arm": targets["arm"].to_numpy(),
            "metric": metric.name,
            "value": values,
            "random_weights": metric.random_weights,
            "backbone": metric.backbone,
        }
    )


def _reduce_set_metric(run: RunData, metric: Metric, base: str, force: bool) -> Path | None:
    from .._io import read_table

    folder = features_dir(run.run_dir, metric.name)
    out = set_metric_dir(run.run_dir, metric.name) / "part-paired.parquet"
    feats = read_table(folder, FEATURES_SCHEMA).to_pandas()
    feats = feats[feats["unit_id"].isin(run.units["unit_id"])]
    if set(feats["unit_id"]) != set(run.units["unit_id"]):  # some shard not featurised yet
        log.info("%s: features incomplete, set values not computed yet", metric.name)
        return None
    if not force and out.exists():
        newest = max(p.stat().st_mtime for p in [*folder.glob("part-*.parquet"), folder / rf.COMPACTION_STATE] if p.exists())
        if out.stat().st_mtime >= newest:
            return None
    table = metric.reduce(feats, base)
    return write_parquet_atomic(table, out, SET_METRICS_SCHEMA)
