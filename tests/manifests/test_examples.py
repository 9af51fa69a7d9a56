"""The example sweeps (one per model family) run end to end, pass `orchestrate verify`, and analyse."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrate.cli import app

from manifests.models import MODEL_NOTES

# the toy-model examples (demo.yaml, toy_controls.yaml) have their own end-to-end tests:
# tests/orchestrate/test_cli.py (the demo) and tests/workers/test_toy_controls.py (the controls)
EXAMPLES = sorted(p for p in (Path(__file__).parents[2] / "manifests" / "examples").glob("*.yaml")
                  if yaml.safe_load(p.read_text())["model"].get("preset") not in MODEL_NOTES)
runner = CliRunner()
pytestmark = pytest.mark.slow


def test_every_tiny_family_has_an_example():
    models = {yaml.safe_load(p.read_text())["model"]["preset"] for p in EXAMPLES}
    assert {"tiny-sd3", "tiny-sd35", "tiny-sdxl", "tiny-flux", "tiny-pixart", "tiny-qwen-image", "tiny-z-image", "tiny-wan",
            "tiny-ltx-video"} <= models


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_verifies_and_analyses(path, tmp_path):
    data = yaml.safe_load(path.read_text())
    data["output_root"] = str(tmp_path / "runs")
    sweep = tmp_path / path.name
    sweep.write_text(yaml.safe_dump(data))
    verified = runner.invoke(app, ["verify", str(sweep), "--prompts", "1"])
    assert verified.exit_code == 0, verified.output
    assert "checks passed" in verified.output
    submitted = runner.invoke(app, ["submit", str(sweep)])
    assert submitted.exit_code == 0, submitted.output
    (run_dir,) = list((tmp_path / "runs").iterdir())
    analysed = runner.invoke(app, ["analyze", str(run_dir)])
    assert analysed.exit_code == 0, analysed.output
    assert "RANDOM WEIGHTS" in (run_dir / "report" / "summary.md").read_text()
