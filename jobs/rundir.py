"""The run directory: one per sweep (named by its name and config hash), the only shared state.

Everything a process needs to know about a run is on disk here, so any executor, any node and any
later `status` / `resume` sees the same truth. A shard is done iff its marker exists (written last).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import filelock

from manifests import Manifest, shard_name

MARKER_DIRS = ("done", "failed", "running")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a hidden temp name in the same folder, fsync, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=1, sort_keys=True, default=str) + "\n").encode())


class RunDir:
    """Paths and small state files of one run. Cheap to construct; touches nothing until asked."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    # ---- layout -------------------------------------------------------------------------------
    @property
    def sweep_path(self) -> Path:
        return self.root / "sweep.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def provenance_path(self) -> Path:
        return self.root / "provenance.json"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def executor_dir(self) -> Path:
        return self.state_dir / "executor"

    @property
    def submissions_path(self) -> Path:
        return self.state_dir / "submissions.jsonl"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def tables_dir(self) -> Path:
        return self.root / "tables"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    def scratch_dir(self, shard_id: int) -> Path:
        """Finished groups of an unfinished shard. The leading underscore hides it from dataset readers."""
        return self.tables_dir / "_scratch" / shard_name(shard_id)

    @staticmethod
    def shard_name(shard_id: int) -> str:
        return shard_name(shard_id)

    def marker_path(self, kind: str, shard_id: int) -> Path:
        assert kind in MARKER_DIRS, kind
        return self.state_dir / kind / f"{shard_name(shard_id)}.json"

    def done_path(self, shard_id: int) -> Path:
        return self.marker_path("done", shard_id)

    def failed_path(self, shard_id: int) -> Path:
        return self.marker_path("failed", shard_id)

    def running_path(self, shard_id: int) -> Path:
        return self.marker_path("running", shard_id)

    def log_path(self, shard_id: int) -> Path:
        return self.logs_dir / f"{shard_name(shard_id)}.log"

    def part_path(self, table: str, shard_id: int) -> Path:
        return self.tables_dir / table / f"part-{shard_name(shard_id)}.parquet"

    # ---- state --------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_path.is_file() and self.sweep_path.is_file()

    def all_shard_ids(self) -> list[int]:
        import pyarrow.parquet as pq

        column = pq.read_table(self.manifest_path, columns=["shard_id"]).column("shard_id")
        return sorted(set(column.to_pylist()))

    def _marker_ids(self, kind: str) -> set[int]:
        folder = self.state_dir / kind
        if not folder.is_dir():
            return set()
        # one listing, not one stat per shard (datatrove's lesson for large runs)
        return {int(p.stem.split("-")[1]) for p in folder.glob("shard-*.json")}

    def done_shards(self) -> set[int]:
        return self._marker_ids("done")

    def failed_shards(self) -> set[int]:
        return self._marker_ids("failed")

    def running_shards(self) -> set[int]:
        return self._marker_ids("running")

    def read_marker(self, kind: str, shard_id: int) -> dict | None:
        path = self.marker_path(kind, shard_id)
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

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
        """Serialises submit / resume / cancel of one run across processes and hosts sharing the folder."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(self.state_dir / "lock"), timeout=timeout)

    def manifest_table(self):
        import pyarrow.parquet as pq

        return pq.read_table(self.manifest_path)

    def units_of_shard(self, shard_id: int):
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = pq.read_table(self.manifest_path)
        return table.filter(pc.equal(table.column("shard_id"), shard_id))

    def iter_logs(self) -> Iterator[Path]:
        return iter(sorted(self.logs_dir.glob("shard-*.log")))


def run_dir_for(manifest: Manifest) -> Path:
    sweep = manifest.sweep
    return Path(sweep.output_root) / f"{sweep.name}-{manifest.config_hash[:8]}"
