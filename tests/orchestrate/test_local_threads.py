"""CPU threads of the local executor's workers: torch's count comes from the sweep, the pools' env from the executor.

Each shard log names the worker's pid, torch.get_num_threads() and OMP_NUM_THREADS (jobs/run_shard.py), so the
real CLI runs here, in fresh processes, and the logs are read back; nothing of the executor is mocked. Which
worker runs which shard is made deterministic by the `rendezvous` fault hook (each worker's first shard waits
until both workers hold one), never by a sleep.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from jobs.rundir import RunDir
from manifests.schema import LocalExecutorConfig
from orchestrate.executors.local import host_cpus, resolve_threads
from tests.conftest import run_cli, tiny_sweep

SHARD_LINE = re.compile(r"shard \d+: \d+ groups, \d+ units \(pid (\d+), (\d+) torch threads, OMP_NUM_THREADS=(\S+)\)")


def _workers(run: RunDir) -> dict[int, tuple[int, str]]:
    """pid -> (torch threads, OMP_NUM_THREADS), from the shard logs."""
    out: dict[int, tuple[int, str]] = {}
    for path in sorted(run.logs_dir.glob("shard-*.log")):
        for pid, threads, omp in SHARD_LINE.findall(path.read_text()):
            out[int(pid)] = (int(threads), omp)
    return out


def _submit(tmp_path: Path, executor: dict, **sweep_extra) -> tuple[RunDir, dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    sweep = tiny_sweep(tmp_path, prompts=2, per_shard=1, executor=executor, **sweep_extra)
    run_cli("submit", str(sweep), env={"SINKSCOPE_FAULT_INJECT": "rendezvous"})
    (root,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    run = RunDir(root)
    assert run.done_shards() == {0, 1}
    finished = [r for r in run.submissions() if r.get("event") == "finished"]
    return run, finished[-1]


def test_resolve_threads():
    cpus = host_cpus()
    assert resolve_threads(None, 1) is None  # one worker: the process's own environment
    assert resolve_threads(None, 2) == max(1, cpus // 2)
    assert resolve_threads(None, 4 * cpus) == 1  # never 0
    assert resolve_threads(0, 2) is None  # off: the inherited environment in every worker
    assert resolve_threads(3, 2) == 3
    with pytest.raises(ValueError, match="threads_per_worker"):
        LocalExecutorConfig(threads_per_worker=-1)


def test_bad_threads_override_names_the_key(tmp_path):
    proc = run_cli("submit", str(tiny_sweep(tmp_path)), "-e", "local", "-o", "threads_per_worker=-2", check=False)
    assert proc.returncode == 2 and "--executor-opt threads_per_worker=-2" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_workers_torch_threads_from_the_sweep_pools_from_the_executor(tmp_path):
    """Default threads_per_worker: CPUs ÷ workers in each worker's OMP_NUM_THREADS; torch runs the sweep's
    generation.torch_threads (default 1) whatever the executor says."""
    run, record = _submit(tmp_path / "default", {"kind": "local", "workers": 2})
    expected = max(1, host_cpus() // 2)
    assert _workers(run).values() and set(_workers(run).values()) == {(1, str(expected))}, _workers(run)
    assert len(_workers(run)) == 2  # two worker processes ran the shards (the rendezvous guarantees it)
    assert record["workers"] == 2 and record["threads_per_worker"] == expected
    done = run.read_marker("done", 0)
    assert done["torch_threads"] == 1
    assert __import__("json").loads(run.provenance_path.read_text())["torch_threads"] == 1


@pytest.mark.slow
def test_threads_per_worker_off_and_explicit_torch_threads(tmp_path):
    run, record = _submit(tmp_path / "off", {"kind": "local", "workers": 2, "threads_per_worker": 0},
                          generation={"steps": 2, "guidance": 5.0, "height": 64, "width": 64, "torch_threads": 2})
    workers = _workers(run)
    assert len(workers) == 2 and set(workers.values()) == {(2, os.environ.get("OMP_NUM_THREADS", "unset"))}, workers
    assert record["threads_per_worker"] is None
    assert {run.read_marker("done", s)["torch_threads"] for s in (0, 1)} == {2}
