"""Command-line input: every check before anything is written, several sweeps at once, truthful exit codes."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from manifests import read_sweep_file
from manifests.schema import RESERVED_SBATCH_OPTIONS
from orchestrate.cli import app, executor_config
from tests.conftest import run_cli, tiny_sweep

runner = CliRunner()


def _flat(output: str) -> str:
    return " ".join(output.split())


def _runs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def test_executor_option_typo_is_refused_before_the_run_directory_exists(tmp_path):
    sweep = tiny_sweep(tmp_path)
    result = runner.invoke(app, ["submit", str(sweep), "-e", "slurm", "-o", "partion=a100"])
    assert result.exit_code == 2
    out = _flat(result.output)
    assert "--executor-opt partion='a100': unknown key 'partion'; did you mean 'partition'?" in out
    assert "valid keys here:" in out and "Extra inputs are not permitted" not in out
    assert _runs(tmp_path / "runs") == []


@pytest.mark.parametrize("options, expected", [
    (["-e", "slurmm"], "--executor 'slurmm': unknown executor; did you mean 'slurm'?"),
    (["-e", "slurm", "-o", "time=soon"], "--executor-opt time='soon': Input should be a valid integer"),
    (["-e", "slurm", "-o", "partition=gpu$(id)"], "--executor-opt partition='gpu$(id)': String should match pattern"),
    (["-e", "slurm", "-o", "sbatch_extra.array=0-3"], "--executor-opt sbatch_extra.array='0-3': --array is set by sinkscope itself"),
    (["-e", "ray", "-o", "num_gpus=.nan"], "--executor-opt num_gpus=nan: Input should be a finite number"),
    (["-o", "kind=slurm"], "choose the executor with --executor"),
    (["--set", "generation.stepz=2"], "generation.stepz: unknown key 'stepz'; did you mean 'steps'?"),
    (["--output-root", "/dev/null/x"], "--output-root: cannot create run directories under '/dev/null/x'"),
])
def test_every_cli_mistake_is_refused_before_anything_is_written(tmp_path, options, expected):
    sweep = tiny_sweep(tmp_path)
    result = runner.invoke(app, ["submit", str(sweep), *options])
    assert result.exit_code == 2, result.output
    assert expected in _flat(result.output)
    assert _runs(tmp_path / "runs") == []


def test_valid_executor_options_reach_the_config(tmp_path):
    sweep, _ = read_sweep_file(tiny_sweep(tmp_path))
    config = executor_config(sweep, "slurm", ["partition=gpu", "time=30", "sbatch_extra.exclusive=", "sbatch_extra.nice=10"])
    assert (config.partition, config.time, config.sbatch_extra) == ("gpu", 30, {"exclusive": "", "nice": "10"})


def test_the_executor_refuses_no_option_the_sweep_accepts():
    """The slurm executor's own reserved set is inside the schema's, so plan refuses everything submit would."""
    from orchestrate.executors.slurm import RESERVED_SBATCH

    assert set(RESERVED_SBATCH) <= set(RESERVED_SBATCH_OPTIONS)


def test_plan_over_several_files_reports_each_and_exits_2(tmp_path):
    good = tiny_sweep(tmp_path, name="good")
    bad = tiny_sweep(tmp_path, name="bad", generation={"guidance": float("inf")})
    result = runner.invoke(app, ["plan", str(good), str(bad)])
    assert result.exit_code == 2
    out = _flat(result.output)
    assert "good (" in out and "units" in out  # the valid one is planned
    assert f"{bad}: invalid sweep" in out and "generation.guidance: Input should be a finite number" in out
    assert "1 of 2 sweep files are invalid" in out
    assert runner.invoke(app, ["plan", str(good), str(good)]).exit_code == 0


def test_set_changes_the_planned_sweep(tmp_path):
    sweep = tiny_sweep(tmp_path)
    plain = _flat(runner.invoke(app, ["plan", str(sweep)]).output)
    changed = _flat(runner.invoke(app, ["plan", str(sweep), "--set", "generation.steps=3", "--set", "seeds.count=2"]).output)
    assert "2 steps" in plain and "3 steps" in changed and "× 2 seeds" in changed


def test_submit_of_several_files_writes_nothing_if_one_is_invalid(tmp_path):
    good = tiny_sweep(tmp_path, name="good")
    bad = tiny_sweep(tmp_path, name="bad", executor={"kind": "slurm", "sbatch_extra": {"output": "x.log"}})
    result = runner.invoke(app, ["submit", str(good), str(bad)])
    assert result.exit_code == 2
    out = _flat(result.output)
    assert "--output is set by sinkscope itself" in out and "nothing was submitted" in out
    assert _runs(tmp_path / "runs") == []


def test_status_over_several_runs_exits_2_for_one_that_is_not_a_run(tmp_path):
    result = runner.invoke(app, ["status", str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code == 2
    out = _flat(result.output)
    assert f"{tmp_path / 'a'}: not a sinkscope run directory" in out and f"{tmp_path / 'b'}: not a sinkscope run directory" in out


@pytest.mark.slow
def test_submit_several_sweeps_one_run_each_with_a_truthful_exit_code(tmp_path):
    """Two sweeps: one runs, one fails at model load (a CUDA device on a CPU-only machine); exit 1, both runs exist."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA so that the second sweep fails")
    good = tiny_sweep(tmp_path, name="good", prompts=1)
    data = yaml.safe_load(good.read_text())
    data["name"], data["model"]["device"] = "cudaless", "cuda"
    bad = tmp_path / "cudaless.yaml"
    bad.write_text(yaml.safe_dump(data))
    proc = run_cli("submit", str(good), str(bad), "--set", "generation.steps=1", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    runs = _runs(tmp_path / "runs")
    assert [r.name.rsplit("-", 1)[0] for r in runs] == ["cudaless", "good"]
    assert "2 runs: 1 submitted cleanly, 1 with errors" in _flat(proc.stdout)
    frozen = yaml.safe_load((runs[1] / "sweep.yaml").read_text())
    assert frozen["generation"]["steps"] == 1  # the override is part of the run
    status = runner.invoke(app, ["status", str(runs[0]), str(runs[1])])
    assert status.exit_code == 0, status.output
    out = _flat(status.output)
    assert "shards: 1 total: 1 failed" in out and "shards: 1 total: 1 done" in out  # one summary per run


def test_a_run_path_slurm_would_interpret_is_refused_before_it_exists(tmp_path):
    root = tmp_path / "my runs $(x)"
    result = runner.invoke(app, ["submit", str(tiny_sweep(tmp_path)), "-e", "slurm", "--output-root", str(root)])
    assert result.exit_code == 2
    assert "characters Slurm or a shell would interpret" in _flat(result.output)
    assert not root.exists()


def test_demo_refuses_an_output_root_it_cannot_create():
    result = runner.invoke(app, ["demo", "--output-root", "/dev/null/runs"])
    assert result.exit_code == 2
    assert "--output-root: cannot create run directories under '/dev/null/runs'" in _flat(result.output)
