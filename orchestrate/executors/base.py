"""What every executor does: send shards to run `jobs.run_shard`, report scheduler states, cancel.

Executors are thin: the run directory's markers are the truth about what is done; the scheduler only
adds what the markers cannot know (pending in a queue, running, cancelled, timed out).
"""

from __future__ import annotations

import abc
from typing import ClassVar

from jobs.rundir import RunDir
from jobs.tasks import GENERATE, ShardJob

SCHEDULER_STATES = ("pending", "running", "failed", "cancelled", "timeout", "completed", "unknown")


class Executor(abc.ABC):
    kind: ClassVar[str]
    blocking: ClassVar[bool] = False  # True: submit() returns only when the shards have run

    def __init__(self, config):
        self.config = config

    @abc.abstractmethod
    def submit(self, run: RunDir, shard_ids: list[int], job: ShardJob = GENERATE) -> list[dict]:
        """Start `job` (generation by default, or metrics) on the shards; return one submission record per job
        or array (appended to state/submissions.jsonl). Records of a metrics job carry `task: metrics`."""

    def scheduler_states(self, run: RunDir, task: str = "generate") -> dict[int, str]:
        """shard_id -> one of SCHEDULER_STATES of its latest job of `task` (jobs.runformat.TASKS), for shards the
        scheduler knows about."""
        return {}

    def cancel(self, run: RunDir) -> list[str]:
        """Cancel what this run submitted (generation and metric jobs); return the job ids cancelled."""
        return []


def make_executor(config) -> Executor:
    """The executor for a sweep's `executor:` block. Cluster executors are imported only when asked for."""
    if config.kind == "local":
        from orchestrate.executors.local import LocalExecutor

        return LocalExecutor(config)
    if config.kind == "slurm":
        from orchestrate.executors.slurm import SlurmExecutor

        return SlurmExecutor(config)
    if config.kind == "ray":
        from orchestrate.executors.ray_executor import RayExecutor

        return RayExecutor(config)
    raise ValueError(f"executor.kind: unknown executor {config.kind!r}; expected local, slurm or ray")
