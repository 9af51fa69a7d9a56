"""The run directory format, defined once: layout, file names, every table's schema, markers, atomic writes.

Writers (jobs, workers, analysis metric jobs, compaction) and readers (orchestrate status, analysis) import
these names instead of spelling paths or columns themselves, so the two sides cannot drift apart. Torch-free:
pyarrow only.

    <run>/sweep.yaml                   the submitted YAML, kept for reference only (never parsed again)
    <run>/sweep.resolved.json          the resolved sweep (pydantic dump) + its hash: what every process reads
    <run>/manifest.parquet             one row per unit (manifests.MANIFEST_SCHEMA)
    <run>/provenance.json              code, packages, host, the resolved sweep's hash, recorded overrides
    <run>/state/{done,failed,running}/shard-00012.json            generation job markers
    <run>/state/metrics/{done,failed,running}/shard-00012.json    metric job markers
    <run>/logs/shard-00012.log  logs/metrics-shard-00012.log
    <run>/images/arm=<arm>/p00012-s003.png     (a video: its frames side by side, see frame_strip)
    <run>/tables/<table>[/metric=<name>]/part-shard-00012.parquet  one part per shard (fixed name: rerun replaces)
    <run>/tables/<table>/_compacted/...  + _compaction.json        compacted parts (jobs.compaction)
    <run>/tables/_scratch/shard-00012/                             finished groups of an unfinished shard

A job is done iff its done marker exists; the marker is written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
from pathlib import Path
from typing import IO, Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.expand import MANIFEST_SCHEMA, shard_name

__all__ = [
    "MANIFEST_SCHEMA", "shard_name", "shard_id_of", "part_name", "image_relpath", "TASKS", "MARKER_KINDS",
    "UNIT_KEY_FIELDS", "UNITS_SCHEMA", "SINK_STEP_RECORD_SCHEMA", "SINK_STEPS_SCHEMA", "METRICS_SCHEMA",
    "SET_METRICS_SCHEMA", "FEATURES_SCHEMA", "TABLE_SCHEMAS", "conform", "atomic_writer", "atomic_write_bytes",
    "atomic_write_json", "atomic_write_text", "atomic_write_parquet", "parquet_bytes",
]

# ---- layout ---------------------------------------------------------------------------------------------
SWEEP_YAML = "sweep.yaml"
RESOLVED_SWEEP = "sweep.resolved.json"
MANIFEST = "manifest.parquet"
PROVENANCE = "provenance.json"
STATE = "state"
LOGS = "logs"
TABLES = "tables"
IMAGES = "images"
REPORT = "report"
SCRATCH = "_scratch"  # leading underscore: dataset discovery ignores it
COMPACTED = "_compacted"
COMPACTION_STATE = "_compaction.json"

TASKS = ("generate", "metrics")  # what a shard job does (jobs.tasks.ShardJob.kind)
MARKER_KINDS = ("done", "failed", "running")


def task_prefix(task: str) -> str:
    """'' for generation (its markers and logs keep the original names), the task's name otherwise."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return "" if task == "generate" else task


def marker_dir(root: Path, kind: str, task: str = "generate") -> Path:
    if kind not in MARKER_KINDS:
        raise ValueError(f"unknown marker kind {kind!r}; expected one of {MARKER_KINDS}")
    prefix = task_prefix(task)
    return Path(root) / STATE / prefix / kind if prefix else Path(root) / STATE / kind


def marker_name(shard_id: int) -> str:
    return f"{shard_name(shard_id)}.json"


def shard_id_of(name: str) -> int:
    """The shard id in a marker, log or part file name (shard-00012.json, part-shard-00012.parquet, ...)."""
    stem = name.split(".", 1)[0]
    return int(stem.rsplit("shard-", 1)[1])


def log_name(shard_id: int, task: str = "generate") -> str:
    prefix = task_prefix(task)
    return f"{prefix + '-' if prefix else ''}{shard_name(shard_id)}.log"


def part_name(shard_id: int) -> str:
    return f"part-{shard_name(shard_id)}.parquet"


def table_dir(root: Path, table: str, partition: tuple[str, str] | None = None) -> Path:
    """tables/<table>, or tables/<table>/<key>=<value> for a Hive-style partition (metric=lpips)."""
    if table not in TABLE_SCHEMAS:
        raise ValueError(f"unknown table {table!r}; expected one of {sorted(TABLE_SCHEMAS)}")
    folder = Path(root) / TABLES / table
    return folder / f"{partition[0]}={partition[1]}" if partition else folder


def image_relpath(arm: str, prompt_id: int, seed_index: int) -> str:
    """Where a unit's PNG goes, relative to the run directory (also the units table's image_path)."""
    return f"{IMAGES}/arm={arm}/p{prompt_id:05d}-s{seed_index:03d}.png"


# A video unit is one PNG: its frames side by side, left to right (a frame strip), with the frame count in a PNG
# text chunk. Lossless like every still image, checksummed and cached as one file, viewable anywhere; the units
# table's width / height are the strip's. Image metrics score one frame of it, SCORED_FRAME; a PNG without the
# chunk is a still image and is scored whole.
FRAMES_CHUNK = "sinkscope:frames"


def frame_strip(frames: list) -> Any:
    """One PIL image of a video's frames (PIL images of one size) side by side, tagged with their count."""
    from PIL import Image

    if not frames:
        raise ValueError("a video unit needs at least one frame")
    width, height = frames[0].size
    strip = Image.new("RGB", (width * len(frames), height))
    for i, frame in enumerate(frames):
        if frame.size != (width, height):
            raise ValueError(f"frame {i} is {frame.size[0]}×{frame.size[1]}, frame 0 is {width}×{height}")
        strip.paste(frame.convert("RGB"), (i * width, 0))
    strip.info[FRAMES_CHUNK] = str(len(frames))
    return strip


def strip_frames(image) -> int:
    """The number of frames in a unit's image (1: a still image)."""
    return int(image.info.get(FRAMES_CHUNK, 1))


def scored_frame_index(num_frames: int) -> int:
    """The frame image metrics score: the middle one (the first frame of a causal video VAE is encoded alone)."""
    return num_frames // 2


def scored_frame(image) -> Any:
    """What image metrics score of a unit's image: the image itself, or the SCORED_FRAME of a frame strip."""
    frames = strip_frames(image)
    if frames == 1:
        return image
    width = image.width // frames
    left = scored_frame_index(frames) * width
    return image.crop((left, 0, left + width, image.height))


def png_bytes(image) -> bytes:
    """A unit's PNG file: the image, losslessly, with a frame strip's frame count kept in its text chunk."""
    from PIL import PngImagePlugin

    info = None
    if FRAMES_CHUNK in image.info:
        info = PngImagePlugin.PngInfo()
        info.add_text(FRAMES_CHUNK, str(image.info[FRAMES_CHUNK]))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def scratch_group_names(group_index: int) -> tuple[str, str]:
    """(units, sink_steps) file names of one finished group in a shard's scratch folder."""
    return f"units-g{group_index:05d}.parquet", f"sink_steps-g{group_index:05d}.parquet"


# ---- schemas (one definition serves writer and reader) --------------------------------------------------
# Every row of a per-unit table starts with the unit's key; shard_id lets readers and compaction select
# the rows of one shard without a join.
UNIT_KEY_FIELDS = [
    pa.field("unit_id", pa.string()),
    pa.field("shard_id", pa.int32()),
    pa.field("prompt_id", pa.int32()),
    pa.field("seed_index", pa.int32()),
    pa.field("arm", pa.string()),
]

UNITS_SCHEMA = pa.schema(
    UNIT_KEY_FIELDS
    + [
        ("seed", pa.int64()),
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
        ("seconds", pa.float64()),  # time spent on the unit in this run (0 for a unit taken from elsewhere)
        ("reused_from", pa.string()),  # cache entry it was taken from (jobs.baseline_cache: a baseline or an intervened unit), or
        # "unit:<unit_id>" of an identical baseline arm of its group; null: generated by its own pipeline call
        ("start_step", pa.int32()),  # > 0: the arm ran from the group baseline's latents entering this step
    ]
)

# What the worker's recorder produces (workers.recorder): one row per step × layer × head × CFG branch.
# `layer` is stable per architecture (block index, or num_blocks + rank for glob-only modules); `layer_name`
# is the attention module's name.
SINK_STEP_RECORD_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int32(), nullable=False),
        pa.field("timestep", pa.float32(), nullable=False),
        pa.field("sigma", pa.float32(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("head", pa.int32(), nullable=False),
        pa.field("branch", pa.string(), nullable=False),
        pa.field("topk_idx", pa.list_(pa.int32())),
        pa.field("topk_modality", pa.list_(pa.string())),
        pa.field("topk_mass", pa.list_(pa.float32())),
        pa.field("max_mass", pa.float32()),
        pa.field("entropy", pa.float32()),
        pa.field("top5_conc", pa.float32()),
        pa.field("intervened", pa.bool_(), nullable=False),
        pa.field("selected_idx", pa.list_(pa.int32())),
        pa.field("removed_mass_after", pa.float32()),
        pa.field("layer_name", pa.string(), nullable=False),
        # atlas columns (issue 12): the top-1 key (filled when `mass` is recorded) and where it sits
        # (manifests.keys: region label, image frame / row / col, or text segment / position / token), and the
        # sink-to-random key-importance ratios (stat `ratio`: top-1 mass over the mean / median key mass)
        pa.field("sink_idx", pa.int32()),
        pa.field("sink_region", pa.string()),
        pa.field("sink_frame", pa.int32()),
        pa.field("sink_row", pa.int32()),
        pa.field("sink_col", pa.int32()),
        pa.field("sink_segment", pa.string()),
        pa.field("sink_position", pa.int32()),
        pa.field("sink_token", pa.string()),
        pa.field("sink_ratio", pa.float32()),
        pa.field("sink_ratio_median", pa.float32()),
    ]
)

# tables/sink_steps: the unit key (added by jobs.run_shard) + the recorder's columns.
SINK_STEPS_SCHEMA = pa.schema(UNIT_KEY_FIELDS + list(SINK_STEP_RECORD_SCHEMA))

# tables/metrics/metric=<name>: one row per scored unit.
METRICS_SCHEMA = pa.schema(
    UNIT_KEY_FIELDS
    + [
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("random_weights", pa.bool_()),
        ("backbone", pa.string()),
    ]
)

# tables/features/metric=<name>: per-unit feature vectors cached by set metrics (FID), one part per shard.
FEATURES_SCHEMA = pa.schema(
    UNIT_KEY_FIELDS
    + [
        ("feature", pa.list_(pa.float32())),
        ("random_weights", pa.bool_()),
        ("backbone", pa.string()),
    ]
)

# tables/set_metrics/metric=<name>: one row per (metric, arm, reference set); numbers of a whole image set.
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

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "units": UNITS_SCHEMA,
    "sink_steps": SINK_STEPS_SCHEMA,
    "metrics": METRICS_SCHEMA,
    "features": FEATURES_SCHEMA,
    "set_metrics": SET_METRICS_SCHEMA,
}
# Tables with one part per shard (set_metrics is one small file per metric).
SHARDED_TABLES = ("units", "sink_steps", "metrics", "features")


class SchemaError(ValueError):
    """A table does not have the columns or types of the run format."""


def conform(table: pa.Table, schema: pa.Schema, source: str = "table") -> pa.Table:
    """`table` with exactly the columns of `schema`, in its order and types; a missing column is an error."""
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise SchemaError(f"{source}: missing column(s) {missing}; expected {schema.names}")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as error:
        raise SchemaError(f"{source}: cannot cast to the run format's schema ({error})") from error


# ---- the one atomic writer ------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[IO[bytes]]:
    """Yield a binary file at a hidden temporary name beside `path`; on success fsync and rename it onto `path`.

    Readers (and dataset discovery, which skips names starting with '.') see the old file or the whole new
    one, never a partial one; on an error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # host and pid: unique also among hosts that share the folder (a cluster's shared storage)
    tmp = path.parent / f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{id(path):x}"
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (best effort: some file systems cannot open a folder; the rename is atomic anyway)."""
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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_writer(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> Path:
    atomic_write_bytes(path, text.encode("utf-8"))
    return Path(path)


def atomic_write_json(path: str | Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=1, sort_keys=True, default=str) + "\n").encode())


def sha256_file(path: str | Path) -> str:
    """The checksum markers and the compaction record carry for every file they vouch for."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def atomic_write_parquet(path: str | Path, table: pa.Table, schema: pa.Schema | None = None) -> Path:
    """Write one Parquet file atomically, conformed to `schema` when given."""
    if schema is not None:
        table = conform(table, schema, str(path))
    with atomic_writer(path) as handle:
        pq.write_table(table, handle)
    return Path(path)
