"""executor.threads_per_worker of the local executor: what each worker's torch really runs with.

Each shard log names the worker's pid and torch.get_num_threads() (jobs/run_shard.py), so the real CLI runs
here, in fresh processes, and the logs are read back; nothing of the executor is mocked.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.rundir import RunDir
from manifests.schema import LocalExecutorConfig
from orchestrate.executors.local import host_cpus, resolve_threads
from tests.conftest import run_cli, tiny_sweep

SHARD_LINE = re.compile(r"shard (\d+): \d+ groups, \d+ units \(pid (\d+), (\d+) torch threads\)")


def _worker_threads(run: RunDir) -> dict[int, int]:
    """pid -> torch threads, from the shard logs."""
    out: dict[int, int] = {}
    for path in sorted(run.logs_dir.glob("shard-*.log")):
        for _, pid, threads in SHARD_LINE.findall(path.read_text()):
            out[int(pid)] = int(threads)
    return out


def _torch_default_threads() -> int:
    """What a fresh process's torch picks with this environment (the pools are sized at import)."""
    code = "import torch; print(torch.get_num_threads())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def _submit(tmp_path: Path, executor: dict) -> tuple[RunDir, dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    sweep = tiny_sweep(tmp_path, prompts=4, per_shard=1, executor=executor)
    # each one-group shard lingers a second, so the second worker, started with the first, always gets shards
    run_cli("submit", str(sweep), env={"SINKSCOPE_FAULT_INJECT": "sleep_after_groups:1:1"})
    (root,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    run = RunDir(root)
    assert run.done_shards() == {0, 1, 2, 3}
    finished = [r for r in run.submissions() if r.get("event") == "finished"]
    return run, finished[-1]


def test_resolve_threads():
    cpus = host_cpus()
    assert resolve_threads(None, 1) is None  # one worker: torch's own default
    assert resolve_threads(None, 2) == max(1, cpus // 2)
    assert resolve_threads(None, 4 * cpus) == 1  # never 0
    assert resolve_threads(0, 2) is None  # off: torch's default in every worker
    assert resolve_threads(3, 2) == 3
    with pytest.raises(ValueError, match="threads_per_worker"):
        LocalExecutorConfig(threads_per_worker=-1)


def test_bad_threads_override_names_the_key(tmp_path):
    proc = run_cli("submit", str(tiny_sweep(tmp_path)), "-e", "local", "-o", "threads_per_worker=-2", check=False)
    assert proc.returncode == 2 and "--executor-opt threads_per_worker=-2: Input should be greater than or equal to 0" in proc.stdout


@pytest.mark.slow
def test_two_workers_share_the_cpus_by_default(tmp_path):
    run, record = _submit(tmp_path, {"kind": "local", "workers": 2})
    threads = _worker_threads(run)
    expected = max(1, host_cpus() // 2)
    assert len(threads) == 2, threads  # two worker processes ran the shards
    assert set(threads.values()) == {expected}, threads
    assert record["workers"] == 2 and record["threads_per_worker"] == expected


@pytest.mark.slow
def test_threads_per_worker_explicit_and_off(tmp_path):
    run, record = _submit(tmp_path / "explicit", {"kind": "local", "workers": 2, "threads_per_worker": 2})
    assert set(_worker_threads(run).values()) == {2} and record["threads_per_worker"] == 2
    run, record = _submit(tmp_path / "off", {"kind": "local", "workers": 2, "threads_per_worker": 0})
    threads = _worker_threads(run)
    assert len(threads) == 2 and set(threads.values()) == {_torch_default_threads()}, threads
    assert record["threads_per_worker"] is None


@pytest.mark.slow
def test_one_worker_in_process_takes_an_explicit_limit(tmp_path):
    run, record = _submit(tmp_path, {"kind": "local", "workers": 1, "threads_per_worker": 1})
    threads = _worker_threads(run)
    assert len(threads) == 1, threads  # every shard in the CLI's own process
    assert set(threads.values()) == {1} and record["threads_per_worker"] == 1
