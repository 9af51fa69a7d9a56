"""Per-shard state of a run, from the markers on disk plus what the scheduler knows.

Markers decide done / failed; the scheduler (or, for local runs, whether the recorded process still
lives) decides pending / running / cancelled / timed out. A `running` marker whose process is gone and
that no scheduler claims is reported as `interrupted`: resume reruns it.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

from jobs.rundir import RunDir
from jobs.run_shard import verify_done_shard

STATES = ("done", "running", "pending", "failed", "cancelled", "timeout", "interrupted", "corrupt", "not started")
RERUNNABLE = {"failed", "cancelled", "timeout", "interrupted", "corrupt", "not started"}


@dataclass
class ShardStatus:
    shard_id: int
    state: str
    groups_done: int
    groups_total: int
    elapsed_s: float | None = None
    error: str | None = None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _scratch_groups(run: RunDir, shard_id: int) -> int:
    folder = run.scratch_dir(shard_id)
    return len(list(folder.glob("units-g*.parquet"))) if folder.is_dir() else 0


def shard_statuses(run: RunDir, scheduler: dict[int, str] | None = None, verify: bool = False) -> list[ShardStatus]:
    scheduler = scheduler or {}
    table = run.manifest_table().select(["shard_id", "group_index"]).to_pandas().drop_duplicates()
    groups = table.groupby("shard_id").size().to_dict()
    done, failed, running = run.done_shards(), run.failed_shards(), run.running_shards()
    host = socket.gethostname()
    now = time.time()
    out = []
    for shard_id in sorted(groups):
        total = int(groups[shard_id])
        sched = scheduler.get(shard_id)
        if shard_id in done:
            marker = run.read_marker("done", shard_id) or {}
            problems = verify_done_shard(run, shard_id) if verify else []
            state = "corrupt" if problems else "done"
            elapsed = (marker.get("finished", 0) - marker.get("started", 0)) or None
            out.append(ShardStatus(shard_id, state, total, total, elapsed, "; ".join(problems) or None))
            continue
        finished_groups = _scratch_groups(run, shard_id)
        running_marker = run.read_marker("running", shard_id) if shard_id in running else None
        failed_marker = run.read_marker("failed", shard_id) if shard_id in failed else None
        elapsed = now - running_marker["started"] if running_marker else None
        if sched in ("pending", "running"):
            state = sched
        elif running_marker is not None:
            same_host_dead = running_marker.get("host") == host and not pid_alive(int(running_marker.get("pid", -1)))
            if sched in ("cancelled", "timeout", "failed"):
                state = sched
            elif same_host_dead or sched == "completed":
                state = "interrupted"
            else:
                state = "running"
        elif failed_marker is not None:
            state = "failed"
        elif sched in ("cancelled", "timeout", "failed"):
            state = sched
        else:
            state = "not started"
        error = failed_marker.get("error") if failed_marker and state == "failed" else None
        out.append(ShardStatus(shard_id, state, finished_groups, total, elapsed, error))
    return out


def rerunnable(statuses: list[ShardStatus]) -> list[int]:
    return [s.shard_id for s in statuses if s.state in RERUNNABLE]


def eta_seconds(run: RunDir, statuses: list[ShardStatus], parallel: int = 1) -> float | None:
    """Remaining groups × mean seconds per group of the done shards, divided by the parallelism."""
    per_group = [s.elapsed_s / s.groups_total for s in statuses if s.state == "done" and s.elapsed_s and s.groups_total]
    if not per_group:
        return None
    remaining = sum(s.groups_total - s.groups_done for s in statuses if s.state != "done")
    return remaining * (sum(per_group) / len(per_group)) / max(parallel, 1)
