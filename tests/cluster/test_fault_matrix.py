"""Cells of the fault matrix (docs/cluster.md) that the executor-specific files do not cover: a full disk on
each executor (a real 48 MiB tmpfs, filled by the fill_disk fault hook until the kernel answers ENOSPC), a
refused submission, and resume going back to the executor recorded at submission. Every cell ends with the
uninterrupted reference's rows, no duplicate, identical pixels, and no temporary file left behind.
"""

from __future__ import annotations

import json

import pytest

from jobs.rundir import RunDir
from tests.cluster.conftest import (
    RAY_ENV, REF_PROMPTS, assert_same_as_reference, cluster_sweep, executor_of, free_disk, only_run, slurm_block,
    submission_records, temp_files, wait_done, wait_for,
)
from tests.conftest import run_cli

pytestmark = pytest.mark.slow
FILL = {"SINKSCOPE_FAULT_INJECT": "fill_disk_after_groups:1"}  # the second group's first write meets ENOSPC


def _summary(stdout: str) -> str:
    return [line for line in stdout.splitlines() if line.startswith("shards:")][-1]


def _wait_failed(run: RunDir) -> None:
    """The failed marker is written before the job's process exits: wait for the scheduler to agree."""
    wait_for(lambda: run.failed_shards() == {0} and executor_of(run).scheduler_states(run).get(0) == "failed", 240,
             "the shard to fail on the full disk", run)


def _assert_failed_for_disk_full(run: RunDir) -> dict:
    failed = run.read_marker("failed", 0)
    assert failed is not None and failed["cause"].startswith("ENOSPC"), failed
    assert "No space left on device" in failed["error"]
    status = run_cli("status", str(run.root)).stdout
    assert "1 failed" in _summary(status) and "No space left" in status, status
    return failed


def _resume_and_compare(run: RunDir, reference, mount, env=None) -> None:
    free_disk(mount)
    resumed = run_cli("resume", str(run.root), env=env)
    assert not temp_files(run) or "temporary file" in resumed.stdout, resumed.stdout
    wait_done(run, timeout=240)
    assert not temp_files(run), temp_files(run)
    assert_same_as_reference(run, reference)


def test_local_disk_full(small_fs, reference):
    sweep = cluster_sweep(small_fs, "fulllocal", ids=REF_PROMPTS[:2], per_shard=2)
    proc = run_cli("submit", str(sweep), env=FILL, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "shard 0" in proc.stdout and "No space left on device" in proc.stdout, proc.stdout
    assert "1 failed" in _summary(proc.stdout), proc.stdout  # the final state, not "running"
    run = only_run(small_fs / "runs")
    _assert_failed_for_disk_full(run)
    _resume_and_compare(run, reference, small_fs)


@pytest.mark.slurm
def test_slurm_disk_full_refused_resubmission_then_resume_to_slurm(slurm_cluster, small_fs, reference):
    sweep = cluster_sweep(small_fs, "fullslurm", ids=REF_PROMPTS[:2], per_shard=2, executor=slurm_block(slurm_cluster))
    run_cli("submit", str(sweep), env=FILL)
    run = only_run(small_fs / "runs")
    _wait_failed(run)
    failed = _assert_failed_for_disk_full(run)
    free_disk(small_fs)
    # sbatch refuses an unknown GRES: nothing about the shard may change, the refusal is recorded
    arrays = len(submission_records(run, "slurm", "array"))
    refused = run_cli("resume", str(run.root), "-o", "sbatch_extra={gres: 'nonsense:1'}", check=False)
    assert refused.returncode != 0 and "refused" in refused.stdout, refused.stdout
    assert run.read_marker("failed", 0) == failed
    (event,) = submission_records(run, "slurm", "refused")
    assert event["shards"] == [0] and "gres" in event["message"].lower(), event
    assert len(submission_records(run, "slurm", "array")) == arrays
    assert "1 failed" in _summary(run_cli("status", str(run.root)).stdout)
    # a plain resume goes back to Slurm with the options of the accepted submission (not the refused ones)
    resumed = run_cli("resume", str(run.root))
    assert "on slurm (executor recorded at submission)" in resumed.stdout and "submitted 1 shard(s) to slurm" in resumed.stdout
    assert len(submission_records(run, "slurm", "array")) == arrays + 1
    wait_done(run, timeout=240)
    assert not temp_files(run), temp_files(run)
    assert_same_as_reference(run, reference)


@pytest.mark.ray
def test_ray_disk_full_then_resume_to_ray(ray_head, small_fs, reference):
    sweep = cluster_sweep(small_fs, "fullray", ids=REF_PROMPTS[:2], per_shard=2,
                          executor={"kind": "ray", "address": ray_head, "num_gpus": 1, "num_cpus": 2, "max_retries": 1})
    run_cli("submit", str(sweep), env={**RAY_ENV, **FILL})
    run = only_run(small_fs / "runs")
    _wait_failed(run)
    _assert_failed_for_disk_full(run)
    jobs = len(submission_records(run, "ray", "job"))
    _resume_and_compare(run, reference, small_fs, env=RAY_ENV)
    assert len(submission_records(run, "ray", "job")) == jobs + 1, "resume must go back to the recorded Ray cluster"
    assert json.loads(run.provenance_path.read_text())["torch_threads"] == 1
