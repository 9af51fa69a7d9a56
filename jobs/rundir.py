"""The run directory: one per sweep (named by its name and config hash), the only shared state.

Everything a process needs to know about a run is on disk here, so any executor, any node and any later
`status` / `resume` sees the same truth. File names and schemas come from `jobs.runformat`; this class adds
the state operations (markers, submissions, the run lock). A job is done iff its done marker exists.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Iterator

import filelock

from jobs import runformat as rf
from manifests import Manifest


class RunDir:
    """Paths and small state files of one run. Cheap to construct; touches nothing until asked."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    # ---- layout (names from jobs.runformat) -------------------------------------------------------
    @property
    def sweep_path(self) -> Path:
        return self.root / rf.SWEEP_YAML

    @property
    def resolved_sweep_path(self) -> Path:
        return self.root / rf.RESOLVED_SWEEP

    @property
    def manifest_path(self) -> Path:
        return self.root / rf.MANIFEST

    @property
    def provenance_path(self) -> Path:
        return self.root / rf.PROVENANCE

    @property
    def state_dir(self) -> Path:
        return self.root / rf.STATE

    @property
    def executor_dir(self) -> Path:
        return self.state_dir / "executor"

    @property
    def submissions_path(self) -> Path:
        return self.state_dir / "submissions.jsonl"

    @property
    def logs_dir(self) -> Path:
        return self.root / rf.LOGS

    @property
    def tables_dir(self) -> Path:
        return self.root / rf.TABLES

    @property
    def images_dir(self) -> Path:
        return self.root / rf.IMAGES

    def table_dir(self, table: str, partition: tuple[str, str] | None = None) -> Path:
        return rf.table_dir(self.root, table, partition)

    def scratch_dir(self, shard_id: int) -> Path:
        """Finished groups of an unfinished shard. The leading underscore hides it from dataset readers."""
        return self.tables_dir / rf.SCRATCH / rf.shard_name(shard_id)

    @staticmethod
    def shard_name(shard_id: int) -> str:
        return rf.shard_name(shard_id)

    def marker_dir(self, kind: str, task: str = "generate") -> Path:
        return rf.marker_dir(self.root, kind, task)

    def marker_path(self, kind: str, shard_id: int, task: str = "generate") -> Path:
        return self.marker_dir(kind, task) / rf.marker_name(shard_id)

    def done_path(self, shard_id: int, task: str = "generate") -> Path:
        return self.marker_path("done", shard_id, task)

    def failed_path(self, shard_id: int, task: str = "generate") -> Path:
        return self.marker_path("failed", shard_id, task)

    def running_path(self, shard_id: int, task: str = "generate") -> Path:
        return self.marker_path("running", shard_id, task)

    def log_path(self, shard_id: int, task: str = "generate") -> Path:
        return self.logs_dir / rf.log_name(shard_id, task)

    def part_path(self, table: str, shard_id: int, partition: tuple[str, str] | None = None) -> Path:
        return self.table_dir(table, partition) / rf.part_name(shard_id)

    def create_layout(self) -> None:
        for task in rf.TASKS:
            for kind in rf.MARKER_KINDS:
                self.marker_dir(kind, task).mkdir(parents=True, exist_ok=True)
        for folder in (self.logs_dir, self.tables_dir, self.images_dir):
            folder.mkdir(parents=True, exist_ok=True)

    # ---- state --------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_path.is_file() and self.resolved_sweep_path.is_file()

    def all_shard_ids(self) -> list[int]:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        column = pq.read_table(self.manifest_path, columns=["shard_id"]).column("shard_id")
        return pc.unique(column).sort().to_pylist()

    def marker_ids(self, kind: str, task: str = "generate") -> set[int]:
        """Shards with a marker of this kind: one directory listing, no stat or read per shard."""
        folder = self.marker_dir(kind, task)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return set()
        # marker names are exactly rf.marker_name(id) = "shard-<digits>.json": slice, no parsing per name
        return {int(name[6:-5]) for name in names if name.startswith("shard-") and name.endswith(".json")}

    def done_shards(self, task: str = "generate") -> set[int]:
        return self.marker_ids("done", task)

    def failed_shards(self, task: str = "generate") -> set[int]:
        return self.marker_ids("failed", task)

    def running_shards(self, task: str = "generate") -> set[int]:
        return self.marker_ids("running", task)

    def read_marker(self, kind: str, shard_id: int, task: str = "generate") -> dict | None:
        return read_marker_file(os.path.join(self.marker_dir(kind, task), rf.marker_name(shard_id)))

    def write_marker(self, kind: str, shard_id: int, payload: dict, task: str = "generate") -> None:
        rf.atomic_write_json(self.marker_path(kind, shard_id, task), payload)

    @contextlib.contextmanager
    def tracked(self, shard_id: int, task: str = "generate") -> Iterator[float]:
        """Markers and log of one job on a shard: `running` while it runs, `failed` (error and traceback) if it
        raises, neither once it returns (the caller writes `done` last). A requeue, preemption or Ctrl-C is not
        a failure: the running marker goes and the exception propagates. Yields the start time."""
        log = logging.getLogger("sinkscope.jobs")
        started = time.time()
        self.done_path(shard_id, task).unlink(missing_ok=True)  # a rerun (metric jobs): the old done marker is stale
        running = {"host": socket.gethostname(), "pid": os.getpid(), "started": started,
                   "job_id": os.environ.get("SINKSCOPE_JOB_ID"), "task": task, "node": node_name()}
        # padded: the failed marker's space is reserved now, so a full disk can still record why the job failed
        rf.atomic_write_bytes(self.running_path(shard_id, task), _padded_json(running))
        with _ShardLog(self.log_path(shard_id, task)):
            try:
                yield started
            except (SystemExit, KeyboardInterrupt):
                log.warning("%s job of shard %s interrupted (requeue, preemption or Ctrl-C); finished work is kept", task, shard_id)
                self.running_path(shard_id, task).unlink(missing_ok=True)
                raise
            except BaseException as error:  # noqa: BLE001 — record every failure, then let it propagate
                log.error("%s job of shard %s failed: %s", task, shard_id, error, exc_info=True)
                self.record_failure(shard_id, error, task)
                raise
        self.failed_path(shard_id, task).unlink(missing_ok=True)
        self.running_path(shard_id, task).unlink(missing_ok=True)

    def record_failure(self, shard_id: int, error: BaseException, task: str = "generate") -> None:
        """Write the job's failed marker (error, errno `cause` for OS errors, traceback) and drop its running marker.

        When the filesystem refuses a new file (disk or quota full), the running marker's reserved bytes are
        renamed to the failed marker and overwritten in place, which needs no new block.
        """
        record = {"error": f"{type(error).__name__}: {error}", "cause": os_error_cause(error), "host": socket.gethostname(),
                  "pid": os.getpid(), "time": time.time(), "task": task}
        try:
            self.write_marker("failed", shard_id, {**record, "traceback": traceback.format_exc()}, task)
        except OSError as write_error:
            logging.getLogger("sinkscope.jobs").error("cannot write a failed marker (%s): using the reserved running marker",
                                                      write_error)
            data = json.dumps(record, sort_keys=True, default=str).encode()[:MARKER_RESERVE]
            try:
                os.replace(self.running_path(shard_id, task), self.failed_path(shard_id, task))
                with open(self.failed_path(shard_id, task), "r+b") as f:  # no truncation: the pages stay allocated
                    f.write(data + b" " * (MARKER_RESERVE - len(data)))
            except OSError as last:
                logging.getLogger("sinkscope.jobs").error("shard %s: no failed marker could be written: %s", shard_id, last)
                return
        self.running_path(shard_id, task).unlink(missing_ok=True)

    def submissions(self) -> list[dict]:
        if not self.submissions_path.is_file():
            return []
        out = []
        for line in self.submissions_path.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
        return out

    def append_submission(self, record: dict) -> None:
        """Append one JSON line; callers hold `lock()`, so lines never interleave."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}
        with open(self.submissions_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def lock(self, timeout: float = 30.0) -> filelock.BaseFileLock:
        """Serialises submit / resume / cancel / compact of one run across processes and hosts sharing the folder."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(self.state_dir / "lock"), timeout=timeout)

    def manifest_table(self, columns: list[str] | None = None):
        import pyarrow.parquet as pq

        return pq.read_table(self.manifest_path, columns=columns)

    def units_of_shard(self, shard_id: int):
        import pyarrow.parquet as pq

        return pq.read_table(self.manifest_path, filters=[("shard_id", "=", shard_id)])

    def iter_logs(self) -> Iterator[Path]:
        return iter(sorted(self.logs_dir.glob("*shard-*.log")))


MARKER_RESERVE = 4096  # bytes of a running marker, reused for the failed marker on a full disk


def _padded_json(payload: dict) -> bytes:
    data = json.dumps(payload, sort_keys=True, default=str).encode()
    return data + b" " * max(0, MARKER_RESERVE - len(data))  # JSON allows trailing blanks


def os_error_cause(error: BaseException) -> str | None:
    """'ENOSPC: No space left on device' for an OS error (disk full, permission, quota, ...), else None."""
    if isinstance(error, OSError) and error.errno:
        return f"{errno.errorcode.get(error.errno, error.errno)}: {os.strerror(error.errno)}"
    return None


def node_name() -> str | None:
    """The cluster node running this process: Slurm's node name, or the Ray node id (several nodes may share a host)."""
    if os.environ.get("SLURMD_NODENAME"):
        return os.environ["SLURMD_NODENAME"]
    ray = sys.modules.get("ray")  # only a Ray worker has imported it
    if ray is not None and ray.is_initialized():
        return f"ray:{ray.get_runtime_context().get_node_id()}"
    return None


def read_marker_file(path: str | Path) -> dict | None:
    """A marker's content; None if it is absent or half-written (markers are written atomically, so only by a crash)."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class _ShardLog:
    """Appends the `sinkscope` loggers' records to one job's log file while the job runs."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(path)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def __enter__(self):
        root = logging.getLogger("sinkscope")
        root.addHandler(self.handler)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        logging.getLogger("sinkscope").removeHandler(self.handler)
        self.handler.close()


def run_dir_for(manifest: Manifest) -> Path:
    sweep = manifest.sweep
    return Path(sweep.output_root) / f"{sweep.name}-{manifest.config_hash[:8]}"
