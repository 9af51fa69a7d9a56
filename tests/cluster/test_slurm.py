"""The Slurm executor on a REAL Slurm (scripts/slurm/start_slurm.sh): arrays, states, faults, resume.

Every fault is followed by `orchestrate resume` (or Slurm's own requeue) and must end with exactly the
local executor's rows, no duplicate, identical pixels.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from jobs.rundir import RunDir
from orchestrate.executors.slurm import SlurmExecutor
from tests.cluster.conftest import (
    REF_PROMPTS, assert_same_as_reference, cluster_sweep, executor_of, only_run, scratch_groups, skip_or_fail,
    slurm_block, submission_records, table, wait_done, wait_for,
)
from tests.conftest import run_cli

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _submit(sweep: Path, env: dict | None = None, *opts: str) -> RunDir:
    started = time.monotonic()
    proc = run_cli("submit", str(sweep), *opts, env=env)
    assert "submitted" in proc.stdout, proc.stdout
    assert time.monotonic() - started < 60, "slurm submit must return without waiting for the jobs"
    return only_run(sweep.parent / "runs")


def _states(run: RunDir) -> dict[int, str]:
    return executor_of(run).scheduler_states(run)


def _job_of(run: RunDir, shard: int) -> str:
    return SlurmExecutor.latest_job_ids(run)[shard]


def _sacct_history(job_id: str) -> list[str]:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "--duplicates", "-o", "JobID,State", "-j", job_id.split("_")[0]],
                         capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split("|")[0] == job_id]


# ---- submission: arrays split by MaxArraySize, same results as local ---------------------------------------
@pytest.fixture(scope="module")
def split_run(slurm_cluster, tmp_path_factory) -> RunDir:
    """One shard per prompt: more shards than MaxArraySize, so several arrays."""
    tmp = tmp_path_factory.mktemp("split")
    extra = {} if slurm_cluster.max_array_size < len(REF_PROMPTS) else {"max_array_size": 2}
    run = _submit(cluster_sweep(tmp, "split", ids=REF_PROMPTS, per_shard=1, executor=slurm_block(slurm_cluster, **extra)))
    wait_done(run, timeout=240)
    return run


def test_sweep_is_split_into_arrays_and_matches_local(split_run, reference, slurm_cluster):
    run = split_run
    size = slurm_cluster.max_array_size if slurm_cluster.max_array_size < len(REF_PROMPTS) else 2
    arrays = submission_records(run, "slurm", "array")
    assert [r["shards"] for r in arrays] == [list(range(i, min(i + size, 5))) for i in range(0, 5, size)]
    assert len({r["array_job_id"] for r in arrays}) == len(arrays) > 1
    job_ids = [j for r in arrays for j in r["job_ids"].values()]
    assert len(set(job_ids)) == len(REF_PROMPTS)
    assert_same_as_reference(run, reference)
    # the marker is written before the job's process exits: Slurm says COMPLETED a moment later
    wait_for(lambda: set(_states(run).values()) == {"completed"}, 60, "every array element COMPLETED", run)
    # each done marker names the array element that wrote it
    for shard, job in SlurmExecutor.latest_job_ids(run).items():
        assert json.loads(run.done_path(shard).read_text())["job_id"] == f"slurm:{job}"
    assert "5 done" in run_cli("status", str(run.root)).stdout


def test_max_array_size_is_read_from_the_cluster(slurm_cluster):
    from orchestrate.executors.slurm import cluster_max_array_size

    shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    assert cluster_max_array_size() == int(re.search(r"MaxArraySize\s*=\s*(\d+)", shown).group(1))


def test_truncated_part_file_is_detected_and_only_its_shard_rerun(split_run, reference):
    run = split_run
    part = run.part_path("units", 2)
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    assert "corrupt" in run_cli("status", str(run.root), "--verify").stdout
    before = len(submission_records(run, "slurm", "array"))
    run_cli("resume", str(run.root), "--verify")
    new = submission_records(run, "slurm", "array")[before:]
    assert [r["shards"] for r in new] == [[2]], new
    wait_done(run)
    wait_for(lambda: _states(run).get(2) == "completed", 60, "shard 2 completed in sacct", run)
    assert_same_as_reference(run, reference)


# ---- faults mid-shard, then resume ------------------------------------------------------------------------
def test_scancel_and_sigkill_mid_shard_then_resume(slurm_cluster, reference, tmp_path):
    """Two array elements, each paused after its first group: one is scancelled, the other SIGKILLed."""
    sweep = cluster_sweep(tmp_path, "kill", ids=REF_PROMPTS[:4], per_shard=2, executor=slurm_block(slurm_cluster))
    run = _submit(sweep, env={"SINKSCOPE_FAULT_INJECT": "sleep_after_groups:1:600"})
    wait_for(lambda: all(scratch_groups(run, s) == 1 for s in (0, 1)) and run.running_shards() == {0, 1},
             150, "both shards paused after one group", run)
    assert _states(run) == {0: "running", 1: "running"}
    # scancel one array element
    subprocess.run(["scancel", _job_of(run, 0)], check=True)
    # SIGKILL the other's worker process (pid from its running marker)
    marker = run.read_marker("running", 1)
    assert marker["host"] == socket.gethostname()
    os.kill(marker["pid"], signal.SIGKILL)
    wait_for(lambda: _states(run) == {0: "cancelled", 1: "failed"}, 90, "cancelled + failed in Slurm", run)
    status = run_cli("status", str(run.root)).stdout
    assert "cancelled" in status and "failed" in status, status
    logs_before = {s: run.log_path(s).read_text() for s in (0, 1)}
    run_cli("resume", str(run.root))  # no fault injection this time
    wait_done(run)
    for s in (0, 1):
        assert "group 0 already finished, kept" in run.log_path(s).read_text()[len(logs_before[s]):]
    assert_same_as_reference(run, reference)


def test_sigkill_during_write_then_resume(slurm_cluster, reference, tmp_path):
    sweep = cluster_sweep(tmp_path, "write", ids=REF_PROMPTS[2:3], per_shard=1, executor=slurm_block(slurm_cluster))
    run = _submit(sweep, env={"SINKSCOPE_FAULT_INJECT": "die_during_write"})
    wait_for(lambda: _states(run).get(0) == "failed", 120, "the job to die", run)
    assert not run.done_shards()
    partial = list(run.images_dir.rglob(".*.tmp-*"))
    assert partial, "die_during_write leaves a partial hidden file"
    resumed = run_cli("resume", str(run.root))
    assert f"removed {len(partial)} temporary file(s) left by dead writers" in resumed.stdout, resumed.stdout
    wait_done(run)
    assert not list(run.root.rglob(".*.tmp-*")), "resume cleans the temporary files of dead writers"
    assert_same_as_reference(run, reference)


def test_time_limit_warning_requeues_and_the_shard_resumes(slurm_cluster, reference, tmp_path):
    """time=1 min: Slurm sends USR2 10 s before the limit (checked every 30 s); submitit checkpoints
    (ShardTask) and requeues; the requeued job keeps group 0 and finishes."""
    sweep = cluster_sweep(tmp_path, "timeout", ids=REF_PROMPTS[:2], per_shard=2,
                          executor=slurm_block(slurm_cluster, time=1, max_requeues=3))
    run = _submit(sweep, env={"SINKSCOPE_FAULT_INJECT": "sleep_after_groups:1:600"})
    wait_done(run, timeout=240)
    job = _job_of(run, 0)
    history = _sacct_history(job)
    assert any("REQUEUED" in line for line in history), history
    assert len(submission_records(run, "slurm", "array")) == 1, "requeued by Slurm, not resubmitted"
    err = "".join(p.read_text() for p in run.executor_dir.glob(f"{job}_0_log.err"))
    # (submitit's own "Requeued job" line is usually lost: Slurm kills the step as soon as it is requeued)
    assert "this job is timed-out" in err and "DUE TO JOB REQUEUE" in err, err[-2000:]
    log = run.log_path(0).read_text()
    assert "interrupted" in log and "group 0 already finished, kept" in log, log
    assert not run.failed_shards()
    assert_same_as_reference(run, reference)


def test_preemption_requeues_and_the_shard_resumes(slurm_cluster, reference, tmp_path):
    """A real preemption: a job in partition `urgent` needs the whole node; Slurm preempts ours (REQUEUE)
    and sends the user signal first; submitit sees a preemption (not a timeout: time=60), requeues."""
    partitions = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()
    if "urgent" not in partitions:
        skip_or_fail("this Slurm has no preempting partition `urgent` (scripts/slurm/start_slurm.sh sets one up)")
    sweep = cluster_sweep(tmp_path, "preempt", ids=REF_PROMPTS[3:5], per_shard=2,
                          executor=slurm_block(slurm_cluster, time=60, partition="debug"))
    run = _submit(sweep, env={"SINKSCOPE_FAULT_INJECT": "sleep_after_groups:1:600"})
    wait_for(lambda: scratch_groups(run, 0) == 1 and run.running_shards() == {0}, 150, "the shard paused", run)
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "--exclusive", "-N", "1", "-t", "1",
                             "-o", "/dev/null", "--wrap", "sleep 2"], capture_output=True, text=True, check=True).stdout.strip()
    wait_done(run, timeout=180)
    job = _job_of(run, 0)
    assert any(state in "".join(_sacct_history(job)) for state in ("PREEMPTED", "REQUEUED")), _sacct_history(job)
    err = "".join(p.read_text() for p in run.executor_dir.glob(f"{job}_0_log.err"))
    assert "this job is preempted" in err and "DUE TO JOB REQUEUE" in err, err[-2000:]
    assert "group 0 already finished, kept" in run.log_path(0).read_text()
    assert subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", urgent], capture_output=True, text=True).stdout.strip()
    assert_same_as_reference(run, reference)


# ---- failures, hostile prompts, cancel, configuration errors ------------------------------------------------
HOSTILE = [
    'a "double-quoted" cat; echo pwned',
    "it's $(touch {canary}) a dog",
    "back`touch {canary}`ticks and %j %A %x %% slurm patterns",
    "../../../etc/passwd ../ a bird",
    "line one\nline two && touch {canary}",
    "a plain red apple",
]


def test_a_raising_prompt_fails_its_shard_and_hostile_prompts_never_reach_a_shell(slurm_cluster, tmp_path):
    canary = tmp_path / "canary-must-not-exist"
    prompts = [p.format(canary=canary) for p in HOSTILE]
    prompt_file = tmp_path / "hostile.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    sweep = cluster_sweep(tmp_path, "hostile", prompts_file=prompt_file, per_shard=3, executor=slurm_block(slurm_cluster))
    run = _submit(sweep, env={"SINKSCOPE_FAULT_INJECT": "raise_on_prompt:line two"})
    wait_for(lambda: run.done_shards() == {0} and run.failed_shards() == {1} and _states(run).get(1) == "failed",
             180, "shard 0 done, shard 1 failed", run)
    failed = run.read_marker("failed", 1)
    assert "injected failure" in failed["error"]
    status = run_cli("status", str(run.root)).stdout
    assert "failed" in status and "injected failure" in status, status
    run_cli("resume", str(run.root))
    wait_done(run)
    units = table(run, "units")
    assert sorted(set(units.prompt)) == sorted(prompts) and units.unit_id.is_unique and len(units) == 2 * len(prompts)
    assert not canary.exists(), "a prompt was executed by a shell"
    # what reached Slurm: shard ids and the run path only
    sent = "".join(p.read_text() for p in run.executor_dir.glob("*submission.sh"))
    sent += json.dumps(submission_records(run, "slurm", "array"))
    for fragment in ("double-quoted", "touch", "passwd", "line two", "apple"):
        assert fragment not in sent
    names = [p.relative_to(run.root).as_posix() for p in run.root.rglob("*")]
    assert all(re.fullmatch(r"[A-Za-z0-9_./=+-]+", n) for n in names), [n for n in names if not re.fullmatch(r"[A-Za-z0-9_./=+-]+", n)]


def test_cancel_stops_pending_jobs(slurm_cluster, tmp_path):
    # begin in an hour: the jobs stay pending, nothing runs (cheap)
    sweep = cluster_sweep(tmp_path, "cancel", ids=REF_PROMPTS[:2], per_shard=1,
                          executor=slurm_block(slurm_cluster, sbatch_extra={"begin": "now+1hour"}))
    run = _submit(sweep)
    assert _states(run) == {0: "pending", 1: "pending"}
    out = run_cli("cancel", str(run.root)).stdout
    ids = SlurmExecutor.latest_job_ids(run)
    assert all(ids[s] in out for s in (0, 1)), out
    wait_for(lambda: _states(run) == {0: "cancelled", 1: "cancelled"}, 60, "both cancelled", run)
    assert "2 cancelled" in run_cli("status", str(run.root)).stdout
    assert "nothing to cancel" in run_cli("cancel", str(run.root)).stdout


def test_unsafe_run_path_and_reserved_sbatch_options_are_refused(slurm_cluster, tmp_path):
    bad_root = tmp_path / "my runs $(x)"
    bad_root.mkdir()
    sweep = cluster_sweep(bad_root, "unsafe", ids=[0], executor=slurm_block(slurm_cluster))
    proc = run_cli("submit", str(sweep), check=False)
    assert proc.returncode != 0 and "characters Slurm or a shell would interpret" in proc.stdout + proc.stderr
    sweep = cluster_sweep(tmp_path, "reserved", ids=[0], executor=slurm_block(slurm_cluster, sbatch_extra={"array": "0-99"}))
    proc = run_cli("submit", str(sweep), check=False)
    assert proc.returncode != 0 and "--array is set by sinkscope" in proc.stdout + proc.stderr
    sweep = cluster_sweep(tmp_path, "newline", ids=[0], executor=slurm_block(slurm_cluster, partition="debug\ntouch /tmp/x"))
    proc = run_cli("submit", str(sweep), check=False)
    assert proc.returncode != 0 and "executor.partition" in proc.stdout + proc.stderr
    for root in (bad_root, tmp_path):  # (refused at plan time now: no run directory is created at all)
        for run_root in (root / "runs").iterdir() if (root / "runs").is_dir() else []:
            assert not submission_records(RunDir(run_root), "slurm", "array"), "nothing may reach sbatch"
