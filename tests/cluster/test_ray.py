"""The Ray executor on a REAL Ray: a head started by scripts/ray/start_ray.sh (detached Ray jobs) and an
in-process `ray.init(address="local")` (blocking). Same rows and pixels as the local executor."""

from __future__ import annotations

import time

import pytest

from jobs.rundir import RunDir
from tests.cluster.conftest import (
    RAY_ENV, REF_PROMPTS, assert_same_as_reference, cluster_sweep, executor_of, only_run, scratch_groups,
    submission_records, wait_done, wait_for,
)
from tests.conftest import run_cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _submit(sweep, env=None) -> RunDir:
    started = time.monotonic()
    proc = run_cli("submit", str(sweep), env={**RAY_ENV, **(env or {})})
    assert "submitted" in proc.stdout, proc.stdout
    assert time.monotonic() - started < 60, "submit to a Ray cluster must not wait for the shards"
    return only_run(sweep.parent / "runs")


def _states(run: RunDir) -> dict[int, str]:
    return executor_of(run).scheduler_states(run)


def _attempts(run: RunDir) -> dict[str, int]:
    """Task name -> number of attempts, from Ray's state API."""
    from ray.util.state import list_tasks

    (record,) = submission_records(run, "ray", "job")[-1:]
    from ray.job_submission import JobSubmissionClient

    job_id = JobSubmissionClient(record["dashboard"]).get_job_info(record["submission_id"]).job_id
    out: dict[str, int] = {}
    for task in list_tasks(address=record["dashboard"], filters=[("job_id", "=", job_id)], limit=1000):
        if task.name and task.name.startswith("shard-"):
            out[task.name] = max(out.get(task.name, 0), task.attempt_number + 1)
    return out


def ray_block(address: str, **extra) -> dict:
    return {"kind": "ray", "address": address, "num_gpus": 1, "num_cpus": 1, **extra}


def test_ray_job_returns_at_once_and_matches_local(ray_head, reference, tmp_path):
    """address: auto, resolved through RAY_ADDRESS as inside a cluster allocation."""
    sweep = cluster_sweep(tmp_path, "rayjob", ids=REF_PROMPTS[:2], per_shard=1, executor=ray_block("auto"))
    run = _submit(sweep, env={"RAY_ADDRESS": ray_head})
    (record,) = submission_records(run, "ray", "job")
    assert record["shards"] == [0, 1] and record["submission_id"].startswith("sinkscope-rayjob-")
    assert record["dashboard"].startswith("http://127.0.0.1:")
    assert set(_states(run).values()) <= {"pending", "running", "completed"}
    wait_done(run, timeout=180)
    wait_for(lambda: _states(run) == {0: "completed", 1: "completed"}, 60, "tasks FINISHED in Ray", run)
    assert_same_as_reference(run, reference)
    assert "2 done" in run_cli("status", str(run.root), env={**RAY_ENV, "RAY_ADDRESS": ray_head}).stdout


def test_worker_sigkill_is_retried_by_ray_and_resumes(ray_head, reference, tmp_path):
    """kill_after_groups:1 SIGKILLs the worker after each newly generated group: attempt 1 dies after
    group 0, attempt 2 (keeps group 0) after group 1, attempt 3 finds both and finishes. No resume."""
    sweep = cluster_sweep(tmp_path, "raykill", ids=REF_PROMPTS[2:4], per_shard=2, executor=ray_block(ray_head, max_retries=3))
    run = _submit(sweep, env={"SINKSCOPE_FAULT_INJECT": "kill_after_groups:1"})
    wait_done(run, timeout=240)
    assert _attempts(run) == {"shard-00000": 3}
    log = run.log_path(0).read_text()
    assert log.count("already finished, kept") >= 2, log
    assert_same_as_reference(run, reference)


def test_raising_prompt_fails_without_retry_then_resume(ray_head, reference, tmp_path):
    sweep = cluster_sweep(tmp_path, "rayraise", ids=REF_PROMPTS[4:5], per_shard=1, executor=ray_block(ray_head, max_retries=3))
    run = _submit(sweep, env={"SINKSCOPE_FAULT_INJECT": f"raise_on_prompt:{_prompt_word(sweep)}"})
    wait_for(lambda: _states(run).get(0) == "failed" and run.failed_shards() == {0}, 180, "the shard to fail", run)
    assert _attempts(run) == {"shard-00000": 1}, "an application error must not be retried"
    assert "injected failure" in run.read_marker("failed", 0)["error"]
    run_cli("resume", str(run.root), env=RAY_ENV)
    wait_done(run, timeout=180)
    assert_same_as_reference(run, reference)


def test_cancel_stops_the_ray_job_then_resume(ray_head, reference, tmp_path):
    sweep = cluster_sweep(tmp_path, "raycancel", ids=REF_PROMPTS[:2], per_shard=2, executor=ray_block(ray_head))
    run = _submit(sweep, env={"SINKSCOPE_FAULT_INJECT": "sleep_after_groups:1:600"})
    wait_for(lambda: scratch_groups(run, 0) == 1 and _states(run).get(0) == "running", 180, "the shard paused", run)
    out = run_cli("cancel", str(run.root), env=RAY_ENV).stdout
    (record,) = submission_records(run, "ray", "job")
    assert record["submission_id"] in out, out
    wait_for(lambda: _states(run).get(0) == "cancelled", 60, "the job stopped", run)
    run_cli("resume", str(run.root), env=RAY_ENV)
    wait_done(run, timeout=180)
    assert "group 0 already finished, kept" in run.log_path(0).read_text()
    assert_same_as_reference(run, reference)


def test_in_process_local_ray_blocks_and_matches_local(reference, tmp_path):
    """address: local — an own Ray instance inside `orchestrate submit`, which therefore waits."""
    sweep = cluster_sweep(tmp_path, "raylocal", ids=REF_PROMPTS[:2], per_shard=1,
                          executor={"kind": "ray", "address": "local", "num_gpus": 1})
    env = {**RAY_ENV, "RAY_ADDRESS": ""}
    refused = run_cli("submit", str(sweep), env=env, check=False)  # no GPU here: a clear error, no hang
    assert refused.returncode != 0 and "executor.num_gpus" in refused.stdout + refused.stderr
    (event,) = submission_records(only_run(tmp_path / "runs"), "ray", "refused")  # recorded; no shard state changed
    assert event["shards"] == [0, 1] and "executor.num_gpus" in event["message"]
    assert not only_run(tmp_path / "runs").running_shards() and not only_run(tmp_path / "runs").failed_shards()
    run_cli("submit", str(sweep), "-o", "num_gpus=0", env=env)
    run = only_run(tmp_path / "runs")
    (record,) = submission_records(run, "ray", "finished")
    assert record["states"] == {"0": "completed", "1": "completed"} and record["failed"] == []
    assert_same_as_reference(run, reference)


def _prompt_word(sweep) -> str:
    from orchestrate.create import build_manifest

    manifest, _ = build_manifest(sweep)
    return manifest.prompts[0].text.split()[-1]
