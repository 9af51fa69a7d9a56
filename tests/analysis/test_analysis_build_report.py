"""Figures, sink maps and the full report (Markdown and HTML) from a real run directory."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from analysis import build_report, load_run
from jobs.rundir import RunDir
from analysis import plots
from analysis.report import completeness
from analysis.spatial import sink_maps, step_windows
from analysis.stats import delta_delta_table

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(shared_run):
    """One full report of the shared run (built once: it draws every figure)."""
    path = build_report(shared_run, n_resamples=500, qualitative_rows=2)
    return path, path.read_text(), (path.parent / "report.html").read_text()


def test_sink_step_means_and_modality_fractions_match_pandas(shared_run):
    run = load_run(shared_run)
    got = plots.sink_step_means(run)
    steps = run.sink_steps.df(arm="base")
    ref = steps.groupby(["unit_id", "layer", "step"])[["max_mass", "entropy", "top5_conc"]].mean().reset_index()
    merged = got.merge(ref, on=["unit_id", "layer", "step"], suffixes=("", "_ref"))
    assert len(merged) == len(ref) == len(got)
    np.testing.assert_allclose(merged["max_mass"], merged["max_mass_ref"], rtol=1e-6)  # stored as float32
    # the same numbers when the big table was not loaded into pandas
    lazy = plots.sink_step_means(load_run(shared_run))
    pd.testing.assert_frame_equal(lazy, got)

    frac = plots.modality_fractions(run)
    top1 = steps.assign(mod=steps["topk_modality"].map(lambda x: x[0]))
    expected = top1.groupby("layer")["mod"].value_counts(normalize=True)
    for row in frac.itertuples():
        assert row.fraction == pytest.approx(expected.loc[(row.layer, row.modality)])


def test_sink_maps_place_top_k_keys_on_the_grid_and_average_over_prompts(shared_run):
    run = load_run(shared_run)
    maps = sink_maps(load_run(shared_run))
    assert (maps.rows, maps.cols) == (4, 4) and maps.n_prompts == 6 and maps.arm == "base"  # 64² / (8·2) per side
    steps = run.sink_steps.df(arm="base").explode(["topk_idx", "topk_modality"])
    window = step_windows(steps["step"].tolist())
    assert window == {0: "steps 0–1", 1: "steps 0–1", 2: "step 2", 3: "step 3"}
    steps["window"] = steps["step"].map(window)
    layer, win = 12, "steps 0–1"
    sub = steps[(steps["layer"] == layer) & (steps["window"] == win)]
    expected = np.zeros((4, 4))
    for _, g in sub.groupby("prompt_id"):  # per prompt: fraction of all top-k slots on each patch
        img = g[g["topk_modality"] == "image"]["topk_idx"].astype(int)
        np.add.at(expected, (img // 4, img % 4), 1.0 / len(g))
    expected /= sub["prompt_id"].nunique()
    np.testing.assert_allclose(maps.grid(layer, win), expected, rtol=1e-12)
    shares = maps.modality.groupby(["layer", "window"])["share"].sum()
    np.testing.assert_allclose(shares, 1.0)
    # text keys are named by the prompt's tokens: CLIP position 0 is the start token
    clip0 = maps.text[maps.text["token"].str.endswith("(clip 0)")]
    assert len(clip0) and clip0["token"].str.startswith("<|startoftext|>").all()
    assert maps.text["token"].str.contains(r"^\(empty T5 slot\) \(t5 \d+\)$").any()  # SD3 preset: no T5


class _Html(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.links, self.images, self.text, self._in_code = [], [], [], [], 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_code += tag == "code"
        attrs = dict(attrs)
        if tag == "a":
            self.links.append(attrs["href"])
        if tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        self._in_code -= tag == "code"

    def handle_data(self, data):
        if not self._in_code:
            self.text.append(data)


def _sections(text: str) -> list[str]:
    return re.findall(r"^## (.+)$", text, flags=re.M)


def test_report_markdown_structure(report, shared_run):
    path, text, _ = report
    root = shared_run / "report"
    assert "random-weight LPIPS backbone: numbers are not LPIPS" in text.split("## ")[0]
    assert _sections(text) == [
        "Headline: does removing the sinks matter more than removing random keys?", "Paired differences vs baseline (Δ)",
        "Sink vs control (ΔΔ), all columns", "Dose–response", "FID-shift", "Per GenEval tag", "Where the sinks are",
        "Sink dynamics and modality, every arm", "Qualitative panels",
    ]  # fmt: skip
    headline = text.split("## Headline")[1].split("\n## ")[0]
    assert "### LPIPS (random weights)" in headline
    head_row = next(ln for ln in headline.splitlines() if ln.startswith("| contrast"))
    for column in ("ΔΔ", "95% hull of the t- and bootstrap-t intervals", "p (Holm over all contrasts of the metric)", "verdict"):
        assert column in head_row
    assert headline.count("| sink_k") == 2 and "too few (n = 6 < 10)" in headline
    assert "Statistics: preset **project**" in headline
    links = re.findall(r"\]\(([^)]+)\)", text)
    for link in links:
        assert (root / link).is_file(), link
    for fig in ("sink_dynamics", "sink_modality", "sink_map_grid", "sink_map_overlay", "forest_delta_delta",
                "dose_response", "qualitative_sink_k1_vs_rand_k1", "qualitative_sink_k5_vs_rand_k5"):  # fmt: skip
        assert f"](figures/{fig}.png)" in text
        assert (root / "figures" / f"{fig}.png").read_bytes()[:4] == b"\x89PNG"
        assert (root / "figures" / f"{fig}.pdf").read_bytes()[:4] == b"%PDF"
    where = text.split("## Where the sinks are")[1].split("\n## ")[0]
    assert "| layer | window | image | clip | t5 | t5_pad |" in re.sub(r" +", " ", where)
    assert "<|startoftext|> (clip 0)" in where or "(empty T5 slot)" in where
    qual = text.split("## Qualitative panels")[1]
    assert "| row | prompt_id | prompt |" in re.sub(r" +", " ", qual) and "a photo of object number" in qual
    assert "All 2 shards finished" in text
    # the stored ΔΔ table is the statistics module's, with the same settings
    stored = pd.read_parquet(root / "tables" / "delta_delta.parquet")
    pd.testing.assert_frame_equal(stored, delta_delta_table(load_run(shared_run), n_resamples=500))
    assert "sink_k5 − rand_k5" in (root / "tables" / "delta_delta.md").read_text()
    assert r"\begin{tabular}" in (root / "tables" / "delta_delta.tex").read_text()
    assert r"\toprule" in (root / "tables" / "delta_delta.tex").read_text()


def test_report_html_is_the_markdown_rendered(report):
    _, text, html = report
    page = _Html()
    page.feed(html)
    assert page.tags.count("table") == len(re.findall(r"^\|[-:| ]+\|$", text, flags=re.M))  # one per Markdown table
    assert page.tags.count("h2") == len(_sections(text)) and "blockquote" in page.tags  # the banner
    assert set(page.images) == set(re.findall(r"!\[[^]]*\]\(([^)]+)\)", text))
    assert "tables/paired.parquet" in page.links and "figures/sink_map_grid.pdf" in page.links
    visible = "".join(page.text)
    assert "`" not in visible and "RANDOM WEIGHTS" in visible and "Δ sink" in visible


@pytest.mark.filterwarnings("ignore:.*have part files but no done marker")
def test_report_names_missing_and_failed_shards_and_the_commands(fake_run):
    run_dir = fake_run(n_prompts=6, n_seeds=1, prompts_per_shard=2, with_sink_steps=False, done_shards=[0])
    run_all = load_run(run_dir, only_done=False)
    run_all.units.assign(group_index=0).to_parquet(run_dir / "manifest.parquet")  # the shards the run planned
    RunDir(run_dir).write_marker("failed", 1, {"error": "CUDA out of memory\ntrace"})
    state = completeness(load_run(run_dir))
    assert state.expected_shards == [0, 1, 2] and state.failed == {1: "CUDA out of memory"} and state.unfinished == [2]
    assert state.excluded_units == 4 * 6 and state.excluded_prompts == [2, 3, 4, 5]
    text = build_report(run_dir, n_resamples=100).read_text()
    assert "**Incomplete run.** 1 of 3 shards finished." in text
    assert "Failed shards: 1 (`CUDA out of memory`)." in text and "not finished (never started, running or interrupted): 2" in text
    assert "They hold 24 images (4 prompts: 2, 3, 4, 5), which no table or figure below includes." in text
    assert f"orchestrate resume {run_dir}\norchestrate analyze {run_dir}\norchestrate report {run_dir}" in text
    assert "No top-k sink records" in text and "No sink records in this run" in text
    html = (run_dir / "report" / "report.html").read_text()
    assert f"<pre><code>orchestrate resume {run_dir}" in html


def test_qualitative_rows_follow_the_documented_rule(shared_run):
    run = load_run(shared_run)
    rows = plots.choose_qualitative_rows(run, "sink_k1", n=3)
    m = run.metrics[(run.metrics["arm"] == "sink_k1") & (run.metrics["seed_index"] == 0)]
    expected = m.sort_values(["value", "prompt_id"], ascending=[False, True])["prompt_id"].head(3).tolist()
    assert rows == expected
    scores = plots._scores(run, "sink_k1")
    value = m.set_index("prompt_id").loc[rows[0], "value"]
    assert scores[rows[0]] == f"LPIPS {value:.3g}"
    img = np.asarray(run.image(m.set_index("prompt_id").loc[rows[0], "unit_id"]))
    base = np.asarray(run.image(f"p{rows[0]:05d}-s000-base"))
    diff = plots.difference_map(img, base)
    assert diff.shape == img.shape[:2] and diff.max() > 0
    np.testing.assert_allclose(diff, np.abs(img.astype(float) - base.astype(float)).mean(-1))
