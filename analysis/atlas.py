"""The sink atlas: the same prompts through several models, compared side by side.

Per run (one model), from the atlas columns of the sink record (`workers.recorder`; record `stats: [mass, ratio]`):
- `ratio`: layer × step heat map of the sink-to-random key-importance ratio (`sink_ratio`: the top-1 key's
  incoming mass over the mean key's), averaged over units and heads;
- `distinct`: layer × step heat map of the number of distinct top-1 keys (`sink_idx`) across the run's units
  (prompts × seeds), averaged over heads: low = one deterministic sink, high = a prompt-dependent one;
- `regions`: layer × region share of the top-1 keys (`manifests.keys` labels: image corner / edge / interior,
  text padding / special / content);
- `spatial`: where image sinks sit on the patch grid (count per row, column; transformer families only: a
  UNet's layers work on grids of several sizes).
Plus one summary row per model: peak ratio (the largest layer × step mean), distinct sinks (how many different
keys are the units' most frequent top-1 key), and the dominant region.

Only the conditional branch is used when it was recorded (CFG's unconditional prompt is the same for every unit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from manifests.keys import REGION_LABELS

from ._io import write_text_atomic
from .plots import Saved, _figure, _save
from .tables import to_markdown

ATLAS_COLUMNS = ["unit_id", "arm", "step", "layer", "head", "branch", "layer_name", "sink_idx", "sink_region", "sink_row",
                 "sink_col", "sink_ratio"]


@dataclass
class ModelAtlas:
    """The atlas numbers of one run (one model)."""

    label: str
    family: str | None
    random_weights: bool
    ratio: pd.DataFrame  # index layer, columns step: mean sink_ratio
    distinct: pd.DataFrame  # index layer, columns step: distinct top-1 keys across units (mean over heads)
    regions: pd.DataFrame  # index layer, columns region label: share of top-1 keys
    spatial: np.ndarray | None  # [rows, cols] counts of image sinks (None: no image sink, or a multi-scale UNet)
    summary: dict


def _label(sweep: dict) -> str:
    model = sweep.get("model") or {}
    return str(model.get("preset") or model.get("hub_id") or model.get("path") or sweep.get("name", "?"))


def _family(sweep: dict) -> str | None:
    from manifests.schema import ModelSpec

    try:
        geometry = ModelSpec(**(sweep.get("model") or {})).geometry()
    except ValueError:
        return None
    return None if geometry is None else geometry.family


def atlas_rows(run) -> pd.DataFrame:
    """The atlas columns of a loaded run's baseline arm (done shards only), conditional branch if recorded."""
    return _rows(run, run.baseline, run.run_dir)


def _rows(run, arm: str, where) -> pd.DataFrame:
    rows = run.sink_steps.df(ATLAS_COLUMNS, arm=arm)
    if rows.empty or rows["sink_idx"].isna().all():
        raise ValueError(f"{where}: no sink rows with a top-1 key for arm {arm!r}; record with "
                         "`recording.stats: [mass, ratio]` and some layers")
    if (rows["branch"] == "cond").any():
        rows = rows[rows["branch"] == "cond"]
    return rows.reset_index(drop=True)


def model_atlas(run_dir: Path, arm: str | None = None) -> ModelAtlas:
    """The atlas of one run (`arm`: default the baseline)."""
    from .run import load_run

    run = load_run(run_dir)
    rows = _rows(run, arm or run.baseline, run_dir)
    ratio = rows.pivot_table(index="layer", columns="step", values="sink_ratio", aggfunc="mean")
    per_head = rows.groupby(["layer", "step", "head"])["sink_idx"].nunique()
    distinct = per_head.groupby(["layer", "step"]).mean().unstack("step")
    regions = pd.crosstab(rows["layer"], rows["sink_region"], normalize="index").reindex(columns=list(REGION_LABELS), fill_value=0.0)
    family = _family(run.sweep)
    spatial = None
    image = rows[rows["sink_row"].notna()]
    if family != "sdxl" and len(image):
        shape = (int(image["sink_row"].max()) + 1, int(image["sink_col"].max()) + 1)
        spatial = np.zeros(shape)
        np.add.at(spatial, (image["sink_row"].astype(int).to_numpy(), image["sink_col"].astype(int).to_numpy()), 1)
    unit_sinks = rows.groupby("unit_id")["sink_idx"].agg(lambda s: s.value_counts().sort_index().idxmax())
    has_ratio = bool(ratio.notna().any().any())
    peak = ratio.stack().idxmax() if has_ratio else (None, None)
    summary = {
        "model": _label(run.sweep),
        "units": int(rows["unit_id"].nunique()),
        "peak_ratio": float(np.nanmax(ratio.to_numpy())) if has_ratio else float("nan"),
        "peak_layer": peak[0],
        "peak_step": peak[1],
        "distinct_sinks": int(unit_sinks.nunique()),
        "dominant_region": rows["sink_region"].value_counts().idxmax(),
    }
    return ModelAtlas(_label(run.sweep), family, run.random_weights, ratio, distinct, regions, spatial, summary)


def _heat(ax, frame: pd.DataFrame, title: str, cmap: str, fig) -> None:
    image = ax.imshow(frame.to_numpy(dtype=float), aspect="auto", origin="lower", cmap=cmap, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(frame.index)), [str(i) for i in frame.index], fontsize=6)
    ax.set_xticks(range(len(frame.columns)), [str(c) for c in frame.columns], fontsize=6)
    fig.colorbar(image, ax=ax, shrink=0.8)


def plot_atlas(atlases: list[ModelAtlas], out_dir: Path, stem: str = "atlas") -> Saved:
    """One row per model: ratio heat map, distinct-sink heat map, region shares by layer, spatial image-sink map."""
    fig = _figure(16, 3.4 * len(atlases))
    axes = fig.subplots(len(atlases), 4, squeeze=False)
    for row, atlas in zip(axes, atlases):
        _heat(row[0], atlas.ratio, f"{atlas.label}\nsink-to-random ratio", "magma", fig)
        _heat(row[1], atlas.distinct, "distinct top-1 sinks across units", "viridis", fig)
        regions = atlas.regions
        image = row[2].imshow(regions.to_numpy(dtype=float), aspect="auto", origin="lower", cmap="Blues", vmin=0, vmax=1,
                              interpolation="nearest")
        row[2].set_title("top-1 region share", fontsize=9)
        row[2].set_xticks(range(len(regions.columns)), [c.replace(":", "\n") for c in regions.columns], fontsize=6)
        row[2].set_yticks(range(len(regions.index)), [str(i) for i in regions.index], fontsize=6)
        row[2].set_ylabel("layer")
        fig.colorbar(image, ax=row[2], shrink=0.8)
        if atlas.spatial is None:
            row[3].axis("off")
            row[3].set_title("no image sinks" if atlas.family != "sdxl" else "UNet: multi-scale grids (see regions)", fontsize=9)
        else:
            image = row[3].imshow(atlas.spatial, cmap="inferno", interpolation="nearest")
            row[3].set_title("image sinks on the patch grid", fontsize=9)
            row[3].set_xlabel("column")
            row[3].set_ylabel("row")
            fig.colorbar(image, ax=row[3], shrink=0.8)
    return _save(fig, out_dir, stem, any(a.random_weights for a in atlases))


def write_atlas(run_dirs: list[Path], out_dir: Path, arm: str | None = None) -> Path:
    """Atlas of several runs into `out_dir`: atlas.md (summary table, figure), atlas.png/.pdf, atlas.csv (heat-map numbers)."""
    if not run_dirs:
        raise ValueError("the atlas needs at least one run directory")
    atlases = [model_atlas(Path(d), arm) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = plot_atlas(atlases, out_dir)
    long = []
    for atlas in atlases:
        for name, frame in (("ratio", atlas.ratio), ("distinct", atlas.distinct)):
            stacked = frame.stack().rename("value").reset_index()
            stacked.insert(0, "measure", name)
            stacked.insert(0, "model", atlas.label)
            long.append(stacked)
    write_text_atomic(pd.concat(long, ignore_index=True).to_csv(index=False), out_dir / "atlas.csv")
    summary = pd.DataFrame([a.summary for a in atlases])
    lines = ["# Sink atlas", ""]
    if any(a.random_weights for a in atlases):
        lines += ["> **RANDOM WEIGHTS — not results.** At least one model has random weights; its numbers mean nothing.", ""]
    lines += [
        "Sink-to-random ratio: the top-1 key's incoming mass over the mean key's (the expected importance of a random key). "
        "Distinct sinks: how many different keys are the units' most frequent top-1 key. Conditional branch, baseline arm.",
        "",
        to_markdown(summary.assign(peak_ratio=summary["peak_ratio"].map(lambda v: f"{v:.3g}"))),
        "",
        f"![atlas]({saved.png.name})",
        "",
        "Heat-map numbers (model, measure, layer, step, value): `atlas.csv`.",
        "",
    ]
    return write_text_atomic("\n".join(lines), out_dir / "atlas.md")
