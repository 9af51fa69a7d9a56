"""Parquet schemas the analysis reads and writes, and the one atomic writer it uses.

Readers of a run directory see many writers at once (one job per shard), so every file is
written under a temporary name that pyarrow's discovery ignores (leading ``.``), fsynced,
then renamed onto its final name. Schemas are explicit: a file whose column is all-null or
has another integer width must not make the whole dataset unreadable.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

UNITS_SCHEMA = pa.schema(
    [
        ("unit_id", pa.string()),
        ("prompt_id", pa.int64()),
        ("seed_index", pa.int64()),
        ("seed", pa.int64()),
        ("arm", pa.string()),
        ("prompt", pa.string()),
        ("tag", pa.string()),
        ("shard_id", pa.int64()),
        ("image_path", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("random_weights", pa.bool_()),
        ("model", pa.string()),
    ]
)

SINK_STEPS_SCHEMA = pa.schema(
    [
        ("unit_id", pa.string()),
        ("prompt_id", pa.int64()),
        ("seed_index", pa.int64()),
        ("arm", pa.string()),
        ("step", pa.int64()),
        ("timestep", pa.float64()),
        ("sigma", pa.float64()),
        ("layer", pa.int64()),
        ("head", pa.int64()),
        ("branch", pa.string()),
        ("topk_idx", pa.list_(pa.int32())),
        ("topk_modality", pa.list_(pa.string())),
        ("topk_mass", pa.list_(pa.float32())),
        ("max_mass", pa.float64()),
        ("entropy", pa.float64()),
        ("top5_conc", pa.float64()),
        ("intervened", pa.bool_()),
        ("selected_idx", pa.list_(pa.int32())),
        ("removed_mass_after", pa.float32()),
        ("layer_name", pa.string()),  # the attention module's name (layer ids of glob-only modules are num_blocks + rank)
        # atlas columns (workers.recorder): the top-1 key and where it sits (manifests.keys), sink-to-random ratios
        ("sink_idx", pa.int32()),
        ("sink_region", pa.string()),
        ("sink_frame", pa.int32()),
        ("sink_row", pa.int32()),
        ("sink_col", pa.int32()),
        ("sink_segment", pa.string()),
        ("sink_position", pa.int32()),
        ("sink_token", pa.string()),
        ("sink_ratio", pa.float32()),
        ("sink_ratio_median", pa.float32()),
    ]
)

METRICS_SCHEMA = pa.schema(
    [
        ("unit_id", pa.string()),
        ("prompt_id", pa.int64()),
        ("seed_index", pa.int64()),
        ("arm", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("random_weights", pa.bool_()),
        ("backbone", pa.string()),
    ]
)

# One row per (metric, arm, reference set): numbers that only exist for a whole image set (FID).
SET_METRICS_SCHEMA = pa.schema(
    [
        ("metric", pa.string()),
        ("mode", pa.string()),  # "paired" (arm vs its paired baseline) or "calibration"
        ("arm", pa.string()),
        ("reference", pa.string()),
        ("n", pa.int64()),
        ("value", pa.float64()),
        ("random_weights", pa.bool_()),
        ("backbone", pa.string()),
    ]
)

# Per-unit feature vectors cached by set metrics, so shards can be featurised independently.
FEATURES_SCHEMA = pa.schema(
    [
        ("unit_id", pa.string()),
        ("prompt_id", pa.int64()),
        ("seed_index", pa.int64()),
        ("arm", pa.string()),
        ("feature", pa.list_(pa.float32())),
        ("random_weights", pa.bool_()),
        ("backbone", pa.string()),
    ]
)

_HIVE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


class TableReadError(ValueError):
    """A Parquet file of the run does not match the schema the analysis expects."""


def empty_frame(schema: pa.Schema) -> pd.DataFrame:
    """An empty DataFrame whose columns and dtypes follow ``schema``."""
    return schema.empty_table().to_pandas()


def table_files(root: Path) -> list[Path]:
    """Parquet data files under ``root`` as pyarrow discovers them (``_*``/``.*`` ignored)."""
    if not root.is_dir():
        return []
    dataset = ds.dataset(
        str(root), format="parquet", exclude_invalid_files=False, ignore_prefixes=[".", "_"]
    )
    return sorted(Path(f) for f in dataset.files)


def _cast_file(path: Path, root: Path, schema: pa.Schema) -> pa.Table:
    table = pq.read_table(path)
    # Hive-style directories (arm=x/) supply columns the file itself may not carry.
    rel_parts = path.relative_to(root).parts[:-1]
    for part in rel_parts:
        m = _HIVE.match(part)
        if m and m.group(1) not in table.column_names:
            table = table.append_column(m.group(1), pa.array([m.group(2)] * table.num_rows))
    columns, fields = [], []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            if not col.type.equals(field.type):
                try:
                    col = col.cast(field.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise TableReadError(
                        f"{path}: column {field.name!r} has type {col.type}, expected {field.type} ({exc})"
                    ) from exc
        else:
            col = pa.nulls(table.num_rows, field.type)
        columns.append(col)
        fields.append(field)
    extra = [n for n in table.column_names if n not in schema.names]
    for name in extra:  # keep columns a writer added; they are not part of the contract
        columns.append(table.column(name))
        fields.append(table.schema.field(name))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def read_table(root: Path, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Read every part file under ``root`` into one table with ``schema`` (empty if none)."""
    files = table_files(root)
    if not files:
        table = schema.empty_table()
    else:
        tables = [_cast_file(f, root, schema) for f in files]
        table = pa.concat_tables(tables, promote_options="permissive")
    if columns is not None:
        table = table.select(columns)
    return table


def write_parquet_atomic(table: pa.Table | pd.DataFrame, path: Path, schema: pa.Schema | None = None) -> Path:
    """Write ``table`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, schema=schema, preserve_index=False)
    elif schema is not None:
        table = table.select(schema.names).cast(schema)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def write_text_atomic(text: str, path: Path) -> Path:
    """Same guarantee as :func:`write_parquet_atomic` for report files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
