"""Ray executor: one Ray task per shard (`jobs.run_shard`), `max_retries` for system failures only.

Two modes, chosen by `executor.address`:

- `local`: an own in-process Ray instance (`ray.init(address="local")`). It lives and dies with the
  submitting process, so `submit` blocks until every shard has run (like the local executor) and returns
  one record listing the failed shards. A detached driver is not possible in-process.
- anything else (`auto`, `host:port`, `ray://host:10001`, `http://host:8265`): a running cluster. `submit`
  sends a Ray *job* through the Jobs API whose entrypoint is this module's driver
  (`python -m orchestrate.executors.ray_executor --run-dir ... --shards ...`); the driver runs on the head
  node, owns the shard tasks and outlives the submitting shell. `submit` returns at once with the job's
  submission id; `scheduler_states` reads the job status and the state API (tasks named `shard-XXXXX`).

Application errors (a prompt that raises) are not retried (`retry_exceptions=False`): the shard fails and
`run_shard` records why. Worker/node deaths are retried up to `max_retries`; the retry resumes from the
shard's finished groups. Environment variables named SINKSCOPE_* and HF_* of the submitter travel with the
tasks (runtime_env), since Ray workers do not inherit the driver's environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
import time
import uuid

from jobs.rundir import RunDir
from jobs.runformat import TASKS
from jobs.tasks import GENERATE, ShardJob, record_task
from orchestrate.executors.base import Executor

log = logging.getLogger("sinkscope.orchestrate.ray")

# Ray traps measured on these machines (docs/cluster.md): token auth on by default; Ray swaps 127.0.0.1
# for the host address unless this is 0 in the head and every driver (one driver without it hung).
RAY_ENV_DEFAULTS = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
LOCAL_ENV_DEFAULTS = {**RAY_ENV_DEFAULTS, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
PASSED_ENV = re.compile(r"^(SINKSCOPE_|HF_|TORCH_HOME$|OMP_NUM_THREADS$)")

_TASK_STATE_MAP = {
    "FINISHED": "completed", "FAILED": "failed", "RUNNING": "running", "RUNNING_IN_RAY_GET": "running",
    "RUNNING_IN_RAY_WAIT": "running", "SUBMITTED_TO_WORKER": "running", "PENDING_ARGS_AVAIL": "pending",
    "PENDING_NODE_ASSIGNMENT": "pending", "PENDING_OBJ_STORE_MEM_AVAIL": "pending", "PENDING_ARGS_FETCH": "pending",
    "NIL": "unknown",
}
_TERMINAL_JOB = {"SUCCEEDED", "FAILED", "STOPPED"}


class RayExecutorError(RuntimeError):
    """Ray is unreachable, lacks the requested resources, or refused the job."""


def task_name(shard_id: int) -> str:
    return RunDir.shard_name(shard_id)


def forwarded_env() -> dict[str, str]:
    """The submitter's SINKSCOPE_* / HF_* variables (fault injection, offline hub) for the tasks."""
    return {k: v for k, v in os.environ.items() if PASSED_ENV.match(k)}


def _ray_run_shard(run_dir: str, shard_id: int, job: ShardJob = GENERATE) -> dict:
    """The body of one Ray task (module-level, so workers import it by name)."""
    import ray

    ctx = ray.get_runtime_context()
    os.environ["SINKSCOPE_JOB_ID"] = f"ray:{ctx.get_job_id()}:{ctx.get_task_id()}"
    marker = job.run(run_dir, shard_id)
    return {"shard_id": shard_id, "rows": marker.get("rows", {}), "task": job.kind}


def _check_resources(resources: dict, num_gpus: float, num_cpus: float, where: str) -> None:
    if num_gpus > 0 and resources.get("GPU", 0) < num_gpus:
        raise RayExecutorError(
            f"{where} offers {resources.get('GPU', 0):g} GPU(s) but executor.num_gpus is {num_gpus:g}: the tasks would "
            "wait forever. Use a cluster with GPUs, or set executor.num_gpus: 0 for CPU runs."
        )
    if num_cpus > resources.get("CPU", 0):
        raise RayExecutorError(f"{where} offers {resources.get('CPU', 0):g} CPU(s) per node at most but executor.num_cpus is {num_cpus:g}")


def run_shards(run_root: str, shard_ids: list[int], num_gpus: float, num_cpus: float, max_retries: int,
               on_done=None, job: ShardJob = GENERATE) -> dict[int, str]:
    """Run the shards as Ray tasks in the connected Ray and wait; shard -> completed | failed | cancelled."""
    import ray
    from ray.exceptions import RayTaskError, TaskCancelledError

    resources = ray.cluster_resources()
    # per node: a task must fit on one node
    node_max = {"CPU": 0.0, "GPU": 0.0}
    for node in ray.nodes():
        if node.get("Alive"):
            for key in node_max:
                node_max[key] = max(node_max[key], float(node.get("Resources", {}).get(key, 0)))
    _check_resources(node_max, num_gpus, num_cpus, f"Ray ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs)")
    task = ray.remote(_ray_run_shard)
    options = dict(num_gpus=num_gpus, num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=False)
    if forwarded_env():
        options["runtime_env"] = {"env_vars": forwarded_env()}
    name = task_name if job.kind == "generate" else (lambda s: f"{task_name(s)}-{job.kind}")
    refs = {task.options(name=name(s), **options).remote(run_root, s, job): s for s in shard_ids}
    outcome: dict[int, str] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            shard = refs[ref]
            try:
                ray.get(ref)
                outcome[shard] = "completed"
            except TaskCancelledError:
                outcome[shard] = "cancelled"
            except RayTaskError as error:  # the shard raised: run_shard recorded it in state/failed
                outcome[shard] = "failed"
                log.error("shard %s failed: %s", shard, str(error).strip().splitlines()[-1])
            except Exception as error:  # noqa: BLE001 — worker died more than max_retries times, node lost, ...
                outcome[shard] = "failed"
                log.error("shard %s lost: %s: %s", shard, type(error).__name__, error)
            if on_done:
                on_done(shard, outcome[shard])
    return outcome


class RayExecutor(Executor):
    """Shards as Ray tasks: in-process and blocking for `address: local`, a detached Ray job otherwise."""

    kind = "ray"

    def __init__(self, config):
        super().__init__(config)
        self.notes: list[str] = []

    @property
    def local(self) -> bool:
        return self.config.address == "local"

    @property
    def blocking(self) -> bool:  # type: ignore[override]
        return self.local

    # ---- submission -------------------------------------------------------------------------------
    def submit(self, run: RunDir, shard_ids: list[int], job: ShardJob = GENERATE) -> list[dict]:
        shard_ids = [int(s) for s in shard_ids]
        if not shard_ids:
            return []
        record = self._run_local(run, shard_ids, job) if self.local else self._submit_job(run, shard_ids, job)
        return [{**record, **job.record()}]

    def _run_local(self, run: RunDir, shard_ids: list[int], job: ShardJob) -> dict:
        for key, value in LOCAL_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        if self.config.num_gpus > 0:
            from orchestrate.executors.local import visible_gpus

            if not visible_gpus():  # refuse before paying for ray.init (~8 s)
                _check_resources({"GPU": 0, "CPU": os.cpu_count() or 1}, self.config.num_gpus, 0, "this machine")
        import ray

        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=True)
        started = time.time()
        try:
            outcome = run_shards(str(run.root), shard_ids, self.config.num_gpus, self.config.num_cpus, self.config.max_retries,
                                 job=job)
        finally:
            if started_here:
                ray.shutdown()
        failed = sorted(s for s, state in outcome.items() if state != "completed")
        return {"executor": "ray", "event": "finished", "address": "local", "shards": shard_ids,
                "states": {str(s): state for s, state in sorted(outcome.items())}, "failed": failed,
                "seconds": round(time.time() - started, 1)}

    def _client(self, address: str | None = None):
        for key, value in RAY_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from ray.job_submission import JobSubmissionClient

        address = address or self.config.address
        try:
            return JobSubmissionClient(address)
        except Exception as error:  # noqa: BLE001 — connection refused, no dashboard, auth ...
            raise RayExecutorError(
                f"cannot reach the Ray Jobs API at executor.address={address!r}: {type(error).__name__}: {error}. "
                "Is a Ray cluster running there with its dashboard (ray start --head; scripts/ray/start_ray.sh)?"
            ) from error

    def _submit_job(self, run: RunDir, shard_ids: list[int], job: ShardJob) -> dict:
        client = self._client()
        dashboard = client.get_address()
        try:
            from ray.util.state import list_nodes

            nodes = [n for n in list_nodes(address=dashboard, timeout=20, detail=True) if n.state == "ALIVE"]
            per_node = {"CPU": max((n.resources_total.get("CPU", 0) for n in nodes), default=0),
                        "GPU": max((n.resources_total.get("GPU", 0) for n in nodes), default=0)}
        except Exception as error:  # noqa: BLE001 — an old Ray without the state API: let the driver check
            log.warning("could not list Ray nodes (%s); the driver will check resources", error)
        else:
            if per_node["CPU"] > 0:
                _check_resources(per_node, self.config.num_gpus, self.config.num_cpus, f"Ray at {dashboard}")
            else:  # a head that has just started may not have reported its resources yet: the driver checks
                log.warning("Ray at %s reports no node resources yet; the driver will check resources", dashboard)
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", run.root.name)[:60]
        submission_id = f"sinkscope-{safe}-{uuid.uuid4().hex[:8]}"
        c = self.config
        entrypoint = " ".join([
            shlex.quote(sys.executable), "-m", "orchestrate.executors.ray_executor",
            "--run-dir", shlex.quote(str(run.root)),
            "--shards", ",".join(str(s) for s in shard_ids),
            "--num-gpus", repr(float(c.num_gpus)), "--num-cpus", repr(float(c.num_cpus)),
            "--max-retries", str(int(c.max_retries)),
            "--task", job.kind,
            *(["--metrics", shlex.quote(",".join(job.metrics))] if job.metrics else []),
        ])
        env = {**forwarded_env(), **RAY_ENV_DEFAULTS}
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env={"env_vars": env},
                              metadata={"sinkscope_run": run.root.name})
        except Exception as error:  # noqa: BLE001
            raise RayExecutorError(f"Ray refused the job for shards {shard_ids}: {error}") from error
        return {"executor": "ray", "event": "job", "address": c.address, "dashboard": dashboard,
                "submission_id": submission_id, "shards": shard_ids}

    # ---- state ------------------------------------------------------------------------------------
    @staticmethod
    def _latest_jobs(run: RunDir, task: str = "generate") -> dict[int, dict]:
        out: dict[int, dict] = {}
        for record in run.submissions():
            if record.get("executor") == "ray" and record.get("event") == "job" and record_task(record) == task:
                for shard in record.get("shards", []):
                    out[int(shard)] = record
        return out

    def scheduler_states(self, run: RunDir, task: str = "generate") -> dict[int, str]:
        """Detached jobs only: the local mode has no scheduler left once `submit` returned (markers rule)."""
        self.notes = []
        latest = self._latest_jobs(run, task)
        by_job: dict[str, list[int]] = {}
        for shard, record in latest.items():
            by_job.setdefault(record["submission_id"], []).append(shard)
        records = {r["submission_id"]: r for r in latest.values()}
        states: dict[int, str] = {}
        for sid, shards in by_job.items():
            states.update(self._job_states(records[sid], shards))
        for note in self.notes:
            log.warning(note)
        return states

    def _job_states(self, record: dict, shards: list[int]) -> dict[int, str]:
        address = record.get("dashboard") or record.get("address")
        try:
            client = self._client(address)
            info = client.get_job_info(record["submission_id"])
        except Exception as error:  # noqa: BLE001 — cluster gone: markers decide
            self.notes.append(f"Ray job {record['submission_id']} unreachable ({type(error).__name__}): states unknown")
            return {s: "unknown" for s in shards}
        status = str(getattr(info.status, "value", info.status)).upper()
        if status == "PENDING" or not info.job_id:
            return {s: "pending" for s in shards}
        tasks: dict[int, tuple[int, str]] = {}
        try:
            from ray.util.state import list_tasks

            for t in list_tasks(address=address, filters=[("job_id", "=", info.job_id)], limit=10_000, timeout=20,
                                raise_on_missing_output=False):
                match = re.fullmatch(r"shard-(\d+)", t.name or "")
                if match:
                    shard = int(match.group(1))
                    if shard not in tasks or t.attempt_number >= tasks[shard][0]:
                        tasks[shard] = (t.attempt_number, str(t.state))
        except Exception as error:  # noqa: BLE001
            self.notes.append(f"Ray state API failed for job {record['submission_id']}: {error}")
        out = {}
        for shard in shards:
            state = _TASK_STATE_MAP.get(tasks[shard][1], "unknown") if shard in tasks else None
            if status == "STOPPED" and state != "completed":
                state = "cancelled"  # stopped by `orchestrate cancel` / `ray job stop`: its tasks died with the driver
            elif status in _TERMINAL_JOB and state in (None, "pending", "running", "unknown"):
                # the driver is gone; its unfinished tasks went with it
                state = "completed" if status == "SUCCEEDED" else "failed"
            out[shard] = state or "pending"  # the driver has not submitted it yet
        return out

    def cancel(self, run: RunDir) -> list[str]:
        """Stop the Ray jobs of this run (generation and metric jobs) that are not finished (their tasks die with the driver)."""
        stopped = []
        latest = {r["submission_id"]: r for task in TASKS for r in self._latest_jobs(run, task).values()}
        for sid, record in latest.items():
            client = self._client(record.get("dashboard") or record.get("address"))
            status = str(getattr(client.get_job_status(sid), "value", "")).upper()
            if status not in _TERMINAL_JOB and client.stop_job(sid):
                stopped.append(sid)
        return stopped


def main(argv: list[str] | None = None) -> int:
    """The detached driver of a Ray job: run the shards, wait, exit 1 if any failed."""
    parser = argparse.ArgumentParser(prog="python -m orchestrate.executors.ray_executor")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--shards", required=True, help="comma-separated shard ids")
    parser.add_argument("--num-gpus", type=float, default=1.0)
    parser.add_argument("--num-cpus", type=float, default=1.0)
    parser.add_argument("--max-retries", type=int, default=3)
    parser.add_argument("--task", choices=("generate", "metrics"), default="generate")
    parser.add_argument("--metrics", default="", help="comma-separated metric names (with --task metrics)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import ray

    ray.init(configure_logging=False)  # RAY_ADDRESS is set by the job supervisor
    shards = [int(s) for s in args.shards.split(",") if s.strip()]
    job = ShardJob(args.task, tuple(m for m in args.metrics.split(",") if m))
    outcome = run_shards(args.run_dir, shards, args.num_gpus, args.num_cpus, args.max_retries,
                         on_done=lambda s, st: log.info("shard %s: %s", s, st), job=job)
    failed = sorted(s for s, st in outcome.items() if st != "completed")
    log.info("%d shard(s) completed, %d failed %s", len(shards) - len(failed), len(failed), failed or "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
