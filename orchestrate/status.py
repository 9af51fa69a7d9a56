"""State of a run's shards, from the markers on disk plus what the scheduler knows, fast at 10,000 shards.

Markers decide done / failed; the scheduler (or, for local runs, whether the recorded process still lives)
decides pending / running / cancelled / timed out. A `running` marker whose process is gone and that no
scheduler claims is reported as `interrupted`: resume reruns it.

Cost: each marker folder is listed once; only `running` and `failed` markers are read (they are few), plus
a fixed sample of done markers for the throughput. Done markers are read per shard only for the per-shard
table (`per_shard=True`), and outputs are hashed only with `verify=True`, once per command.
"""

from __future__ import annotations

import os
import random
import socket
import time
from dataclasses import asdict, dataclass, field

from jobs import compaction
from jobs import runformat as rf
from jobs.run_shard import verify_done_shard
from jobs.rundir import RunDir, read_marker_file

STATES = ("done", "running", "pending", "failed", "cancelled", "timeout", "interrupted", "corrupt", "not started")
RERUNNABLE = {"failed", "cancelled", "timeout", "interrupted", "corrupt", "not started"}
THROUGHPUT_SAMPLE = 64  # done markers read to estimate shard duration and throughput
OLDEST_RUNNING = 5


@dataclass
class ShardStatus:
    shard_id: int
    state: str
    groups_done: int | None = None  # known for the per-shard table only
    groups_total: int | None = None
    elapsed_s: float | None = None
    error: str | None = None
    host: str | None = None
    started: float | None = None


@dataclass
class TaskSummary:
    """Counts per state, failures grouped by error (with one example shard each), the oldest running shards."""

    task: str
    total: int
    counts: dict[str, int]
    failures: list[dict] = field(default_factory=list)  # {"error", "count", "example_shard"}
    oldest_running: list[dict] = field(default_factory=list)  # {"shard_id", "host", "age_s"}
    workers_running: int = 0
    mean_shard_s: float | None = None
    throughput_per_h: float | None = None
    eta_s: float | None = None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shard_statuses(run: RunDir, scheduler: dict[int, str] | None = None, verify: bool = False, per_shard: bool = False,
                   task: str = "generate", shard_ids: list[int] | None = None, errors: bool = True) -> list[ShardStatus]:
    """One status per shard of the manifest (`shard_ids` when given). `errors=False` skips reading failed markers
    (a dispatch only needs to know they failed)."""
    scheduler = scheduler or {}
    ids = run.all_shard_ids() if shard_ids is None else shard_ids
    done, failed, running = run.done_shards(task), run.failed_shards(task), run.running_shards(task)
    running_dir, failed_dir = str(run.marker_dir("running", task)), str(run.marker_dir("failed", task))
    host, now = socket.gethostname(), time.time()
    covered = _covered(run) if verify else None
    out = []
    for shard_id in ids:
        sched = scheduler.get(shard_id)
        if shard_id in done:
            status = ShardStatus(shard_id, "done")
            if verify and task == "generate":
                problems = verify_done_shard(run, shard_id, covered)
                if problems:
                    status.state, status.error = "corrupt", "; ".join(problems)
            out.append(status)
            continue
        running_marker = read_marker_file(os.path.join(running_dir, rf.marker_name(shard_id))) if shard_id in running else None
        failed_marker = None
        if shard_id in failed:
            failed_marker = read_marker_file(os.path.join(failed_dir, rf.marker_name(shard_id))) if errors else {}
        status = ShardStatus(shard_id, "not started")
        if running_marker is not None:
            status.host, status.started = running_marker.get("host"), running_marker.get("started")
            status.elapsed_s = now - status.started if status.started else None
        if sched in ("pending", "running"):
            status.state = sched
        elif running_marker is not None:
            same_host_dead = running_marker.get("host") == host and not pid_alive(int(running_marker.get("pid", -1)))
            if sched in ("cancelled", "timeout", "failed"):
                status.state = sched
            elif same_host_dead or sched == "completed":
                status.state = "interrupted"
            else:
                status.state = "running"
        elif failed_marker is not None:  # ({} when not read: still failed)
            status.state = "failed"
        elif sched in ("cancelled", "timeout", "failed"):
            status.state = sched
        if failed_marker and status.state == "failed":
            status.error = failed_marker.get("error")
        out.append(status)
    if per_shard:
        _fill_per_shard(run, out, task)
    return out


def _covered(run: RunDir) -> dict[str, dict[int, str]]:
    return {t: compaction.covered_parts(run.table_dir(t)) for t in ("units", "sink_steps")}


def verify_compacted(run: RunDir) -> list[str]:
    """Hash every compacted file once (part of `--verify`)."""
    return [p for t in rf.SHARDED_TABLES for folder in compaction.dataset_folders(run.root, t) for p in compaction.verify_compacted(folder)]


def _fill_per_shard(run: RunDir, statuses: list[ShardStatus], task: str) -> None:
    """Groups per shard (manifest), finished groups of unfinished shards (scratch) and elapsed time of done ones."""
    table = run.manifest_table(["shard_id", "group_index"])
    groups = table.group_by("shard_id").aggregate([("group_index", "count_distinct")])
    total = dict(zip(groups["shard_id"].to_pylist(), groups["group_index_count_distinct"].to_pylist()))
    scratch_root = run.tables_dir / rf.SCRATCH
    scratch = set(os.listdir(scratch_root)) if scratch_root.is_dir() else set()
    done_dir = str(run.marker_dir("done", task))
    for s in statuses:
        s.groups_total = int(total.get(s.shard_id, 0))
        if s.state in ("done", "corrupt"):
            s.groups_done = s.groups_total
            marker = read_marker_file(os.path.join(done_dir, rf.marker_name(s.shard_id))) or {}
            if marker.get("finished") and marker.get("started"):
                s.elapsed_s = marker["finished"] - marker["started"]
        else:
            name = rf.shard_name(s.shard_id)
            s.groups_done = len([n for n in os.listdir(scratch_root / name) if n.startswith("units-")]) if name in scratch else 0


def summarise(run: RunDir, statuses: list[ShardStatus], task: str = "generate") -> TaskSummary:
    counts: dict[str, int] = {}
    by_error: dict[str, dict] = {}
    running = []
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
        if s.state == "failed":
            key = (s.error or "unknown error").splitlines()[0][:300]
            group = by_error.setdefault(key, {"error": key, "count": 0, "example_shard": s.shard_id})
            group["count"] += 1
        if s.state == "running":
            running.append(s)
    now = time.time()
    running.sort(key=lambda s: s.started or now)
    summary = TaskSummary(task, len(statuses), counts, sorted(by_error.values(), key=lambda g: -g["count"]),
                          [{"shard_id": s.shard_id, "host": s.host, "age_s": None if s.started is None else now - s.started}
                           for s in running[:OLDEST_RUNNING]], workers_running=len(running))
    _throughput(run, statuses, summary, task)
    return summary


def _throughput(run: RunDir, statuses: list[ShardStatus], summary: TaskSummary, task: str) -> None:
    """Mean shard duration and shards per hour from a fixed sample of done markers; ETA from the throughput."""
    done = [s.shard_id for s in statuses if s.state == "done"]
    if not done:
        return
    sample = random.Random(0).sample(done, min(THROUGHPUT_SAMPLE, len(done)))
    done_dir = str(run.marker_dir("done", task))
    markers = [m for m in (read_marker_file(os.path.join(done_dir, rf.marker_name(s))) for s in sample)
               if m and m.get("finished") and m.get("started")]
    if not markers:
        return
    summary.mean_shard_s = sum(m["finished"] - m["started"] for m in markers) / len(markers)
    span = max(m["finished"] for m in markers) - min(m["started"] for m in markers)
    remaining = summary.total - len(done)
    if span > 0 and len(markers) >= 2:
        summary.throughput_per_h = len(done) / span * 3600  # the sample's span estimates the whole run's
    if remaining:
        per_hour = summary.throughput_per_h or 3600 * max(summary.workers_running, 1) / max(summary.mean_shard_s, 1e-9)
        summary.eta_s = remaining / per_hour * 3600


def rerunnable(statuses: list[ShardStatus]) -> list[int]:
    return [s.shard_id for s in statuses if s.state in RERUNNABLE]


def metric_job_ids(run: RunDir) -> list[int]:
    """Shards that have any metric-job marker (metric jobs exist only for shards they were submitted for)."""
    return sorted(set().union(*(run.marker_ids(kind, "metrics") for kind in rf.MARKER_KINDS)))


def as_json(summary: TaskSummary, statuses: list[ShardStatus] | None = None) -> dict:
    out = asdict(summary)
    if statuses is not None:
        out["shards"] = [asdict(s) for s in statuses]
    return out
