"""benchmarks/bench_executor_scaling.py end to end on the CPU (tiny-sd3): the real CLI runs, and the shard-log
lines it parses (jobs/run_shard.py) still say what it expects."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from orchestrate.executors.local import host_cpus
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_cpu_mode_measures_one_and_two_workers(tmp_path):
    command = [sys.executable, "benchmarks/bench_executor_scaling.py", "--out", str(tmp_path), "--preset", "tiny-sd3",
               "--size", "64", "--steps", "2", "--device", "cpu", "--groups-per-worker", "3", "--prompts-per-shard", "1",
               "--configs", "a1-w1,a1-w2,a1-w2-threads-off", "--no-warmup"]
    # each worker's first shard waits until both workers hold one: two workers provably run shards (no sleep)
    env = {**os.environ, "SINKSCOPE_FAULT_INJECT": "rendezvous"}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "scaling.json").read_text())
    runs = result["runs"]
    assert [runs[c]["images"] for c in ("a1-w1", "a1-w2", "a1-w2-threads-off")] == [9, 18, 18]
    for name, run in runs.items():
        assert run["wall_s"] > 0 and run["images_per_hour_wall"] > 0, name
        assert sum(w["groups"] for w in run["per_worker"]) == run["groups"], name
        assert all(w["load_s"] is not None and w["first_group_s"] > 0 for w in run["per_worker"]), name
    assert len(runs["a1-w1"]["per_worker"]) == 1 and runs["a1-w1"]["steady_images_per_hour"] > 0
    assert len(runs["a1-w2"]["per_worker"]) == 2
    # torch's threads come from the sweep (generation.torch_threads, default 1); the executor sets the pools' env
    assert {w["threads"] for w in runs["a1-w2"]["per_worker"]} == {1}
    assert {w["omp"] for w in runs["a1-w2"]["per_worker"]} == {str(max(1, host_cpus() // 2))}
    assert runs["a1-w2"]["threads_per_worker_used"] == max(1, host_cpus() // 2)
    assert runs["a1-w2-threads-off"]["threads_per_worker_used"] is None
    assert {r["ratio"] for r in result["ratios"]} >= {"a1-w2 / a1-w1", "a1-w2 / a1-w2-threads-off"}
    assert "a1-w2 / a1-w1" in (tmp_path / "scaling.txt").read_text()
