"""The CLI as a user meets it: help texts, early errors, the demo end to end."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrate.cli import app
from tests.conftest import run_cli

runner = CliRunner()
COMMANDS = ["plan", "submit", "verify", "status", "resume", "cancel", "logs", "compact", "analyze", "report", "demo"]
MALFORMED = Path(__file__).parents[1] / "manifests" / "malformed"


def test_top_level_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_plan_rejects_a_bad_sweep_with_file_and_key():
    path = MALFORMED / "layer_outside_model.yaml"
    result = runner.invoke(app, ["plan", str(path)])
    assert result.exit_code == 2
    flat = " ".join(result.output.split())
    assert "layer_outside_model.yaml" in flat and "layers" in flat and "outside the model" in flat


def test_status_of_a_folder_that_is_not_a_run(tmp_path):
    result = runner.invoke(app, ["status", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a sinkscope run directory" in " ".join(result.output.split())


def test_report_rejects_an_unknown_statistics_preset(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path), "--statistics", "papr"])
    assert result.exit_code == 2
    assert "--statistics: unknown preset 'papr'; expected one of project, paper" in " ".join(result.output.split())


def test_executor_override_is_validated(tmp_path, sweep_factory):
    result = runner.invoke(app, ["submit", str(sweep_factory()), "-e", "slurm", "-o", "time=soon"])
    assert result.exit_code == 2
    assert "--executor-opt time='soon': Input should be a valid integer" in " ".join(result.output.split())


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    import analysis

    proc = run_cli("demo", "--output-root", str(tmp_path))
    out = " ".join(proc.stdout.split())
    assert "toy model trained on synthetic shapes: not SD3" in out
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    data = analysis.load_run(run_dir)
    assert len(data.units) == 6 * 1 * 3
    assert set(data.units.arm) == {"baseline", "sink_k1", "random_k1"}
    assert set(data.units.model) == {"toy-sd3"} and not data.units.random_weights.any()  # trained, not random
    assert set(data.metrics.metric) == {"lpips", "toy_geneval"}
    assert len(data.sink_steps) == 6 * 3 * 8 * 6 * 4 * 2  # units × steps × layers × heads × branches
    assert not list((run_dir / "tables" / "sink_steps").glob("part-*.parquet"))  # analyze compacted the parts
    summary = (run_dir / "report" / "summary.md").read_text()
    assert "RANDOM WEIGHTS" in summary  # LPIPS's backbone is random in the offline demo, and says so
    assert "not SD3" in summary and "sink_k1" in summary and "toy-GenEval" in summary
    assert str(run_dir / "tables") in out and str(run_dir / "images") in out
    # the report: headline first, spatial sink maps, every arm, qualitative grids; HTML rendered from the Markdown
    report = (run_dir / "report" / "report.md").read_text()
    sections = ["## Headline", "## Paired differences", "## Where the sinks are", "## Sink dynamics and modality, every arm",
                "## Qualitative panels"]  # fmt: skip
    assert [report.index(s) for s in sections] == sorted(report.index(s) for s in sections)
    assert "### LPIPS (random weights)" in report and "| sink_k1 − random_k1 " in report
    for figure in ("sink_map_grid", "sink_map_overlay", "sink_dynamics", "sink_modality", "qualitative_sink_k1_vs_random_k1"):
        assert f"](figures/{figure}.png)" in report and (run_dir / "report" / "figures" / f"{figure}.png").is_file()
    html = (run_dir / "report" / "report.html").read_text()
    assert "<h2>Where the sinks are</h2>" in html and '<img src="figures/sink_map_grid.png"' in html
    assert '<a href="tables/paired.parquet">' in html and "<table>" in html


@pytest.mark.slow
def test_verify_passes_on_the_tiny_sd3_example():
    demo = Path(__file__).parents[2] / "manifests" / "examples" / "sd3_tiny.yaml"
    proc = run_cli("verify", str(demo), "--prompts", "1")
    out = " ".join(proc.stdout.split())
    assert "all 11 checks passed" in out
    for check in ("noop", "selection", "output", "mass_after", "scope"):
        assert check in out


def test_the_readme_sweep_is_valid(tmp_path):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "readme.yaml"
    path.write_text(block)
    result = runner.invoke(app, ["plan", str(path)])
    assert result.exit_code == 0, result.output
    assert "553 prompts" in " ".join(result.output.split())
