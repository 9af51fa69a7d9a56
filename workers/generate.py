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
used); Qwen-Image (workers.qwen_encoding: `generation.guidance` is its `true_cfg_scale`; the pipeline calls the
transformer twice per step, cond × A then uncond × A, and the session hands each call the elements of its branch
from the same [uncond × A, cond × A] plan list); Z-Image (`generation.guidance` > 0 enables CFG, pos + g·(pos − neg);
one call with the batch [cond × A, uncond × A], lists of latents and captions). Wan 2.1 (video): 5-D latents
[1, C, latent frames, h, w]; WanPipeline runs CFG as two denoiser calls per step, cond × A then uncond × A, handed
their elements as Qwen-Image's are; a unit's image is the video's frame strip (`jobs.runformat.frame_strip`).
LTX-Video: its latents packed into tokens (1×1×1 patches, frame by frame), one CFG batch [uncond, cond], T5 padding
masked in cross-attention as PixArt's.

Fault injection for the cluster tests: `SINKSCOPE_FAULT_INJECT` holds comma-separated hooks; with
`raise_on_prompt:<substring>`, `generate_group` raises RuntimeError for a prompt containing <substring>
(before any work), the same hook jobs/faults.py honours.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import torch

from manifests.grouping import chunks, group_plan, latents_needed, prompt_edit, start_step  # noqa: F401 (re-exported)
from manifests.interventions import PromptEdit
from manifests.keys import TextKey
from manifests.schema import ArmSpec, GenerationSpec, RecordingSpec
from workers import prompt_side
from workers.loading import LoadedPipeline
from workers.processors.common import denoiser_processors, set_denoiser_processors
from workers.qwen_encoding import check_z_image_size, encode_qwen_image, encode_z_image, qwen_image_latents
from workers.recorder import records_to_table
from workers.session import ElementPlan, RunContext

_FLOW_FAMILIES = ("sd3", "flux", "qwen_image", "z_image", "wan", "ltx")
VIDEO_FAMILIES = ("wan", "ltx")  # pipelines that return frames: a unit's image is their frame strip (jobs.runformat)


@dataclass
class ArmResult:
    arm: str
    image: object  # PIL.Image.Image
    sink_rows: pa.Table  # workers.SINK_STEP_SCHEMA
    seconds: float  # denoising + decoding of this arm (text encoding is shared by the group and excluded);
    # in a batch of A arms, the batch's time / A; 0 for a baseline taken from the cache
    png: bytes | None = None  # a reused baseline's PNG as cached (written as it is, so its checksum is the producer's)
    start_step: int = 0  # > 0: the arm ran from the group baseline's latents entering this step (prefix sharing)
    trajectory: dict | None = None  # baseline only: step -> latents entering that step (device tensors)
    final_latents: object = None  # baseline only: latents after the last step, before decoding
    sigmas: list[float] | None = None  # baseline only: the scheduler's sigmas of the run
    same_as: str | None = None  # a further baseline arm of the group: the arm whose (identical) result it is


@dataclass
class ReusedUnit:
    """An arm's result taken from elsewhere (jobs' unit cache) instead of generated: its image and sink rows."""

    image: object  # PIL.Image.Image
    png: bytes
    sink_rows: pa.Table


@dataclass
class ReusedBaseline(ReusedUnit):
    """A reused baseline: also the latents that prefix-sharing arms of the group start from."""

    trajectory: dict  # step -> latents entering that step (the steps the producer captured)
    final_latents: object
    sigmas: list[float]


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
    frames: int = 1  # video frames generated (the pipeline's num_frames); 1 for image models

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
    trajectory: dict = field(default_factory=dict)  # step i -> latents entering step i (i ≥ 1), when captured
    final_latents: object = None  # after the last step, when captured
    sigmas: list[float] | None = None  # the run's scheduler sigmas (full schedule), when captured


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
    # Wan's default (UniPC over flow sigmas) names its shift `flow_shift`; the flow-matching schedulers call it `shift`
    shift = base.get("shift", base.get("flow_shift", 3.0))
    if kind == "flow_euler":
        if "shift" in base:  # already a flow-matching config (SD3, Flux, LTX-Video)
            return FlowMatchEulerDiscreteScheduler.from_config(base)
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=base.get("num_train_timesteps", 1000), shift=shift)
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
            flow_shift=shift,
            **extra,
        )
    raise ValueError(f"unknown scheduler {kind!r} (default, flow_euler, flow_dpmpp)")


def initial_latents(loaded: LoadedPipeline, seed: int, height: int, width: int, frames: int = 1) -> torch.Tensor:
    """Batch-1 initial latents in the shape the pipeline's `latents=` expects (Flux: packed; video: 5-D
    [1, C, latent frames, h, w] for `frames` video frames)."""
    pipe = loaded.pipe
    generator = torch.Generator("cpu").manual_seed(seed)
    if loaded.family in VIDEO_FAMILIES:
        geo = loaded.geometry
        cfg = loaded.denoiser.config
        if loaded.family == "ltx":  # LTXPipeline takes its latents packed into tokens [1, frames·h·w, C·patch volume]
            channels = cfg.in_channels // (cfg.patch_size * cfg.patch_size * cfg.patch_size_t)
        else:
            channels = cfg.in_channels
        shape = (1, channels, geo.latent_frames(frames), height // geo.vae_scale, width // geo.vae_scale)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if loaded.family == "ltx":
            noise = pipe._pack_latents(noise, cfg.patch_size, cfg.patch_size_t)
        return noise.to(device=loaded.device, dtype=loaded.dtype)
    if loaded.family == "flux":
        channels = pipe.transformer.config.in_channels // 4
        h, w = 2 * (height // (pipe.vae_scale_factor * 2)), 2 * (width // (pipe.vae_scale_factor * 2))
        noise = torch.randn((1, channels, h, w), generator=generator, dtype=torch.float32)
        return pipe._pack_latents(noise, 1, channels, h, w).to(device=loaded.device, dtype=loaded.dtype)
    if loaded.family == "qwen_image":
        return qwen_image_latents(pipe, generator, height, width).to(device=loaded.device, dtype=loaded.dtype)
    denoiser = loaded.denoiser
    shape = (1, denoiser.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if loaded.family == "z_image":  # ZImagePipeline keeps its latents in float32 whatever the model dtype
        return noise.to(device=loaded.device)
    return noise.to(device=loaded.device, dtype=loaded.dtype)


def resolution(loaded: LoadedPipeline, generation: GenerationSpec) -> tuple[int, int]:
    geo = loaded.geometry
    height = generation.height or geo.default_resolution
    width = generation.width or geo.default_resolution
    side = geo.vae_scale * geo.patch_size
    if height % side or width % side:
        raise ValueError(f"height/width {height}×{width} must be multiples of {side} (VAE scale × patch size)")
    return height, width


def num_frames(loaded: LoadedPipeline, generation: GenerationSpec) -> int:
    """Video frames to generate: generation.num_frames, else the model's default (1 for image models)."""
    geo = loaded.geometry
    frames = generation.num_frames or geo.default_frames
    problem = geo.frames_error(frames)
    if problem:
        raise ValueError(f"generation.num_frames: {problem} ({loaded.description})")
    return frames


def encode_prompt(loaded: LoadedPipeline, prompt: str, generation: GenerationSpec, edit: PromptEdit | None = None) -> EncodedPrompt:
    """Run the text encoders once for a group (family-specific), with CFG negatives when the family uses them.

    `edit`: an arm's prompt-side change (workers.prompt_side), applied to the conditional and unconditional prompt.
    """
    pipe, family = loaded.pipe, loaded.family
    if family not in _FLOW_FAMILIES and generation.scheduler != "default":
        raise ValueError(f"scheduler {generation.scheduler!r} is a flow-matching sampler; {loaded.description} is not a flow model")
    height, width = resolution(loaded, generation)
    if family in ("qwen_image", "z_image"):  # workers.qwen_encoding: their own templates, lengths and CFG
        if family == "z_image":
            check_z_image_size(height, width, pipe.vae_scale_factor, loaded.geometry.patch_size)
        encode = encode_qwen_image if family == "qwen_image" else encode_z_image
        embeds, extra, use_cfg, text_cond, text_uncond = encode(
            pipe, prompt, generation.guidance, generation.max_sequence_length, edit, pipe._execution_device
        )
        t5_cond = tuple(k.kind != "padding" for k in text_cond)
        t5_uncond = tuple(k.kind != "padding" for k in text_uncond) if use_cfg else None
        return EncodedPrompt(embeds, extra, use_cfg, t5_cond, t5_uncond, height, width, text_cond, text_uncond)
    frames = num_frames(loaded, generation)
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
        elif family == "wan":  # UMT5 only; embeddings past the last real token are zeroed (attended: no mask)
            pe, npe = pipe.encode_prompt(
                prompt=prompt, negative_prompt="", do_classifier_free_guidance=use_cfg, num_videos_per_prompt=1,
                max_sequence_length=msl, device=device,
            )
            embeds = dict(prompt_embeds=pe, negative_prompt_embeds=npe)
            extra = dict(guidance_scale=generation.guidance, max_sequence_length=msl, num_frames=frames)
            t5_cond, t5_uncond = (), None  # set from the log below
        elif family == "ltx":  # T5 only, encoded unmasked; the transformer masks the padding keys (−10000), as PixArt's
            pe, mask, npe, nmask = pipe.encode_prompt(
                prompt=prompt, negative_prompt="", do_classifier_free_guidance=use_cfg, num_videos_per_prompt=1,
                max_sequence_length=msl, device=device,
            )
            embeds = dict(prompt_embeds=pe, prompt_attention_mask=mask, negative_prompt_embeds=npe, negative_prompt_attention_mask=nmask)
            extra = dict(guidance_scale=generation.guidance, max_sequence_length=msl, num_frames=frames)
            t5_cond, t5_uncond = (), None  # set from the log below
        else:
            raise ValueError(f"unknown family {family!r}")
    zero = {"clip": loaded.geometry.clip_tokens, "t5": msl}
    text_cond = prompt_side.text_keys(pipe, family, log, 0, zero)
    text_uncond = prompt_side.text_keys(pipe, family, log, 1, {**zero, "clip": sum(k.segment == "clip" for k in text_cond)}) if use_cfg else ()
    if t5_cond is not None:  # which T5 slots hold real tokens, as encoded (an edit may change length or padding)
        t5_cond = tuple(k.kind != "padding" for k in text_cond if k.segment == "t5")
        t5_uncond = tuple(k.kind != "padding" for k in text_uncond if k.segment == "t5") if use_cfg else t5_uncond
    return EncodedPrompt(embeds, extra, use_cfg, t5_cond, t5_uncond, height, width, text_cond, text_uncond, frames=frames)


def batch_plans(arms: list[ArmSpec], seed: int, encoded: EncodedPrompt, cond_first: bool = False) -> list[ElementPlan]:
    """One ElementPlan per denoiser batch element, in diffusers' layout [uncond × A, cond × A] (`cond_first`:
    [cond × A, uncond × A], ZImagePipeline's)."""
    cond = [ElementPlan(arm.name, "cond", arm.intervention, seed, encoded.t5_cond, encoded.text_cond) for arm in arms]
    if not encoded.use_cfg:
        return cond
    uncond = [ElementPlan(arm.name, "uncond", arm.intervention, seed, encoded.t5_uncond, encoded.text_uncond) for arm in arms]
    return cond + uncond if cond_first else uncond + cond


def check_prompt_edits(loaded: LoadedPipeline, arms: list[ArmSpec]) -> None:
    """Fail early, naming the arm and the model, on a prompt edit that makes no sense for the loaded family."""
    for arm in arms:
        edit = prompt_edit(arm)
        why = edit.unsupported_reason(loaded.family) if edit is not None else None
        if why:
            raise ValueError(f"arm {arm.name!r}: intervention.prompt: {why} ({loaded.description})")


def denoiser_calls_per_step(loaded: LoadedPipeline, encoded: EncodedPrompt) -> int:
    """Qwen-Image's true CFG and WanPipeline call the denoiser once per branch; the other families batch both branches."""
    return 2 if loaded.family in ("qwen_image", "wan") and encoded.use_cfg else 1


def _repeat(value, n: int):
    if isinstance(value, list):  # Z-Image: one caption tensor per element
        return value * n
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
    start_step: int = 0,
    capture_latents: bool = False,
) -> BatchRun:
    """One pipeline call for `arms` (all from `latents`). sinks=False runs without a RunContext (stock behaviour).

    start_step > 0: `latents` are those entering that step (a prefix-sharing arm); the pipeline then runs only
    the steps from there on (see `_run_from`). capture_latents: keep the latents entering every step and the final
    ones (the group baseline's trajectory, which prefix-sharing arms and the baseline cache reuse).
    """
    pipe = loaded.pipe
    n = len(arms)
    ctx = None
    if sinks:
        ctx = RunContext(
            elements=batch_plans(arms, seed, encoded, cond_first=loaded.family == "z_image"), recording=recording if recording and recording.layers else None,
            num_clip_tokens=encoded.num_clip, probe=probe, image_size=(encoded.height, encoded.width),
            frames=loaded.geometry.latent_frames(encoded.frames),
            start_step=start_step, step=start_step - 1,
        )
    outputs: list[torch.Tensor] = []
    hook = None
    if capture_outputs:
        def keep(module, args, result):
            first = result[0] if isinstance(result, tuple) else getattr(result, "sample", result)
            if isinstance(first, list):  # Z-Image returns one tensor per element
                first = torch.stack(first)
            outputs.append(first.detach().to("cpu", copy=True))

        hook = loaded.denoiser.register_forward_hook(keep)
    original_scheduler = pipe.scheduler
    scheduler = make_scheduler(pipe, generation.scheduler)
    trajectory: dict = {}
    if start_step or capture_latents:
        scheduler = copy.deepcopy(scheduler)  # instance-level wrappers below must not outlive this call
        if start_step:
            _run_from(scheduler, start_step)
        if capture_latents:
            _capture_steps(scheduler, trajectory, start_step)
    pipe.scheduler = scheduler
    stock_denoiser = _use_compiled_denoiser(loaded, generation.compile)
    loaded.session.context = ctx
    start = time.perf_counter()
    if loaded.family == "ltx":  # a timestep-conditioned LTX VAE (0.9.1+) adds decode noise: drawn from the group seed
        extra = {**encoded.extra, "generator": torch.Generator("cpu").manual_seed(seed)}
    else:
        extra = encoded.extra
    try:
        output = pipe(
            **{name: _repeat(value, n) for name, value in encoded.embeds.items()},
            latents=_repeat(latents, n), num_inference_steps=generation.steps, height=encoded.height, width=encoded.width,
            output_type=output_type, **extra,
        )
        if str(loaded.device).startswith("cuda"):
            torch.cuda.synchronize()
    finally:
        loaded.session.context = None
        pipe.scheduler = original_scheduler
        if stock_denoiser is not None:
            eager, processors = stock_denoiser
            set_denoiser_processors(eager, processors)
            setattr(pipe, "unet" if loaded.family == "sdxl" else "transformer", eager)
        if hook is not None:
            hook.remove()
    seconds = time.perf_counter() - start
    if ctx is not None and ctx.step + 1 != generation.steps:
        raise RuntimeError(f"arms {[a.name for a in arms]}: the denoiser ran {ctx.step + 1} times for {generation.steps} steps")
    images = list(output.images) if loaded.family not in VIDEO_FAMILIES else video_units(output.frames, output_type)
    if len(images) != n:
        raise RuntimeError(f"the pipeline returned {len(images)} images for a batch of {n} arms")
    run = BatchRun(arms=arms, images=images, context=ctx, seconds=seconds, denoiser_outputs=outputs)
    if capture_latents:
        run.final_latents = trajectory.pop(generation.steps)
        run.trajectory = trajectory
        run.sigmas = [float(x) for x in scheduler.sigmas]
    return run


def video_units(videos, output_type: str) -> list:
    """A video pipeline's output → one unit image per video: its frame strip (jobs.runformat, the rule's owner)."""
    if output_type != "pil":
        return list(videos)
    from jobs.runformat import frame_strip

    return [frame_strip(list(frames)) for frames in videos]


_COMPILE_MODES = {"inductor": "default"}


class _OutsideGraph:
    """An attention processor run outside torch.compile's graph: its Python state (run context, records) and its
    own Triton kernels are not traced (inductor cannot recompile them); the rest of each block is compiled."""

    def __init__(self, processor):
        self.processor = processor

    @torch._dynamo.disable
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


def _use_compiled_denoiser(loaded: LoadedPipeline, setting: str):
    """generation.compile: put a torch.compile'd denoiser (built once per loaded pipeline and mode) in the pipeline
    for this call, with its attention processors wrapped by _OutsideGraph; returns what to restore, or None."""
    if setting == "none":
        return None
    eager = loaded.denoiser
    cache = loaded.__dict__.setdefault("_compiled_denoisers", {})
    if setting not in cache:
        wrapped = {name: _OutsideGraph(proc) for name, proc in denoiser_processors(eager).items()}
        cache[setting] = (torch.compile(eager, mode=_COMPILE_MODES[setting]), wrapped)
    compiled, wrapped = cache[setting]
    processors = denoiser_processors(eager)
    set_denoiser_processors(eager, wrapped)
    setattr(loaded.pipe, "unet" if loaded.family == "sdxl" else "transformer", compiled)
    return eager, processors


# Schedulers whose step i depends only on (model output, latents entering step i, sigmas[i], sigmas[i+1]), so
# a run may start at step s from the latents entering it: diffusers' own img2img start (`set_begin_index`).
# Multistep solvers (DPM++, PixArt's default) carry earlier model outputs and are not listed: their arms run
# from step 0. EulerDiscrete (SDXL) would need its init_noise_sigma scaling of given latents undone: not listed.
PREFIX_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def supports_prefix(loaded: LoadedPipeline, generation: GenerationSpec) -> bool:
    scheduler = make_scheduler(loaded.pipe, generation.scheduler)
    return type(scheduler).__name__ in PREFIX_SCHEDULERS and not scheduler.config.get("stochastic_sampling", False)


def prefix_latents_needed(loaded: LoadedPipeline, arms: list[ArmSpec], generation: GenerationSpec, sigmas: list[float] | None) -> list[int]:
    """The baseline latents this group's prefix arms start from on this pipeline (none where its sampler cannot
    start mid-trajectory): what a cached baseline must hold, and what its entry is published with."""
    return latents_needed(arms, generation, sigmas) if supports_prefix(loaded, generation) else []


def _run_from(scheduler, start: int) -> None:
    """Make the pipeline's loop begin at step `start` of the same schedule, as diffusers' img2img pipelines do:
    the full schedule is computed, the pipeline iterates over timesteps[start:], and the scheduler's step index
    begins at `start` (also when the pipeline itself calls set_begin_index(0), as Flux's does)."""
    set_timesteps, set_begin_index = scheduler.set_timesteps, scheduler.set_begin_index

    @functools.wraps(set_timesteps)  # pipelines inspect its signature (LTX's retrieve_timesteps: does it take sigmas?)
    def set_timesteps_from(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        scheduler.timesteps = scheduler.timesteps[start:]
        set_begin_index(start)

    scheduler.set_timesteps = set_timesteps_from
    scheduler.set_begin_index = lambda begin_index=0: set_begin_index(start + begin_index)


def _capture_steps(scheduler, trajectory: dict, start: int) -> None:
    """Keep a copy of every scheduler step's output: trajectory[i + 1] = latents after step i (entering step i + 1)."""
    step = scheduler.step

    def step_and_keep(*args, **kwargs):
        out = step(*args, **kwargs)
        latents = out[0] if isinstance(out, tuple) else out.prev_sample
        trajectory[start + len(trajectory) + 1] = latents.detach().clone()
        return out

    scheduler.step = step_and_keep


def generate_group(
    loaded: LoadedPipeline,
    prompt: str,
    seed: int,
    arms: list[ArmSpec],
    generation: GenerationSpec,
    recording: RecordingSpec,
    *,
    reused: dict[str, ReusedBaseline] | None = None,
    reuse_chunk: Callable[[int, list[ArmSpec]], dict[str, ReusedUnit] | None] | None = None,
) -> list[ArmResult]:
    """Run every arm of one (prompt, seed) group; one ArmResult per arm, in the order given.

    Pipeline calls follow `group_plan`. The first baseline's trajectory is captured while it runs (or taken from
    `reused`, baselines generated elsewhere, e.g. jobs' baseline cache); with `generation.prefix_sharing` and a
    single-step scheduler (PREFIX_SCHEDULERS), an arm whose intervention starts at step s > 0 then runs only
    steps s.. from the baseline's latents entering step s, and its sink rows of steps < s are the baseline's:
    bit-identical to running it from step 0 on its own (tests/workers/test_sharing.py).

    `reuse_chunk(start step, chunk)`: asked before each pipeline call of intervened arms (e.g. jobs' unit cache);
    results for every arm of the chunk stand in for running it, None runs it. A chunk is reused whole or not at
    all: running part of a batch would change its GEMM shapes, so the rest would no longer be what it keys.
    """
    _maybe_inject_fault(prompt)
    if not arms:
        raise ValueError("generate_group needs at least one arm")
    names = [arm.name for arm in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate arm names in one group: {names}")
    reused = reused or {}
    unknown = sorted(set(reused) - {arm.name for arm in arms if arm.intervention is None})
    if unknown:
        raise ValueError(f"reused results given for {unknown}, which are not baseline arms of this group")
    loaded.check_layers(arms, recording)
    check_prompt_edits(loaded, arms)
    encodings: dict = {}  # one per distinct prompt edit of the group, made when a pipeline call needs it

    def encoding(edit: PromptEdit | None) -> EncodedPrompt:
        if edit not in encodings:  # a group whose every unit is reused runs no text encoder
            encodings[edit] = encode_prompt(loaded, prompt, generation, edit)
        return encodings[edit]

    latents = initial_latents(loaded, seed, *resolution(loaded, generation), num_frames(loaded, generation))
    results: dict[str, ArmResult] = {}
    baseline: ArmResult | None = None
    for arm in (a for a in arms if a.intervention is None):
        if baseline is not None and arm.name not in reused:
            # a second baseline arm is the same batch-1 computation: its result, not a second run
            results[arm.name] = dataclasses.replace(baseline, arm=arm.name, seconds=0.0, same_as=baseline.arm)
            continue
        if arm.name in reused:
            r = reused[arm.name]
            results[arm.name] = ArmResult(arm.name, r.image, r.sink_rows, 0.0, png=r.png, trajectory=r.trajectory,
                                          final_latents=r.final_latents, sigmas=r.sigmas)
        else:
            run = run_batch(loaded, encoding(None), [arm], seed, latents, generation, recording, capture_latents=True)
            results[arm.name] = ArmResult(arm.name, run.images[0], records_to_table(run.context.records), run.seconds,
                                          trajectory={0: latents, **run.trajectory}, final_latents=run.final_latents,
                                          sigmas=run.sigmas)
        baseline = baseline or results[arm.name]
    starts: dict[str, int] = {}
    if baseline is not None and generation.prefix_sharing and supports_prefix(loaded, generation):
        for arm in arms:
            step = start_step(arm, generation.steps, baseline.sigmas)
            if arm.intervention is not None and step > 0:
                if step not in baseline.trajectory:  # a reused baseline must hold what latents_needed names
                    raise ValueError(f"arm {arm.name} starts at step {step}, the baseline's latents hold steps "
                                     f"{sorted(baseline.trajectory)}")
                starts[arm.name] = step
    for step, chunk in group_plan(arms, generation, starts):
        if chunk[0].intervention is None:
            continue  # baselines: above
        hit = reuse_chunk(step, chunk) if reuse_chunk is not None else None
        if hit is not None:
            for arm in chunk:
                r = hit[arm.name]
                results[arm.name] = ArmResult(arm.name, r.image, r.sink_rows, 0.0, png=r.png, start_step=step)
            continue
        source = baseline.trajectory[step] if step else latents
        edit = prompt_edit(chunk[0])  # chunks never mix prompt edits (chunks())
        run = run_batch(loaded, encoding(edit), chunk, seed, source, generation, recording, start_step=step)
        prefix_rows = baseline.sink_rows.filter(pc.less(baseline.sink_rows.column("step"), step)) if step else None
        for arm, image in zip(chunk, run.images):
            rows = records_to_table([r for r in run.context.records if r.arm == arm.name])
            if prefix_rows is not None:
                rows = pa.concat_tables([prefix_rows, rows])
            results[arm.name] = ArmResult(arm=arm.name, image=image, sink_rows=rows, seconds=run.seconds / len(chunk),
                                          start_step=step)
    return [results[name] for name in names]
