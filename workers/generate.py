"""Generate one (prompt, seed) group: every arm from the same initial latents and the same text embeddings.

Initial noise follows docs/design.md: `torch.randn` on a CPU generator seeded with the group seed, in
float32, then cast to the pipeline's dtype and device, so it is the same on every device and every arm.
The text encoders run once per group; each arm then runs the denoising loop with its own RunContext.

Fault injection for the cluster tests: `SINKSCOPE_FAULT_INJECT` holds comma-separated hooks; with
`raise_on_prompt:<substring>`, `generate_group` raises RuntimeError for a prompt containing <substring>
(before any work), the same hook jobs/faults.py honours.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pyarrow as pa
import torch

from manifests.schema import ArmSpec, GenerationSpec, RecordingSpec
from workers.loading import LoadedPipeline
from workers.recorder import records_to_table
from workers.session import ElementPlan, RunContext


@dataclass
class ArmResult:
    arm: str
    image: object  # PIL.Image.Image
    sink_rows: pa.Table  # workers.SINK_STEP_SCHEMA
    seconds: float  # denoising + decoding of this arm (text encoding is shared by the group and excluded)


def _maybe_inject_fault(prompt: str) -> None:
    for item in filter(None, (part.strip() for part in os.environ.get("SINKSCOPE_FAULT_INJECT", "").split(","))):
        name, _, value = item.partition(":")
        if name == "raise_on_prompt" and value and value in prompt:
            raise RuntimeError(f"injected failure on prompt {prompt!r} (SINKSCOPE_FAULT_INJECT)")


def make_scheduler(pipe, kind: str):
    """default: the pipeline's own; flow_euler / flow_dpmpp: valid flow-matching samplers (never ε-prediction)."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    base = pipe.scheduler.config
    if kind == "default":
        return pipe.scheduler
    if kind == "flow_euler":
        return FlowMatchEulerDiscreteScheduler.from_config(base)
    if kind == "flow_dpmpp":
        return DPMSolverMultistepScheduler(
            num_train_timesteps=base.get("num_train_timesteps", 1000),
            algorithm_type="dpmsolver++",
            solver_order=2,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=base.get("shift", 3.0),
        )
    raise ValueError(f"unknown scheduler {kind!r} (default, flow_euler, flow_dpmpp)")


def initial_latents(loaded: LoadedPipeline, seed: int, height: int, width: int) -> torch.Tensor:
    pipe = loaded.pipe
    denoiser = pipe.unet if loaded.family == "sdxl" else pipe.transformer
    shape = (1, denoiser.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    return noise.to(device=loaded.device, dtype=loaded.dtype)


def _t5_valid(pipe, text: str, max_sequence_length: int) -> tuple[bool, ...] | None:
    """Which T5 slots hold real tokens (the tokenizer's attention mask); None when T5 is absent."""
    if getattr(pipe, "text_encoder_3", None) is None or getattr(pipe, "tokenizer_3", None) is None:
        return None
    mask = pipe.tokenizer_3(text, padding="max_length", max_length=max_sequence_length, truncation=True, add_special_tokens=True).attention_mask
    return tuple(bool(x) for x in mask)


def generate_group(
    loaded: LoadedPipeline,
    prompt: str,
    seed: int,
    arms: list[ArmSpec],
    generation: GenerationSpec,
    recording: RecordingSpec,
) -> list[ArmResult]:
    """Run every arm of one (prompt, seed) group, in order; returns one ArmResult per arm."""
    _maybe_inject_fault(prompt)
    if not arms:
        raise ValueError("generate_group needs at least one arm")
    loaded.check_layers(arms, recording)
    pipe = loaded.pipe
    geo = loaded.geometry
    height = generation.height or geo.default_resolution
    width = generation.width or geo.default_resolution
    side = geo.vae_scale * geo.patch_size
    if height % side or width % side:
        raise ValueError(f"height/width {height}×{width} must be multiples of {side} (VAE scale × patch size)")
    use_cfg = generation.guidance > 1.0  # diffusers runs CFG only above 1; its batch is then [uncond, cond]
    sd3 = loaded.family == "sd3"
    if not sd3 and generation.scheduler != "default":
        raise ValueError(f"scheduler {generation.scheduler!r} is a flow-matching sampler; {loaded.description} is not a flow model")
    with torch.no_grad():
        extra = {"prompt_3": None, "max_sequence_length": generation.max_sequence_length} if sd3 else {}
        prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=pipe._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=use_cfg, **extra,
        )
    t5_cond = _t5_valid(pipe, prompt, generation.max_sequence_length)
    t5_uncond = _t5_valid(pipe, "", generation.max_sequence_length)
    call_extra = {"max_sequence_length": generation.max_sequence_length} if sd3 else {}
    latents = initial_latents(loaded, seed, height, width)
    original_scheduler = pipe.scheduler
    results = []
    for arm in arms:
        iv = arm.intervention
        elements = [ElementPlan(arm.name, "cond", iv, seed, t5_cond)]
        if use_cfg:
            elements.insert(0, ElementPlan(arm.name, "uncond", iv, seed, t5_uncond))
        ctx = RunContext(elements=elements, recording=recording if recording.layers else None, num_clip_tokens=loaded.geometry.clip_tokens)
        pipe.scheduler = make_scheduler(pipe, generation.scheduler)
        loaded.session.context = ctx
        start = time.perf_counter()
        try:
            output = pipe(
                prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled,
                latents=latents.clone(), num_inference_steps=generation.steps, guidance_scale=generation.guidance,
                height=height, width=width, output_type="pil", **call_extra,
            )
            if str(loaded.device).startswith("cuda"):
                torch.cuda.synchronize()
        finally:
            loaded.session.context = None
            pipe.scheduler = original_scheduler
        seconds = time.perf_counter() - start
        if ctx.step + 1 != generation.steps:
            raise RuntimeError(f"arm {arm.name!r}: the denoiser ran {ctx.step + 1} times for {generation.steps} steps")
        results.append(ArmResult(arm=arm.name, image=output.images[0], sink_rows=records_to_table(ctx.records), seconds=seconds))
    return results
