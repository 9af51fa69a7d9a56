"""Status summary / --json, dry runs, sweep drift, compaction kill-and-rerun and metric-job markers.

The run is synthetic but written by the project's own writers (benchmarks/bench_orchestration.py: `create_run`,
`_write_group`, `_finalise`, `RunDir` markers), so no model runs here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

import analysis
from jobs import compaction
from jobs.frozen_sweep import SweepDriftError, load_resolved_sweep
from jobs.rundir import RunDir
from jobs.tasks import ShardJob
from tests.conftest import REPO, run_cli

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_orchestration import ERRORS, build_run  # noqa: E402


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> RunDir:
    """40 shards of 1 prompt × 11 arms: 36 done, 1 failed, 0 running (90 %, 3 %, 1 %, rounded down), 3 not started."""
    return build_run(tmp_path_factory.mktemp("template") / "bench", shards=40, steps=2, layers=2, heads=2, procs=1)


@pytest.fixture
def synthetic(template, tmp_path) -> RunDir:
    """A fresh copy of the template run for each test."""
    return RunDir(shutil.copytree(template.root, tmp_path / template.root.name))


def _rows(run: RunDir) -> tuple[pd.DataFrame, pd.DataFrame]:
    data = analysis.load_run(run.root)
    key = ["unit_id", "step", "layer", "head", "branch"]
    return (data.units.sort_values("unit_id").reset_index(drop=True),
            data.sink_steps.df().sort_values(key).reset_index(drop=True))


def test_status_json_summary_groups_failures_and_lists_running(synthetic):
    out = json.loads(run_cli("status", str(synthetic.root), "--json").stdout)
    gen = out["generate"]
    assert gen["total"] == 40 and gen["counts"] == {"done": 36, "failed": 1, "not started": 3}
    assert gen["failures"] == [{"error": ERRORS[0], "count": 1, "example_shard": 36}]
    assert gen["mean_shard_s"] > 0 and gen["eta_s"] > 0
    assert "shards" not in gen and out["metrics"] is None and out["sweep_drift"] is None
    full = json.loads(run_cli("status", str(synthetic.root), "--json", "--all").stdout)["generate"]["shards"]
    assert [s["state"] for s in full].count("done") == 36 and full[0]["groups_total"] == 1 and full[0]["elapsed_s"] > 0


def test_status_text_and_watch_end_when_nothing_runs(synthetic):
    text = run_cli("status", str(synthetic.root), "--watch", "0.2").stdout
    assert "shards: 40 total: 36 done, 1 failed, 3 not started" in text
    assert f"1 failed with {ERRORS[0]} (e.g. shard 36" in text


def test_dry_runs_create_or_reopen_and_run_nothing(synthetic, template, tmp_path):
    before = sorted(os.listdir(synthetic.marker_dir("done")))
    text = run_cli("resume", str(synthetic.root), "--dry-run").stdout
    assert "dry run: 4 shard(s) would be run here (1 failed, 3 not started): 36-39; nothing was started" in text
    assert sorted(os.listdir(synthetic.marker_dir("done"))) == before
    assert not os.listdir(synthetic.marker_dir("running"))
    text = run_cli("submit", str(template.root.parents[1] / "bench.yaml"), "--dry-run", "--output-root", str(tmp_path / "new")).stdout
    assert "created run" in text and "40 shard(s) would be run here (40 not started)" in text
    (created,) = (tmp_path / "new").iterdir()
    assert (created / "sweep.resolved.json").is_file() and not list((created / "tables").rglob("*.parquet"))


def test_sweep_drift_stops_shards_resume_and_analyze_until_accepted(synthetic):
    resolved = json.loads(synthetic.resolved_sweep_path.read_text())
    recorded = resolved["hash"]
    resolved["sweep"]["generation"]["steps"] = 9  # an edited file
    synthetic.resolved_sweep_path.write_text(json.dumps(resolved))
    with pytest.raises(SweepDriftError, match=r"generation.steps: 2 → 9"):
        load_resolved_sweep(synthetic)  # what every shard start calls
    with pytest.raises(SweepDriftError, match=recorded[:12]):
        analysis.load_run(synthetic.root)
    for command in (["resume", "--dry-run"], ["analyze", "--no-compact"]):
        proc = run_cli(command[0], str(synthetic.root), *command[1:], check=False)
        assert proc.returncode == 2 and "generation.steps: 2 → 9" in proc.stdout and recorded[:12] in proc.stdout, proc.stdout
    assert "sweep drift" in run_cli("status", str(synthetic.root)).stdout
    run_cli("resume", str(synthetic.root), "--dry-run", "--accept-sweep-drift")
    provenance = json.loads(synthetic.provenance_path.read_text())
    (override,) = provenance["sweep_overrides"]
    assert override["from_hash"] == recorded and override["command"] == "resume"
    assert "generation.steps: 2 → 9" in override["differences"]
    assert load_resolved_sweep(synthetic).generation.steps == 9  # accepted: shards, analysis and resume go on


def test_sinkscope_that_resolves_differently_is_drift(synthetic):
    from jobs.frozen_sweep import sweep_hash

    # as if the run had been created by a sinkscope without recording.top5_query_stride: file and provenance agree
    resolved = json.loads(synthetic.resolved_sweep_path.read_text())
    provenance = json.loads(synthetic.provenance_path.read_text())
    for record in (resolved, provenance["resolved_sweep"]):
        del record["sweep"]["recording"]["top5_query_stride"]
        record["hash"] = sweep_hash(record["sweep"])
    synthetic.resolved_sweep_path.write_text(json.dumps(resolved))
    synthetic.provenance_path.write_text(json.dumps(provenance))
    with pytest.raises(SweepDriftError, match=r"resolves it differently.*\n  - recording.top5_query_stride: absent → 1"):
        load_resolved_sweep(synthetic)


def test_compaction_gives_the_same_rows_and_keeps_resume_and_verify_working(synthetic):
    units, steps = _rows(synthetic)
    reports = compaction.compact_run(synthetic)
    assert sum(r.shards_added for r in reports) == 2 * 36
    assert not list(synthetic.table_dir("sink_steps").glob("part-*.parquet"))
    assert {p.parent.name for p in synthetic.table_dir("sink_steps").rglob("part-0.parquet")} >= {"arm=baseline", "arm=sink_k1"}
    units2, steps2 = _rows(synthetic)
    pd.testing.assert_frame_equal(units, units2)
    pd.testing.assert_frame_equal(steps, steps2)
    status = json.loads(run_cli("status", str(synthetic.root), "--json", "--verify").stdout)
    assert status["generate"]["counts"]["done"] == 36 and status["compacted_problems"] == []
    assert sum(r.shards_added for r in compaction.compact_run(synthetic)) == 0  # rerun: nothing to do


def test_a_regenerated_shard_replaces_its_compacted_rows(synthetic):
    compaction.compact_run(synthetic)
    units, _ = _rows(synthetic)
    # shard 3 is redone (e.g. its images were corrupt): marker gone, part rewritten, marker back
    marker = synthetic.read_marker("done", 3)
    synthetic.done_path(3).unlink()
    assert 3 not in set(_rows(synthetic)[0]["shard_id"])  # not done: its compacted rows are hidden
    shard_units = units[units["shard_id"] == 3]
    from jobs import runformat as rf
    import pyarrow as pa

    rf.atomic_write_parquet(synthetic.part_path("units", 3), pa.Table.from_pandas(shard_units, preserve_index=False), rf.UNITS_SCHEMA)
    synthetic.write_marker("done", 3, {**marker, "parts": {}})
    again, _ = _rows(synthetic)
    pd.testing.assert_frame_equal(units, again)  # the part wins, the compacted copy is left out: counted once
    compaction.compact_run(synthetic, ("units",))
    pd.testing.assert_frame_equal(units, _rows(synthetic)[0])
    assert not synthetic.part_path("units", 3).exists()


KILLER = """
import os, signal, sys
from jobs import compaction
from jobs.rundir import RunDir
point = sys.argv[2]
if point == "before-commit":
    real = compaction.rf.atomic_write_json
    def die(path, payload):
        if path.name == compaction.rf.COMPACTION_STATE:
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, payload)
    compaction.rf.atomic_write_json = die
elif point == "after-commit":
    real = compaction.Path.unlink
    def die(self, missing_ok=False):
        if self.name.startswith("part-shard-"):
            os.kill(os.getpid(), signal.SIGKILL)
        real(self, missing_ok=missing_ok)
    compaction.Path.unlink = die
elif point == "mid-write":
    real = compaction._PartitionWriter.add
    calls = [0]
    def die(self, *a):
        calls[0] += 1
        if calls[0] == 30:
            os.kill(os.getpid(), signal.SIGKILL)
        real(self, *a)
    compaction._PartitionWriter.add = die
compaction.compact_run(RunDir(sys.argv[1]))
"""


@pytest.mark.parametrize("point", ["mid-write", "before-commit", "after-commit"])
def test_compaction_killed_at_any_point_then_rerun_gives_exactly_the_same_rows(synthetic, point):
    units, steps = _rows(synthetic)
    proc = subprocess.run([sys.executable, "-c", KILLER, str(synthetic.root), point], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pd.testing.assert_frame_equal(units, _rows(synthetic)[0])  # readers right after the kill
    pd.testing.assert_frame_equal(steps, _rows(synthetic)[1])
    run_cli("compact", str(synthetic.root))
    units2, steps2 = _rows(synthetic)
    pd.testing.assert_frame_equal(units, units2)
    pd.testing.assert_frame_equal(steps, steps2)
    assert not list(synthetic.table_dir("units").glob("part-*.parquet"))
    assert not [p for p in synthetic.table_dir("sink_steps").rglob("*") if p.name.startswith(".")]


def test_metric_jobs_leave_markers_that_status_and_logs_show(synthetic):
    ShardJob("metrics", ("lpips",)).run(synthetic.root, 0)
    with pytest.raises(Exception):
        ShardJob("metrics", ("lpips",)).run(synthetic.root, 38)  # not generated: the metric job fails
    assert synthetic.read_marker("done", 0, "metrics")["metrics"] == ["lpips"]
    assert "RunDirError" in synthetic.read_marker("failed", 38, "metrics")["error"]
    status = json.loads(run_cli("status", str(synthetic.root), "--json").stdout)["metrics"]
    assert status["counts"] == {"done": 1, "failed": 1} and status["failures"][0]["example_shard"] == 38
    text = run_cli("status", str(synthetic.root)).stdout
    assert "metric jobs: 2 total: 1 done, 1 failed" in text and "--task metrics" in text
    logs = run_cli("logs", str(synthetic.root), "38", "--task", "metrics").stdout
    assert "metrics-shard-00038.log" in logs and "RunDirError" in logs
