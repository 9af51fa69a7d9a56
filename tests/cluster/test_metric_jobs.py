"""Metrics as jobs: `orchestrate analyze -e slurm|ray` scores finished shards through the real executors,
then a plain `orchestrate analyze` reduces and summarises without scoring anything twice."""

from __future__ import annotations

import shutil

import pytest

from jobs.rundir import RunDir
from tests.cluster.conftest import RAY_ENV, wait_for
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def _copy_of(reference: RunDir, tmp_path) -> RunDir:
    root = tmp_path / reference.root.name
    shutil.copytree(reference.root, root, ignore=shutil.ignore_patterns("metrics", "report", "features", "set_metrics"))
    return RunDir(root)


def _parts(run: RunDir) -> list:
    folder = run.tables_dir / "metrics" / "metric=lpips"
    return sorted(folder.glob("part-shard-*.parquet")) if folder.is_dir() else []


def _finish_and_check(run: RunDir, env: dict | None = None) -> None:
    import analysis

    mtimes = {p.name: p.stat().st_mtime_ns for p in _parts(run)}
    proc = run_cli("analyze", str(run.root), "--no-compact", env=env)  # compaction would move the parts compared here
    assert "summary" in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in _parts(run)} == mtimes  # nothing scored twice
    data = analysis.load_run(run.root)
    scored = set(data.metrics[data.metrics.metric == "lpips"].unit_id)
    assert scored == set(data.units[data.units.arm != "baseline"].unit_id)
    assert (run.root / "report" / "summary.md").is_file()


@pytest.mark.slurm
def test_metric_jobs_on_slurm(slurm_cluster, reference, tmp_path):
    run = _copy_of(reference, tmp_path)
    gpus = "1" if slurm_cluster.gpus_per_node else "0"
    proc = run_cli("analyze", str(run.root), "-e", "slurm", "-o", f"gpus_per_task={gpus}", "-o", "cpus_per_task=1", "-o", "time=5")
    assert "submitted metric jobs (lpips)" in proc.stdout
    records = [r for r in run.submissions() if r.get("executor") == "slurm" and r.get("event") == "array"]
    assert records and all(r["task"] == "metrics" and r["metrics"] == ["lpips"] for r in records)
    shards = sorted(run.done_shards())
    wait_for(lambda: run.done_shards("metrics") == set(shards), timeout=240, what="metric-job done markers from Slurm", run=run)
    assert len(_parts(run)) == len(shards)
    # generation status is untouched by metric jobs, which have their own line
    text = run_cli("status", str(run.root)).stdout
    assert f"{len(shards)} done" in text and f"metric jobs: {len(shards)} total: {len(shards)} done" in text
    _finish_and_check(run)


@pytest.mark.ray
def test_metric_jobs_on_ray(ray_head, reference, tmp_path):
    run = _copy_of(reference, tmp_path)
    env = {**RAY_ENV, "RAY_ADDRESS": ray_head}
    proc = run_cli("analyze", str(run.root), "-e", "ray", "-o", "address=auto", "-o", "num_gpus=0", env=env)
    assert "submitted metric jobs (lpips)" in proc.stdout
    shards = sorted(run.done_shards())
    wait_for(lambda: run.done_shards("metrics") == set(shards), timeout=240, what="metric-job done markers from Ray", run=run)
    assert len(_parts(run)) == len(shards)
    _finish_and_check(run, env=env)
