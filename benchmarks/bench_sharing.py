"""What sharing and the speed options buy on the real worker (sd3-medium-random, 1024², bf16, CFG, 20 steps).

    python benchmarks/bench_sharing.py [--json out.json] [--small --device cpu] [--sections prefix,slice,options,compile]

Sections (each prints its table as soon as it is done, so a time limit keeps what was measured):
  prefix   one Table-13-like group (baseline, full, mid 0.4–0.6, late 0.8–1.0; record 6/12/18), generate_group with
           prefix sharing on and off: seconds, and whether every image and sink row is bit-identical.
  slice    a slice of the catalogue through `jobs.run_shard` (the executor's function): three sweeps that share their
           baselines (Table-2-like A1 and A2, Table-13-fixed-like), run with sharing off (no cache, no prefix) and on
           (one baseline cache, prefix on): measured GPU seconds and images/hour, the plan's prediction for the same
           slice, and whether every image of the two modes is bit-identical.
  units    a slice shaped like the catalogue's overlapping sweeps (Table-19-like, Table-6/7-like, Table-2-fixed-like,
           Table-2-A1-like) through `jobs.run_shard`, three ways: no cache; the cache for baselines only; the cache for
           baselines and intervened units. Measured GPU seconds and images/hour, the plan's prediction for each, every
           image bit-identical across the three, and the seconds a group costs beyond its units' pipeline calls.
  batching a 4-arm Table-2-fixed-like group (baseline + three arms at 12, record 6/12/18) at arms_per_batch 1, 2, 3:
           seconds per group and images/hour.
  records  host side only: `records_to_table` over one paper-configuration image's records (20 steps × layers
           6/12/18 × CFG branches × 24 heads = 2,880 rows; removal at 12), synthetic values (image keys): seconds per image.
  options  one transformer step (stock processors, CFG batch 2): eager; replayed from a CUDA graph (and whether it
           equals eager bit for bit); VAE decode alone; decode on a second stream while the transformer steps run.
  steps    bench_worker's step table (stock, paper configuration exact and strided, all 24 layers): the step ratios.
  compile  generation.compile = inductor for a 3-arm group (baseline, fixed.m1@12, fixed.random@12): compile
           seconds, s/group and images/hour against eager, and the largest pixel difference from eager.
Numbers only; no assertions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_worker import build_loaded, step_inputs, step_table, sync  # noqa: E402

PROMPTS = ["a red bicycle leaning on a white wall", "a bowl of oranges on a wooden table", "two dogs running on a beach",
           "a lighthouse at dusk", "a blue car parked in the snow", "a cup of coffee next to a laptop"]
M3 = {"preset": "paper.m3_both"}


def _window(start, end):
    return {**M3, "step_window": {"start": start, "end": end}}


def _equal_results(a, b) -> bool:
    return all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) and x.sink_rows.equals(y.sink_rows) for x, y in zip(a, b))


def prefix_section(loaded, res, steps):
    from manifests import ArmSpec, GenerationSpec, RecordingSpec
    from workers import generate_group

    arms = [ArmSpec(name="baseline"), ArmSpec.model_validate({"name": "full", "intervention": M3}),
            ArmSpec.model_validate({"name": "mid", "intervention": _window(0.4, 0.6)}),
            ArmSpec.model_validate({"name": "late", "intervention": _window(0.8, 1.0)})]
    rec = RecordingSpec(layers=[6, 12, 18])
    out = {}
    for sharing in (True, False, True):  # the first is a warm-up
        gen = GenerationSpec(steps=steps, guidance=7.0, height=res, width=res, prefix_sharing=sharing)
        sync(loaded.device)
        t0 = time.perf_counter()
        results = generate_group(loaded, PROMPTS[0], 7, arms, gen, rec)
        sync(loaded.device)
        out[sharing] = (time.perf_counter() - t0, results)
    row = dict(seconds_prefix=out[True][0], seconds_full=out[False][0], start_steps=[r.start_step for r in out[True][1]],
               bit_identical=_equal_results(out[True][1], out[False][1]))
    print(f"\n(prefix) 4 arms, {steps} steps: prefix on {row['seconds_prefix']:.2f} s, off {row['seconds_full']:.2f} s "
          f"(×{row['seconds_full'] / row['seconds_prefix']:.2f}); start steps {row['start_steps']}; "
          f"images and sink rows bit-identical: {row['bit_identical']}", flush=True)
    return row


def _slice_sweeps(folder: Path, res: int, steps: int, prompts: int, preset: str, dtype: str, layers: list[int]) -> list[Path]:
    """Three sweeps sharing their baselines; `layers`: recorded layers, the last one is where one-layer arms act."""
    one, last = [layers[len(layers) // 2]], layers
    base = {"model": {"preset": preset, "dtype": dtype}, "prompts": {"set": "geneval", "limit": prompts},
            "generation": {"steps": steps, "guidance": 7.0, "height": res, "width": res}, "recording": {"layers": layers}}

    def window(start, end):
        return {**_window(start, end), "layers": one}

    arms = {
        "slice-a1": [{"name": "sink", "intervention": {"preset": "fixed.m1", "layers": one}}],
        "slice-a2": [{"name": "sink3", "intervention": {"preset": "fixed.m1", "layers": last}}],
        "slice-t13": [{"name": "early", "intervention": window(0.0, 0.2)}, {"name": "mid", "intervention": window(0.4, 0.6)},
                      {"name": "late", "intervention": window(0.8, 1.0)}],
    }
    paths = []
    for name, extra in arms.items():
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**base, "name": name, "arms": [{"name": "baseline", "intervention": None}, *extra]}))
        paths.append(path)
    return paths


def _run_sweep(loaded, sweep_path: Path, runs: Path, mode: str, pixels: dict):
    """Create the run of one sweep file and run all its shards through `run_shard` with the pipeline already loaded
    here; keeps every image's pixels under (sweep, image path)[mode]. Returns (run, manifest, GPU seconds)."""
    import importlib

    import PIL.Image

    from jobs.run_shard import run_shard
    from orchestrate.create import create_run

    run_shard_module = importlib.import_module("jobs.run_shard")  # the module (jobs/__init__ exports the function)
    run, manifest, _ = create_run(sweep_path, str(runs))
    run_shard_module._PIPELINES.clear()  # run_shard's per-process pipeline: the one already loaded here
    run_shard_module._PIPELINES[manifest.sweep.model.model_dump_json()] = loaded
    sync(loaded.device)
    t0 = time.perf_counter()
    for shard in manifest.shard_ids:
        run_shard(run.root, shard)
    sync(loaded.device)
    seconds = time.perf_counter() - t0
    for png in sorted(run.images_dir.rglob("*.png")):
        key = (manifest.sweep.name, png.relative_to(run.images_dir).as_posix())
        pixels.setdefault(key, {})[mode] = np.asarray(PIL.Image.open(png))
    return run, manifest, seconds


def slice_section(loaded, res, steps, prompts, preset, dtype, layers):
    import os

    from orchestrate.create import build_manifest
    from orchestrate.estimate import plan_costs

    work = Path(tempfile.mkdtemp(prefix="bench-sharing-"))
    rows, pixels = [], {}
    for mode in ("off", "on"):
        folder = work / mode
        folder.mkdir()
        paths = _slice_sweeps(folder, res, steps, prompts, preset, dtype, layers)
        if mode == "off":
            os.environ["SINKSCOPE_BASELINE_CACHE"] = "off"
            for p in paths:
                raw = yaml.safe_load(p.read_text())
                raw["generation"]["prefix_sharing"] = False
                p.write_text(yaml.safe_dump(raw))
        else:
            os.environ["SINKSCOPE_BASELINE_CACHE"] = str(work / "cache")
        seconds, units = 0.0, 0
        for p in paths:
            run, manifest, took = _run_sweep(loaded, p, folder / "runs", mode, pixels)
            seconds += took
            units += manifest.num_units
        predicted = plan_costs([build_manifest(p)[0] for p in paths])
        rows.append(dict(mode=mode, images=units, seconds=seconds, images_per_hour=units / seconds * 3600,
                         predicted_seconds=sum(c.seconds_without if mode == "off" else c.seconds_with for c in predicted),
                         predicted_images_generated=units if mode == "off" else sum(c.images_generated for c in predicted)))
    os.environ.pop("SINKSCOPE_BASELINE_CACHE", None)
    same = all(np.array_equal(v["off"], v["on"]) for v in pixels.values() if len(v) == 2)
    shutil.rmtree(work, ignore_errors=True)
    off, on = rows
    print(f"\n(slice) 3 sweeps × {prompts} prompts, {steps} steps, {res}², through run_shard (one loaded pipeline)")
    print(f"{'sharing':8s} {'images':>7s} {'GPU s':>8s} {'img/h':>8s} {'plan s':>8s}")
    for r in rows:
        print(f"{r['mode']:8s} {r['images']:7d} {r['seconds']:8.1f} {r['images_per_hour']:8.0f} {r['predicted_seconds']:8.1f}")
    print(f"measured with/without: {on['seconds'] / off['seconds']:.3f}; plan with/without: "
          f"{on['predicted_seconds'] / off['predicted_seconds']:.3f}; every image bit-identical between modes: {same}", flush=True)
    return dict(rows=rows, bit_identical=same, measured_ratio=on["seconds"] / off["seconds"],
                predicted_ratio=on["predicted_seconds"] / off["predicted_seconds"])


def _unit_sweeps(folder: Path, res: int, steps: int, prompts: int, preset: str, dtype: str, layers: list[int]) -> list[Path]:
    """Four sweeps whose units overlap as the catalogue's do: the 6/7-like sweep's arms are all in the 19-like one
    (same recording and seeds), the two Table-2-like sweeps share their baselines (another seed base)."""
    one = [layers[len(layers) // 2]]
    base = {"model": {"preset": preset, "dtype": dtype}, "prompts": {"set": "geneval", "limit": prompts},
            "generation": {"steps": steps, "guidance": 7.0, "height": res, "width": res}}
    m2 = {"preset": "paper.m2", "layers": one}
    m2_random = {"preset": "paper.m2_random", "layers": one}
    specs = {
        "units-t19": (1000, one, [("top_k1", m2), ("random_k1", m2_random), ("top_k5", {**m2, "k": 5})]),
        "units-t67": (1000, one, [("top_sink", m2), ("random", m2_random)]),
        "units-t2f": (42, layers, [("sink", {"preset": "fixed.m1", "layers": one}), ("random", {"preset": "fixed.random", "layers": one}),
                                   ("modality_random", {"preset": "fixed.modality_random", "layers": one})]),
        "units-t2a1": (42, layers, [("sink_a1", {"preset": "paper.m1a", "layers": one})]),
    }
    paths = []
    for name, (seed_base, recorded, arms) in specs.items():
        path = folder / f"{name}.yaml"
        data = {**base, "name": name, "seeds": {"base": seed_base, "count": 1}, "recording": {"layers": recorded},
                "arms": [{"name": "baseline", "intervention": None}, *({"name": n, "intervention": iv} for n, iv in arms)]}
        path.write_text(yaml.safe_dump(data))
        paths.append(path)
    return paths


def units_section(loaded, res, steps, prompts, preset, dtype, layers):
    import pyarrow.dataset as pads

    from orchestrate.create import build_manifest
    from orchestrate.estimate import plan_costs

    work = Path(tempfile.mkdtemp(prefix="bench-units-"))
    rows, pixels = [], {}
    for mode in ("off", "baselines", "units"):
        folder = work / mode
        folder.mkdir()
        paths = _unit_sweeps(folder, res, steps, prompts, preset, dtype, layers)
        for p in paths:
            raw = yaml.safe_load(p.read_text())
            raw["cache"] = {"baselines": "off" if mode == "off" else str(work / f"cache-{mode}"), "units": mode == "units"}
            p.write_text(yaml.safe_dump(raw))
        seconds, units, groups, call_seconds, per_sweep = 0.0, 0, 0, 0.0, {}
        for p in paths:
            run, manifest, took = _run_sweep(loaded, p, folder / "runs", mode, pixels)
            seconds += took
            units += manifest.num_units
            groups += len(manifest.prompts)
            table = pads.dataset(run.tables_dir / "units", format="parquet").to_table()
            made = [(arm, t) for arm, t in zip(table.column("arm").to_pylist(), table.column("seconds").to_pylist()) if t > 0]
            call_seconds += sum(t for _, t in made)
            # per sweep: s per generated baseline and per generated intervened unit (pipeline call incl. decode)
            per_sweep[manifest.sweep.name] = {
                kind: statistics.mean(ts) if ts else None
                for kind, ts in (("baseline", [t for a, t in made if a == "baseline"]), ("arm", [t for a, t in made if a != "baseline"]))
            }
        plan = plan_costs([build_manifest(p)[0] for p in paths])
        predicted = sum(c.seconds_without if mode == "off" else c.seconds_with for c in plan)
        generated = units if mode == "off" else sum(c.images_generated for c in plan)
        rows.append(dict(mode=mode, images=units, seconds=seconds, images_per_hour=units / seconds * 3600, groups=groups,
                         pipeline_call_seconds=call_seconds, outside_calls_per_group=(seconds - call_seconds) / groups,
                         predicted_seconds=predicted, predicted_images_generated=generated, per_sweep=per_sweep))
    same = all(len(set(v)) == 3 and all(np.array_equal(v["off"], x) for x in v.values()) for v in pixels.values())
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n(units) 4 sweeps × {prompts} prompts, {steps} steps, {res}², through run_shard (one loaded pipeline)")
    print(f"{'cache':10s} {'images':>7s} {'GPU s':>8s} {'img/h':>8s} {'in calls s':>10s} {'other s/group':>13s} {'plan s':>8s} {'plan gen':>8s}")
    for r in rows:
        print(f"{r['mode']:10s} {r['images']:7d} {r['seconds']:8.1f} {r['images_per_hour']:8.0f} {r['pipeline_call_seconds']:10.1f} "
              f"{r['outside_calls_per_group']:13.3f} {r['predicted_seconds']:8.1f} {r['predicted_images_generated']:8d}")
    for name, kinds in rows[0]["per_sweep"].items():
        print(f"  {name}: s per generated " + ", ".join(f"{k} {v:.3f}" for k, v in kinds.items() if v is not None))
    print(f"every image bit-identical across the three: {same}", flush=True)
    return dict(rows=rows, bit_identical=same)


def batching_section(loaded, res, steps, groups):
    from manifests import ArmSpec, GenerationSpec, RecordingSpec
    from workers import generate_group

    arms = [ArmSpec(name="baseline"), ArmSpec(name="sink", intervention="fixed.m1"),
            ArmSpec(name="random", intervention="fixed.random"), ArmSpec(name="modality", intervention="fixed.modality_random")]
    rec = RecordingSpec(layers=[6, 12, 18])
    rows = []
    generate_group(loaded, PROMPTS[0], 5, arms, GenerationSpec(steps=steps, guidance=7.0, height=res, width=res), rec)  # warm-up
    for a in (1, 2, 3):
        gen = GenerationSpec(steps=steps, guidance=7.0, height=res, width=res, arms_per_batch=a)
        if a > 1:  # a new batch shape: its first call picks GEMM plans
            generate_group(loaded, PROMPTS[0], 5, arms, gen, rec)
        sync(loaded.device)
        t0 = time.perf_counter()
        for i in range(groups):
            generate_group(loaded, PROMPTS[1 + i % 5], 20 + i, arms, gen, rec)
        sync(loaded.device)
        sec = (time.perf_counter() - t0) / groups
        rows.append(dict(arms_per_batch=a, s_per_group=sec, images_per_hour=len(arms) / sec * 3600))
    print(f"\n(batching) baseline + 3 arms at 12, {steps} steps, {res}², record 6/12/18, {groups} groups each")
    for r in rows:
        print(f"  arms_per_batch {r['arms_per_batch']}: {r['s_per_group']:.2f} s/group = {r['images_per_hour']:.0f} img/h", flush=True)
    return rows


def records_section(repeats: int = 5):
    """Seconds `records_to_table` takes for one paper-configuration image (the host time outside the pipeline call)."""
    from workers.recorder import records_to_table
    from workers.session import CallRecord

    heads, generator = 24, torch.Generator("cpu").manual_seed(0)
    records = []
    for step in range(20):
        for layer in (6, 12, 18):
            for branch in ("uncond", "cond"):
                acts = layer == 12
                records.append(CallRecord(
                    arm="sink", branch=branch, element=0, step=step, timestep=1000.0 - 50 * step, sigma=1.0 - step / 20,
                    layer=layer, layer_name=f"transformer_blocks.{layer}.attn", heads=heads, num_image=4096, num_clip=77,
                    t5_valid=None, topk_idx=torch.randint(0, 4096, (heads, 5), generator=generator),
                    topk_mass=torch.rand(heads, 5, generator=generator), max_mass=torch.rand(heads, generator=generator),
                    entropy=torch.rand(heads, generator=generator), top5=torch.rand(heads, generator=generator),
                    selected=torch.randint(0, 4096, (heads, 1), generator=generator) if acts else None,
                    removed_mass_after=torch.rand(heads, generator=generator) if acts else None, image_size=(1024, 1024)))
    records_to_table(records)  # warm-up (imports, region tables)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rows = records_to_table(records).num_rows
        times.append(time.perf_counter() - t0)
    row = dict(rows=rows, seconds_per_image=statistics.median(times))
    print(f"\n(records) records_to_table, one paper-configuration image ({rows} rows): {row['seconds_per_image'] * 1e3:.1f} ms "
          f"(median of {repeats}, host CPU tensors)", flush=True)
    return row


def _time(fn, iters, device):
    times = []
    for _ in range(iters):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def options_section(loaded, res, iters):
    device = "cuda" if str(loaded.device).startswith("cuda") else "cpu"
    tr, vae = loaded.pipe.transformer, loaded.pipe.vae
    ours = dict(tr.attn_processors)
    tr.set_attn_processor(dict(loaded.stock_processors))
    inputs = step_inputs(loaded, res, device, loaded.dtype)
    latents = torch.randn(1, 16, res // 8, res // 8, generator=torch.Generator("cpu").manual_seed(3)).to(device, loaded.dtype)
    row = {}
    with torch.inference_mode():
        for _ in range(2):
            eager = tr(**inputs).sample.clone()
        row["eager_ms"] = _time(lambda: tr(**inputs), iters, device)
        row["decode_ms"] = _time(lambda: vae.decode(latents).sample, max(3, iters // 2), device)
        if device == "cuda":
            static = {k: v.clone() for k, v in inputs.items()}
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    tr(**static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                graph_out = tr(**static).sample
            graph.replay()
            torch.cuda.synchronize()
            row["cuda_graph_ms"] = _time(graph.replay, iters, device)
            row["cuda_graph_bit_identical"] = bool(torch.equal(graph_out, eager))
            del graph
            side = torch.cuda.Stream()

            def overlapped():
                with torch.cuda.stream(side):
                    vae.decode(latents)
                for _ in range(5):
                    tr(**inputs)
                torch.cuda.current_stream().wait_stream(side)

            def sequential():
                vae.decode(latents)
                for _ in range(5):
                    tr(**inputs)

            row["five_steps_plus_decode_sequential_ms"] = _time(sequential, max(3, iters // 2), device)
            row["five_steps_plus_decode_overlapped_ms"] = _time(overlapped, max(3, iters // 2), device)
    tr.set_attn_processor(ours)
    print(f"\n(options) one stock transformer step, {res}², CFG batch 2: eager {row['eager_ms']:.2f} ms", flush=True)
    if "cuda_graph_ms" in row:
        print(f"  CUDA graph replay {row['cuda_graph_ms']:.2f} ms (×{row['cuda_graph_ms'] / row['eager_ms']:.3f}), "
              f"bit-identical to eager: {row['cuda_graph_bit_identical']}")
        print(f"  VAE decode (1 image) {row['decode_ms']:.2f} ms; 5 steps + decode: sequential "
              f"{row['five_steps_plus_decode_sequential_ms']:.2f} ms, decode on a second stream "
              f"{row['five_steps_plus_decode_overlapped_ms']:.2f} ms", flush=True)
    return row


def compile_section(loaded, res, steps, groups):
    from manifests import ArmSpec, GenerationSpec, RecordingSpec
    from workers import generate_group

    arms = [ArmSpec(name="baseline"), ArmSpec(name="sink", intervention="fixed.m1"), ArmSpec(name="random", intervention="fixed.random")]
    rec = RecordingSpec(layers=[6, 12, 18])
    rows, images = [], {}
    for mode in ("none", "inductor"):
        gen = GenerationSpec(steps=steps, guidance=7.0, height=res, width=res, compile=mode)
        t0 = time.perf_counter()
        try:
            first_results = generate_group(loaded, PROMPTS[1], 11, arms, gen, rec)
        except Exception as error:  # noqa: BLE001 — a compile failure is a result to report, not a crash
            print(f"  compile={mode}: failed: {type(error).__name__}: {str(error)[:400]}", flush=True)
            return dict(rows=rows, error=f"{type(error).__name__}: {error}"[:2000])
        images[mode] = [np.asarray(r.image).astype(np.int16) for r in first_results]
        sync(loaded.device)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(groups):
            generate_group(loaded, PROMPTS[2 + i % 3], 12 + i, arms, gen, rec)
        sync(loaded.device)
        sec = (time.perf_counter() - t0) / groups
        rows.append(dict(compile=mode, first_group_s=first, s_per_group=sec, images_per_hour=3 / sec * 3600))
    diff = max(int(np.abs(a - b).max()) for a, b in zip(images["none"], images["inductor"]))
    print(f"\n(compile) 3-arm group, {steps} steps, {res}², record 6/12/18; max |Δpixel| inductor vs eager: {diff}")
    for r in rows:
        print(f"  compile={r['compile']:10s} first group {r['first_group_s']:7.1f} s, then {r['s_per_group']:.2f} s/group = "
              f"{r['images_per_hour']:.0f} img/h", flush=True)
    return dict(rows=rows, max_pixel_diff=diff)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=3, help="prompts per sweep of the slice")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--sections", default="prefix,slice,units,batching,options,steps,compile")
    args = ap.parse_args()
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    res = 128 if args.small else 1024
    import diffusers

    info = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                diffusers=diffusers.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(info, flush=True)
    t0 = time.perf_counter()
    loaded = build_loaded(device, dtype, args.small)
    print(f"built in {time.perf_counter() - t0:.1f}s", flush=True)
    result = dict(info=info)
    sections = args.sections.split(",")
    if args.small:  # the slice needs a preset run_shard can load: the tiny SD3 stands in on a CPU
        from manifests import ModelSpec
        from workers import load_pipeline

        slice_loaded = load_pipeline(ModelSpec(preset="tiny-sd3"), device=device)
        preset, dname, slice_res, slice_layers = "tiny-sd3", "fp32", 64, [0, 1]
    else:
        slice_loaded, preset, dname, slice_res, slice_layers = loaded, "sd3-medium-random", "bf16", res, [6, 12, 18]

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str))

    if "prefix" in sections:
        result["prefix"] = prefix_section(loaded, res, args.steps)
        save()
    if "slice" in sections:
        result["slice"] = slice_section(slice_loaded, slice_res, args.steps, args.prompts, preset, dname, slice_layers)
        save()
    if "units" in sections:
        result["units"] = units_section(slice_loaded, slice_res, args.steps, args.prompts, preset, dname, slice_layers)
        save()
    if "batching" in sections:
        result["batching"] = batching_section(loaded, res, args.steps, args.groups)
        save()
    if "records" in sections:
        result["records"] = records_section()
        save()
    if "options" in sections:
        result["options"] = options_section(loaded, res, args.iters)
        save()
    if "steps" in sections:
        rows = step_table(loaded, device, dtype, args.iters, res)
        print(f"\n(steps) transformer step, {res}², CFG batch 2, median of {args.iters}")
        for r in rows:
            print(f"  {r['variant']:66s} {r['ms']:8.2f} ms ×{r['x_stock']:.3f}", flush=True)
        result["steps"] = rows
        save()
    if "compile" in sections:
        result["compile"] = compile_section(loaded, res, args.steps, args.groups)
        save()


if __name__ == "__main__":
    main()
