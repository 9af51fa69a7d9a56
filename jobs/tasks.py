"""What a job does with its shard: generate its images (the default) or score them with metrics.

Executors send a `ShardJob` with every shard, so metrics run through the same executors, sharded and
resumable like generation: `analysis.compute_metrics(..., shard=…)` recomputes only missing or stale parts.
A metric job leaves the same markers and log as a generation shard, under the task name `metrics`
(state/metrics/{running,failed,done}/, logs/metrics-shard-XXXXX.log), so status, logs and cancel see it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class ShardJob:
    kind: Literal["generate", "metrics"] = "generate"
    metrics: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.kind not in ("generate", "metrics"):
            raise ValueError(f"unknown shard job {self.kind!r}; expected generate or metrics")
        if self.kind == "metrics" and not self.metrics:
            raise ValueError("a metrics job needs at least one metric name")

    def run(self, run_dir: str | Path, shard_id: int) -> dict:
        if self.kind == "generate":
            from jobs.run_shard import run_shard

            return run_shard(run_dir, shard_id)
        import time

        from jobs.rundir import RunDir

        run = RunDir(run_dir)
        with run.tracked(shard_id, "metrics") as started:
            import analysis  # heavy: metric backbones are loaded only where a metric job runs

            parts = analysis.compute_metrics(run.root, metrics=list(self.metrics), shard=shard_id)
            marker = {"shard_id": shard_id, "metrics": list(self.metrics), "metric_parts": [str(p) for p in parts],
                      "started": started, "finished": time.time()}
            run.write_marker("done", shard_id, marker, "metrics")  # last
        return marker

    def record(self) -> dict:
        """The fields submission records carry, so status tells generation jobs from metric jobs."""
        return {"task": self.kind, **({"metrics": list(self.metrics)} if self.metrics else {})}


GENERATE = ShardJob()


def record_task(record: dict) -> str:
    """The task (jobs.runformat.TASKS) of a submission record; records before metric jobs existed are generation."""
    return record.get("task", "generate")
