"""load_run / baseline_arm on real Parquet files written like the jobs package writes them."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis import RunDirError, baseline_arm, load_run
from analysis._io import METRICS_SCHEMA, UNITS_SCHEMA, write_parquet_atomic
from jobs.frozen_sweep import SweepDriftError


def test_load_run_reads_tables_with_contract_columns(fake_run):
    run_dir = fake_run(n_prompts=4, n_seeds=2, prompts_per_shard=2)
    run = load_run(run_dir)
    assert list(run.units.columns[: len(UNITS_SCHEMA)]) == UNITS_SCHEMA.names
    # 4 prompts x 2 seeds x 6 arms
    assert len(run.units) == 48
    assert run.units["unit_id"].is_unique
    assert sorted(run.units["shard_id"].unique()) == [0, 1]
    assert run.units["random_weights"].dtype == bool
    assert run.arms == ["base", "noop", "sink_k1", "rand_k1", "sink_k5", "rand_k5"]
    assert run.baseline == "base"
    assert run.sweep["name"] == "demo"
    # 48 units x 4 steps x 3 layers x 2 heads x 2 branches
    assert len(run.sink_steps) == 48 * 4 * 3 * 2 * 2
    assert isinstance(run.sink_steps.df(["topk_modality"])["topk_modality"].iloc[0][0], str)
    assert run.metrics.empty and list(run.metrics.columns) == METRICS_SCHEMA.names
    assert run.random_weights
    img = run.image(run.units["unit_id"].iloc[0])
    assert img.size == (64, 64) and img.mode == "RGB"


def test_missing_tables_give_empty_frames_with_columns(fake_run):
    run_dir = fake_run(n_prompts=1, prompts_per_shard=1)
    for table in ("units", "sink_steps"):
        for part in (run_dir / "tables" / table).glob("*.parquet"):
            part.unlink()
    run = load_run(run_dir)
    assert run.units.empty and "image_path" in run.units.columns
    assert len(run.sink_steps) == 0 and run.sink_steps.df().columns.tolist()[-1] == "layer_name"
    assert run.metrics.empty and "backbone" in run.metrics.columns
    assert not run.random_weights


def test_a_run_without_resolved_sweep_is_an_error(tmp_path):
    (tmp_path / "old-run").mkdir()
    with pytest.raises(SweepDriftError, match=r"sweep.resolved.json: missing"):
        load_run(tmp_path / "old-run")
    with pytest.raises(RunDirError, match="does not exist"):
        load_run(tmp_path / "nope")


def test_scratch_hidden_and_underscore_files_are_ignored(fake_run):
    run_dir = fake_run(n_prompts=2, prompts_per_shard=2)
    units = run_dir / "tables" / "units"
    first = next(units.glob("part-*.parquet"))
    # an unfinished shard's scratch area and a writer's temp files must never be read
    scratch = run_dir / "tables" / "_scratch" / "shard-00000"
    scratch.mkdir(parents=True)
    shutil.copy(first, scratch / "part-0.parquet")
    shutil.copy(first, units / ".part-shard-00000.parquet.tmp")
    shutil.copy(first, units / "_part-shard-00000.parquet")
    (units / ".broken.tmp").write_bytes(b"not parquet")
    run = load_run(run_dir)
    assert run.units["unit_id"].is_unique
    assert len(run.units) == 2 * 2 * 6


def test_shards_without_done_marker_are_left_out(fake_run):
    run_dir = fake_run(n_prompts=4, prompts_per_shard=2, done_shards=[1])
    with pytest.warns(UserWarning, match=r"shards \[0\]"):
        run = load_run(run_dir)
    assert set(run.units["shard_id"]) == {1}
    assert set(run.sink_steps.df(["unit_id"])["unit_id"]) == set(run.units["unit_id"])
    assert run.unfinished_shards == [0] and run.done_shards == [1]
    everything = load_run(run_dir, only_done=False)
    assert set(everything.units["shard_id"]) == {0, 1}


def test_a_part_with_another_schema_is_an_error_naming_the_table(fake_run):
    run_dir = fake_run(n_prompts=1, prompts_per_shard=1)
    part = run_dir / "tables" / "units" / "part-shard-00000.parquet"
    pq.write_table(pa.table({"unit_id": ["u"], "prompt_id": ["not-an-int"]}), part)
    with pytest.raises(ValueError, match=r"tables/units: a file does not match the run format's units schema"):
        load_run(run_dir)


def test_duplicate_metric_rows_are_an_error(fake_run):
    run_dir = fake_run(n_prompts=1, prompts_per_shard=1)
    rows = pd.DataFrame(
        {
            "unit_id": ["p00000-s000-base"], "shard_id": [0], "prompt_id": [0], "seed_index": [0], "arm": ["base"],
            "metric": ["clip_t"], "value": [0.3], "random_weights": [True], "backbone": ["x"],
        }
    )  # fmt: skip
    folder = run_dir / "tables" / "metrics" / "metric=clip_t"
    write_parquet_atomic(pd.concat([rows, rows]), folder / "part-shard-00000.parquet", METRICS_SCHEMA)
    with pytest.raises(RunDirError, match="more than one value"):
        load_run(run_dir)


def test_atomic_writer_leaves_no_temp_files(tmp_path):
    df = pd.DataFrame({"a": [1, 2]})
    out = write_parquet_atomic(df, tmp_path / "x" / "part-shard-00000.parquet")
    assert [p.name for p in out.parent.iterdir()] == ["part-shard-00000.parquet"]
    assert pq.read_table(out).to_pandas()["a"].tolist() == [1, 2]


def _resolved(arms, baseline=None):
    """The shape of a resolved sweep (RunData.sweep) as far as baseline_arm reads it."""
    return {"arms": [{"name": n, "intervention": iv} for n, iv in arms], "analysis": {"baseline": baseline}}


@pytest.mark.parametrize(
    "sweep, expected",
    [
        (_resolved([("b", None), ("s", {"k": 1})]), "b"),
        (_resolved([("b1", None), ("b2", None)], baseline="b2"), "b2"),
    ],
)
def test_baseline_arm(sweep, expected):
    assert baseline_arm(sweep) == expected


@pytest.mark.parametrize(
    "sweep, message",
    [
        (_resolved([("s", {"k": 1})]), "no arm has 'intervention: null'"),
        (_resolved([("a", None), ("b", None)]), r"\['a', 'b'\]"),
    ],
)
def test_baseline_arm_errors(sweep, message):
    with pytest.raises(RunDirError, match=message):
        baseline_arm(sweep)
