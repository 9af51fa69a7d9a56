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

from ._io import SINK_STEPS_SCHEMA, read_table
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
    from scipy import stats as sps

    v = values[~np.isnan(values)]
    if v.size == 0:
        return (np.nan, np.nan, np.nan)
    mean = float(v.mean())
    if v.size < 2:
        return (mean, mean, mean)
    half = float(sps.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return (mean, mean - half, mean + half)


# ----------------------------------------------------------------------------- sink dynamics
DYNAMICS = (("max_mass", "max incoming mass"), ("entropy", "attention entropy (nats)"), ("top5_conc", "top-5 concentration"))


def _arm_sink_steps(run: "RunData", arm: str, cols: list[str]) -> pa.Table:
    """The given sink-step columns of one arm's finished units: from the loaded frame if ``load_run``
    kept it, else straight from the part files (only these columns), so large runs need not load it."""
    if len(run.sink_steps):
        table = pa.Table.from_pandas(run.sink_steps[cols], preserve_index=False)
    else:
        table = read_table(run.run_dir / "tables" / "sink_steps", SINK_STEPS_SCHEMA, columns=cols)
    table = table.filter(pc.equal(table["arm"], arm))
    if len(run.units):
        table = table.filter(pc.is_in(table["unit_id"], value_set=pa.array(run.units["unit_id"])))
    return table


def sink_step_means(run: "RunData", arm: str | None = None) -> pd.DataFrame:
    """Per (unit, layer, step): sink statistics averaged over heads and CFG branches.

    Read with pyarrow straight from the part files (only the needed columns), so it also
    works when ``load_run(..., sink_steps=False)`` skipped the large table.
    """
    table = _arm_sink_steps(run, arm or run.baseline, ["unit_id", "arm", "step", "layer", *[c for c, _ in DYNAMICS]])
    agg = table.group_by(["unit_id", "layer", "step"]).aggregate([(c, "mean") for c, _ in DYNAMICS])
    df = agg.to_pandas().rename(columns={f"{c}_mean": c for c, _ in DYNAMICS})
    return df.sort_values(["layer", "step", "unit_id"]).reset_index(drop=True)


def plot_sink_dynamics(run: "RunData", out_dir: Path, *, arm: str | None = None, stem: str = "sink_dynamics") -> Saved:
    """max_mass, entropy and top-5 concentration vs step, one line per layer, 95% t-bands across
    units (each unit first averaged over heads and CFG branches)."""
    from matplotlib.ticker import MaxNLocator

    arm = arm or run.baseline
    df = sink_step_means(run, arm)
    fig = _figure(12, 3.4)
    axes = fig.subplots(1, 3)
    if df.empty:
        for ax in axes:
            ax.text(0.5, 0.5, "no sink records", ha="center", va="center", transform=ax.transAxes)
    layers = sorted(df["layer"].unique())
    cmap = _colors(len(layers))
    for ax, (col, label) in zip(axes, DYNAMICS):
        for color, layer in zip(cmap, layers):
            sub = df[df["layer"] == layer]
            steps = sorted(sub["step"].unique())
            stats = np.array([_t_band(sub.loc[sub["step"] == s, col].to_numpy(dtype=float)) for s in steps])
            ax.plot(steps, stats[:, 0], color=color, label=f"layer {layer}", lw=1.5)
            ax.fill_between(steps, stats[:, 1], stats[:, 2], color=color, alpha=0.2, lw=0)
        ax.set_xlabel("denoising step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label, fontsize=10)
    if layers:
        axes[0].legend(fontsize=7, ncol=1 + len(layers) // 8)
    n_units = df["unit_id"].nunique()
    fig.suptitle(f"Sink dynamics, arm '{arm}' (n = {n_units} images; bands: 95% CI of the mean)", fontsize=10)
    return _save(fig, out_dir, stem, weights_stamp(run))


# ----------------------------------------------------------------------------- modality
def modality_fractions(run: "RunData", arm: str | None = None) -> pd.DataFrame:
    """Per layer: fraction of (step, head, branch, unit) records whose top-1 key has each modality."""
    table = _arm_sink_steps(run, arm or run.baseline, ["unit_id", "arm", "layer", "topk_modality"])
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


def plot_modality_fractions(run: "RunData", out_dir: Path, *, arm: str | None = None, stem: str = "sink_modality") -> Saved:
    """Stacked bars: which modality the top-1 sink key belongs to, per layer."""
    df = modality_fractions(run, arm)
    layers = sorted(df["layer"].unique())
    fig = _figure(max(4.0, 0.35 * len(layers) + 2), 3.4)
    ax = fig.subplots()
    bottom = np.zeros(len(layers))
    mods = [m for m in MODALITY_COLORS if m in set(df["modality"])] + sorted(set(df["modality"]) - set(MODALITY_COLORS))
    for mod in mods:
        frac = np.array([df.loc[(df["layer"] == l) & (df["modality"] == mod), "fraction"].sum() for l in layers])
        ax.bar([str(l) for l in layers], frac, bottom=bottom, label=mod, color=MODALITY_COLORS.get(mod))
        bottom += frac
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of top-1 sinks")
    ax.set_ylim(0, 1)
    if mods:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"Top-1 sink modality per layer, arm '{arm or run.baseline}'", fontsize=10)
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


def plot_qualitative(run: "RunData", sink: str, control: str | None, out_dir: Path, *, n: int = 5,
                     stem: str | None = None) -> Saved:  # fmt: skip
    """Panel: baseline | sink-removed | random-removed, rows chosen by :data:`QUALITATIVE_RULE`."""
    from .stats import paired_values

    rows = choose_qualitative_rows(run, sink, n)
    cols = [run.baseline, sink] + ([control] if control else [])
    titles = ["baseline", f"sink removed ({sink})"] + ([f"control ({control})"] if control else [])
    lp = {}
    if (run.metrics["metric"] == "lpips").any():
        for arm in cols[1:]:
            v = paired_values(run.units, run.metrics, "lpips", arm, run.baseline)
            lp[arm] = v[v["seed_index"] == 0].set_index("prompt_id")["value_arm"]
    fig = _figure(2.2 * len(cols), 2.3 * max(1, len(rows)) + 0.4)
    axes = np.atleast_2d(fig.subplots(max(1, len(rows)), len(cols), squeeze=False))
    by_key = run.units.set_index(["prompt_id", "seed_index", "arm"])
    for r, pid in enumerate(rows):
        for c, arm in enumerate(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            try:
                unit_id = by_key.loc[(pid, 0, arm), "unit_id"]
            except KeyError:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes)
                continue
            ax.imshow(np.asarray(run.image(unit_id)))
            label = titles[c] if r == 0 else ""
            if arm in lp and pid in lp[arm].index:
                label = (label + "\n" if label else "") + f"LPIPS {lp[arm].loc[pid]:.3f}"
            ax.set_title(label, fontsize=7)
            if c == 0:
                prompt = str(by_key.loc[(pid, 0, arm), "prompt"] or "")
                ax.set_ylabel(f"p{pid}: {prompt[:28]}", fontsize=6)
    if not rows:
        axes[0, 0].text(0.5, 0.5, "no images", ha="center", va="center", transform=axes[0, 0].transAxes)
    return _save(fig, out_dir, stem or f"qualitative_{sink}", weights_stamp(run))


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.85, max(n, 1))]
