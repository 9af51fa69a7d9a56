"""Submit a shrunken copy of a catalogue sweep (tiny random model, 2 prompts, 2 steps): the paper and atlas catalogues."""

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from manifests import parse_sweep, read_sweep_file
from manifests.shrink import shrink
from orchestrate.cli import app


def submit_shrunken(path: Path, tmp_path: Path, prompts: int = 2) -> None:
    """Shrink `path`, write it under `tmp_path` (runs in tmp_path/runs) and submit it; the test is skipped when the
    family has no tiny model (with shrink's reason) and fails when the copy is invalid or does not finish."""
    sweep, raw = read_sweep_file(path)
    geometry = sweep.model.geometry()
    try:
        small = shrink(raw, geometry.family, geometry.num_layers, prompts=prompts)
    except ValueError as error:
        pytest.skip(str(error))
    small["output_root"] = str(tmp_path / "runs")
    parse_sweep(small)
    file = tmp_path / path.name
    file.write_text(yaml.safe_dump(small))
    result = CliRunner().invoke(app, ["submit", str(file)])
    assert result.exit_code == 0, result.output
    assert re.search(r"\b1 done\b", result.output), result.output  # "shards: 1 done" / "shards: 1 total: 1 done"
