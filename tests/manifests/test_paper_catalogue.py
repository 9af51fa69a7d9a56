"""Every sweep of the paper catalogue validates, and a shrunken copy of each runs end to end."""

from pathlib import Path

import pytest
from shrunken import submit_shrunken
from typer.testing import CliRunner

from orchestrate.cli import app

CATALOGUE = sorted((Path(__file__).parents[2] / "manifests" / "paper").glob("*.yaml"))
runner = CliRunner()


def test_catalogue_covers_the_paper():
    names = {p.name for p in CATALOGUE}
    for expected in ("table2_a1.yaml", "table2_a1_fixed.yaml", "table5_sdxl_cross.yaml", "table6_7_k1.yaml",
                     "table13_phase.yaml", "table13_phase_fixed.yaml", "table19_k_sweep.yaml", "table20_hps_dose.yaml",
                     "fig2_dynamics.yaml", "table17_noop.yaml", "table9_18_fid_baseline_a.yaml"):
        assert expected in names
    readme = (CATALOGUE[0].parent / "README.md").read_text()
    assert all(p.name in readme for p in CATALOGUE)


@pytest.mark.parametrize("path", CATALOGUE, ids=[p.stem for p in CATALOGUE])
def test_plan_accepts_every_sweep(path):
    result = runner.invoke(app, ["plan", str(path)])
    assert result.exit_code == 0, result.output
    assert "units" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("path", CATALOGUE, ids=[p.stem for p in CATALOGUE])
def test_shrunken_copy_runs_end_to_end(path, tmp_path):
    submit_shrunken(path, tmp_path)  # skips, with shrink's reason, a family without a tiny model
