"""Scaling of orchestrate's LOCAL executor itself: one GPU against two, through the real CLI.

    python benchmarks/bench_executor_scaling.py --out DIR [--gpus 0,1] [--groups-per-worker 12]
    python benchmarks/bench_executor_scaling.py --out DIR --preset tiny-sd3 --size 64 --steps 2 --device cpu   # CPU check

For each configuration it writes a sweep (model sd3-medium-random bf16, 1024², 20 steps; arms baseline + sink
(fixed.m1 at layer 12) + random (fixed.random at 12); recording layers 6/12/18) and runs
`python -m orchestrate submit SWEEP -e local -o workers=W [-o threads_per_worker=0]` in a fresh process:

    a1-w1   arms_per_batch 1, workers 1 (CUDA_VISIBLE_DEVICES = the first GPU)
    a1-w2   arms_per_batch 1, workers 2 (both GPUs)
    a3-w1   arms_per_batch 3, workers 1
    a3-w2   arms_per_batch 3, workers 2
    a1-w2-threads-off   as a1-w2 with executor.threads_per_worker = 0 (torch's default pools: the diagnosis)

Every worker gets the same work (`--groups-per-worker` groups of 3 images; a group ≈ 3.8 s on one H200, so 12
groups ≈ 45 s), in shards of `--prompts-per-shard` groups (4 shards per worker by default), so the fixed costs
(start, model build, warm-up) weigh the same in both. Before the timed runs, two one-group runs (A = 1, A = 3) fill
the Triton and CUDA caches, so the first timed configuration pays no compilation the others skip.

Reported per configuration: wall seconds of the whole `submit` (process start, run creation, model build in each
worker, warm-up, generation, writes), images, images/hour from that wall time, and the steady-state images/hour:
for each worker (a pid in the shard logs, jobs/run_shard.py), (its groups − 1) × 3 images over the time from its
first to its last finished group, summed over workers. That excludes the model build and the first (warm-up)
group but keeps everything a worker does between groups (PNG and Parquet writes, shard hand-over); "overlap" is
the share of those windows during which all workers were in them (near 1: the sum is a concurrent rate). Then the
2-vs-1 ratios of both. The random-weight images are noise: their PNGs are larger than real images' (≈3 MB at
1024²), which makes the writes a little dearer than in a real run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from manifests.models import PRESET_GEOMETRY  # noqa: E402

REFERENCE_LAYERS = 24  # the layer numbers below are SD3-medium's; smaller presets get them mapped proportionally
RECORD_LAYERS = (6, 12, 18)
INTERVENTION_LAYER = 12
ARMS_PER_GROUP = 3
CONFIGS = {  # name: (arms_per_batch, workers, threads_per_worker override or None)
    "a1-w1": (1, 1, None),
    "a1-w2": (1, 2, None),
    "a3-w1": (3, 1, None),
    "a3-w2": (3, 2, None),
    "a1-w2-threads-off": (1, 2, 0),
}

_STAMP = r"(?P<t>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
SHARD_START = re.compile(_STAMP + r" INFO sinkscope\.jobs: shard (?P<shard>\d+): (?P<groups>\d+) groups, (?P<units>\d+) units "
                         r"\(pid (?P<pid>\d+), (?P<threads>\d+) torch threads(?:, OMP_NUM_THREADS=(?P<omp>\S+))?\)")
LOADED = re.compile(_STAMP + r" INFO sinkscope\.jobs: loaded .* in (?P<s>[\d.]+) s$")
GROUP_DONE = re.compile(_STAMP + r" INFO sinkscope\.jobs: group (?P<group>\d+) \(prompt \d+, seed \d+\) finished in (?P<s>[\d.]+) s")


def _map_layer(layer: int, layers: int) -> int:
    return min(layer * layers // REFERENCE_LAYERS, layers - 1)


def sweep_data(name: str, preset: str, dtype: str, device: str | None, size: int, steps: int, groups: int,
               arms_per_batch: int, prompts_per_shard: int, output_root: Path) -> dict:
    """The benchmark sweep: `groups` (prompt, seed) groups of baseline / sink / random."""
    layers = PRESET_GEOMETRY[preset].num_layers
    at = _map_layer(INTERVENTION_LAYER, layers)
    model = {"preset": preset, "dtype": dtype}
    if device:
        model["device"] = device
    return {
        "name": name,
        "description": "executor scaling benchmark (random weights: cost only, images are noise)",
        "model": model,
        "prompts": {"set": "geneval", "limit": groups},
        "seeds": {"base": 42, "count": 1},
        "generation": {"steps": steps, "guidance": 7.0, "height": size, "width": size, "arms_per_batch": arms_per_batch},
        "arms": [
            {"name": "baseline", "intervention": None},
            {"name": "sink", "intervention": {"preset": "fixed.m1", "layers": [at]}},
            {"name": "random", "intervention": {"preset": "fixed.random", "layers": [at]}},
        ],
        "recording": {"layers": sorted({_map_layer(layer, layers) for layer in RECORD_LAYERS}), "topk": 5},
        "sharding": {"prompts_per_shard": prompts_per_shard},
        "executor": {"kind": "local"},
        "output_root": str(output_root),
    }


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def worker_timings(run_root: Path) -> list[dict]:
    """Per worker (pid) of a finished run: torch threads, model build seconds, groups, first-group seconds and the
    steady-state images/hour (groups after the first, first to last finish), from logs/shard-*.log."""
    by_pid: dict[int, dict] = {}
    for path in sorted((run_root / "logs").glob("shard-*.log")):
        pid = None
        for line in path.read_text().splitlines():
            if m := SHARD_START.match(line):
                pid = int(m["pid"])
                by_pid.setdefault(pid, {"pid": pid, "threads": int(m["threads"]), "omp": m["omp"], "load_s": None, "groups": []})
            elif (m := LOADED.match(line)) and pid is not None:
                by_pid[pid]["load_s"] = float(m["s"])
            elif (m := GROUP_DONE.match(line)) and pid is not None:
                by_pid[pid]["groups"].append((_stamp(m["t"]), float(m["s"])))
    out = []
    for worker in by_pid.values():
        groups = sorted(worker.pop("groups"))
        worker["groups"] = len(groups)
        worker["first_group_s"] = groups[0][1] if groups else None
        worker["median_group_s"] = statistics.median(s for _, s in groups[1:]) if len(groups) > 1 else None
        span = groups[-1][0] - groups[0][0] if len(groups) > 1 else 0.0
        worker["steady_window"] = (groups[0][0], groups[-1][0]) if groups else None
        worker["steady_span_s"] = span
        worker["steady_images_per_hour"] = (len(groups) - 1) * ARMS_PER_GROUP / span * 3600 if span > 0 else None
        out.append(worker)
    return out


def steady_overlap(per_worker: list[dict]) -> float | None:
    """Share of the workers' steady-state windows (first to last finished group) during which all of them were in
    it: near 1, the summed per-worker rates are a concurrent throughput; low, one worker ran alone for a while."""
    windows = [w["steady_window"] for w in per_worker if w["steady_window"] is not None]
    if len(windows) < 2:
        return None
    union = max(b for _, b in windows) - min(a for a, _ in windows)
    common = min(b for _, b in windows) - max(a for a, _ in windows)
    return max(common, 0.0) / union if union > 0 else None


def run_config(name: str, args, work: Path, gpus: list[str]) -> dict:
    """Write the sweep of configuration `name`, run `orchestrate submit` on it, and measure."""
    arms_per_batch, workers, threads = CONFIGS[name]
    return run_submit(name, arms_per_batch, workers, threads, args.groups_per_worker * workers, args, work, gpus)


def run_submit(name: str, arms_per_batch: int, workers: int, threads: int | None, groups: int, args, work: Path,
               gpus: list[str]) -> dict:
    root = work / name
    if root.exists():
        if not args.fresh:
            raise SystemExit(f"{root} exists: a run there would be re-opened and measure nothing; remove it or pass --fresh")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    sweep = root / "sweep.yaml"
    data = sweep_data(f"scaling-{name}", args.preset, args.dtype, args.device, args.size, args.steps, groups,
                      arms_per_batch, args.prompts_per_shard, root / "runs")
    sweep.write_text(yaml.safe_dump(data, sort_keys=False))
    command = [sys.executable, "-m", "orchestrate", "submit", str(sweep), "-e", "local", "-o", f"workers={workers}"]
    if threads is not None:
        command += ["-o", f"threads_per_worker={threads}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160",
           "CUDA_VISIBLE_DEVICES": ",".join(gpus[:workers]) if gpus else ""}
    print(f"[{name}] {' '.join(command[1:])}  (CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r})", flush=True)
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=args.timeout)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as error:  # its output may come back as bytes despite text=True
        parts = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (error.stdout, error.stderr)]
        code, output = "timeout", "".join(parts)
    wall = time.perf_counter() - started
    (root / "submit.log").write_text(output)
    result = {"config": name, "arms_per_batch": arms_per_batch, "workers": workers,
              "threads_per_worker_setting": threads, "groups": groups, "wall_s": wall, "exit": code}
    runs = [p for p in (root / "runs").glob("*") if p.is_dir()] if (root / "runs").is_dir() else []
    if code != 0 or len(runs) != 1:
        print(f"[{name}] FAILED (exit {code}); tail of its output:\n{output[-3000:]}", flush=True)
        result["failed"] = True
        return result
    run = runs[0]
    done = list((run / "state" / "done").glob("*.json"))
    images = sum(json.loads(p.read_text())["rows"]["units"] for p in done)
    finished = [json.loads(line) for line in (run / "state" / "submissions.jsonl").read_text().splitlines()]
    finished = [r for r in finished if r.get("event") == "finished"]
    per_worker = worker_timings(run)
    steady = [w["steady_images_per_hour"] for w in per_worker]
    result.update(
        run_dir=str(run), images=images, images_per_hour_wall=images / wall * 3600,
        steady_images_per_hour=sum(steady) if steady and all(s is not None for s in steady) else None,
        steady_overlap=steady_overlap(per_worker),
        per_worker=per_worker, threads_per_worker_used=finished[-1].get("threads_per_worker") if finished else None,
        gpus=finished[-1].get("gpus") if finished else None,
        devices=sorted({json.loads(p.read_text()).get("device") or "?" for p in done}),
    )
    print(f"[{name}] {wall:.1f} s wall, {images} images; workers: "
          + "; ".join(f"pid {w['pid']} {w['threads']} threads, load {w['load_s']} s, {w['groups']} groups, "
                      f"first {w['first_group_s']:.2f} s, median {w['median_group_s'] or float('nan'):.2f} s"
                      for w in per_worker), flush=True)
    return result


def _ratio(a, b):
    return a / b if a and b else None


def ratios(results: dict[str, dict]) -> list[dict]:
    out = []
    pairs = [("a1-w2", "a1-w1"), ("a3-w2", "a3-w1"), ("a1-w2-threads-off", "a1-w1"), ("a1-w2", "a1-w2-threads-off")]
    for top, bottom in pairs:
        if top in results and bottom in results:
            t, b = results[top], results[bottom]
            out.append({"ratio": f"{top} / {bottom}",
                        "wall": _ratio(t.get("images_per_hour_wall"), b.get("images_per_hour_wall")),
                        "steady": _ratio(t.get("steady_images_per_hour"), b.get("steady_images_per_hour"))})
    return out


def _fmt(x, spec):
    """x formatted by spec, or a dash as wide as the spec's width."""
    if isinstance(x, (int, float)):
        return format(x, spec)
    width = re.match(r"\d*", spec).group()
    return "—".rjust(int(width or 1))


def table(results: dict[str, dict], rows: list[dict]) -> str:
    lines = [f"{'config':20s} {'A':>2s} {'W':>2s} {'threads':>8s} {'wall s':>8s} {'images':>7s} {'img/h wall':>11s} "
             f"{'img/h steady':>13s} {'overlap':>7s} {'load s':>7s} {'1st grp s':>9s} {'s/group':>8s}"]
    for name, r in results.items():
        workers = r.get("per_worker") or []
        threads = ",".join(str(w["threads"]) for w in workers) or "—"
        load = max((w["load_s"] for w in workers if w["load_s"] is not None), default=None)
        first = max((w["first_group_s"] for w in workers if w["first_group_s"] is not None), default=None)
        med = [w["median_group_s"] for w in workers if w["median_group_s"] is not None]
        lines.append(
            f"{name:20s} {r['arms_per_batch']:>2d} {r['workers']:>2d} {threads:>8s} {_fmt(r['wall_s'], '8.1f')} "
            f"{_fmt(r.get('images'), '7d')} {_fmt(r.get('images_per_hour_wall'), '11.0f')} "
            f"{_fmt(r.get('steady_images_per_hour'), '13.0f')} {_fmt(r.get('steady_overlap'), '7.2f')} "
            f"{_fmt(load, '7.1f')} {_fmt(first, '9.2f')} "
            f"{_fmt(statistics.mean(med) if med else None, '8.2f')}" + ("  FAILED" if r.get("failed") else "")
        )
    lines.append("")
    lines.append(f"{'ratio':40s} {'wall':>7s} {'steady':>7s}")
    for row in rows:
        lines.append(f"{row['ratio']:40s} {_fmt(row['wall'], '7.3f')} {_fmt(row['steady'], '7.3f')}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="where the JSON and table go")
    ap.add_argument("--work", type=Path, help="where the sweeps and run directories go (default: OUT/work)")
    ap.add_argument("--preset", default="sd3-medium-random", choices=sorted(PRESET_GEOMETRY))
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--device", default=None, help="model.device of the sweeps (cpu for the CPU check; default: cuda if any)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--groups-per-worker", type=int, default=12, help="groups of 3 images each worker runs")
    ap.add_argument("--prompts-per-shard", type=int, default=3, help="groups per shard")
    ap.add_argument("--gpus", default="0,1", help="GPU ids; workers=1 uses the first (empty: no GPU, e.g. --device cpu)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {', '.join(CONFIGS)}")
    ap.add_argument("--no-warmup", action="store_true", help="skip the one-group runs that fill the compile caches")
    ap.add_argument("--timeout", type=float, default=420, help="seconds one submit may take")
    ap.add_argument("--fresh", action="store_true", help="delete this benchmark's earlier run folders under --work")
    args = ap.parse_args()
    if args.device == "cpu" and args.dtype == "bf16" and args.preset.startswith("tiny"):
        args.dtype = "fp32"  # the tiny presets' CPU path, as the tests run them
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; known: {', '.join(CONFIGS)}")
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.device != "cpu" else []
    if args.device != "cpu" and any(CONFIGS[c][1] > len(gpus) for c in configs):
        raise SystemExit(f"--gpus {args.gpus!r}: the 2-worker configurations need two GPU ids")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host_cpus": len(os.sched_getaffinity(0)),
            "preset": args.preset, "dtype": args.dtype, "size": args.size, "steps": args.steps,
            "groups_per_worker": args.groups_per_worker, "prompts_per_shard": args.prompts_per_shard, "gpus": gpus}
    if shutil.which("nvidia-smi") and gpus:
        query = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True)
        info["nvidia_smi"] = query.stdout.strip().splitlines()
    print(json.dumps(info), flush=True)
    header = (f"local executor scaling: {args.preset} {args.dtype}, {args.size}², {args.steps} steps, "
              f"{args.groups_per_worker} groups of {ARMS_PER_GROUP} per worker, {args.prompts_per_shard} groups per shard")
    warmups, results = {}, {}

    def write() -> str:  # after every run, so a run cut short by a time limit still leaves what it measured
        rows = ratios(results)
        text = table(results, rows)
        (args.out / "scaling.txt").write_text(f"{json.dumps(info)}\n{header}\n{text}\n")
        (args.out / "scaling.json").write_text(json.dumps({"info": info, "warmups": warmups, "runs": results, "ratios": rows},
                                                          indent=1, default=str))
        return text

    if not args.no_warmup:
        for a in sorted({CONFIGS[c][0] for c in configs}):
            warmups[f"warmup-a{a}"] = run_submit(f"warmup-a{a}", a, 1, None, 1, args, work, gpus)
    for name in configs:
        results[name] = run_config(name, args, work, gpus)
        text = write()
    print(f"\n{header}\n{text}", flush=True)
    if any(r.get("failed") for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
