"""Formatting of result tables as Markdown and LaTeX (no tabulate/jinja dependency)."""

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


def display_name(metric: str) -> str:
    return DISPLAY_NAMES.get(metric, metric)


def fmt_num(x: float, digits: int = 4) -> str:
    """Signed fixed-point for deltas; scientific below 10^-digits so small effects never print
    as +0.0000; '—' for missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if x != 0 and abs(x) < 10.0 ** (-digits + 1):
        return f"{x:+.{max(1, digits - 2)}e}"
    return f"{x:+.{digits}f}"


def fmt_plain(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}f}"


def fmt_p(p: float) -> str:
    """p to 4 decimals, or '<1e-4' below that (the resolution of 10,000 resamples)."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "—"
    return "<1e-4" if p < 1e-4 else f"{p:.4f}"


def fmt_ci(lo: float, hi: float, digits: int = 4) -> str:
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (lo, hi)):
        return "—"
    return f"[{fmt_num(lo, digits)}, {fmt_num(hi, digits)}]"


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of the (already formatted) frame."""
    cols = [str(c) for c in df.columns]

    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "Δ": r"$\Delta$", "−": "-", "—": "--", "<": r"$<$", ">": r"$>$",
}  # fmt: skip


def latex_escape(text: object) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(df: pd.DataFrame, caption: str | None = None, label: str | None = None) -> str:
    """A booktabs ``table`` environment of the (already formatted) frame."""
    spec = "l" * len(df.columns)
    out = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    out.append(" & ".join(latex_escape(c) for c in df.columns) + r" \\")
    out.append(r"\midrule")
    for row in df.itertuples(index=False):
        out.append(" & ".join(latex_escape(v) for v in row) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        out.append(rf"\caption{{{latex_escape(caption)}}}")
    if label:
        out.append(rf"\label{{{label}}}")
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


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


def format_paired(table: pd.DataFrame) -> pd.DataFrame:
    """Display form of :func:`analysis.stats.paired_table`."""
    return pd.DataFrame(
        {
            "arm": table["arm"],
            "metric": [display_name(m) + (" (random weights)" if rw else "") for m, rw in
                       zip(table["metric"], table["random_weights"])],
            "n": [f"{n}" + (f" (−{k} NaN)" if k else "") for n, k in zip(table["n"], table["n_dropped"])],
            "mean Δ": [fmt_num(v) for v in table["mean"]],
            "95% CI": [fmt_ci(lo, hi) for lo, hi in zip(table["ci_low"], table["ci_high"])],
            "t p-value": [fmt_p(p) for p in table["p_t"]],
            "Wilcoxon p": [fmt_p(p) for p in table["p_wilcoxon"]],
            "d_z": [fmt_plain(v, 3) for v in table["dz"]],
            "Holm p (t)": [fmt_p(p) for p in table["p_t_holm"]],
        }
    )  # fmt: skip


def _metric_labels(table: pd.DataFrame) -> list[str]:
    return [display_name(m) + (" (random weights)" if rw else "") for m, rw in zip(table["metric"], table["random_weights"])]


def format_delta_delta(table: pd.DataFrame) -> pd.DataFrame:
    """Display form of :func:`analysis.stats.delta_delta_table`."""
    return pd.DataFrame(
        {
            "metric": _metric_labels(table),
            "sink − control": [f"{s} − {c}" for s, c in zip(table["sink"], table["control"])],
            "k": [("" if pd.isna(k) else str(int(k))) for k in table["k"]],
            "n": [f"{n}" + (f" (−{k} NaN)" if k else "") for n, k in zip(table["n"], table["n_dropped"])],
            "Δ sink": [fmt_num(v) for v in table["mean_delta_sink"]],
            "Δ control": [fmt_num(v) for v in table["mean_delta_control"]],
            "ΔΔ": [fmt_num(v) for v in table["mean"]],
            "95% CI": [fmt_ci(lo, hi) for lo, hi in zip(table["ci_low"], table["ci_high"])],
            "t p (2-sided)": [fmt_p(p) for p in table["p_t"]],
            "t p (1-sided)": [fmt_p(p) + (f" ({e})" if e else "") for p, e in zip(table["p_t_expected"], table["expected"])],
            "Wilcoxon p (1-sided)": [fmt_p(p) for p in table["p_wilcoxon_expected"]],
            "Holm p (1-sided t)": [fmt_p(p) for p in table["p_t_expected_holm"]],
            "sink-specific": ["yes" if s else "no" for s in table["sink_specific"]],
        }
    )  # fmt: skip


def format_dose(table: pd.DataFrame) -> pd.DataFrame:
    """Display form of :func:`analysis.stats.dose_table`."""
    return pd.DataFrame(
        {
            "metric": _metric_labels(table),
            "trend": [f"{s}({hi}) − {s}({lo})" for s, lo, hi in zip(table["statistic"], table["arm_lo"], table["arm_hi"])],
            "n": table["n"].astype(str),
            "mean": [fmt_num(v) for v in table["mean"]],
            "95% CI": [fmt_ci(lo, hi) for lo, hi in zip(table["ci_low"], table["ci_high"])],
            "t p (1-sided)": [fmt_p(p) + (f" ({e})" if e else "") for p, e in zip(table["p_t_expected"], table["expected"])],
            "t p (2-sided)": [fmt_p(p) for p in table["p_t"]],
            "Wilcoxon p (1-sided)": [fmt_p(p) for p in table["p_wilcoxon_expected"]],
            "significant": ["yes" if s else "no" for s in table["significant"]],
        }
    )  # fmt: skip


def format_tags(table: pd.DataFrame) -> pd.DataFrame:
    """Display form of :func:`analysis.stats.tag_table`."""
    return pd.DataFrame(
        {
            "metric": _metric_labels(table),
            "arm": table["arm"],
            "tag": table["tag"],
            "n": table["n"].astype(str),
            "mean Δ": [fmt_num(v) for v in table["mean"]],
            "95% CI": [fmt_ci(lo, hi) for lo, hi in zip(table["ci_low"], table["ci_high"])],
            "t p-value": [fmt_p(p) for p in table["p_t"]],
            "Holm p (t)": [fmt_p(p) for p in table["p_t_holm"]],
        }
    )


def format_set_metrics(table: pd.DataFrame) -> pd.DataFrame:
    """Display form of the set-metric table (FID-shift and its calibration)."""
    return pd.DataFrame(
        {
            "metric": [display_name(m) + (" (random weights)" if rw else "") for m, rw in
                       zip(table["metric"], table["random_weights"])],
            "mode": table["mode"],
            "set": table["arm"],
            "reference": table["reference"],
            "n": table["n"].astype(str),
            "value": [fmt_plain(v, 3) for v in table["value"]],
        }
    )  # fmt: skip
