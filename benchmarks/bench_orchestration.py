"""Orchestration and analysis at paper scale on a CPU: plan, run creation, status, dry resume, load_run, compaction,
sink-step queries. Prints seconds and peak RSS per step (results in benchmarks/RESULTS.md).

The synthetic run is written through the project's own writers (`create_run`, `jobs.run_shard._write_group` and
`_finalise`, `RunDir` markers) with fake generation results: N shards of one prompt × 1 seed × 11 arms each, 90 %
done, 3 % failed (three distinct errors), 1 % running, the rest not started. Sink-step rows per unit are
steps × layers × heads × 2 branches (default 4 × 2 × 19 × 2 = 304, i.e. 30 M rows for 9,000 done shards).

    python benchmarks/bench_orchestration.py --shards 10000 --workdir /tmp/bench-orch
    python benchmarks/bench_orchestration.py --shards 200              # a smoke run in a minute
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs import runformat as rf  # noqa: E402
from jobs.run_shard import _finalise, _write_group  # noqa: E402
from jobs.rundir import RunDir  # noqa: E402
from jobs.frozen_sweep import load_resolved_sweep  # noqa: E402
from orchestrate.create import create_run  # noqa: E402

ARMS = ["baseline"] + [f"sink_k{k}" for k in range(1, 6)] + [f"random_k{k}" for k in range(1, 6)]  # 11 arms
ERRORS = ["RuntimeError: CUDA out of memory", "OSError: [Errno 122] Disk quota exceeded", "ValueError: NaN in latents"]


@dataclass
class FakeResult:
    """What `workers.generate_group` returns per arm, as far as `_write_group` reads it."""

    arm: str
    image: object
    sink_rows: pa.Table
    seconds: float


def write_sweep(folder: Path, shards: int, steps: int, layers: int, n_arms: int = len(ARMS)) -> Path:
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(f"a synthetic prompt number {i}\n" for i in range(shards)))
    arms = [{"name": "baseline", "intervention": None}]
    for k in range(1, 6):
        arms.append({"name": f"sink_k{k}", "intervention": {"preset": "fixed.m1", "k": k, "layers": [1]}})
        arms.append({"name": f"random_k{k}", "intervention": {"preset": "fixed.random", "k": k, "layers": [1]}})
    arms = sorted(arms, key=lambda a: ARMS.index(a["name"]))[:n_arms]
    sweep = {"name": "bench", "model": {"preset": "tiny-sd3"}, "prompts": {"file": "prompts.txt"}, "seeds": {"count": 1},
             "generation": {"steps": steps, "height": 64, "width": 64}, "arms": arms,
             "recording": {"layers": list(range(layers)), "topk": 5}, "sharding": {"prompts_per_shard": 1},
             "analysis": {"metrics": ["lpips"], "random_metric_weights": True}, "output_root": str(folder / "runs")}
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def write_plan_sweep(folder: Path) -> Path:
    """The paper's scale: 553 GenEval prompts × 10 seeds × 20 arms = 110,600 units."""
    arms = [{"name": "baseline", "intervention": None}]
    arms += [{"name": f"sink_k{k}", "intervention": {"preset": "fixed.m1", "k": k}} for k in range(1, 11)]
    arms += [{"name": f"random_k{k}", "intervention": {"preset": "fixed.random", "k": k}} for k in range(1, 10)]
    sweep = {"name": "paper-scale", "model": {"preset": "sd3-medium-random"}, "prompts": {"set": "geneval"},
             "seeds": {"count": 10}, "arms": arms, "sharding": {"prompts_per_shard": 1}}
    path = folder / "paper-scale.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def record_template(steps: int, layers: int, heads: int, seed: int) -> pa.Table:
    """One unit's recorder rows (SINK_STEP_RECORD_SCHEMA), random but plausible."""
    rng = np.random.default_rng(seed)
    n = steps * layers * heads * 2
    grid = np.stack(np.meshgrid(np.arange(steps), np.arange(layers), np.arange(heads), np.arange(2), indexing="ij"), -1).reshape(-1, 4)
    topk = rng.integers(0, 80, (n, 5)).astype(np.int32)
    topk[rng.random(n) < 0.6, 0] = 0  # a dominant sink key
    mass = np.sort(rng.uniform(0.01, 0.5, (n, 5)).astype(np.float32), axis=1)[:, ::-1]
    modality = np.where(topk < 64, "image", "clip")
    return pa.table({
        "step": pa.array(grid[:, 0], pa.int32()), "timestep": pa.array(1000 * (1 - grid[:, 0] / steps), pa.float32()),
        "sigma": pa.array(1 - grid[:, 0] / steps, pa.float32()), "layer": pa.array(grid[:, 1], pa.int32()),
        "head": pa.array(grid[:, 2], pa.int32()), "branch": pa.array(np.where(grid[:, 3] == 0, "cond", "uncond")),
        "topk_idx": pa.array(list(topk)), "topk_modality": pa.array(list(modality)), "topk_mass": pa.array(list(mass)),
        "max_mass": pa.array(mass[:, 0]), "entropy": pa.array(rng.uniform(3, 6, n).astype(np.float32)),
        "top5_conc": pa.array(mass.sum(1)), "intervened": pa.array(np.zeros(n, bool)),
        "selected_idx": pa.nulls(n, pa.list_(pa.int32())), "removed_mass_after": pa.nulls(n, pa.float32()),
        "layer_name": pa.array([f"transformer_blocks.{i}.attn" for i in grid[:, 1]]),
    }, schema=rf.SINK_STEP_RECORD_SCHEMA)


def _write_shards(args: tuple) -> int:
    """Write done shards [a, b) through `_write_group` + `_finalise` (one process of the pool)."""
    from PIL import Image

    root, shard_ids, steps, layers, heads = args
    run = RunDir(root)
    sweep = load_resolved_sweep(run)
    arms_by_name = {a.name: a for a in sweep.arms}
    manifest = run.manifest_table().to_pylist()
    by_shard: dict[int, list[dict]] = {}
    for row in manifest:
        by_shard.setdefault(row["shard_id"], []).append(row)
    image = Image.new("RGB", (64, 64), (120, 30, 200))  # the sweep's size: metric jobs can score it
    templates = [record_template(steps, layers, heads, i) for i in range(4)]
    for shard in shard_ids:
        rows = sorted(by_shard[shard], key=lambda r: ARMS.index(r["arm"]))
        scratch = run.scratch_dir(shard)
        scratch.mkdir(parents=True, exist_ok=True)
        results = [FakeResult(r["arm"], image, templates[(shard + i) % 4], 0.01) for i, r in enumerate(rows)]
        started = time.time() - 30
        _write_group(run, scratch, shard, 0, rows, results, arms_by_name, sweep, True)
        marker = _finalise(run, shard, [0], None, started)
        del marker
    return len(shard_ids)


def build_run(workdir: Path, shards: int, steps: int, layers: int, heads: int, procs: int, n_arms: int = len(ARMS)) -> RunDir:
    workdir.mkdir(parents=True, exist_ok=True)
    sweep_path = write_sweep(workdir, shards, steps, layers, n_arms)
    run, manifest, _ = create_run(sweep_path)
    ids = manifest.shard_ids
    n_done, n_failed, n_running = int(shards * 0.9), int(shards * 0.03), int(shards * 0.01)
    done_ids = ids[:n_done]
    chunks = [(str(run.root), done_ids[i::procs], steps, layers, heads) for i in range(procs)]
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(_write_shards, chunks))
    for i, shard in enumerate(ids[n_done:n_done + n_failed]):
        run.write_marker("failed", shard, {"error": ERRORS[i % 3], "traceback": "...", "host": "node7", "time": time.time()})
    for shard in ids[n_done + n_failed:n_done + n_failed + n_running]:
        run.write_marker("running", shard, {"host": "node-elsewhere", "pid": 1, "started": time.time() - 600})
    return run


class PeakRSS:
    """Peak resident memory of this process while a block runs (sampled every 5 ms; ru_maxrss never goes down)."""

    def __enter__(self):
        self.peak, self._stop = 0, False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop:
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


def timed(label: str, fn, results: dict, repeat: int = 1):
    gc.collect()
    best, value = float("inf"), None
    with PeakRSS() as rss:
        for _ in range(repeat):
            start = time.perf_counter()
            value = fn()
            best = min(best, time.perf_counter() - start)
    results[label] = {"seconds": round(best, 3), "peak_rss_mib": round(rss.peak / 2**20)}
    print(f"{label:<48} {best:8.3f} s   peak RSS {rss.peak / 2**20:7.0f} MiB", flush=True)
    return value


def cli(*args: str) -> float:
    """Wall seconds of one `orchestrate` command in a fresh process (what a user waits for, imports included)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "orchestrate", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    if proc.returncode != 0:
        raise RuntimeError(f"orchestrate {' '.join(args)}: {proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=19)
    parser.add_argument("--arms", type=int, default=len(ARMS), help=f"arms (units per shard), at most {len(ARMS)}")
    parser.add_argument("--procs", type=int, default=2, help="processes writing the synthetic run")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sinkscope-bench-orchestration"))
    parser.add_argument("--reuse", action="store_true", help="reuse a synthetic run already in --workdir")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import analysis
    from jobs import compaction
    from orchestrate import status as run_status
    from orchestrate.create import build_manifest

    results: dict = {"host": socket.gethostname(), "cpus": os.cpu_count(), "shards": args.shards}
    if not args.reuse:
        shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    paper = write_plan_sweep(args.workdir)
    manifest = timed("plan: validate + expand 553 × 10 × 20", lambda: build_manifest(paper)[0], results, repeat=3)
    results["plan_units"] = manifest.num_units
    results["cli_plan_s"] = round(min(cli("plan", str(paper)) for _ in range(2)), 3)
    print(f"  ({manifest.num_units} units; orchestrate plan in a fresh process: {results['cli_plan_s']} s)")
    if not args.reuse:
        start = time.perf_counter()
        run = build_run(args.workdir, args.shards, args.steps, args.layers, args.heads, args.procs, args.arms)
        results["build_s"] = round(time.perf_counter() - start, 1)
        print(f"built the synthetic run in {results['build_s']} s: {run.root}")
    else:
        (root,) = [p for p in (args.workdir / "runs").iterdir() if p.is_dir()]
        run = RunDir(root)
    create_root = args.workdir / "create"
    shutil.rmtree(create_root, ignore_errors=True)
    timed("run creation (create_run, new directory)", lambda: create_run(args.workdir / "bench.yaml", str(create_root)), results)

    timed("status summary (in process)", lambda: run_status.summarise(run, run_status.shard_statuses(run)), results, repeat=3)
    timed("dry resume: states + rerunnable (in process)", lambda: run_status.rerunnable(run_status.shard_statuses(run)), results,
          repeat=3)
    timed("status --all per-shard table (in process)", lambda: run_status.shard_statuses(run, per_shard=True), results, repeat=3)
    results["cli_startup_s"] = round(min(cli("--help") for _ in range(3)), 3)  # interpreter + imports, no work
    results["cli_status_s"] = round(min(cli("status", str(run.root)) for _ in range(3)), 3)
    results["cli_status_all_s"] = round(min(cli("status", str(run.root), "--all", "--json") for _ in range(2)), 3)
    results["cli_resume_dry_s"] = round(min(cli("resume", str(run.root), "--dry-run") for _ in range(3)), 3)
    print(f"orchestrate --help (fresh process: startup only)  {results['cli_startup_s']:8.3f} s")
    print(f"orchestrate status (fresh process)                {results['cli_status_s']:8.3f} s")
    print(f"orchestrate status --all --json (fresh process)   {results['cli_status_all_s']:8.3f} s")
    print(f"orchestrate resume --dry-run (fresh process)      {results['cli_resume_dry_s']:8.3f} s")

    def load():
        data = analysis.load_run(run.root)
        return len(data.units), len(data.metrics)

    timed("load_run (parts): units + metrics", load, results)
    rows = timed("compaction (orchestrate compact)", lambda: sum(r.rows_written for r in compaction.compact_run(run)), results)
    print(f"  ({rows} rows rewritten)")
    timed("load_run (compacted): units + metrics", load, results, repeat=3)
    data = analysis.load_run(run.root)
    n_rows = timed("sink steps: count(*)", lambda: len(data.sink_steps), results)
    results["sink_step_rows"] = n_rows
    print(f"  ({n_rows} sink-step rows)")
    timed("query: mean max mass by arm × step × layer", data.sink_steps.mean_max_mass, results, repeat=2)
    timed("query: top-1 sink identity counts by layer × step", data.sink_steps.top1_counts, results, repeat=2)
    timed("query: entropy by arm × branch where step = 0 (SQL)",
          lambda: data.sink_steps.sql("SELECT arm, branch, avg(entropy) FROM sink_steps WHERE step = 0 GROUP BY ALL"),
          results, repeat=2)
    results["peak_rss_process_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
