"""Slurm executor: one job-array element per shard, submitted through submitit, never waited on.

What reaches Slurm is the shard id and the run directory path, nothing else: prompt text and sweep
values stay in the run directory's manifest, which `jobs.run_shard` reads on the node. The run path is
checked against a conservative character set (Slurm expands `%` in file names; shells split on spaces).

Requeue: `ShardTask.checkpoint` hands submitit the same task again, so a timeout warning (USR2 sent
`signal_delay_s` before the limit) or a preemption requeues the array element; `run_shard` then resumes
from the shard's finished groups. Timeout requeues are bounded by `max_requeues`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess

from jobs.rundir import RunDir
from jobs.runformat import TASKS
from jobs.tasks import GENERATE, ShardJob, record_task
from orchestrate.executors.base import Executor

log = logging.getLogger("sinkscope.orchestrate.slurm")

# A run directory must be one of these characters only: no spaces, quotes, `%` (Slurm file patterns), `$`.
SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+=,@:-]+$")
# sbatch options the executor owns: overriding them from sbatch_extra would break logs or array indexing.
RESERVED_SBATCH = {"array", "output", "error", "open-mode", "signal", "wrap", "parsable", "job-name", "export"}
SBATCH_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
SIGNAL_DELAY_S = 90  # USR2 this many seconds before the time limit: time to checkpoint and requeue


def signal_delay_s(time_min: int) -> int:
    """90 s before the limit, but at most a sixth of a short limit (checkpointing a shard is instant:
    finished groups are on disk already); at least 10 s."""
    return int(min(SIGNAL_DELAY_S, max(10, time_min * 60 // 6)))

# Slurm state (sacct / squeue) -> the executor's scheduler state
_STATE_MAP = {
    "PENDING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending", "REQUEUE_FED": "pending",
    "RESV_DEL_HOLD": "pending", "CONFIGURING": "pending", "SUSPENDED": "pending", "STOPPED": "pending",
    "RUNNING": "running", "COMPLETING": "running", "STAGE_OUT": "running", "SIGNALING": "running",
    "RESIZING": "running",
    "COMPLETED": "completed",
    "FAILED": "failed", "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed", "BOOT_FAIL": "failed",
    "DEADLINE": "timeout", "TIMEOUT": "timeout",
    "CANCELLED": "cancelled", "PREEMPTED": "cancelled", "REVOKED": "cancelled", "SPECIAL_EXIT": "failed",
}


class SlurmError(RuntimeError):
    """Slurm is missing, misconfigured, or refused a submission."""


class PartialSubmissionError(SlurmError):
    """Some arrays were submitted before a later one failed. `records` describe the submitted ones."""

    def __init__(self, message: str, records: list[dict]):
        super().__init__(message)
        self.records = records


class ShardTask:
    """The picklable job function: run one shard in the array element. Checkpointable (requeue = rerun)."""

    def __init__(self, run_dir: str, shard_id: int, job: ShardJob = GENERATE):
        self.run_dir = str(run_dir)
        self.shard_id = int(shard_id)
        self.job = job

    def __call__(self) -> dict:
        array_id, task_id = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        job_id = f"{array_id}_{task_id}" if array_id and task_id else os.environ.get("SLURM_JOB_ID", "")
        os.environ["SINKSCOPE_JOB_ID"] = f"slurm:{job_id}"  # recorded in the shard's markers
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus:  # torch would start one thread per core of the node, not of the allocation
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ.setdefault(var, cpus)
        marker = self.job.run(self.run_dir, self.shard_id)  # heavy imports happen on the node only
        return {"shard_id": self.shard_id, "rows": marker.get("rows", {}), "job_id": job_id, "task": self.job.kind,
                "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)}

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on USR2 (timeout warning or preemption): requeue the same shard.

        Nothing to save here: finished groups already sit in the shard's scratch folder.
        """
        import submitit

        return submitit.helpers.DelayedSubmission(ShardTask(self.run_dir, self.shard_id, self.job))

    def __repr__(self) -> str:
        return f"ShardTask(shard={self.shard_id}, run_dir={self.run_dir!r})"


# ---- Slurm queries ------------------------------------------------------------------------------
def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def require_slurm() -> None:
    missing = [c for c in ("sbatch", "squeue", "scontrol", "srun") if shutil.which(c) is None]
    if missing:
        raise SlurmError(f"Slurm client commands not found on PATH: {', '.join(missing)}. "
                         "Submit from a Slurm login node, or start the test cluster: scripts/slurm/start_slurm.sh")


def cluster_config() -> dict[str, str]:
    """`scontrol show config` as a dict."""
    require_slurm()
    proc = _run(["scontrol", "show", "config"])
    if proc.returncode != 0:
        raise SlurmError(f"`scontrol show config` failed (is slurmctld up?): {proc.stderr.strip()}")
    out = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def cluster_max_array_size() -> int:
    """Elements allowed in one array (MaxArraySize; indices run 0..MaxArraySize-1)."""
    value = cluster_config().get("MaxArraySize", "1001")
    try:
        return max(1, int(value.split()[0]))
    except ValueError as e:
        raise SlurmError(f"cannot read MaxArraySize from `scontrol show config`: {value!r}") from e


def _expand_job_ids(job_field: str) -> list[str]:
    """'12_3' -> ['12_3']; '12_[4-6,9%2]' -> ['12_4','12_5','12_6','12_9']; '12' -> ['12']."""
    base, sep, rest = job_field.partition("_")
    if not sep:
        return [base]
    if not rest.startswith("["):
        return [f"{base}_{rest}"]
    inner = rest.strip("[]").split("%")[0]
    out = []
    for part in filter(None, inner.split(",")):
        low, dash, high = part.partition("-")
        for i in range(int(low), int(high if dash else low) + 1):
            out.append(f"{base}_{i}")
    return out


def parse_job_states(text: str) -> dict[str, str]:
    """Lines 'JobID|State' (sacct -P / squeue -o '%i|%T') -> {'12_3': 'RUNNING', ...}; steps skipped."""
    states: dict[str, str] = {}
    for line in text.splitlines():
        job, sep, state = line.strip().partition("|")
        if not sep or not job or "." in job:
            continue
        state = state.split()[0].split("|")[0] if state.strip() else "UNKNOWN"  # 'CANCELLED by 0' -> CANCELLED
        try:
            ids = _expand_job_ids(job)
        except ValueError:
            log.warning("cannot read Slurm job id %r", job)
            continue
        for jid in ids:
            states[jid] = state
    return states


def map_state(slurm_state: str) -> str:
    return _STATE_MAP.get(slurm_state.upper().rstrip("+"), "unknown")


# ---- the executor -----------------------------------------------------------------------------------
class SlurmExecutor(Executor):
    """Shards as Slurm job arrays through submitit; returns as soon as the arrays are queued."""

    kind = "slurm"

    def __init__(self, config):
        super().__init__(config)
        self.notes: list[str] = []  # why a state is "unknown" (e.g. no accounting), for `status`

    # ---- submission -------------------------------------------------------------------------------
    def _check_run_path(self, run: RunDir) -> None:
        for path in (run.root, run.executor_dir):
            if not SAFE_PATH.match(str(path)):
                raise SlurmError(
                    f"run directory {str(path)!r} has characters Slurm or a shell would interpret "
                    f"(allowed: letters, digits and _./+=,@:-). Choose an output_root without spaces, quotes, % or $."
                )

    def _sbatch_extra(self) -> dict:
        extra = {}
        for key, value in (self.config.sbatch_extra or {}).items():
            flag = key.lstrip("-")
            if not SBATCH_KEY.match(flag):
                raise SlurmError(f"executor.sbatch_extra: {key!r} is not an sbatch option name")
            if flag.replace("_", "-") in RESERVED_SBATCH:
                raise SlurmError(f"executor.sbatch_extra: --{flag} is set by sinkscope and cannot be overridden")
            value = "" if value is None else str(value)
            if any(c in value for c in "\n\r\0"):
                raise SlurmError(f"executor.sbatch_extra.{key}: value must be one line")
            # submitit quotes every value; a bare flag (e.g. requeue) is written as True
            extra[flag.replace("_", "-")] = True if value.lower() in ("", "true") else value
        return extra

    def slurm_parameters(self, run: RunDir) -> dict:
        """submitit `slurm_*` parameters from the executor block (exposed for tests and `--dry-run`)."""
        c = self.config
        for field in ("partition", "account", "qos", "mem", "constraint"):
            value = getattr(c, field)
            if value is not None and (not str(value).strip() or any(ch in str(value) for ch in "\n\r\0")):
                # submitit writes these into the sbatch script: a line break would start a shell command
                raise SlurmError(f"executor.{field}: {value!r} must be one non-empty line")
        name = "sinkscope-" + re.sub(r"[^A-Za-z0-9_.-]", "_", run.root.name)[:60]
        params = {
            "slurm_job_name": name,
            "slurm_time": int(c.time),
            "slurm_cpus_per_task": int(c.cpus_per_task),
            "slurm_array_parallelism": int(c.array_parallelism),
            "slurm_signal_delay_s": signal_delay_s(c.time),
            "slurm_setup": list(c.setup) or None,
            "slurm_partition": c.partition,
            "slurm_account": c.account,
            "slurm_qos": c.qos,
            "slurm_mem": c.mem,
            "slurm_constraint": c.constraint,
            "slurm_additional_parameters": self._sbatch_extra() or None,
        }
        if c.gpus_per_task:
            # --gpus-per-task needs an explicit task count; one task per shard job
            params.update(slurm_gpus_per_task=int(c.gpus_per_task), slurm_ntasks_per_node=1)
        return {k: v for k, v in params.items() if v is not None}

    def _make_submitit(self, run: RunDir):
        import submitit

        run.executor_dir.mkdir(parents=True, exist_ok=True)
        ex = submitit.AutoExecutor(folder=run.executor_dir, cluster="slurm", slurm_max_num_timeout=int(self.config.max_requeues))
        ex.update_parameters(**self.slurm_parameters(run))
        return ex

    def submit(self, run: RunDir, shard_ids: list[int], job: ShardJob = GENERATE) -> list[dict]:
        """Queue the shards as arrays of at most max_array_size elements; one record per array."""
        shard_ids = [int(s) for s in shard_ids]
        if not shard_ids:
            return []
        require_slurm()
        self._check_run_path(run)
        size = self.config.max_array_size or cluster_max_array_size()
        ex = self._make_submitit(run)
        chunks = [shard_ids[i : i + size] for i in range(0, len(shard_ids), size)]
        records: list[dict] = []
        for n, chunk in enumerate(chunks):
            try:
                jobs = ex.submit_array([ShardTask(str(run.root), s, job) for s in chunk])
            except Exception as error:  # noqa: BLE001 — report what was and was not queued
                unsent = [s for c in chunks[n:] for s in c]
                message = f"sbatch failed for shards {unsent}: {error}"
                if not records:
                    raise SlurmError(message) from error
                # the caller appends our records only on success: keep the queued arrays known
                for record in records:
                    run.append_submission(record)
                raise PartialSubmissionError(
                    f"{message} (shards {[s for r in records for s in r['shards']]} were queued and recorded)", records
                ) from error
            job_ids = {str(s): job.job_id for s, job in zip(chunk, jobs)}
            array_id = jobs[0].job_id.split("_")[0]
            records.append({
                "executor": "slurm",
                "event": "array",
                "array_job_id": array_id,
                "shards": chunk,
                "job_ids": job_ids,
                "array_index": n,
                "arrays": len(chunks),
                "max_array_size": size,
                "folder": str(run.executor_dir),
                **job.record(),
            })
            log.info("queued shards %s as Slurm job %s", chunk, array_id)
        return records

    # ---- state ------------------------------------------------------------------------------------
    @staticmethod
    def latest_job_ids(run: RunDir, task: str = "generate") -> dict[int, str]:
        """shard -> the Slurm job id ('12_3' or '12') of its most recent submission of `task`."""
        out: dict[int, str] = {}
        for record in run.submissions():
            if record.get("executor") == "slurm" and isinstance(record.get("job_ids"), dict) and record_task(record) == task:
                for shard, jid in record["job_ids"].items():
                    out[int(shard)] = str(jid)
        return out

    def query_states(self, job_ids: list[str]) -> dict[str, str]:
        """Slurm job id -> Slurm state: live jobs from squeue, finished ones from sacct."""
        self.notes = []
        bases = sorted({j.split("_")[0] for j in job_ids}, key=int)
        if not bases:
            return {}
        states: dict[str, str] = {}
        sacct = shutil.which("sacct")
        if sacct:
            proc = _run([sacct, "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(bases)])
            if proc.returncode == 0:
                states.update(parse_job_states(proc.stdout))
            else:
                self.notes.append(f"sacct failed ({proc.stderr.strip()[:200]}): finished jobs read as 'unknown'")
        else:
            self.notes.append("sacct not found (no Slurm accounting): finished jobs read as 'unknown'")
        if shutil.which("squeue"):
            # squeue is current where sacct lags behind slurmdbd (or never hears of a job cancelled before it
            # became eligible); -t all includes jobs finished less than MinJobAge ago; -r lists array elements
            proc = _run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(bases)])
            if proc.returncode == 0:
                states.update(parse_job_states(proc.stdout))
            elif "Invalid job id" not in proc.stderr:
                self.notes.append(f"squeue failed: {proc.stderr.strip()[:200]}")
        for note in self.notes:
            log.warning(note)
        return states

    def scheduler_states(self, run: RunDir, task: str = "generate") -> dict[int, str]:
        latest = self.latest_job_ids(run, task)
        if not latest:
            return {}
        raw = self.query_states(list(latest.values()))
        out = {}
        for shard, jid in latest.items():
            # an array cancelled (or ended) before its elements were split out is listed as one job "12"
            state = raw.get(jid) or raw.get(jid.split("_")[0])
            out[shard] = map_state(state) if state else "unknown"
        return out

    def cancel(self, run: RunDir) -> list[str]:
        """scancel every array/job of this run (generation and metric jobs) that Slurm still lists as pending or running."""
        require_slurm()
        live_ids = set()
        for task in TASKS:
            ids = self.latest_job_ids(run, task)
            live_ids |= {ids[s] for s, state in self.scheduler_states(run, task).items() if state in ("pending", "running")}
        live = sorted(live_ids)
        if live:
            proc = _run(["scancel", *live])
            if proc.returncode != 0:
                raise SlurmError(f"scancel {' '.join(live)} failed: {proc.stderr.strip()}")
        return live
