"""How the analysis reads and writes run tables: through the run format (`jobs.runformat`) only.

Schemas, file names and the atomic writer are the run format's; this module adds the reader side: which files
of a table are live (parts of done shards + compacted files, `jobs.compaction`), read into one Arrow table with
the run format's schema, either eagerly (small tables) or as a lazy DuckDB relation (sink steps).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from jobs import runformat as rf
from jobs.compaction import DatasetFiles, dataset_files
from jobs.runformat import FEATURES_SCHEMA, METRICS_SCHEMA, SET_METRICS_SCHEMA, SINK_STEPS_SCHEMA, UNITS_SCHEMA

__all__ = ["FEATURES_SCHEMA", "METRICS_SCHEMA", "SET_METRICS_SCHEMA", "SINK_STEPS_SCHEMA", "UNITS_SCHEMA", "TableReadError",
           "empty_frame", "read_table", "read_datasets", "write_parquet_atomic", "write_text_atomic"]


class TableReadError(ValueError):
    """A Parquet file of the run does not match the run format's schema."""


def empty_frame(schema: pa.Schema) -> pd.DataFrame:
    """An empty DataFrame whose columns and dtypes follow ``schema``."""
    return schema.empty_table().to_pandas()


def _dataset(files: list[Path], schema: pa.Schema) -> ds.Dataset:
    return ds.dataset([str(f) for f in files], schema=schema, format="parquet")


MANY_FILES = 64  # above this many files DuckDB reads them (in parallel), ~4× faster than pyarrow datasets here


def read_datasets(datasets: list[DatasetFiles], schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Every live row of the given datasets as one table with ``schema`` (small tables: units, metrics)."""
    names = columns or schema.names
    if sum(len(d.files) for d in datasets) > MANY_FILES:
        try:
            import duckdb
        except ImportError:
            pass
        else:
            return _read_with_duckdb(duckdb, datasets, schema, names)
    pieces = []
    for d in datasets:
        try:
            if d.parts:
                pieces.append(_dataset(d.parts, schema).to_table(columns=names))
            if d.compacted:
                keep = None if not d.exclude else ~ds.field("shard_id").isin(sorted(d.exclude))
                pieces.append(_dataset(d.compacted, schema).to_table(columns=names, filter=keep))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError) as error:
            raise _damaged_part(d) or TableReadError(
                f"{d.folder}: a file does not match the run format's {d.table} schema ({error})") from error
    if not pieces:
        return schema.empty_table().select(names)
    return pa.concat_tables(pieces)


def _damaged_part(d: DatasetFiles) -> TableReadError | None:
    """An error naming the first unreadable part of a dataset (its shard) and the commands that repair
    it, or None when every part opens (done markers vouch for the parts; `resume` reruns damaged shards)."""
    import pyarrow.parquet as pq

    for part in d.parts:
        try:
            pq.read_metadata(part)
        except (pa.ArrowInvalid, OSError) as part_error:
            run_dir = Path(part).parents[2] if d.table in ("units", "sink_steps") else Path(part).parents[3]
            return TableReadError(
                f"{part}: the {d.table} part of shard {rf.shard_id_of(Path(part).name)} is damaged ({part_error}). "
                f"`orchestrate status {run_dir} --verify` lists every damaged shard; `orchestrate resume {run_dir} --verify` reruns them"
            )
    return None


def _read_with_duckdb(duckdb, datasets: list[DatasetFiles], schema: pa.Schema, names: list[str]) -> pa.Table:
    cols = ", ".join('"' + n + '"' for n in names)
    selects = []
    for d in datasets:
        for files, exclude in ((d.parts, set()), (d.compacted, d.exclude)):
            if files:
                listed = "[" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "]"
                where = f" WHERE shard_id NOT IN ({', '.join(map(str, sorted(exclude)))})" if exclude else ""
                selects.append(f"SELECT {cols} FROM read_parquet({listed}, hive_partitioning=false){where}")
    try:
        con = duckdb.connect()
        con.execute("SET enable_progress_bar = false")
        table = con.sql(" UNION ALL ".join(selects)).to_arrow_table()
        return table.cast(pa.schema([schema.field(n) for n in names]))
    except (duckdb.Error, pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
        damaged = next(filter(None, map(_damaged_part, datasets)), None)
        if damaged:
            raise damaged from error
        folders = sorted({str(d.folder) for d in datasets})
        raise TableReadError(f"{', '.join(folders)}: a file does not match the run format's schema ({error})") from error


def read_table(root: Path, schema: pa.Schema, columns: list[str] | None = None, done: set[int] | None = None) -> pa.Table:
    """Every live row of the table dataset(s) under ``root`` (a table folder or one ``metric=`` partition)."""
    root = Path(root)
    table = next((name for name, s in rf.TABLE_SCHEMAS.items() if s.equals(schema)), None)
    if table is None:
        raise ValueError("read_table: schema is not one of the run format's table schemas")
    if table == "set_metrics":  # a few whole-set files per metric (part-paired, part-calibration), not per shard
        files = sorted(p for p in root.rglob("*.parquet") if not any(q.startswith(("_", ".")) for q in p.relative_to(root).parts))
        return _dataset(files, schema).to_table(columns=columns) if files else schema.empty_table().select(columns or schema.names)
    folders = [root] if "=" in root.name or table in ("units", "sink_steps") else sorted(p for p in root.glob("*=*") if p.is_dir())
    return read_datasets([dataset_files(f, table, done) for f in folders if f.is_dir()], schema, columns)


def write_parquet_atomic(table: pa.Table | pd.DataFrame, path: Path, schema: pa.Schema | None = None) -> Path:
    """Write ``table`` to ``path`` so that readers see either the old file or the whole new one."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, schema=schema, preserve_index=False)
    return rf.atomic_write_parquet(path, table, schema)


def write_text_atomic(text: str, path: Path) -> Path:
    """Same guarantee as :func:`write_parquet_atomic` for report files."""
    return rf.atomic_write_text(path, text)
