"""Figures of a run, saved as PNG and PDF.

Figures are built with matplotlib's object API on an Agg canvas: nothing touches pyplot's
global state or the notebook's backend. Every function returns the paths it wrote and leaves
the Figure on ``.figure`` of the result for notebooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .tables import display_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .run import RunData

MODALITY_COLORS = {"image": "#4C72B0", "clip": "#DD8452", "t5": "#55A868", "t5_pad": "#C44E52"}
RANDOM_NOTE = "RANDOM WEIGHTS — not results"


@dataclass
class Saved:
    """Paths written for one figure (and the Figure itself, for display)."""

    png: Path | None = None
    pdf: Path | None = None
    figure: "Figure | None" = field(default=None, repr=False)

    @property
    def paths(self) -> list[Path]:
        return [p for p in (self.png, self.pdf) if p is not None]


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def weights_stamp(run: "RunData") -> str | None:
    """What every figure of `run` must say about its weights: RANDOM_NOTE, a model's own note
    (manifests.models.MODEL_NOTES, e.g. the toy model's), or nothing."""
    from manifests.models import MODEL_NOTES

    if run.random_weights:
        return RANDOM_NOTE
    notes = [MODEL_NOTES[m] for m in sorted(set(run.units["model"].dropna()) & set(MODEL_NOTES))]
    return "; ".join(notes) or None


def _save(fig: "Figure", out_dir: Path, stem: str, random: bool | str | None) -> Saved:
    """Save PNG + PDF; `random` stamps the figure: True → RANDOM_NOTE, a string → that note."""
    if random:
        note = RANDOM_NOTE if random is True else str(random)
        title = fig.get_suptitle()
        fig.suptitle(f"{title}\n{note}" if title else note, fontsize=10, color="#B00020")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, pdf = out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"
    for path, kw in ((png, {"dpi": 150}), (pdf, {})):
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, format=path.suffix[1:], **kw)
        tmp.replace(path)
    return Saved(png, pdf, fig)


def _t_band(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the t-interval of the mean (analysis.stats.t_interval); (m, m, m) for one value."""
    from .stats import t_interval

    v = values[~np.isnan(values)]
    if v.size == 0:
        return (np.nan, np.nan, np.nan)
    mean = float(v.mean())
    if v.size < 2:
        return (mean, mean, mean)
    return (mean, *t_interval(v, confidence))


# ----------------------------------------------------------------------------- sink dynamics
DYNAMICS = (("max_mass", "max incoming mass"), ("entropy", "attention entropy (nats)"), ("top5_conc", "top-5 concentration"))


def read_sink_steps(run: "RunData", arm: str, cols: list[str]) -> pa.Table:
    """The given sink-step columns of one arm's finished units, queried lazily (only these columns and rows).
    The one place the figures read sink records (analysis.spatial too)."""
    return run.sink_steps.arrow(cols, arm=arm)


def sink_step_means(run: "RunData", arm: str | None = None) -> pd.DataFrame:
    """Per (unit, layer, step): sink statistics averaged over heads and CFG branches.

    Only the needed columns of one arm are read from the lazy sink-step relation.
    """
    table = read_sink_steps(run, arm or run.baseline, ["unit_id", "arm", "step", "layer", *[c for c, _ in DYNAMICS]])
    agg = table.group_by(["unit_id", "layer", "step"]).aggregate([(c, "mean") for c, _ in DYNAMICS])
    df = agg.to_pandas().rename(columns={f"{c}_mean": c for c, _ in DYNAMICS})
    return df.sort_values(["layer", "step", "unit_id"]).reset_index(drop=True)


def recorded_arms(run: "RunData") -> list[str]:
    """Arms (sweep order) with finished units; the figures draw one row or panel per arm."""
    present = set(run.units["arm"])
    return [a for a in run.arms if a in present]


def plot_sink_dynamics(run: "RunData", out_dir: Path, *, arms: list[str] | None = None,
                       stem: str = "sink_dynamics") -> Saved:  # fmt: skip
    """max_mass, entropy and top-5 concentration vs step, one row per arm (default: every arm), one line
    per layer, 95% t-bands across units (each unit first averaged over heads and CFG branches);
    rows share their y axes so arms compare at a glance."""
    from matplotlib.ticker import MaxNLocator

    arms = arms or recorded_arms(run) or [run.baseline]
    fig = _figure(12, 2.6 * len(arms) + 0.6)
    axes = np.atleast_2d(fig.subplots(len(arms), 3, sharex=True, sharey="col", squeeze=False))
    for r, arm in enumerate(arms):
        df = sink_step_means(run, arm)
        if df.empty:
            for ax in axes[r]:
                ax.text(0.5, 0.5, "no sink records", ha="center", va="center", transform=ax.transAxes)
        layers = sorted(df["layer"].unique())
        cmap = _colors(len(layers))
        for ax, (col, label) in zip(axes[r], DYNAMICS):
            for color, layer in zip(cmap, layers):
                sub = df[df["layer"] == layer]
                steps = sorted(sub["step"].unique())
                stats = np.array([_t_band(sub.loc[sub["step"] == s, col].to_numpy(dtype=float)) for s in steps])
                ax.plot(steps, stats[:, 0], color=color, label=f"layer {layer}", lw=1.5)
                ax.fill_between(steps, stats[:, 1], stats[:, 2], color=color, alpha=0.2, lw=0)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{arm}: {label} (n = {df['unit_id'].nunique()} images)", fontsize=8)
        if layers and r == 0:
            axes[r, 0].legend(fontsize=7, ncol=1 + len(layers) // 8)
    for ax in axes[-1]:
        ax.set_xlabel("denoising step")
    fig.suptitle("Sink dynamics per arm (bands: 95% t-interval of the mean over images)", fontsize=10)
    return _save(fig, out_dir, stem, weights_stamp(run))


# ----------------------------------------------------------------------------- modality
def modality_fractions(run: "RunData", arm: str | None = None) -> pd.DataFrame:
    """Per layer: fraction of (step, head, branch, unit) records whose top-1 key has each modality."""
    table = read_sink_steps(run, arm or run.baseline, ["unit_id", "arm", "layer", "topk_modality"])
    table = table.filter(pc.greater(pc.list_value_length(table["topk_modality"]), 0))
    top1 = pc.list_element(table["topk_modality"], 0)
    counts = pa.table({"layer": table["layer"], "modality": top1}).group_by(["layer", "modality"]).aggregate(
        [("modality", "count")]
    )  # fmt: skip
    df = counts.to_pandas().rename(columns={"modality_count": "count"})
    if df.empty:
        return pd.DataFrame(columns=["layer", "modality", "count", "fraction"])
    df["fraction"] = df["count"] / df.groupby("layer")["count"].transform("sum")
    return df.sort_values(["layer", "modality"]).reset_index(drop=True)


def plot_modality_fractions(run: "RunData", out_dir: Path, *, arms: list[str] | None = None,
                            stem: str = "sink_modality") -> Saved:  # fmt: skip
    """Stacked bars, one panel per arm (default: every arm): which modality the top-1 sink key belongs to, per layer."""
    arms = arms or recorded_arms(run) or [run.baseline]
    frames = {arm: modality_fractions(run, arm) for arm in arms}
    n_layers = max([df["layer"].nunique() for df in frames.values()] + [1])
    fig = _figure(max(4.0, 0.35 * n_layers + 2) * min(len(arms), 3), 3.0 * -(-len(arms) // 3) + 0.4)
    axes = np.atleast_1d(fig.subplots(-(-len(arms) // 3), min(len(arms), 3), squeeze=False)).ravel()
    all_mods = set().union(*[set(df["modality"]) for df in frames.values()])
    mods = [m for m in MODALITY_COLORS if m in all_mods] + sorted(all_mods - set(MODALITY_COLORS))
    for ax, arm in zip(axes, arms):
        df = frames[arm]
        layers = sorted(df["layer"].unique())
        bottom = np.zeros(len(layers))
        for mod in mods:
            frac = np.array([df.loc[(df["layer"] == l) & (df["modality"] == mod), "fraction"].sum() for l in layers])
            ax.bar([str(l) for l in layers], frac, bottom=bottom, label=mod, color=MODALITY_COLORS.get(mod))
            bottom += frac
        ax.set_xlabel("layer")
        ax.set_ylabel("fraction of top-1 sinks")
        ax.set_ylim(0, 1)
        ax.set_title(f"arm '{arm}'", fontsize=9)
    for ax in axes[len(arms):]:
        ax.set_visible(False)
    if mods:
        axes[min(len(arms), 3) - 1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("Top-1 sink modality per layer and arm", fontsize=10)
    return _save(fig, out_dir, stem, weights_stamp(run))


# ----------------------------------------------------------------------------- forest / dose
def plot_forest(table: pd.DataFrame, out_dir: Path, *, random: bool | str | None, stem: str = "forest_delta_delta") -> Saved:
    """ΔΔ (sink − control) with 95% CI per contrast, one panel per metric, ordered by k.
    ``table`` is :func:`analysis.stats.delta_delta_table` (or a paired table: Δ per arm)."""
    is_dd = "sink" in table.columns
    metrics = list(dict.fromkeys(table["metric"]))
    fig = _figure(4.2 * max(1, len(metrics)), 0.45 * max(3, table.groupby("metric").size().max() if len(table) else 3) + 1.2)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(metrics))))
    if not metrics:
        axes[0].text(0.5, 0.5, "no contrasts", ha="center", va="center", transform=axes[0].transAxes)
    for ax, metric in zip(axes, metrics):
        sub = table[table["metric"] == metric]
        if is_dd:
            sub = sub.sort_values(["k", "sink", "control"], na_position="last")
            labels = [f"{s} − {c}" for s, c in zip(sub["sink"], sub["control"])]
        else:
            labels = list(sub["arm"])
        y = np.arange(len(sub))[::-1]
        mean = sub["mean"].to_numpy(dtype=float)
        lo, hi = sub["ci_low"].to_numpy(dtype=float), sub["ci_high"].to_numpy(dtype=float)
        ax.errorbar(mean, y, xerr=[mean - lo, hi - mean], fmt="o", color="k", ecolor="#555", capsize=3, ms=4)
        ax.axvline(0, color="#B00020", lw=0.8, ls="--")
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_xlabel(("ΔΔ " if is_dd else "Δ ") + display_name(metric))
        ax.set_title(display_name(metric), fontsize=10)
    fig.suptitle("Sink − control (ΔΔ), 95% bootstrap CI" if is_dd else "Arm − baseline (Δ), 95% bootstrap CI", fontsize=10)
    return _save(fig, out_dir, stem, random)


def plot_dose_response(run: "RunData", paired: pd.DataFrame, dd: pd.DataFrame, out_dir: Path, *,
                       stem: str = "dose_response") -> Saved:  # fmt: skip
    """Mean Δ (with 95% CI) against k for every k-series of arms, plus ΔΔ where contrasts exist."""
    from .design import dose_series

    series = [s for s in dose_series(run.sweep, run.baseline) if s.field == "k"]
    metrics = list(dict.fromkeys(paired["metric"])) if len(paired) else []
    fig = _figure(4.2 * max(1, len(metrics)), 3.4)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(metrics))))
    if not metrics or not series:
        axes[0].text(0.5, 0.5, "no dose series (arms differing only in k)", ha="center", va="center",
                     transform=axes[0].transAxes, fontsize=8)  # fmt: skip
    colors = _colors(len(series) + 1)
    for ax, metric in zip(axes, metrics):
        p = paired[paired["metric"] == metric].set_index("arm")
        for color, s in zip(colors, series):
            arms = [a for a in s.arms if a in p.index]
            ks = [v for a, v in zip(s.arms, s.values) if a in p.index]
            if not arms:
                continue
            m = p.loc[arms, "mean"].to_numpy(dtype=float)
            ax.errorbar(ks, m, yerr=[m - p.loc[arms, "ci_low"], p.loc[arms, "ci_high"] - m], marker="o",
                        color=color, capsize=3, label=f"Δ {_series_label(s)}")  # fmt: skip
        d = dd[dd["metric"] == metric].dropna(subset=["k"]).sort_values("k") if len(dd) else dd
        for ctrl_sel, g in (d.groupby("control_selection") if len(d) else []):
            m = g["mean"].to_numpy(dtype=float)
            ax.errorbar(g["k"], m, yerr=[m - g["ci_low"], g["ci_high"] - m], marker="s", ls="--", color="k",
                        capsize=3, label=f"ΔΔ vs {ctrl_sel}")  # fmt: skip
        ax.axhline(0, color="#B00020", lw=0.8, ls=":")
        ax.set_xscale("log")
        ks = sorted({v for s in series for v in s.values})
        ax.set_xticks(ks, [f"{v:g}" for v in ks])
        ax.minorticks_off()
        ax.set_xlabel("k (keys per head)")
        ax.set_ylabel(display_name(metric))
        ax.legend(fontsize=7)
    fig.suptitle("Dose–response over k (95% bootstrap CI)", fontsize=10)
    return _save(fig, out_dir, stem, weights_stamp(run))


def _series_label(s) -> str:
    import os

    common = os.path.commonprefix(list(s.arms)).rstrip("0123456789")
    if common.endswith("_k"):
        common = common[:-2]
    return common.strip("_-") or " / ".join(s.arms)


# ----------------------------------------------------------------------------- qualitative
QUALITATIVE_RULE = (
    "Rows: the prompts whose sink-removed image is furthest from its baseline by LPIPS (seed_index 0, "
    "largest first, ties by prompt_id); without LPIPS, the largest |Δ| of the first metric; without "
    "metrics, the first prompts."
)


def choose_qualitative_rows(run: "RunData", sink: str, n: int = 5) -> list[int]:
    """Prompt ids for a qualitative panel, by :data:`QUALITATIVE_RULE`."""
    from .stats import paired_values

    units = run.units[(run.units["arm"] == sink) & (run.units["seed_index"] == 0)]
    if units.empty:
        return []
    metrics = run.metrics
    if (metrics["metric"] == "lpips").any():
        score = paired_values(run.units, metrics, "lpips", sink, run.baseline)
        score = score[score["seed_index"] == 0].assign(key=lambda f: f["value_arm"])
    elif len(metrics):
        first = sorted(metrics["metric"].unique())[0]
        score = paired_values(run.units, metrics, first, sink, run.baseline)
        score = score[score["seed_index"] == 0].assign(key=lambda f: f["delta"].abs())
    else:
        return sorted(units["prompt_id"].unique())[:n]
    score = score.dropna(subset=["key"]).sort_values(["key", "prompt_id"], ascending=[False, True])
    return score["prompt_id"].head(n).astype(int).tolist()


def _scores(run: "RunData", arm: str) -> dict[int, str]:
    """prompt_id → "LPIPS 2.13e-06 · ΔCLIP-T −0.0123" for seed_index 0 of ``arm`` (3 significant digits)."""
    from .stats import metric_kind, paired_values
    from .tables import fmt_value

    parts: dict[int, list[str]] = {}
    for metric in sorted(run.metrics["metric"].unique()):
        pair = metric_kind(run.metrics, metric, run.baseline) == "pair"
        v = paired_values(run.units, run.metrics, metric, arm, run.baseline)
        v = v[v["seed_index"] == 0]
        for pid, value in zip(v["prompt_id"], v["value_arm"] if pair else v["delta"]):
            if not np.isnan(value):
                parts.setdefault(int(pid), []).append(f"{'' if pair else 'Δ'}{display_name(metric)} {fmt_value(value)}")
    return {pid: "\n".join(p) for pid, p in parts.items()}


def difference_map(image: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Per-pixel |image − baseline| averaged over RGB, in 0–255 units."""
    return np.abs(image.astype(np.float64) - baseline.astype(np.float64)).mean(axis=-1)


def plot_qualitative(run: "RunData", sink: str, control: str | None, out_dir: Path, *, n: int = 5,
                     stem: str | None = None) -> Saved:  # fmt: skip
    """Panel: baseline | sink removed | its difference map | control | its difference map, rows chosen
    by :data:`QUALITATIVE_RULE`; metric values of seed 0 under each intervened image; the full prompt
    (wrapped) at the left of each row. Difference maps share one colour scale per row."""
    import textwrap

    rows = choose_qualitative_rows(run, sink, n)
    arms = [sink] + ([control] if control else [])
    titles = {sink: f"sink removed ({sink})", **({control: f"control ({control})"} if control else {})}
    scores = {arm: _scores(run, arm) for arm in arms}
    ncols = 1 + 2 * len(arms)
    fig = _figure(1.9 * ncols + 1.6, 2.1 * max(1, len(rows)) + 0.6)
    axes = np.atleast_2d(fig.subplots(max(1, len(rows)), ncols, squeeze=False))
    by_key = run.units.set_index(["prompt_id", "seed_index", "arm"])
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for r, pid in enumerate(rows):
        images = {}
        for arm in [run.baseline, *arms]:
            try:
                images[arm] = np.asarray(run.image(by_key.loc[(pid, 0, arm), "unit_id"]))
            except KeyError:
                images[arm] = None
        base = images[run.baseline]
        diffs = {a: difference_map(images[a], base) for a in arms if images[a] is not None and base is not None}
        vmax = max([float(d.max()) for d in diffs.values()] + [1.0])
        panels = [(run.baseline, "image")] + [(a, kind) for a in arms for kind in ("image", "diff")]
        for c, (arm, kind) in enumerate(panels):
            ax = axes[r, c]
            if images[arm] is None:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes, fontsize=7)
                continue
            if kind == "image":
                ax.imshow(images[arm])
                head = "baseline" if arm == run.baseline else titles[arm]
                label = (head + "\n" if r == 0 else "") + (scores[arm].get(pid, "") if arm != run.baseline else "")
            else:
                im = ax.imshow(diffs[arm], cmap="magma", vmin=0, vmax=vmax)
                label = ("|image − baseline|\n" if r == 0 else "") + f"mean {diffs[arm].mean():.3g}, max {diffs[arm].max():.3g}"
                if arm == arms[-1]:
                    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
            ax.set_title(label, fontsize=6.5)
        prompt = str(by_key.loc[(pid, 0, run.baseline), "prompt"]) if (pid, 0, run.baseline) in by_key.index else ""
        axes[r, 0].set_ylabel(textwrap.fill(f"p{pid}: {prompt}", 26), fontsize=6.5, rotation=0, ha="right", va="center")
    if not rows:
        axes[0, 0].text(0.5, 0.5, "no images", ha="center", va="center", transform=axes[0, 0].transAxes)
    fig.suptitle("Qualitative: seed 0; difference maps in 0–255 units, one colour scale per row", fontsize=9)
    return _save(fig, out_dir, stem or f"qualitative_{sink}", weights_stamp(run))


# ----------------------------------------------------------------------------- spatial sink maps
def plot_sink_heatmaps(maps, out_dir: Path, *, random: bool, stem: str = "sink_map_grid") -> Saved:
    """One heat map per (layer, step window): share of top-k key slots on each patch (rows × cols),
    averaged over prompts (``analysis.spatial.SinkMaps``); one colour scale for all panels."""
    layers = sorted(maps.modality["layer"].unique())
    nw = len(maps.windows)
    fig = _figure(2.0 * nw + 1.0, 1.9 * max(1, len(layers)) + 0.6)
    axes = np.atleast_2d(fig.subplots(max(1, len(layers)), nw, squeeze=False))
    vmax = max(float(maps.image["share"].max()) if len(maps.image) else 0.0, 1e-9)
    im = None
    for r, layer in enumerate(layers):
        for c, window in enumerate(maps.windows):
            ax = axes[r, c]
            im = ax.imshow(maps.grid(layer, window), cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
            image_share = maps.modality.query("layer == @layer and window == @window and modality == 'image'")["share"].sum()
            ax.set_title(f"layer {layer}, {window}\nimage keys {image_share:.0%} of slots", fontsize=7)
            ax.set_xticks(range(maps.cols)) if maps.cols <= 16 else None
            ax.set_yticks(range(maps.rows)) if maps.rows <= 16 else None
            ax.tick_params(labelsize=5)
    for ax in axes[:, 0]:
        ax.set_ylabel("patch row", fontsize=7)
    for ax in axes[-1, :]:
        ax.set_xlabel("patch column", fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=axes, fraction=0.03, pad=0.02, label="share of top-k slots")
    fig.suptitle(f"Top-k sink keys on the {maps.rows}×{maps.cols} patch grid (row × column), arm '{maps.arm}', "
                 f"mean over {maps.n_prompts} prompts", fontsize=9)  # fmt: skip
    return _save(fig, out_dir, stem, random)


def plot_sink_overlay(maps, image, out_dir: Path, *, random: bool, stem: str = "sink_map_overlay") -> Saved:
    """Per layer, the heat map (mean over step windows) laid over an image of the run."""
    layers = sorted(maps.modality["layer"].unique())
    fig = _figure(2.3 * max(1, len(layers)) + 0.8, 2.8)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(layers))))
    picture = np.asarray(image)
    h, w = picture.shape[:2]
    grids = {layer: np.mean([maps.grid(layer, win) for win in maps.windows], axis=0) for layer in layers}
    vmax = max([float(g.max()) for g in grids.values()] + [1e-9])
    im = None
    for ax, layer in zip(axes, layers):
        ax.imshow(picture)
        im = ax.imshow(grids[layer], cmap="inferno", alpha=0.6, vmin=0, vmax=vmax, extent=(0, w, h, 0),
                       interpolation="nearest")  # fmt: skip
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=list(axes), fraction=0.03, pad=0.02, label="share of top-k slots")
    fig.suptitle(f"Top-k sink keys over the image, arm '{maps.arm}' (mean over step windows and {maps.n_prompts} prompts)",
                 fontsize=9)  # fmt: skip
    return _save(fig, out_dir, stem, random)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.85, max(n, 1))]
