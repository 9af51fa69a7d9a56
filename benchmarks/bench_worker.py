"""Cost of the project's REAL SD3 sink processors (workers/processors/sd3.py) and of a Table-2-like group.

    python benchmarks/bench_worker.py [--json out.json] [--small --device cpu]

Loads the `sd3-medium-random` preset through `workers.load_pipeline` (workers/scale_presets.py: SD3-medium's
transformer, a full-size 16-channel AutoencoderKL, tiny CLIP text encoders whose projections give the real
2048-d pooled vector, no T5: 77 CLIP + 256 zero T5 tokens = 333 text tokens, as the real model sees; random
weights built on the device in its dtype), with the sink processors installed by load_pipeline itself.
--small builds a narrow 24-layer variant through the same builder (workers.scale_presets.build_sd3_random and
workers.loading.prepare_pipeline), for a CPU check of the script. Prints:

(a) one transformer forward (1024², bf16, CFG batch 2), median of CUDA-event timings, and peak memory:
    stock diffusers processors; sinkscope processors, nothing active; paper config (record 6/12/18 with
    mass+entropy+top5, fixed.m1 at 12); the same without top5; all 24 layers, all stats; all 24 layers,
    mass+entropy only; plus the paper config with the stock-lse reuse switched off (SINKSCOPE_STOCK_LSE=0).
(b) group throughput (images per GPU-hour): arms baseline + sink (fixed.m1 @12) + random (fixed.random @12),
    20 steps, 1024², recording 6/12/18: `workers.generate_group` with arms_per_batch 1 and 3, against a
    paper-style per-prompt loop (a processor defined here: fp32 logits and softmax of the joint sequence
    materialised at 6/12/18, top-1 / random key masked with -1e4 at 12, statistics copied to the host after
    each call, one pipeline call per arm with its own text encoding).
Numbers only; no assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sd3_step import paper_style_attention  # noqa: E402
from workers.scale_presets import SD3_MEDIUM_TRANSFORMER, ScaleSD3Config  # noqa: E402

# --small: 24 blocks (recording 6/12/18 and removal at 12 stay valid) of 2 heads × 8, a narrow VAE, 128²
SMALL = ScaleSD3Config(
    transformer=dict(SD3_MEDIUM_TRANSFORMER, sample_size=16, attention_head_dim=8, num_attention_heads=2,
                     joint_attention_dim=64, caption_projection_dim=16, pos_embed_max_size=16),
    vae_block_out_channels=(8, 8, 16, 16), vae_norm_num_groups=4,
)


def build_loaded(device: str, dtype: torch.dtype, small: bool):
    """sd3-medium-random through load_pipeline (or the --small variant wrapped the same way)."""
    from manifests import ModelSpec
    from workers import load_pipeline
    from workers.loading import DTYPES, prepare_pipeline
    from workers.scale_presets import build_sd3_random

    if small:
        pipe = build_sd3_random(SMALL, device, dtype)
        return prepare_pipeline(pipe, "sd3", random_weights=True, device=device, dtype=dtype,
                                label="sd3-medium-random-small (bench)", kind="random weights")
    name = {v: k for k, v in DTYPES.items()}[dtype]
    return load_pipeline(ModelSpec(preset="sd3-medium-random", dtype=name), device=device)


class PaperLoopProcessor:
    """Paper-style (`bench_sd3_step.paper_style_attention`): stats of the image rows; mask the top-1 key ("top")
    or a random key ("random") per head at this layer, or none ("none")."""

    def __init__(self, log: list, layer: int, mode: str, seed: int):
        self.log, self.layer, self.mode, self.gen = log, layer, mode, torch.Generator("cpu").manual_seed(seed)

    def _pick(self, mass, num_keys):
        if self.mode == "top":
            return mass.topk(1, dim=-1).indices
        return torch.randint(0, num_keys, mass.shape[:2] + (1,), generator=self.gen).to(mass.device)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        pick = None if self.mode == "none" else self._pick
        out, (mass, ent, top5) = paper_style_attention(attn, hidden_states, encoder_hidden_states, pick)
        self.log.append((self.layer, mass, ent, top5))
        return out


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_reset(device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def step_inputs(loaded, res, device, dtype):
    """One CFG batch (2) of transformer inputs at `res`² with 333 text tokens, as the pipeline feeds them."""
    pipe, cfg = loaded.pipe, loaded.pipe.transformer.config
    pipe.scheduler.set_timesteps(20)
    side = res // 8
    g = torch.Generator("cpu").manual_seed(1)
    return dict(
        hidden_states=torch.randn(2, 16, side, side, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(2, 333, cfg.joint_attention_dim, generator=g).to(device, dtype),
        pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g).to(device, dtype),
        timestep=pipe.scheduler.timesteps[:1].expand(2).to(device),
    )


def _text_keys():
    """SD3-medium-random's 333 text keys as a run sees them: 77 CLIP slots (BOS, 8 words, EOS, padding), 256 zero T5 slots."""
    from manifests.keys import TextKey

    clip = [TextKey("clip", 0, "<|startoftext|>", "special")] + [TextKey("clip", i, f"w{i}</w>", "content") for i in range(1, 9)]
    clip += [TextKey("clip", 9, "<|endoftext|>", "special")] + [TextKey("clip", i, "<|endoftext|>", "padding") for i in range(10, 77)]
    return tuple(clip + [TextKey("t5", i, None, "padding") for i in range(256)])


def ctx(iv=None, layers=(6, 12, 18), stats=("mass", "entropy", "top5"), stride=1, mass_queries="image", res=1024):
    """A factory of fresh RunContexts: one arm (uncond + cond) with intervention `iv`, recording `layers`."""
    from manifests import RecordingSpec
    from workers.session import ElementPlan, RunContext

    text = _text_keys()

    def make():
        rec = (RecordingSpec(layers=list(layers), stats=list(stats), top5_query_stride=stride, mass_queries=mass_queries)
               if layers else None)
        plans = [ElementPlan("a", "uncond", iv, 1, text_keys=text), ElementPlan("a", "cond", iv, 1, text_keys=text)]
        return RunContext(plans, rec, image_size=(res, res))
    return make


def memory_by_resolution(loaded, device, dtype, resolutions):
    """Peak memory of one transformer step per resolution: stock, paper config, all 24 layers with all stats."""
    from manifests.interventions import PRESETS

    tr, session = loaded.pipe.transformer, loaded.session
    ours = dict(tr.attn_processors)
    n = tr.config.num_layers
    variants = [("stock", None), ("paper config", ctx(PRESETS["fixed.m1"])), ("all 24, all stats", ctx(layers=range(n)))]
    rows = []
    for res in resolutions:
        inputs = step_inputs(loaded, res, device, dtype)
        for name, factory in variants:
            tr.set_attn_processor(dict(loaded.stock_processors) if factory is None else dict(ours))
            with torch.inference_mode():
                for it in range(3):
                    if it == 1:
                        peak_reset(device)
                        base = torch.cuda.memory_allocated() if device == "cuda" else 0
                    session.context = factory() if factory is not None else None
                    tr(**inputs)
                    sync(device)
                    session.context = None
            gib = peak(device)
            rows.append(dict(res=res, tokens=(res // 16) ** 2 + 333, variant=name, peak_gib=gib,
                             step_extra_gib=gib - base / 2**30 if device == "cuda" else float("nan")))
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()
    tr.set_attn_processor(ours)
    for r in rows:
        stock = next(x for x in rows if x["res"] == r["res"] and x["variant"] == "stock")
        r["extra_mib_vs_stock"] = (r["peak_gib"] - stock["peak_gib"]) * 1024
    return rows


def atlas_variants(n: int, res: int) -> list:
    """The atlas measures' cost: stat `ratio` on the paper config, and the atlas recording (every layer, mass + ratio)."""
    from manifests.interventions import PRESETS

    m1, paper = PRESETS["fixed.m1"], ("mass", "entropy", "top5")
    return [
        ("stock diffusers processors", None, None),
        ("paper config: record 6/12/18 (mass,entropy,top5) + fixed.m1@12", ctx(m1, res=res), None),
        ("paper config + ratio", ctx(m1, stats=paper + ("ratio",), res=res), None),
        ("all 24 layers, mass", ctx(layers=range(n), stats=("mass",), res=res), None),
        ("all 24 layers, mass+ratio", ctx(layers=range(n), stats=("mass", "ratio"), res=res), None),
        ("atlas config: all 24 layers, mass+ratio, all queries", ctx(layers=range(n), stats=("mass", "ratio"), mass_queries="all", res=res), None),
    ]


def step_table(loaded, device, dtype, iters, res, diag=False, atlas=False):
    from manifests.interventions import PRESETS
    from workers.recorder import records_to_table

    pipe, tr, session = loaded.pipe, loaded.pipe.transformer, loaded.session
    inputs = step_inputs(loaded, res, device, dtype)
    ours = dict(tr.attn_processors)
    n = tr.config.num_layers
    m1 = PRESETS["fixed.m1"]
    variants = atlas_variants(n, res) if atlas else [
        ("stock diffusers processors", None, None),
        ("sinkscope processors, nothing active", lambda: None, None),
        ("paper config: record 6/12/18 (mass,entropy,top5) + fixed.m1@12", ctx(m1), None),
        ("paper config without top5", ctx(m1, stats=("mass", "entropy")), None),
        ("paper config, top5 over every 4th image query", ctx(m1, stride=4), None),
        ("paper config, top5 over every 8th image query", ctx(m1, stride=8), None),
        ("all 24 layers, all stats", ctx(layers=range(n)), None),
        ("all 24 layers, all stats, top5 over every 8th query", ctx(layers=range(n), stride=8), None),
        ("all 24 layers, all stats, top5 over every 16th query", ctx(layers=range(n), stride=16), None),
        ("all 24 layers, mass+entropy", ctx(layers=range(n), stats=("mass", "entropy")), None),
        ("paper config, stock-lse reuse off (SINKSCOPE_STOCK_LSE=0)", ctx(m1), "0"),
        ("record 6/12/18 only (no intervention)", ctx(), None),
        ("fixed.m1@12 only (no recording)", ctx(m1, layers=()), None),
    ]
    rows, outs, tables, host = [], {}, {}, {}
    for name, factory, env in variants:
        tr.set_attn_processor(dict(loaded.stock_processors) if factory is None else dict(ours))
        if env is not None:
            os.environ["SINKSCOPE_STOCK_LSE"] = env
        times = []
        try:
            with torch.inference_mode():
                for it in range(iters + 2):
                    if it == 2:
                        peak_reset(device)
                    session.context = factory() if factory is not None else None
                    t0 = time.perf_counter()
                    if device == "cuda":
                        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        a.record()
                    out = tr(**inputs).sample
                    if device == "cuda":
                        b.record()
                    sync(device)
                    dt = a.elapsed_time(b) if device == "cuda" else (time.perf_counter() - t0) * 1e3
                    if session.context is not None:
                        h0 = time.perf_counter()
                        tables[name] = records_to_table(session.context.records)  # the host copy a run does at its end
                        host.setdefault(name, []).append((time.perf_counter() - h0) * 1e3)
                    session.context = None
                    if it >= 2:
                        times.append(dt)
        finally:
            session.context = None
            os.environ.pop("SINKSCOPE_STOCK_LSE", None)
        outs[name] = out.float().cpu()  # off the GPU: kept outputs must not count in the next variant's peak
        rows.append((name, statistics.median(times), peak(device)))
    tr.set_attn_processor(dict(ours))
    if diag and device == "cuda":
        import warnings

        with torch.inference_mode():
            session.context = ctx(m1)()
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tr(**inputs)
            torch.cuda.set_sync_debug_mode(0)
            session.context = None
            sites = sorted({f"{w.filename}:{w.lineno}" for w in caught})
            print(f"host syncs in one paper-config step: {len(caught)} at {sites}")
            from torch.profiler import ProfilerActivity, profile

            session.context = ctx(m1)()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                tr(**inputs)
                torch.cuda.synchronize()
            session.context = None
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    base_out = outs[rows[0][0]]
    table = []
    for name, ms, gib in rows:
        diff = (outs[name] - base_out).abs().max().item()
        table.append(dict(variant=name, ms=ms, x_stock=ms / rows[0][1], peak_gib=gib, extra_mib=(gib - rows[0][2]) * 1024, max_abs_diff=diff,
                          top5_rel_err=_top5_error(tables, name), host_table_ms=statistics.median(host[name]) if name in host else None))
    return table


def _top5_error(tables, name):
    """For a strided-top-5 variant: mean and max |top5 - exact top5| / exact top5 over its (layer, head, branch) rows."""
    if "every" not in name:
        return None
    exact = "paper config: record 6/12/18 (mass,entropy,top5) + fixed.m1@12" if name.startswith("paper") else "all 24 layers, all stats"
    a, b = tables[name].to_pandas(), tables[exact].to_pandas()
    rel = ((a["top5_conc"] - b["top5_conc"]).abs() / b["top5_conc"]).to_numpy()
    return dict(mean=float(rel.mean()), max=float(rel.max()))


def group_table(loaded, device, groups, steps, res, which=("a1", "a3", "paper"), barrier=None):
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from manifests import ArmSpec, GenerationSpec, RecordingSpec
    from workers import generate_group
    from workers.generate import initial_latents

    prompts = ["a red bicycle leaning on a white wall", "a bowl of oranges on a wooden table", "two dogs running on a beach",
               "a lighthouse at dusk", "a blue car parked in the snow"]
    arms = [ArmSpec(name="baseline"), ArmSpec(name="sink", intervention="fixed.m1"), ArmSpec(name="random", intervention="fixed.random")]
    rec = RecordingSpec(layers=[6, 12, 18])
    tr = loaded.pipe.transformer
    ours = dict(tr.attn_processors)
    out = []

    def run_sinkscope(a):
        def one(i):
            gen = GenerationSpec(steps=steps, guidance=7.0, height=res, width=res, arms_per_batch=a)
            with torch.inference_mode():
                r = generate_group(loaded, prompts[i % len(prompts)], 100 + i, arms, gen, rec)
            return sum(len(x.sink_rows) for x in r)
        return one

    def run_paper(i):
        pipe = loaded.pipe
        lat = initial_latents(loaded, 100 + i, res, res)
        nrows = 0
        for mode in ("none", "top", "random"):
            log = []
            procs = {}
            for name in ours:
                blk = int(name.split(".")[1])
                procs[name] = PaperLoopProcessor(log, blk, mode if blk == 12 else "none", 100 + i) if blk in (6, 12, 18) else JointAttnProcessor2_0()
            tr.set_attn_processor(procs)
            with torch.inference_mode():
                pipe(prompts[i % len(prompts)], latents=lat.clone(), num_inference_steps=steps, guidance_scale=7.0,
                     height=res, width=res, output_type="pil")
            host = [(layer, m.cpu(), e.cpu(), t.cpu()) for layer, m, e, t in log]  # the released code keeps numpy arrays
            nrows += len(host)
        tr.set_attn_processor(dict(ours))
        return nrows

    todo = [("a1", "sinkscope generate_group, arms_per_batch=1", run_sinkscope(1)),
            ("a3", "sinkscope generate_group, arms_per_batch=3", run_sinkscope(3)),
            ("paper", "paper-style per-prompt loop (fp32 softmax, 1 call/arm)", run_paper)]
    for key, name, fn in todo:
        if key not in which:
            continue
        fn(0)  # warm-up (Triton compile, cuDNN plans, allocator)
        if barrier:  # several processes (one per GPU) start their timed groups together: DIR:N:RANK
            folder, n, rank = barrier.split(":")
            Path(folder, f"ready.{key}.{rank}").touch()
            while len(list(Path(folder).glob(f"ready.{key}.*"))) < int(n):
                time.sleep(0.05)
        peak_reset(device)
        sync(device)
        t0 = time.perf_counter()
        for i in range(1, groups + 1):
            fn(i)
        sync(device)
        sec = time.perf_counter() - t0
        imgs = 3 * groups
        out.append(dict(variant=name, s_per_group=sec / groups, images_per_gpu_hour=imgs / sec * 3600, peak_gib=peak(device)))
    for row in out:
        row["x_paper_loop"] = row["images_per_gpu_hour"] / out[-1]["images_per_gpu_hour"] if "paper" in which else float("nan")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-groups", action="store_true")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--which", default="a1,a3,paper", help="group variants: a1, a3, paper")
    ap.add_argument("--barrier", help="DIR:N:RANK: wait for N processes before each timed variant (multi-GPU scaling)")
    ap.add_argument("--memory-res", default="", help="e.g. 512,768,1024,1280: peak memory of one step per resolution")
    ap.add_argument("--diag", action="store_true", help="host-sync sites and a kernel profile of one paper-config step")
    ap.add_argument("--atlas", action="store_true", help="step table of the atlas measures instead (stat ratio, every layer)")
    args = ap.parse_args()
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    res = 128 if args.small else 1024
    import diffusers

    info = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__, diffusers=diffusers.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(info, flush=True)
    t0 = time.perf_counter()
    loaded = build_loaded(device, dtype, args.small)
    print(f"built in {time.perf_counter() - t0:.1f}s: {loaded.geometry}", flush=True)
    steps = [] if args.skip_steps else step_table(loaded, device, dtype, args.iters, res, args.diag, args.atlas)
    from workers.processors.common import _LSE_BITWISE

    print(f"\n(a) transformer step, {res}², {dtype}, CFG batch 2 (median of {args.iters}); stock-lse bitwise verdicts: {list(_LSE_BITWISE.values())}")
    print(f"{'variant':66s} {'ms':>8s} {'x stock':>8s} {'peak GiB':>9s} {'+MiB':>7s} {'max|d out|':>10s}")
    for r in steps:
        err = "" if not r["top5_rel_err"] else f"  top5 vs exact: mean {r['top5_rel_err']['mean']:.1e}, max {r['top5_rel_err']['max']:.1e}"
        host = "" if r["host_table_ms"] is None else f"  host table {r['host_table_ms']:.1f} ms"
        print(f"{r['variant']:66s} {r['ms']:8.2f} {r['x_stock']:8.3f} {r['peak_gib']:9.2f} {r['extra_mib']:7.0f} {r['max_abs_diff']:10.4g}{err}{host}",
              flush=True)
    memory = []
    if args.memory_res:
        memory = memory_by_resolution(loaded, device, dtype, [int(x) for x in args.memory_res.split(",")])
        print("\n(m) peak memory of one transformer step (CFG batch 2) per resolution; extra = peak - stock peak")
        print(f"{'res':>6s} {'tokens':>7s} {'variant':22s} {'peak GiB':>9s} {'step GiB':>9s} {'extra MiB':>10s}")
        for r in memory:
            print(f"{r['res']:6d} {r['tokens']:7d} {r['variant']:22s} {r['peak_gib']:9.3f} {r['step_extra_gib']:9.3f} {r['extra_mib_vs_stock']:10.1f}", flush=True)
    groups = []
    if not args.skip_groups:
        groups = group_table(loaded, device, args.groups, args.steps, res, args.which.split(","), args.barrier)
        print(f"\n(b) group of 3 arms (baseline, fixed.m1@12, fixed.random@12), {args.steps} steps, {res}², record 6/12/18, {args.groups} timed groups")
        print(f"{'variant':58s} {'s/group':>8s} {'img/GPU-h':>10s} {'x paper':>8s} {'peak GiB':>9s}")
        for r in groups:
            print(f"{r['variant']:58s} {r['s_per_group']:8.2f} {r['images_per_gpu_hour']:10.0f} {r['x_paper_loop']:8.2f} {r['peak_gib']:9.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=info, steps=steps, memory=memory, groups=groups), f, indent=1)


if __name__ == "__main__":
    main()
