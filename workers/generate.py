"""Generate one (prompt, seed) group: every arm from the same initial latents and the same text embeddings.

Initial noise follows docs/design.md: `torch.randn` on a CPU generator seeded with the group seed, in
float32, in the pipeline's unpacked latent shape, then cast to the pipeline's dtype and device (and, for
Flux, packed into 2×2 patches as its pipeline does), so it is the same on every device and every arm.
The text encoders run once per group.

Arm batching (`generation.arms_per_batch` = A > 1): the arms are split into consecutive chunks of A, in
the order given (jobs passes the sweep's arm order, so the grouping is a pure function of the sweep), and
each chunk is one pipeline call: embeddings repeated per arm, the same initial latents for every arm. The
denoiser batch is diffusers' CFG layout [uncond × A, cond × A] (cond × A without CFG); element i of it
carries the ElementPlan (arm, branch) it belongs to, so interventions, random draws (seeded by group seed,
step, layer and branch, never by batch position) and records stay per element. GEMM shapes change with the
batch size, so a batched arm equals its unbatched run only within the dtype's rounding; a baseline arm in a
batch is still untouched by its neighbours' interventions (its rows are the stock attention of that batch).

Families: SD3 / SD3.5 and SDXL (CFG batch [uncond, cond]); PixArt-Σ (the same, T5 with attention masks);
Flux (FLUX.1-dev is guidance-distilled: `generation.guidance` is its embedded guidance scale, there is no
CFG batch, only the cond branch; Flux's "true CFG" would call the transformer twice per step and is not
used).

Fault injection for the cluster tests: `SINKSCOPE_FAULT_INJECT` holds comma-separated hooks; with
`raise_on_prompt:<substring>`, `generate_group` raises RuntimeError for a prompt containing <substring>
(before any work), the same hook jobs/faults.py honours.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from manifests.interventions import PromptEdit
from manifests.keys import TextKey
from manifests.schema import ArmSpec, GenerationSpec, RecordingSpec
from workers import prompt_side
from workers.loading import LoadedPipeline
from workers.recorder import records_to_table
from workers.session import ElementPlan, RunContext

_FLOW_FAMILIES = ("sd3", "flux")


@dataclass
class ArmResult:
    arm: str
    image: object  # PIL.Image.Image
    sink_rows: pa.Table  # workers.SINK_STEP_SCHEMA
    seconds: float  # denoising + decoding of this arm (text encoding is shared by the group and excluded);
    # in a batch of A arms, the batch's time / A


@dataclass
class EncodedPrompt:
    """A group's text conditioning, computed once: pipeline kwargs of batch 1, and which T5 slots are real tokens."""

    embeds: dict  # name -> tensor [1, ...] (or None), passed to the pipeline call
    extra: dict  # non-batched pipeline kwargs (guidance, max_sequence_length, ...)
    use_cfg: bool
    t5_cond: tuple[bool, ...] | None
    t5_uncond: tuple[bool, ...] | None
    height: int
    width: int
    text_cond: tuple[TextKey, ...] = ()  # the denoiser's text keys [CLIP | T5] as encoded (prompt edits included)
    text_uncond: tuple[TextKey, ...] = ()

    @property
    def num_clip(self) -> int:
        """CLIP text keys of this encoding (77 unless a prompt edit changed CLIP's length)."""
        return sum(1 for key in self.text_cond if key.segment == "clip")


@dataclass
class BatchRun:
    """One pipeline call over a chunk of arms (what workers.verify inspects)."""

    arms: list[ArmSpec]
    images: list
    context: RunContext | None
    seconds: float
    denoiser_outputs: list = field(default_factory=list)  # per step, when captured


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
        extra = {}
        if base.get("use_dynamic_shifting"):  # Flux: resolution-dependent shift (mu), as its Euler default does
            extra = dict(use_dynamic_shifting=True, time_shift_type=base.get("time_shift_type", "exponential"))
        return DPMSolverMultistepScheduler(
            num_train_timesteps=base.get("num_train_timesteps", 1000),
            algorithm_type="dpmsolver++",
            solver_order=2,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=base.get("shift", 3.0),
            **extra,
        )
    raise ValueError(f"unknown scheduler {kind!r} (default, flow_euler, flow_dpmpp)")


def initial_latents(loaded: LoadedPipeline, seed: int, height: int, width: int) -> torch.Tensor:
    """Batch-1 initial latents in the shape the pipeline's `latents=` expects (Flux: packed)."""
    pipe = loaded.pipe
    generator = torch.Generator("cpu").manual_seed(seed)
    if loaded.family == "flux":
        channels = pipe.transformer.config.in_channels // 4
        h, w = 2 * (height // (pipe.vae_scale_factor * 2)), 2 * (width // (pipe.vae_scale_factor * 2))
        noise = torch.randn((1, channels, h, w), generator=generator, dtype=torch.float32)
        return pipe._pack_latents(noise, 1, channels, h, w).to(device=loaded.device, dtype=loaded.dtype)
    denoiser = loaded.denoiser
    shape = (1, denoiser.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return noise.to(device=loaded.device, dtype=loaded.dtype)


def resolution(loaded: LoadedPipeline, generation: GenerationSpec) -> tuple[int, int]:
    geo = loaded.geometry
    height = generation.height or geo.default_resolution
    width = generation.width or geo.default_resolution
    side = geo.vae_scale * geo.patch_size
    if height % side or width % side:
        raise ValueError(f"height/width {height}×{width} must be multiples of {side} (VAE scale × patch size)")
    return height, width


def encode_prompt(loaded: LoadedPipeline, prompt: str, generation: GenerationSpec, edit: PromptEdit | None = None) -> EncodedPrompt:
    """Run the text encoders once for a group (family-specific), with CFG negatives when the family uses them.

    `edit`: an arm's prompt-side change (workers.prompt_side), applied to the conditional and unconditional prompt.
    """
    pipe, family = loaded.pipe, loaded.family
    if family not in _FLOW_FAMILIES and generation.scheduler != "default":
        raise ValueError(f"scheduler {generation.scheduler!r} is a flow-matching sampler; {loaded.description} is not a flow model")
    height, width = resolution(loaded, generation)
    msl = generation.max_sequence_length
    if edit is not None and edit.max_length and edit.applies_to("t5"):
        msl = edit.max_length  # also the length of SD3's zero T5 slots when T5 is absent
    device = pipe._execution_device
    use_cfg = generation.guidance > 1.0 and family != "flux"  # diffusers runs CFG only above 1; its batch is [uncond, cond]
    with torch.no_grad(), prompt_side.capture(pipe, family, prompt, edit) as log:
        if family == "sd3":
            pe, npe, pooled, npooled = pipe.encode_prompt(
                prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=use_cfg, max_sequence_length=msl,
            )
            embeds = dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=npooled)
            extra = dict(guidance_scale=generation.guidance, max_sequence_length=msl)
            t5_cond = t5_uncond = () if getattr(pipe, "text_encoder_3", None) is not None else None  # set from the log below
        elif family == "sdxl":
            pe, npe, pooled, npooled = pipe.encode_prompt(
                prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=use_cfg,
            )
            embeds = dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=npooled)
            extra = dict(guidance_scale=generation.guidance)
            t5_cond = t5_uncond = None
        elif family == "flux":
            if msl > 512:
                raise ValueError(f"generation.max_sequence_length {msl} > 512, Flux's limit")
            pe, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=1, max_sequence_length=msl)
            embeds = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled)
            extra = dict(guidance_scale=generation.guidance, max_sequence_length=msl)
            t5_cond, t5_uncond = (), None  # set from the log below
        elif family == "pixart":
            pe, mask, npe, nmask = pipe.encode_prompt(
                prompt, do_classifier_free_guidance=use_cfg, negative_prompt="", num_images_per_prompt=1, device=device,
                clean_caption=False, max_sequence_length=msl,
            )
            embeds = dict(prompt_embeds=pe, prompt_attention_mask=mask, negative_prompt_embeds=npe, negative_prompt_attention_mask=nmask)
            # resolution binning would change the generated size; sinkscope generates exactly height × width
            extra = dict(
                guidance_scale=generation.guidance, max_sequence_length=msl, use_resolution_binning=False, clean_caption=False,
                negative_prompt=None,
            )
            t5_cond = tuple(bool(x) for x in mask[0].tolist())
            t5_uncond = None if nmask is None else tuple(bool(x) for x in nmask[0].tolist())
        else:
            raise ValueError(f"unknown family {family!r}")
    zero = {"clip": loaded.geometry.clip_tokens, "t5": msl}
    text_cond = prompt_side.text_keys(pipe, family, log, 0, zero)
    text_uncond = prompt_side.text_keys(pipe, family, log, 1, {**zero, "clip": sum(k.segment == "clip" for k in text_cond)}) if use_cfg else ()
    if t5_cond is not None:  # which T5 slots hold real tokens, as encoded (an edit may change length or padding)
        t5_cond = tuple(k.kind != "padding" for k in text_cond if k.segment == "t5")
        t5_uncond = tuple(k.kind != "padding" for k in text_uncond if k.segment == "t5") if use_cfg else t5_uncond
    return EncodedPrompt(embeds, extra, use_cfg, t5_cond, t5_uncond, height, width, text_cond, text_uncond)


def batch_plans(arms: list[ArmSpec], seed: int, encoded: EncodedPrompt) -> list[ElementPlan]:
    """One ElementPlan per denoiser batch element, in diffusers' layout [uncond × A, cond × A]."""
    cond = [ElementPlan(arm.name, "cond", arm.intervention, seed, encoded.t5_cond, encoded.text_cond) for arm in arms]
    if not encoded.use_cfg:
        return cond
    return [ElementPlan(arm.name, "uncond", arm.intervention, seed, encoded.t5_uncond, encoded.text_uncond) for arm in arms] + cond


def prompt_edit(arm: ArmSpec) -> PromptEdit | None:
    return None if arm.intervention is None else arm.intervention.prompt


def chunks(arms: list[ArmSpec], arms_per_batch: int) -> list[list[ArmSpec]]:
    """Consecutive chunks of at most `arms_per_batch` arms with the same prompt edit (they share one encoding),
    in the given order (a pure function of the arm list)."""
    if arms_per_batch < 1:
        raise ValueError(f"arms_per_batch must be ≥ 1, got {arms_per_batch}")
    out: list[list[ArmSpec]] = []
    for arm in arms:
        if out and len(out[-1]) < arms_per_batch and prompt_edit(out[-1][0]) == prompt_edit(arm):
            out[-1].append(arm)
        else:
            out.append([arm])
    return out


def _repeat(value, n: int):
    if not isinstance(value, torch.Tensor):
        return value
    return value.repeat(n, *([1] * (value.ndim - 1)))


def run_batch(
    loaded: LoadedPipeline,
    encoded: EncodedPrompt,
    arms: list[ArmSpec],
    seed: int,
    latents: torch.Tensor,
    generation: GenerationSpec,
    recording: RecordingSpec | None,
    *,
    sinks: bool = True,
    probe=None,
    capture_outputs: bool = False,
    output_type: str = "pil",
) -> BatchRun:
    """One pipeline call for `arms` (all from `latents`). sinks=False runs without a RunContext (stock behaviour)."""
    pipe = loaded.pipe
    n = len(arms)
    ctx = None
    if sinks:
        ctx = RunContext(
            elements=batch_plans(arms, seed, encoded), recording=recording if recording and recording.layers else None,
            num_clip_tokens=encoded.num_clip, probe=probe, image_size=(encoded.height, encoded.width),
        )
    outputs: list[torch.Tensor] = []
    hook = None
    if capture_outputs:
        def keep(module, args, result):
            first = result[0] if isinstance(result, tuple) else getattr(result, "sample", result)
            outputs.append(first.detach().to("cpu", copy=True))

        hook = loaded.denoiser.register_forward_hook(keep)
    original_scheduler = pipe.scheduler
    pipe.scheduler = make_scheduler(pipe, generation.scheduler)
    loaded.session.context = ctx
    start = time.perf_counter()
    try:
        output = pipe(
            **{name: _repeat(value, n) for name, value in encoded.embeds.items()},
            latents=_repeat(latents, n), num_inference_steps=generation.steps, height=encoded.height, width=encoded.width,
            output_type=output_type, **encoded.extra,
        )
        if str(loaded.device).startswith("cuda"):
            torch.cuda.synchronize()
    finally:
        loaded.session.context = None
        pipe.scheduler = original_scheduler
        if hook is not None:
            hook.remove()
    seconds = time.perf_counter() - start
    if ctx is not None and ctx.step + 1 != generation.steps:
        raise RuntimeError(f"arms {[a.name for a in arms]}: the denoiser ran {ctx.step + 1} times for {generation.steps} steps")
    images = list(output.images)
    if len(images) != n:
        raise RuntimeError(f"the pipeline returned {len(images)} images for a batch of {n} arms")
    return BatchRun(arms=arms, images=images, context=ctx, seconds=seconds, denoiser_outputs=outputs)


def generate_group(
    loaded: LoadedPipeline,
    prompt: str,
    seed: int,
    arms: list[ArmSpec],
    generation: GenerationSpec,
    recording: RecordingSpec,
) -> list[ArmResult]:
    """Run every arm of one (prompt, seed) group, `generation.arms_per_batch` arms per pipeline call; one ArmResult per arm, in order."""
    _maybe_inject_fault(prompt)
    if not arms:
        raise ValueError("generate_group needs at least one arm")
    names = [arm.name for arm in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate arm names in one group: {names}")
    loaded.check_layers(arms, recording)
    encodings = {None: encode_prompt(loaded, prompt, generation)}  # one per distinct prompt edit of the group
    latents = initial_latents(loaded, seed, encodings[None].height, encodings[None].width)
    results = []
    for chunk in chunks(arms, generation.arms_per_batch):
        edit = prompt_edit(chunk[0])
        if edit not in encodings:
            encodings[edit] = encode_prompt(loaded, prompt, generation, edit)
        run = run_batch(loaded, encodings[edit], chunk, seed, latents, generation, recording)
        for arm, image in zip(chunk, run.images):
            rows = records_to_table([r for r in run.context.records if r.arm == arm.name])
            results.append(ArmResult(arm=arm.name, image=image, sink_rows=rows, seconds=run.seconds / len(chunk)))
    return results
