"""Markers, resume after a kill, failures — through the real CLI in fresh processes, on tiny-sd3."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from jobs.rundir import RunDir
from tests.conftest import run_cli, tiny_sweep

pytestmark = pytest.mark.slow


def _run_dir(output_root: Path) -> RunDir:
    (root,) = [p for p in output_root.iterdir() if p.is_dir()]
    return RunDir(root)


def _table(run: RunDir, name: str):
    return ds.dataset(run.tables_dir / name, format="parquet").to_table().to_pandas()


def _pixels(run: RunDir) -> dict[str, str]:
    return {p.relative_to(run.root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.images_dir.rglob("*.png")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the sweep every test below compares against."""
    tmp = tmp_path_factory.mktemp("ref")
    run_cli("submit", str(tiny_sweep(tmp, prompts=3, per_shard=1)))
    return _run_dir(tmp / "runs")


def test_uninterrupted_run_is_complete(reference):
    units = _table(reference, "units")
    assert len(units) == 3 * 3 and units.unit_id.is_unique
    sinks = _table(reference, "sink_steps")
    # 2 steps × 2 recorded layers × 4 heads × 2 CFG branches per unit
    assert len(sinks) == 9 * 2 * 2 * 4 * 2
    assert not sinks.duplicated(["unit_id", "step", "layer", "head", "branch"]).any()
    for shard in reference.all_shard_ids():
        marker = json.loads(reference.done_path(shard).read_text())
        assert marker["rows"]["units"] == 3
        for part in marker["parts"].values():
            path = reference.root / part["path"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == part["sha256"]
            # the marker is written after the files it vouches for
            assert reference.done_path(shard).stat().st_mtime_ns >= path.stat().st_mtime_ns
    assert not list((reference.state_dir / "running").iterdir())
    assert not (reference.tables_dir / "_scratch").exists() or not any((reference.tables_dir / "_scratch").iterdir())


def test_kill_mid_shard_then_resume_gives_identical_rows_and_pixels(tmp_path, reference):
    sweep = tiny_sweep(tmp_path, prompts=3, per_shard=3, seeds=1)  # one shard of 3 groups
    # same results-defining content as the reference, different sharding → different hash: compare by unit
    killed = run_cli("submit", str(sweep), env={"SINKSCOPE_FAULT_INJECT": "kill_after_groups:2"}, check=False)
    assert killed.returncode != 0
    run = _run_dir(tmp_path / "runs")
    assert not run.done_shards()
    assert len(list(run.scratch_dir(0).glob("units-g*.parquet"))) == 2
    status = run_cli("status", str(run.root)).stdout
    assert "interrupted" in status
    log_before = run.log_path(0).read_text()
    run_cli("resume", str(run.root))
    assert run.done_shards() == {0}
    assert "group 0 already finished, kept" in run.log_path(0).read_text()[len(log_before):]
    units = _table(run, "units").sort_values("unit_id")
    ref_units = _table(reference, "units").sort_values("unit_id")
    assert units.unit_id.tolist() == ref_units.unit_id.tolist()
    assert units.image_sha256.tolist() == ref_units.image_sha256.tolist()
    assert _pixels(run) == _pixels(reference)
    sinks = _table(run, "sink_steps")
    assert len(sinks) == len(_table(reference, "sink_steps"))
    assert not sinks.duplicated(["unit_id", "step", "layer", "head", "branch"]).any()


def test_failure_is_visible_and_resume_reruns_only_that_shard(tmp_path):
    sweep = tiny_sweep(tmp_path, prompts=2, per_shard=1)
    # GenEval prompt 80 is "a photo of a bench and a sports ball"-style two-object prompt; inject on its text
    failing = run_cli("submit", str(sweep), env={"SINKSCOPE_FAULT_INJECT": "raise_on_prompt: and "}, check=False)
    assert failing.returncode == 1  # a failed shard makes `submit` exit non-zero, after running the others
    run = _run_dir(tmp_path / "runs")
    assert run.done_shards() == {0} and run.failed_shards() == {1}
    status = run_cli("status", str(run.root)).stdout
    assert "failed" in status and "injected failure" in status
    logs = run_cli("logs", str(run.root), "1").stdout
    assert "RuntimeError: injected failure" in logs
    done_before = run.done_path(0).read_text()
    run_cli("resume", str(run.root))
    assert run.done_shards() == {0, 1} and not run.failed_shards()
    assert run.done_path(0).read_text() == done_before  # the finished shard was not rerun
    assert len(_table(run, "units")) == 6


def test_truncated_part_file_is_detected_and_rerun(tmp_path):
    sweep = tiny_sweep(tmp_path, prompts=1, per_shard=1)
    run_cli("submit", str(sweep))
    run = _run_dir(tmp_path / "runs")
    part = run.part_path("units", 0)
    good = pq.read_table(part).drop_columns(["seconds"])  # wall time differs between runs; nothing else may
    raw = part.read_bytes()
    part.write_bytes(raw[: len(raw) // 2])
    image = sorted(run.images_dir.rglob("*.png"))[0]
    image.unlink()
    verified = run_cli("status", str(run.root), "--verify").stdout
    assert "corrupt" in verified, verified
    from jobs import verify_done_shard

    assert any(image.name in problem for problem in verify_done_shard(run, 0)), verify_done_shard(run, 0)
    import analysis
    from analysis._io import TableReadError

    with pytest.raises(TableReadError, match=r"shard 0 is damaged.*orchestrate resume"):
        analysis.load_run(run.root)
    assert "corrupt" not in run_cli("resume", str(run.root), "--dry-run").stdout  # files are hashed only under --verify
    assert "1 corrupt" in run_cli("resume", str(run.root), "--verify", "--dry-run").stdout
    run_cli("resume", str(run.root), "--verify")
    assert image.is_file()
    assert pq.read_table(part).drop_columns(["seconds"]).equals(good)
    assert "corrupt" not in run_cli("status", str(run.root), "--verify").stdout


def test_two_concurrent_submits_run_each_shard_once(tmp_path):
    import subprocess
    import sys

    sweep = tiny_sweep(tmp_path, prompts=2, per_shard=1)
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "orchestrate", "submit", str(sweep)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    run = _run_dir(tmp_path / "runs")
    assert run.done_shards() == {0, 1}
    for shard in (0, 1):
        starts = [line for line in run.log_path(shard).read_text().splitlines() if ": 1 groups, 3 units" in line]
        assert len(starts) == 1, run.log_path(shard).read_text()
    assert len(_table(run, "units")) == 6


def test_two_workers_one_sigkilled_exits_nonzero_then_resume_matches_one_worker(tmp_path, reference):
    """workers=2 with one OMP thread each (the reference ran in one process with the machine's own pools):
    shard 1's worker is SIGKILLed after its first group. `submit` must exit 1 naming shard 1 and the signal,
    the summary must show the final state (no "running"), and resume must end with the reference's pixels."""
    sweep = tiny_sweep(tmp_path, prompts=3, per_shard=1, executor={"kind": "local", "workers": 2, "threads_per_worker": 1})
    faults = "rendezvous,kill_after_groups:1:1"
    killed = run_cli("submit", str(sweep), env={"SINKSCOPE_FAULT_INJECT": faults}, check=False)
    out = killed.stdout + killed.stderr
    assert killed.returncode == 1, out
    assert "shard 1" in out and "SIGKILL" in out, out
    summary = [line for line in killed.stdout.splitlines() if line.startswith("shards:")][-1]
    assert "running" not in summary and "1 failed" in summary, summary
    run = _run_dir(tmp_path / "runs")
    assert "SIGKILL" in run.read_marker("failed", 1)["error"]
    assert run.done_shards() == {0, 2}
    resumed = run_cli("resume", str(run.root))
    assert "resuming 1 shard(s) on local" in resumed.stdout, resumed.stdout
    assert run.done_shards() == {0, 1, 2} and not run.failed_shards()
    assert _pixels(run) == _pixels(reference)
