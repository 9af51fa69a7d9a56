"""Explicit Parquet schemas of the tables jobs writes: one schema for every part file of a dataset.

A column that is all-null in one part and typed in another makes a dataset unreadable, so every part is
cast to the same schema before it is written.
"""

from __future__ import annotations

import pyarrow as pa

UNITS_SCHEMA = pa.schema(
    [
        ("unit_id", pa.string()),
        ("shard_id", pa.int32()),
        ("prompt_id", pa.int32()),
        ("seed_index", pa.int32()),
        ("seed", pa.int64()),
        ("arm", pa.string()),
        ("intervention", pa.string()),  # JSON of the resolved Intervention; null for a baseline
        ("prompt", pa.string()),
        ("tag", pa.string()),
        ("geneval_index", pa.int32()),
        ("image_path", pa.string()),  # relative to the run directory
        ("image_sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("steps", pa.int32()),
        ("guidance", pa.float32()),
        ("model", pa.string()),
        ("random_weights", pa.bool_()),  # True: the image comes from a randomly initialised model
        ("seconds", pa.float64()),  # time spent on the unit in this run (0 for a baseline reused from the cache)
        ("reused_from", pa.string()),  # baseline cache entry the unit was taken from (jobs.baseline_cache); null: generated here
        ("start_step", pa.int32()),  # > 0: the arm ran from the group baseline's latents entering this step (prefix sharing)
    ]
)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    return table.select(schema.names).cast(schema)
