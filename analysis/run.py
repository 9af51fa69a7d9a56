"""Read a run directory into pandas: the one entry point for notebooks, metrics and reports."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from ._io import (
    METRICS_SCHEMA,
    SET_METRICS_SCHEMA,
    SINK_STEPS_SCHEMA,
    UNITS_SCHEMA,
    empty_frame,
    read_table,
    table_files,
)

_SHARD_NAME = re.compile(r"^shard-(\d+)(?:\.json)?$")
_PART_SHARD = re.compile(r"part-shard-(\d+)\.parquet$")


class RunDirError(ValueError):
    """The run directory (or its sweep.yaml) lacks something the analysis needs."""


@dataclass
class RunData:
    """Everything the analysis needs from one run, as pandas DataFrames.

    ``units``/``sink_steps`` hold only shards that have a done marker (when the run has a
    ``state/done`` folder): a shard without its marker is unfinished whatever files exist.
    """

    run_dir: Path
    sweep: dict[str, Any]
    manifest: pd.DataFrame | None
    units: pd.DataFrame
    sink_steps: pd.DataFrame
    metrics: pd.DataFrame
    set_metrics: pd.DataFrame
    done_shards: list[int] | None = None
    unfinished_shards: list[int] = field(default_factory=list)

    @property
    def baseline(self) -> str:
        """Name of the reference arm (see :func:`baseline_arm`)."""
        return baseline_arm(self.sweep)

    @property
    def arms(self) -> list[str]:
        """Arms in sweep order, then any arm seen only in the units table."""
        names = [a["name"] for a in _arms(self.sweep, strict=False)]
        for arm in self.units["arm"].unique().tolist():
            if arm not in names:
                names.append(arm)
        return names

    @property
    def random_weights(self) -> bool:
        """True if any image or score of this run came from random weights."""
        flags = [self.units["random_weights"], self.metrics["random_weights"], self.set_metrics["random_weights"]]
        return any(bool(f.fillna(False).astype(bool).any()) for f in flags)

    def image_path(self, unit_id: str) -> Path:
        """Absolute path of a unit's PNG."""
        rows = self.units.loc[self.units["unit_id"] == unit_id, "image_path"]
        if rows.empty:
            raise KeyError(f"unit {unit_id!r} is not in {self.run_dir}/tables/units")
        return self.run_dir / rows.iloc[0]

    def image(self, unit_id: str):
        """A unit's image as an RGB PIL image."""
        from PIL import Image

        with Image.open(self.image_path(unit_id)) as im:
            return im.convert("RGB")

    def paired(self, metric: str, arm: str, baseline: str | None = None) -> pd.DataFrame:
        """Per (prompt_id, seed_index) values of ``arm`` and the baseline and their difference.

        For distance-to-baseline metrics (LPIPS) the baseline value is 0 by definition.
        """
        from .stats import paired_frame

        return paired_frame(self, metric, arm, baseline or self.baseline)


def _arms(sweep: dict[str, Any], strict: bool = True) -> list[dict[str, Any]]:
    arms = sweep.get("arms") if isinstance(sweep, dict) else None
    if arms is None:
        if strict:
            raise RunDirError("sweep has no 'arms' list (expected arms: [{name: ..., intervention: ...}])")
        return []
    if not isinstance(arms, list) or not all(isinstance(a, dict) and "name" in a for a in arms):
        raise RunDirError("sweep 'arms' must be a list of mappings with a 'name' key")
    return arms


def baseline_arm(sweep: dict[str, Any]) -> str:
    """The reference arm: ``analysis.baseline`` if the sweep names one, else the single arm
    whose ``intervention`` is null. Every paired statistic is taken against it."""
    arms = _arms(sweep)
    names = [a["name"] for a in arms]
    section = sweep.get("analysis") or {}
    if not isinstance(section, dict):
        raise RunDirError("sweep key 'analysis' must be a mapping")
    named = section.get("baseline")
    if named is not None:
        if named not in names:
            raise RunDirError(f"analysis.baseline = {named!r} is not an arm of the sweep (arms: {names})")
        return named
    nulls = [a["name"] for a in arms if a.get("intervention") is None]
    if len(nulls) == 1:
        return nulls[0]
    if not nulls:
        raise RunDirError(
            f"no baseline arm: no arm has 'intervention: null' (arms: {names}); "
            "add one, or name the reference arm in 'analysis: {baseline: <arm>}'"
        )
    raise RunDirError(
        f"several arms have 'intervention: null' ({nulls}); name the reference one in "
        "'analysis: {baseline: <arm>}' of sweep.yaml"
    )


def arm_interventions(sweep: dict[str, Any]) -> dict[str, dict[str, Any] | str | None]:
    """Map arm name → its intervention as written in the sweep (dict, preset name or None).

    Preset names are resolved through ``manifests.interventions.PRESETS`` when that package
    provides them, so the analysis can read ``selection`` and ``k`` of preset arms too.
    """
    out: dict[str, Any] = {}
    for arm in _arms(sweep, strict=False):
        spec = arm.get("intervention")
        if isinstance(spec, str):
            spec = _resolve_preset(spec)
        out[arm["name"]] = spec
    return out


def _resolve_preset(name: str) -> dict[str, Any] | str:
    try:
        from manifests.interventions import PRESETS  # type: ignore[import-not-found]
    except Exception:  # manifests not importable here: keep the name
        return name
    preset = PRESETS.get(name) if hasattr(PRESETS, "get") else None
    if preset is None:
        return name
    if hasattr(preset, "model_dump"):
        return preset.model_dump()
    return dict(preset)


def _shard_ids_from_markers(folder: Path) -> list[int]:
    ids = []
    for p in folder.iterdir():
        m = _SHARD_NAME.match(p.name)
        if m:
            ids.append(int(m.group(1)))
    return sorted(ids)


def load_sweep(run_dir: Path) -> dict[str, Any]:
    """The frozen ``sweep.yaml`` of a run as a dict ({} when the file is absent)."""
    path = Path(run_dir) / "sweep.yaml"
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: expected a YAML mapping at top level, got {type(data).__name__}")
    return data


def load_run(
    run_dir: str | Path,
    *,
    sink_steps: bool | list[str] = True,
    only_done: bool = True,
) -> RunData:
    """Load a run directory's tables.

    ``sink_steps`` may be False (skip the largest table) or a list of columns to read.
    ``only_done`` drops part files of shards without a ``state/done`` marker; it has no effect
    on run directories without a ``state/done`` folder (hand-made or copied runs).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    tables = run_dir / "tables"
    sweep = load_sweep(run_dir)
    manifest_path = run_dir / "manifest.parquet"
    manifest = pd.read_parquet(manifest_path) if manifest_path.exists() else None

    units = read_table(tables / "units", UNITS_SCHEMA).to_pandas()
    done_dir = run_dir / "state" / "done"
    done: list[int] | None = None
    unfinished: list[int] = []
    if only_done and done_dir.is_dir():
        done = _shard_ids_from_markers(done_dir)
        present = sorted(int(s) for s in units["shard_id"].dropna().unique())
        unfinished = [s for s in present if s not in set(done)]
        if unfinished:
            units = units[units["shard_id"].isin(done)].reset_index(drop=True)
    dup = units["unit_id"].duplicated()
    if dup.any():
        raise RunDirError(
            f"{tables / 'units'}: unit {units.loc[dup, 'unit_id'].iloc[0]!r} appears in more than one row; "
            "a part file was duplicated (only one part per shard may exist)"
        )

    if sink_steps is False:
        steps = empty_frame(SINK_STEPS_SCHEMA)
    else:
        cols = None if sink_steps is True else list(sink_steps)
        steps = read_table(tables / "sink_steps", SINK_STEPS_SCHEMA, columns=cols).to_pandas()
        if unfinished and "unit_id" in steps.columns:
            steps = steps[steps["unit_id"].isin(units["unit_id"])].reset_index(drop=True)

    metrics = read_table(tables / "metrics", METRICS_SCHEMA).to_pandas()
    if not units.empty:
        metrics = metrics[metrics["unit_id"].isin(units["unit_id"])].reset_index(drop=True)
    dup = metrics.duplicated(["unit_id", "metric"])
    if dup.any():
        first = metrics.loc[dup].iloc[0]
        raise RunDirError(
            f"{tables / 'metrics'}: metric {first['metric']!r} has more than one value for unit "
            f"{first['unit_id']!r}; remove the stale part file under metric={first['metric']}/"
        )
    set_metrics = read_table(tables / "set_metrics", SET_METRICS_SCHEMA).to_pandas()
    if unfinished:
        warnings.warn(
            f"{run_dir}: shards {unfinished} have part files but no done marker; they are left out",
            stacklevel=2,
        )
    return RunData(
        run_dir=run_dir,
        sweep=sweep,
        manifest=manifest,
        units=units,
        sink_steps=steps,
        metrics=metrics,
        set_metrics=set_metrics,
        done_shards=done,
        unfinished_shards=unfinished,
    )


def units_part_path(run_dir: Path, shard_id: int) -> Path | None:
    """The units part file a shard wrote, if any (used to detect stale metric parts)."""
    for f in table_files(Path(run_dir) / "tables" / "units"):
        m = _PART_SHARD.search(f.name)
        if m and int(m.group(1)) == shard_id:
            return f
    return None
