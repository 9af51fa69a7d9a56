"""The atlas sweeps validate, and shrunken copies (tiny random models) run end to end into `orchestrate atlas`."""

from pathlib import Path

import pytest
from shrunken import submit_shrunken
from typer.testing import CliRunner

from manifests import read_sweep_file
from orchestrate.cli import app

ATLAS = sorted((Path(__file__).parents[2] / "manifests" / "atlas").glob("*.yaml"))
runner = CliRunner()


def test_atlas_sweeps_share_prompts_and_recording():
    sweeps = [read_sweep_file(p)[0] for p in ATLAS]
    assert {s.model.geometry().family for s in sweeps} == {"sd3", "sdxl", "flux", "pixart", "qwen_image", "z_image", "wan", "ltx"}
    assert len({(s.prompts, s.seeds, s.generation.steps) for s in sweeps}) == 1
    for s in sweeps:
        assert "ratio" in s.recording.stats and "mass" in s.recording.stats and s.recording.layers
    assert all(p.name in (ATLAS[0].parent / "README.md").read_text() for p in ATLAS)


@pytest.mark.slow
def test_shrunken_atlas_runs_and_draws(tmp_path):
    for path in ATLAS:
        submit_shrunken(path, tmp_path, prompts=1)  # one unit per model keeps CI cheap; test_analysis_atlas counts sinks
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == len(ATLAS)
    result = runner.invoke(app, ["atlas", *map(str, runs), "--out", str(tmp_path / "atlas")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "atlas" / "atlas.md").read_text()
    assert "RANDOM WEIGHTS" in text and (tmp_path / "atlas" / "atlas.png").is_file()
    assert sum(line.startswith("| tiny-") for line in text.splitlines()) == len(ATLAS)
    numbers = (tmp_path / "atlas" / "atlas.csv").read_text().splitlines()
    assert numbers[0] == "model,measure,layer,step,value" and len(numbers) > len(ATLAS)
