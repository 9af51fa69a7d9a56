"""Compaction of per-shard part files into a few large Parquet files, and which files a reader must read.

A *dataset* is one folder of per-shard parts: tables/units, tables/sink_steps, and each
tables/metrics/metric=<name> and tables/features/metric=<name>. Compaction (under the run lock) rewrites
the parts of done shards into `_compacted/g<generation>/[<key>=<value>/]part-<n>.parquet` (sink steps split
by arm), then commits by atomically replacing `_compaction.json`, which lists the live compacted files and
the shards (with the sha256 of the part each came from) every file holds. Only after the commit are the
ingested parts deleted. So a crash anywhere leaves either the old state or the new one, and readers follow
one rule that counts every row exactly once:

    rows = parts of done shards  +  compacted rows of done shards that have no live part

(a part of a covered shard, left by a crash before deletion or written by a rerun, wins). A rerun of the
compaction removes unreferenced generations, deletes parts identical to what is already compacted and
rewrites compacted files only for shards that were regenerated since. Markers stay the truth throughout.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs import runformat as rf
from jobs.rundir import RunDir

ROW_GROUP_ROWS = 256_000  # rows buffered per output file before a row group is written (bounds memory)
PARTITION_BY = {"sink_steps": "arm"}  # tables split into one file per value of this column


@dataclass
class DatasetFiles:
    """The files a reader of one dataset reads, and the shards whose compacted rows it must leave out."""

    table: str
    folder: Path
    parts: list[Path] = field(default_factory=list)
    compacted: list[Path] = field(default_factory=list)
    exclude: set[int] = field(default_factory=set)  # applies to compacted rows only

    @property
    def files(self) -> list[Path]:
        return self.parts + self.compacted


def dataset_folders(run_root: Path, table: str) -> list[Path]:
    """The dataset folders of a table: itself, or one per `metric=<name>` partition for metric tables."""
    folder = rf.table_dir(run_root, table)
    if table in ("metrics", "features", "set_metrics"):
        return sorted(p for p in folder.glob("*=*") if p.is_dir()) if folder.is_dir() else []
    return [folder]


def read_state(folder: Path) -> dict:
    path = folder / rf.COMPACTION_STATE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {"generation": 0, "files": []}
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); restore it or rerun `orchestrate compact`") from None
    return state


def list_parts(folder: Path) -> dict[int, Path]:
    """shard id -> part file, from one directory listing."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return {}
    return {rf.shard_id_of(n): folder / n for n in names if n.startswith("part-shard-") and n.endswith(".parquet")}


def dataset_files(folder: Path, table: str, done: set[int] | None) -> DatasetFiles:
    """What to read of one dataset. `done=None`: every part counts (runs without markers, e.g. copied tables)."""
    parts = list_parts(folder)
    live_parts = {s: p for s, p in parts.items() if done is None or s in done}
    state = read_state(folder)
    compacted, covered = [], set()
    for entry in state["files"]:
        compacted.append(folder / entry["path"])
        covered.update(int(s) for s in entry["shards"])
    exclude = covered & set(live_parts)
    if done is not None:
        exclude |= covered - done
    return DatasetFiles(table, folder, [live_parts[s] for s in sorted(live_parts)], compacted, exclude)


def covered_parts(folder: Path) -> dict[int, str]:
    """shard -> sha256 of the part file whose rows the compacted files hold."""
    return {int(s): sha for entry in read_state(folder)["files"] for s, sha in entry["shards"].items()}


# ---- compaction -------------------------------------------------------------------------------------------
@dataclass
class CompactionReport:
    folder: Path
    shards_added: int = 0
    rows_written: int = 0
    files_written: int = 0
    parts_removed: int = 0
    skipped: dict[int, str] = field(default_factory=dict)  # shard -> why its part was left alone


def compact_run(run: RunDir, tables: tuple[str, ...] = rf.SHARDED_TABLES) -> list[CompactionReport]:
    """Compact every dataset of `tables`; holds the run lock so submit/resume/another compaction wait."""
    with run.lock(timeout=600):
        done = run.done_shards()
        markers: dict[int, dict] = {}
        return [_compact_dataset(run, folder, table, done, markers) for table in tables
                for folder in dataset_folders(run.root, table)]


def _expected_sha(run: RunDir, table: str, shard: int, markers: dict[int, dict]) -> str | None:
    """The sha256 a generation part must have (from its done marker); None for tables jobs do not checksum."""
    if table not in ("units", "sink_steps"):
        return None
    if shard not in markers:
        markers[shard] = run.read_marker("done", shard) or {}
    return markers[shard].get("parts", {}).get(table, {}).get("sha256")


def _compact_dataset(run: RunDir, folder: Path, table: str, done: set[int], markers: dict[int, dict]) -> CompactionReport:
    """Stream the new parts (and the live rows of rewritten files) into a new generation, commit, then clean up.

    One part is in memory at a time, plus at most ROW_GROUP_ROWS buffered rows per output file."""
    report = CompactionReport(folder)
    state = read_state(folder)
    _remove_unreferenced(folder, state)
    covered = {int(s): sha for entry in state["files"] for s, sha in entry["shards"].items()}
    parts = {s: p for s, p in list_parts(folder).items() if s in done}
    schema = rf.TABLE_SCHEMAS[table]
    writers = _GenerationWriter(folder, folder / rf.COMPACTED / f"g{state['generation'] + 1:05d}", table, schema)
    new: dict[int, str] = {}
    already: list[Path] = []
    for shard, path in sorted(parts.items()):
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        expected = _expected_sha(run, table, shard, markers)
        if expected is not None and expected != sha:
            report.skipped[shard] = f"{path.name} does not match the sha256 in its done marker (resume --verify reruns it)"
            continue
        if covered.get(shard) == sha:
            already.append(path)  # a crash came after the commit and before the deletion
            continue
        writers.add({shard: sha}, rf.conform(pq.read_table(io.BytesIO(data)), schema, str(path)))
        new[shard] = sha
    stale = (set(covered) - done) | (set(covered) & set(new))
    rewrite = [e for e in state["files"] if stale & {int(s) for s in e["shards"]}]
    for entry in rewrite:  # keep the rows of shards that are neither regenerated nor withdrawn
        keep = {int(s): sha for s, sha in entry["shards"].items() if int(s) not in stale}
        if keep:
            value_set = pa.array(sorted(keep), pa.int32())
            for batch in pq.ParquetFile(folder / entry["path"]).iter_batches(batch_size=ROW_GROUP_ROWS):
                rows = pa.Table.from_batches([batch]).cast(schema)
                writers.add(keep, rows.filter(pc.is_in(rows.column("shard_id"), value_set=value_set)))
    if new or rewrite:
        written = writers.close()
        kept = [e for e in state["files"] if e not in rewrite]
        new_state = {"generation": state["generation"] + 1, "table": table, "files": kept + written}
        rf.atomic_write_json(folder / rf.COMPACTION_STATE, new_state)  # the commit
        report.shards_added = len(new)
        report.files_written = len(written)
        report.rows_written = sum(e["rows"] for e in written)
        for entry in rewrite:
            (folder / entry["path"]).unlink(missing_ok=True)
        state = new_state
    now_covered = {int(s) for entry in state["files"] for s in entry["shards"]}
    ingested = {parts[s]: sha for s, sha in new.items()} | {p: covered[rf.shard_id_of(p.name)] for p in already}
    for path, sha in ingested.items():
        if rf.shard_id_of(path.name) not in now_covered:
            continue  # an empty part (no rows to compact) stays: it is the shard's record
        # a part rewritten meanwhile (a metric job of that shard) differs from what was compacted: it stays, and wins
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha:
            path.unlink()
            report.parts_removed += 1
    _remove_unreferenced(folder, state)
    return report


class _GenerationWriter:
    """The files of one new generation: one per partition value (sink steps: per arm), opened on first use."""

    def __init__(self, folder: Path, gen_dir: Path, table: str, schema: pa.Schema):
        self.folder, self.gen_dir, self.schema = folder, gen_dir, schema
        self.key = PARTITION_BY.get(table)
        self.writers: dict[str | None, _PartitionWriter] = {}

    def add(self, shards: dict[int, str], rows: pa.Table) -> None:
        values = [None] if self.key is None else pc.unique(rows.column(self.key)).to_pylist()
        for value in values:
            piece = rows if self.key is None else rows.filter(pc.equal(rows.column(self.key), value))
            if value not in self.writers:
                sub = self.gen_dir if self.key is None else self.gen_dir / f"{self.key}={value}"
                self.writers[value] = _PartitionWriter(sub / "part-0.parquet", self.schema)
            self.writers[value].add(shards, piece)

    def close(self) -> list[dict]:
        return [w.close(self.folder) for w in self.writers.values()]


class _PartitionWriter:
    """Streams row groups of one compacted file through the atomic writer."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = path, schema
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.rows = 0
        self.shards: dict[str, str] = {}
        self._context = rf.atomic_writer(path)
        self._handle = self._context.__enter__()
        self._writer = pq.ParquetWriter(self._handle, schema, compression="zstd")

    def add(self, shards: dict[int, str], rows: pa.Table) -> None:
        self.shards.update({str(s): sha for s, sha in shards.items()})
        self.buffer.append(rows)
        self.buffered += rows.num_rows
        if self.buffered >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            table = pa.concat_tables(self.buffer)
            self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
            self.rows += table.num_rows
        self.buffer, self.buffered = [], 0

    def close(self, folder: Path) -> dict:
        self._flush()
        self._writer.close()
        self._context.__exit__(None, None, None)
        data_sha = rf.sha256_file(self.path)
        return {"path": self.path.relative_to(folder).as_posix(), "rows": self.rows, "bytes": self.path.stat().st_size,
                "sha256": data_sha, "shards": self.shards}


def _remove_unreferenced(folder: Path, state: dict) -> None:
    """Delete compacted files (and generation folders) that the committed state does not list."""
    root = folder / rf.COMPACTED
    if not root.is_dir():
        return
    referenced = {(folder / e["path"]).resolve() for e in state["files"]}
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file() and path.resolve() not in referenced:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def verify_compacted(folder: Path) -> list[str]:
    """Problems with a dataset's compacted files (missing, truncated, altered); each file is hashed once."""
    problems = []
    for entry in read_state(folder)["files"]:
        path = folder / entry["path"]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != entry["bytes"] or rf.sha256_file(path) != entry["sha256"]:
            problems.append(f"{path} does not match its checksum in {rf.COMPACTION_STATE}")
    return problems

