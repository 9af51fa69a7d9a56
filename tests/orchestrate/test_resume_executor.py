"""Which executor `orchestrate resume` goes back to: the latest accepted submission's, never a refused one's."""

from __future__ import annotations

from jobs.rundir import RunDir
from orchestrate.cli import recorded_executor

SLURM = {"kind": "slurm", "partition": "gpu", "time": 120}


def _run(tmp_path, *records: dict) -> RunDir:
    run = RunDir(tmp_path / "run")
    for record in records:
        run.append_submission(record)
    return run


def test_no_submission_means_none(tmp_path):
    assert recorded_executor(_run(tmp_path)) is None


def test_latest_accepted_submission_wins_and_refused_attempts_are_skipped(tmp_path):
    run = _run(
        tmp_path,
        {"event": "submit", "executor": "local", "config": {"kind": "local"}, "attempt": "a"},
        {"event": "submit", "executor": "slurm", "config": SLURM, "attempt": "b"},
        {"event": "array", "executor": "slurm", "shards": [0], "job_ids": {"0": "7_0"}},
        # a blocking executor writes its submit event first; the refusal of the same attempt cancels it
        {"event": "submit", "executor": "ray", "config": {"kind": "ray", "address": "local", "num_gpus": 1}, "attempt": "c"},
        {"event": "refused", "executor": "ray", "shards": [1], "message": "no GPU", "attempt": "c"},
        # metric jobs are not generation submissions
        {"event": "submit", "executor": "ray", "config": {"kind": "ray"}, "task": "metrics", "attempt": "d"},
    )
    assert recorded_executor(run) == SLURM


def test_partially_queued_slurm_submission_counts(tmp_path):
    run = _run(
        tmp_path,
        {"event": "submit", "executor": "slurm", "config": SLURM, "attempt": "e-partial", "shards": [0]},
        {"event": "refused", "executor": "slurm", "shards": [1], "message": "sbatch: error", "attempt": "e"},
    )
    assert recorded_executor(run) == SLURM
