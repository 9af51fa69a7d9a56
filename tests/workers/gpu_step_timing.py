"""Cost of the real sink processors on one SD3-medium-shaped transformer step (random weights, bf16, 1024², CFG).

    python tests/workers/gpu_step_timing.py [--json out.json]

Variants: stock diffusers; our processors idle; recording 6/12/18; recording 6/12/18 + fixed.m1 at 12;
recording 6/12/18 + paper.m2 at 12; recording all 24 layers. Median of CUDA-event timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import types

import torch

from manifests import RecordingSpec
from manifests.interventions import PRESETS
from workers.processors import install_sd3_processors
from workers.session import ElementPlan, RunContext, SinkSession

SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--iters", type=int, default=8)
    args = ap.parse_args()
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = SD3Transformer2DModel(**SD3_MEDIUM)
    model = model.to(torch.bfloat16).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(20)
    fake_pipe = types.SimpleNamespace(transformer=model, scheduler=scheduler)
    g = torch.Generator("cpu").manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(2, 16, 128, 128, generator=g).to("cuda", torch.bfloat16),
        encoder_hidden_states=torch.randn(2, 333, 4096, generator=g).to("cuda", torch.bfloat16),
        pooled_projections=torch.randn(2, 2048, generator=g).to("cuda", torch.bfloat16),
        timestep=scheduler.timesteps[:1].expand(2).to("cuda"),
    )

    def timed(ctx_factory):
        times = []
        with torch.inference_mode():
            for it in range(args.iters + 2):
                session.context = ctx_factory()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                model(**inputs)
                b.record()
                torch.cuda.synchronize()
                if session.context is not None:
                    from workers.recorder import records_to_table

                    records_to_table(session.context.records)  # include the host copy of the records
                if it >= 2:
                    times.append(a.elapsed_time(b))
                session.context = None
        return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    model.set_attn_processor(JointAttnProcessor2_0())
    session = types.SimpleNamespace(context=None)
    torch.cuda.reset_peak_memory_stats()
    results["stock"] = timed(lambda: None)
    session = SinkSession(fake_pipe)
    install_sd3_processors(model, session)

    def ctx(iv=None, layers=(6, 12, 18)):
        def make():
            c = RunContext([ElementPlan("a", "uncond", iv, 1), ElementPlan("a", "cond", iv, 1)], RecordingSpec(layers=list(layers)))
            return c
        return make

    variants = {
        "ours_idle": lambda: None,
        "record_6_12_18": ctx(),
        "record_6_12_18+fixed.m1@12": ctx(PRESETS["fixed.m1"]),
        "record_6_12_18+paper.m2@12": ctx(PRESETS["paper.m2"]),
        "record_6_12_18+paper.m3@12": ctx(PRESETS["paper.m3"]),
        "record_6_12_18+fixed.random@12": ctx(PRESETS["fixed.random"]),
        "record_6_12_18+modality_random@12": ctx(PRESETS["fixed.modality_random"]),
        "fixed.m1@12, no recording": ctx(PRESETS["fixed.m1"], layers=()),
        "record_all_24": ctx(layers=range(24)),
    }
    for name, factory in variants.items():
        torch.cuda.reset_peak_memory_stats()
        results[name] = timed(factory)
    base = results["stock"][0]
    for name, value in results.items():
        if isinstance(value, tuple):
            print(f"{name:32s} {value[0]:8.1f} ms  x{value[0] / base:5.2f}  peak {value[1]:.1f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
