"""The run format has one owner: a shard written by `run_shard` reads back through `analysis` column for column."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import analysis
from jobs import runformat as rf
from jobs.run_shard import run_shard
from orchestrate.create import create_run
from tests.conftest import tiny_sweep


@pytest.fixture(scope="module")
def written_run(tmp_path_factory):
    """One real shard of tiny-sd3 (2 steps, 64²), written by the jobs package in this process."""
    tmp = tmp_path_factory.mktemp("roundtrip")
    run, manifest, _ = create_run(tiny_sweep(tmp, prompts=1, per_shard=1))
    run_shard(run.root, manifest.shard_ids[0])
    return run


@pytest.mark.slow
def test_written_parts_have_exactly_the_run_format_schemas(written_run):
    for table, schema in (("units", rf.UNITS_SCHEMA), ("sink_steps", rf.SINK_STEPS_SCHEMA)):
        written = pq.read_schema(written_run.part_path(table, 0))
        assert written.remove_metadata().equals(schema), (table, written, schema)


@pytest.mark.slow
def test_analysis_reads_every_written_column_with_its_type(written_run):
    data = analysis.load_run(written_run.root)
    for table, schema, read in (
        ("units", rf.UNITS_SCHEMA, pa.Table.from_pandas(data.units, preserve_index=False)),
        ("sink_steps", rf.SINK_STEPS_SCHEMA, data.sink_steps.arrow()),
    ):
        written = pq.read_table(written_run.part_path(table, 0))
        assert read.column_names == schema.names == written.column_names, table
        read = read.cast(schema)  # pandas carries no nullability; the values and types must survive the trip
        key = ["unit_id"] if table == "units" else ["unit_id", "step", "layer", "head", "branch"]
        assert read.sort_by([(k, "ascending") for k in key]).equals(written.sort_by([(k, "ascending") for k in key]).cast(schema)), table
    assert len(data.units) == 3 and data.units["random_weights"].all()
    assert len(data.sink_steps) == 3 * 2 * 2 * 4 * 2  # units × steps × recorded layers × heads × branches


@pytest.mark.slow
def test_pandas_dtypes_follow_the_schema(written_run):
    units = analysis.load_run(written_run.root).units
    assert units["shard_id"].dtype == "int32" and units["seed"].dtype == "int64" and units["guidance"].dtype == "float32"


def test_conform_names_missing_columns():
    with pytest.raises(rf.SchemaError, match=r"part.parquet: missing column\(s\) \['shard_id'"):
        rf.conform(pa.table({"unit_id": ["u"]}), rf.UNITS_SCHEMA, "part.parquet")


def test_atomic_writer_leaves_the_old_file_on_error(tmp_path):
    path = tmp_path / "f.json"
    rf.atomic_write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with rf.atomic_writer(path) as handle:
            handle.write(b"partial")
            raise RuntimeError("crash mid-write")
    assert path.read_text().strip().startswith("{") and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_names_round_trip():
    assert rf.shard_id_of(rf.part_name(12)) == 12 == rf.shard_id_of(rf.marker_name(12)) == rf.shard_id_of(rf.log_name(12, "metrics"))
    assert rf.log_name(3) == "shard-00003.log" and rf.log_name(3, "metrics") == "metrics-shard-00003.log"
