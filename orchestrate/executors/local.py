"""Local executor: runs the shards on this machine, one worker per visible GPU (one on a CPU machine).

It blocks until every shard has run, with a progress bar over (prompt, seed) groups and an ETA. One
worker runs in this process; several run as spawned processes, each pinned to one GPU through
CUDA_VISIBLE_DEVICES and pulling shards from a shared queue, so a slow shard never idles the others.

Each worker's CPU thread pools are limited (executor.threads_per_worker; default: this machine's CPUs split
evenly among the workers), because every torch process otherwise sizes its pools for the whole host and
several workers on one host then contend for the same cores (suspected in a 1.58× instead of 2× two-GPU run).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import subprocess
import traceback

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from jobs.rundir import RunDir
from jobs.tasks import GENERATE, ShardJob
from orchestrate.executors.base import Executor

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # read when the OpenMP / MKL pools start, i.e. at torch import


def visible_gpus() -> list[str]:
    """GPU ids this process may use, without importing torch (orchestrate never touches model code)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]
    return []


def host_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container or taskset may allow fewer than the host has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_threads(setting: int | None, workers: int) -> int | None:
    """CPU threads each of `workers` workers gets from executor.threads_per_worker, or None: torch's own default."""
    if setting == 0:
        return None
    if setting is not None:
        return setting
    if workers <= 1:
        return None
    return max(1, host_cpus() // workers)


def _groups_per_shard(run: RunDir) -> dict[int, int]:
    table = run.manifest_table().select(["shard_id", "group_index"]).to_pandas()
    return table.drop_duplicates().groupby("shard_id").size().to_dict()


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    )


def _worker_loop(run_root: str, gpu: str | None, shards: "mp.Queue", events: "mp.Queue", job: ShardJob = GENERATE,
                 threads: int | None = None) -> None:
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if threads is not None:
        os.environ.update({name: str(threads) for name in THREAD_ENV})
    from jobs import run_shard  # after pinning the GPU and the pools: torch reads the variables at import

    if threads is not None:
        import torch

        torch.set_num_threads(threads)  # torch's intra-op pool, whatever was imported before

    while True:
        try:
            shard_id = shards.get_nowait()
        except queue.Empty:
            return
        last = [0]

        def progress(done: int, total: int, shard_id=shard_id) -> None:
            events.put(("progress", shard_id, done - last[0]))
            last[0] = done

        try:
            if job.kind == "generate":
                run_shard(run_root, shard_id, progress=progress)
            else:
                job.run(run_root, shard_id)
            events.put(("done", shard_id, None))
        except Exception:  # noqa: BLE001 — the failure is recorded by run_shard; report and go on
            events.put(("failed", shard_id, traceback.format_exc(limit=3)))


class LocalExecutor(Executor):
    kind = "local"
    blocking = True

    def submit(self, run: RunDir, shard_ids: list[int], job: ShardJob = GENERATE) -> list[dict]:
        gpus = visible_gpus()
        workers = self.config.workers or max(len(gpus), 1)
        workers = min(workers, max(len(shard_ids), 1))
        if not shard_ids:
            return []
        threads = resolve_threads(self.config.threads_per_worker, workers)
        if job.kind == "generate":
            groups = _groups_per_shard(run)
            total = sum(groups.get(s, 0) for s in shard_ids)
        else:
            total = len(shard_ids)  # metric jobs report per shard
        failed: dict[int, str] = {}
        with _progress_bar() as bar:
            task = bar.add_task(run.root.name, total=total, unit="groups" if job.kind == "generate" else "shards scored")
            if workers == 1:
                self._run_in_process(run, shard_ids, bar, task, failed, job, threads)
            else:
                self._run_in_workers(run, shard_ids, gpus, workers, bar, task, failed, job, threads)
        return [{"executor": "local", "event": "finished", "shards": list(shard_ids), "workers": workers, "gpus": gpus,
                 "threads_per_worker": threads, "failed": sorted(failed), **job.record()}]

    @classmethod
    def _run_in_process(cls, run, shard_ids, bar, task, failed, job: ShardJob, threads: int | None) -> None:
        if threads is None:
            cls._run_shards_here(run, shard_ids, bar, task, failed, job)
            return
        import torch  # this process runs the shards: limit its pool for as long as they run

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            cls._run_shards_here(run, shard_ids, bar, task, failed, job)
        finally:
            torch.set_num_threads(before)

    @staticmethod
    def _run_shards_here(run, shard_ids, bar, task, failed, job: ShardJob) -> None:
        from jobs import run_shard

        for shard_id in shard_ids:
            last = [0]

            def progress(done: int, total: int) -> None:
                bar.advance(task, done - last[0])
                last[0] = done

            try:
                if job.kind == "generate":
                    run_shard(run.root, shard_id, progress=progress)
                else:
                    job.run(run.root, shard_id)
                    bar.advance(task, 1)
            except Exception as error:  # noqa: BLE001 — recorded in state/failed by run_shard
                failed[shard_id] = f"{type(error).__name__}: {error}"
                bar.console.print(f"[red]shard {shard_id} failed[/red]: {failed[shard_id]} (see `orchestrate logs`)")

    @staticmethod
    def _run_in_workers(run, shard_ids, gpus, workers, bar, task, failed, job: ShardJob, threads: int | None) -> None:
        ctx = mp.get_context("spawn")
        shards, events = ctx.Queue(), ctx.Queue()
        for shard_id in shard_ids:
            shards.put(shard_id)
        procs = [
            ctx.Process(target=_worker_loop, args=(str(run.root), gpus[i] if i < len(gpus) else None, shards, events, job, threads))
            for i in range(workers)
        ]
        for proc in procs:
            proc.start()
        finished = 0
        while finished < len(shard_ids):
            try:
                kind, shard_id, payload = events.get(timeout=5)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break  # a worker died without reporting (killed): its shard stays unfinished for resume
                continue
            if kind == "progress":
                bar.advance(task, payload)
            else:
                finished += 1
                if job.kind != "generate":
                    bar.advance(task, 1)
                if kind == "failed":
                    failed[shard_id] = payload.strip().splitlines()[-1]
                    bar.console.print(f"[red]shard {shard_id} failed[/red]: {failed[shard_id]}")
        for proc in procs:
            proc.join()
