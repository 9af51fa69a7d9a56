"""Local executor: runs the shards on this machine, one worker per visible GPU (one on a CPU machine).

It blocks until every shard has run, with a progress bar over (prompt, seed) groups and an ETA. One
worker runs in this process; several run as spawned processes, each pinned to one GPU through
CUDA_VISIBLE_DEVICES and pulling shards from a shared queue, so a slow shard never idles the others.

torch's intra-op thread count is not the executor's: `run_shard` sets `generation.torch_threads` of the sweep
for every shard, because CPU pixels depend on it. What the executor sets is the environment of each spawned
worker (executor.threads_per_worker → OMP_NUM_THREADS / MKL_NUM_THREADS; default: this machine's CPUs split
evenly among the workers), which sizes the OpenMP / MKL runtimes' other pools at import, so several workers
on one host do not each start a pool for the whole host.

A worker that dies (killed, out of memory) is noticed through its process sentinel at once; the shard it
held is reported as failed with the signal, never silently dropped.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import signal
import subprocess
import traceback
from multiprocessing.connection import wait as wait_ready

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from jobs.faults import POOL_ENV
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


def _worker_loop(run_root: str, gpu: str | None, shards: "mp.Queue", events, job: ShardJob = GENERATE,
                 threads: int | None = None, pool: str = "") -> None:
    """One spawned worker: take shards from the shared queue until it is empty; report on its own pipe."""
    os.environ[POOL_ENV] = pool  # the pool's size and id (fault hooks that coordinate its workers read it)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if threads is not None:
        os.environ.update({name: str(threads) for name in THREAD_ENV})
    from jobs import run_shard  # after pinning the GPU and the pools: torch reads the variables at import

    while True:
        try:
            shard_id = shards.get_nowait()
        except queue.Empty:
            events.close()
            return
        events.send(("started", shard_id, os.getpid()))
        last = [0]

        def progress(done: int, total: int, shard_id=shard_id) -> None:
            events.send(("progress", shard_id, done - last[0]))
            last[0] = done

        try:
            if job.kind == "generate":
                run_shard(run_root, shard_id, progress=progress)
            else:
                job.run(run_root, shard_id)
            events.send(("done", shard_id, None))
        except Exception:  # noqa: BLE001 — the failure is recorded by run_shard; report and go on
            events.send(("failed", shard_id, traceback.format_exc(limit=3)))


def describe_exit(exitcode: int | None) -> str:
    """'killed by SIGKILL' / 'exited with status 3' for a worker process's exit code."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


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
                self._run_shards_here(run, shard_ids, bar, task, failed, job)
            else:
                self._run_in_workers(run, shard_ids, gpus, workers, bar, task, failed, job, threads)
        return [{"executor": "local", "event": "finished", "shards": list(shard_ids), "workers": workers, "gpus": gpus,
                 "threads_per_worker": threads if workers > 1 else None, "failed": sorted(failed),
                 "errors": {str(s): why for s, why in sorted(failed.items())}, **job.record()}]

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
        """Spawned workers pull shards from one queue; each reports on its own pipe (a worker killed while
        writing cannot wedge a lock shared with the others). Waiting is on the pipes and the process
        sentinels, so a dead worker is noticed at once, and the shard it held is named as lost."""
        ctx = mp.get_context("spawn")
        shards = ctx.Queue()
        for shard_id in shard_ids:
            shards.put(shard_id)
        procs, pipes = [], {}
        for i in range(workers):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker_loop,
                               args=(str(run.root), gpus[i] if i < len(gpus) else None, shards, writer, job, threads,
                                     f"{workers}:{os.getpid()}"))
            proc.start()
            writer.close()  # the worker holds the only write end: EOF on the reader means it has gone
            procs.append(proc)
            pipes[reader] = proc
        holding: dict[object, int] = {}  # worker -> the shard it is running
        finished: set[int] = set()

        def handle(proc, message) -> None:
            kind, shard_id, payload = message
            if kind == "started":
                holding[proc] = shard_id
            elif kind == "progress":
                bar.advance(task, payload)
            else:
                holding.pop(proc, None)
                finished.add(shard_id)
                if job.kind != "generate":
                    bar.advance(task, 1)
                if kind == "failed":
                    failed[shard_id] = payload.strip().splitlines()[-1]
                    bar.console.print(f"[red]shard {shard_id} failed[/red]: {failed[shard_id]}")

        open_pipes = dict(pipes)
        while open_pipes:
            for reader in wait_ready(list(open_pipes)):
                proc = open_pipes[reader]
                try:
                    handle(proc, reader.recv())
                except EOFError:  # the worker exited (its last messages were read before EOF)
                    del open_pipes[reader]
                    proc.join()
                    if proc in holding:
                        shard_id = holding.pop(proc)
                        failed[shard_id] = f"worker process {proc.pid} {describe_exit(proc.exitcode)} while running it"
                        bar.console.print(f"[red]shard {shard_id} lost[/red]: {failed[shard_id]}")
        for proc in procs:
            proc.join()
