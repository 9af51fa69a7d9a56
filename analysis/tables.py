"""Formatting of result tables: display frames, Markdown (pandas + tabulate) and LaTeX (pandas Styler).

Every display table says how its intervals were computed and which p-values are adjusted, over
which family, and on which side: a column header never just says "p".
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ._io import write_parquet_atomic, write_text_atomic

DISPLAY_NAMES = {
    "lpips": "LPIPS",
    "clip_t": "CLIP-T",
    "imagereward": "ImageReward",
    "hpsv2": "HPS v2",
    "fid_shift": "FID",
    "toy_geneval": "toy-GenEval",
}

# Holm families in words, per table kind (stats.StatsSettings.holm_family and the fixed families).
FAMILY_WORDS = {
    ("paired", "metric"): "Holm over all arms of the metric",
    ("paired", "k"): "Holm over the arms of the metric at the same k",
    ("delta_delta", "metric"): "Holm over all contrasts of the metric",
    ("delta_delta", "k"): "Holm over the contrasts of the metric at the same k",
    ("dose", "series"): "Holm over the steps of the series",
    ("tags", "tags"): "Holm over the tags of the (metric, arm)",
}


def display_name(metric: str) -> str:
    return DISPLAY_NAMES.get(metric, metric)


def _missing(x: object) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt_num(x: float, digits: int = 4) -> str:
    """Signed fixed-point; scientific below 10^-(digits-1) so small effects never print as +0.0000;
    '—' for missing."""
    if _missing(x):
        return "—"
    if x != 0 and abs(x) < 10.0 ** (-digits + 1):
        return f"{x:+.{max(1, digits - 2)}e}"
    return f"{x:+.{digits}f}"


def fmt_value(x: float, digits: int = 3) -> str:
    """A metric value with ``digits`` significant digits: 0.0205, 2.13e-06, 0.312 (never 0.000 for a nonzero value)."""
    if _missing(x):
        return "—"
    return f"{x:.{digits}g}"


def fmt_plain(x: float, digits: int = 4) -> str:
    if _missing(x):
        return "—"
    return f"{x:.{digits}f}"


def fmt_p(p: float) -> str:
    """p to 4 decimals, or '<1e-4' below that."""
    if _missing(p):
        return "—"
    return "<1e-4" if p < 1e-4 else f"{p:.4f}"


def fmt_ci(lo: float, hi: float, digits: int = 4, method: str = "") -> str:
    """'[lo, hi]'; the method's note ("too few (n < 10)", "constant Δ") where there is no interval."""
    if method.startswith("too few"):
        return method
    if _missing(lo) or _missing(hi):
        return "—"
    return f"[{fmt_num(lo, digits)}, {fmt_num(hi, digits)}]"


def interval_header(table: pd.DataFrame) -> str:
    """Interval column header naming the method, e.g. '95% t-interval' or
    '95% percentile bootstrap (1,000 resamples of prompts, seed 42)'."""
    if table.empty:
        return "95% CI"
    from .stats import interval_description

    row = table.iloc[0]
    return interval_description(str(row["interval"]), int(row["n_resamples"]), int(row["bootstrap_seed"]),
                                float(row["confidence"]), str(row["level"]))  # fmt: skip


def side_words(alternative: str, symbol: str = "Δ") -> str:
    """'2-sided' or '1-sided, Δ < 0' / '1-sided, Δ > 0'."""
    return {"two-sided": "2-sided", "less": f"1-sided, {symbol} < 0", "greater": f"1-sided, {symbol} > 0"}[alternative]


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of the (already formatted) frame."""
    safe = df.map(lambda v: str(v).replace("|", "\\|").replace("\n", " "))
    return safe.to_markdown(index=False, disable_numparse=True) + "\n"


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "Δ": r"$\Delta$", "−": "-", "—": "--", "<": r"$<$", ">": r"$>$", "≥": r"$\geq$", "×": r"$\times$",
}  # fmt: skip


def latex_escape(text: object) -> str:
    """LaTeX-safe text, including the Unicode symbols the tables use (pandas' escape leaves those)."""
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(df: pd.DataFrame, caption: str | None = None, label: str | None = None) -> str:
    """A booktabs ``table`` environment of the (already formatted) frame, through pandas' Styler."""
    escaped = df.map(latex_escape)
    escaped.columns = [latex_escape(c) for c in df.columns]
    styler = escaped.style.hide(axis="index")
    return styler.to_latex(hrules=True, caption=latex_escape(caption) if caption else None, label=label,
                           position="t", position_float="centering", column_format="l" * len(df.columns))  # fmt: skip


def save_table(
    raw: pd.DataFrame, display: pd.DataFrame, folder: Path, stem: str, caption: str | None = None
) -> dict[str, Path]:
    """Write ``stem.parquet`` (raw numbers), ``stem.md`` and ``stem.tex`` (formatted)."""
    folder = Path(folder)
    paths = {
        "parquet": write_parquet_atomic(raw, folder / f"{stem}.parquet"),
        "md": write_text_atomic(to_markdown(display), folder / f"{stem}.md"),
        "tex": write_text_atomic(to_latex(display, caption, f"tab:{stem}"), folder / f"{stem}.tex"),
    }
    return paths


def _metric_labels(table: pd.DataFrame) -> list[str]:
    return [display_name(m) + (" (random weights)" if rw else "") for m, rw in zip(table["metric"], table["random_weights"])]


def _n(table: pd.DataFrame) -> list[str]:
    return [f"{n}" + (f" (−{k} incomplete)" if k else "") for n, k in zip(table["n"], table["n_dropped"])]


def _ci(table: pd.DataFrame) -> list[str]:
    return [fmt_ci(lo, hi, method=m) for lo, hi, m in zip(table["ci_low"], table["ci_high"], table["ci_method"])]


def _family(table: pd.DataFrame, kind: str) -> str:
    return FAMILY_WORDS[(kind, str(table["holm_family"].iloc[0]))] if len(table) else "Holm"


def _decision(table: pd.DataFrame, kind: str, symbol: str) -> dict[str, list[str]]:
    """The decision test's columns: its side, unadjusted p, adjusted p of the declared family (named in
    the header, used by the verdict), the other family's adjusted p where there is one, verdict."""
    out = {
        "test": [f"t, {side_words(a, symbol)}" for a in table["alternative"]],
        "p (unadjusted)": [fmt_p(p) for p in table["p_unadj"]],
        f"p ({_family(table, kind)}; verdict)": [fmt_p(p) for p in table["p_adj"]],
    }
    declared = str(table["holm_family"].iloc[0]) if len(table) else ""
    for family in ("metric", "k"):
        if family != declared and f"p_holm_{family}" in table.columns:
            out[f"p ({FAMILY_WORDS[(kind, family)]})"] = [fmt_p(p) for p in table[f"p_holm_{family}"]]
    out["verdict"] = list(table["verdict"])
    return out


def format_paired(table: pd.DataFrame) -> pd.DataFrame:
    """Display form of :func:`analysis.stats.paired_table`."""
    out = {
        "arm": table["arm"], "metric": _metric_labels(table), "n": _n(table),
        "mean Δ": [fmt_num(v) for v in table["mean"]], interval_header(table): _ci(table),
        "Wilcoxon p (2-sided, unadjusted)": [fmt_p(p) for p in table["p_wilcoxon_two_sided"]],
        "d_z": [fmt_plain(v, 3) for v in table["dz"]],
        **_decision(table, "paired", "Δ"),
    }  # fmt: skip
    return pd.DataFrame(out)


def format_delta_delta(table: pd.DataFrame) -> pd.DataFrame:
    """Display form of :func:`analysis.stats.delta_delta_table` (Δ sink − Δ control = ΔΔ on the same pairs)."""
    out = {
        "metric": _metric_labels(table),
        "sink − control": [f"{s} − {c}" for s, c in zip(table["sink"], table["control"])],
        "k": [("" if pd.isna(k) else str(int(k))) for k in table["k"]],
        "n": _n(table),
        "Δ sink": [fmt_num(v) for v in table["mean_delta_sink"]],
        "Δ control": [fmt_num(v) for v in table["mean_delta_control"]],
        "ΔΔ": [fmt_num(v) for v in table["mean"]],
        interval_header(table): _ci(table),
        "t p (2-sided, unadjusted)": [fmt_p(p) for p in table["p_t_two_sided"]],
        "Wilcoxon p (same side as test, unadjusted)": [
            fmt_p(row[f"p_wilcoxon_{row['alternative'].replace('-', '_')}"]) for _, row in table.iterrows()],
        **_decision(table, "delta_delta", "ΔΔ"),
    }  # fmt: skip
    return pd.DataFrame(out)


def format_dose(table: pd.DataFrame) -> pd.DataFrame:
    """Display form of :func:`analysis.stats.dose_table`."""
    out = {
        "metric": _metric_labels(table),
        "trend": [f"{s}({hi}) − {s}({lo})" for s, lo, hi in zip(table["statistic"], table["arm_lo"], table["arm_hi"])],
        "n": _n(table),
        "mean": [fmt_num(v) for v in table["mean"]],
        interval_header(table): _ci(table),
        "t p (2-sided, unadjusted)": [fmt_p(p) for p in table["p_t_two_sided"]],
        **_decision(table, "dose", "trend"),
    }  # fmt: skip
    return pd.DataFrame(out)


def format_tags(table: pd.DataFrame) -> pd.DataFrame:
    """Display form of :func:`analysis.stats.tag_table`."""
    out = {
        "metric": _metric_labels(table), "arm": table["arm"], "tag": table["tag"], "n": _n(table),
        "mean Δ": [fmt_num(v) for v in table["mean"]], interval_header(table): _ci(table),
        **_decision(table, "tags", "Δ"),
    }  # fmt: skip
    return pd.DataFrame(out)


def format_set_metrics(table: pd.DataFrame) -> pd.DataFrame:
    """Display form of the set-metric table (FID-shift and its calibration)."""
    return pd.DataFrame(
        {
            "metric": _metric_labels(table),
            "mode": table["mode"],
            "set": table["arm"],
            "reference": table["reference"],
            "n": table["n"].astype(str),
            "value": [fmt_plain(v, 3) for v in table["value"]],
        }
    )
