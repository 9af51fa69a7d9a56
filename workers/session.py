"""Per-run state shared by the sink processors: who is in the batch, which step it is, what to record.

One `SinkSession` belongs to a loaded pipeline. Its processors stay installed for the pipeline's lifetime
and behave exactly like stock diffusers while no `RunContext` is active. A run (one pipeline call) sets a
`RunContext` holding one `ElementPlan` per batch element of the transformer call, so one batch can carry
several arms (each with its own intervention, branch and unit seed): the processors look every decision up
per element, never per batch position.

The step index comes from a forward pre-hook on the denoiser: the n-th denoiser call of a run is step n,
and its timestep is checked against `scheduler.timesteps[n]` (the paper instead set the step in a callback
that runs after the scheduler step, an off-by-one: paper-spec §5.2, §5.10).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Callable

import torch

from manifests.interventions import Intervention
from manifests.keys import TextKey
from manifests.schema import RecordingSpec


@dataclass(frozen=True)
class ElementPlan:
    """What one batch element of the transformer input does during a run."""

    arm: str
    branch: str  # "cond" | "uncond"
    intervention: Intervention | None
    unit_seed: int  # the group seed: random draws depend on it, never on the batch position
    t5_valid: tuple[bool, ...] | None = None  # per T5 slot, True for a real token; None: T5 absent (all padding)
    text_keys: tuple[TextKey, ...] = ()  # the element's text keys in canonical order [CLIP | T5] (what the encoders saw)


@dataclass(frozen=True)
class LayerInfo:
    """How one attention module is addressed: its name, its integer index (if integers address it), its record id."""

    name: str  # module name, e.g. "transformer_blocks.12.attn"
    block_index: int | None  # the integer that `layers: [i]` matches; None: reachable by glob only
    layer_id: int  # the `layer` column of the sink record: block_index, else a stable id ≥ the integer-addressable count


@dataclass
class CallRecord:
    """Statistics of one (step, layer, batch element), kept as device tensors until the run ends."""

    arm: str
    branch: str
    element: int
    step: int
    timestep: float
    sigma: float
    layer: int
    layer_name: str
    heads: int
    num_image: int
    num_clip: int
    t5_valid: tuple[bool, ...] | None
    topk_idx: torch.Tensor | None  # [H, k]
    topk_mass: torch.Tensor | None  # [H, k]
    max_mass: torch.Tensor | None  # [H]
    entropy: torch.Tensor | None  # [H]
    top5: torch.Tensor | None  # [H]
    selected: torch.Tensor | None  # [H, n]
    removed_mass_after: torch.Tensor | None  # [H]
    sink_ratio: torch.Tensor | None = None  # [H] top-1 mass / mean mass of the layer's keys (a random key's expectation)
    sink_ratio_median: torch.Tensor | None = None  # [H] top-1 mass / median key mass (a typical key)
    text_keys: tuple[TextKey, ...] = ()
    image_size: tuple[int, int] | None = None  # generated (height, width): lays the image keys out on their grid
    frames: int = 1


@dataclass
class RunContext:
    elements: list[ElementPlan]
    recording: RecordingSpec | None
    num_clip_tokens: int = 77
    image_size: tuple[int, int] | None = None  # (height, width) of the generated image
    frames: int = 1  # latent frames of a video model (image keys are frames × rows × cols)
    max_chunk_bytes: int = 64 << 20
    step: int = -1  # the current step (absolute: a run that starts at step s counts from s)
    start_step: int = 0  # > 0: the pipeline runs only steps start_step.. (prefix sharing, workers.generate._run_from)
    timestep: float = math.nan
    sigma: float = math.nan
    num_text_tokens: int | None = None  # text tokens of the current denoiser call (Flux single blocks need it)
    active_steps: list[frozenset[int] | None] = field(default_factory=list)  # per element
    records: list[CallRecord] = field(default_factory=list)
    probe: Callable | None = None  # workers.verify: called with every intervened call's tensors (None in normal runs)
    # the elements the current denoiser call carries, when the pipeline calls the denoiser once per CFG branch
    # (Qwen-Image's true CFG, WanPipeline's CFG: SinkSession.track_cfg_calls); None: every call carries all elements
    call_elements: list[int] | None = None

    def batch_elements(self) -> list[int]:
        """The element index of each batch row of the denoiser call in progress."""
        return list(range(len(self.elements))) if self.call_elements is None else self.call_elements

    def intervention_active(self, element: int, layer_name: str, block_index: int | None) -> Intervention | None:
        """The element's intervention if it acts at this layer, branch and step, else None."""
        plan = self.elements[element]
        iv = plan.intervention
        if iv is None or not iv.acts_on_attention or (iv.cfg_branch != "both" and iv.cfg_branch != plan.branch):
            return None
        if not layer_matches(iv.layers, layer_name, block_index):
            return None
        steps = self.active_steps[element]
        if steps is not None and self.step not in steps:
            return None
        return iv

    def records_layer(self, element: int, layer_name: str, block_index: int | None) -> bool:
        rec = self.recording
        return (
            rec is not None
            and self.elements[element].branch in rec.branches
            and layer_matches(rec.layers, layer_name, block_index)
        )

    def wants(self, layer_name: str, block_index: int | None) -> bool:
        """Whether any element records or intervenes at this layer and step (cheap; lets processors skip work)."""
        return any(
            self.records_layer(e, layer_name, block_index) or self.intervention_active(e, layer_name, block_index) is not None
            for e in range(len(self.elements))
        )


def layer_matches(layers: list[int | str], layer_name: str, block_index: int | None) -> bool:
    """Integers match a module's block index (see LayerInfo); strings are globs on module names."""
    for layer in layers:
        if isinstance(layer, int):
            if block_index is not None and layer == block_index:
                return True
        elif fnmatch(layer_name, layer):
            return True
    return False


class SinkSession:
    """Holds the active RunContext and keeps its step counter in sync with the denoiser calls.

    `timestep_scale`, `timestep_offset`: `scheduler.timesteps` = scale · (the denoiser's timestep) + offset
    (Flux's pipeline passes t / 1000; Z-Image's (1000 − t) / 1000).
    """

    def __init__(self, pipe, timestep_scale: float = 1.0, timestep_offset: float = 0.0):
        self.pipe = pipe
        self.context: RunContext | None = None
        self.timestep_scale = timestep_scale
        self.timestep_offset = timestep_offset  # Z-Image passes (1000 − t) / 1000: scale −1000, offset 1000
        denoiser = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
        self._hook = denoiser.register_forward_pre_hook(self._on_transformer_call, with_kwargs=True)
        self._split_cfg = False
        self._call_branch: str | None = None

    def track_cfg_calls(self, denoiser) -> None:
        """For pipelines that call the denoiser once per CFG branch inside `denoiser.cache_context("cond" | "uncond")`
        (Qwen-Image, Wan): read the branch of each call from that context, so a step is counted once (at its "cond"
        call, which the pipeline makes first) and each call is given the run's elements of its branch."""
        inner = denoiser.cache_context
        session = self

        @contextlib.contextmanager
        def cache_context(name: str, **kwargs):
            session._call_branch = name
            try:
                with inner(name, **kwargs):
                    yield
            finally:
                session._call_branch = None

        denoiser.cache_context = cache_context
        self._split_cfg = True

    def _branch_elements(self, ctx: RunContext) -> tuple[list[int] | None, bool]:
        """(elements of this call, whether it starts a new step)."""
        if not self._split_cfg:
            return None, True
        branch = self._call_branch
        if branch not in ("cond", "uncond"):
            raise RuntimeError(f"a denoiser call outside a cond / uncond cache_context (got {branch!r}); cannot tell its branch")
        elements = [e for e, plan in enumerate(ctx.elements) if plan.branch == branch]
        if not elements:
            raise RuntimeError(f"a {branch} denoiser call, but the run plans no {branch} elements")
        return elements, branch == "cond"

    def _on_transformer_call(self, module, args, kwargs):
        ctx = self.context
        if ctx is None:
            return None
        scheduler = self.pipe.scheduler
        ctx.call_elements, new_step = self._branch_elements(ctx)
        planned = len(ctx.batch_elements())
        batch = kwargs.get("hidden_states", kwargs.get("sample", kwargs.get("x", args[0] if args else None)))
        size = len(batch) if isinstance(batch, list) else None if batch is None else batch.shape[0]  # Z-Image: a list
        if size is not None and size != planned:
            raise RuntimeError(f"transformer batch of {size} but the run plans {planned} elements for this call")
        context = kwargs.get("encoder_hidden_states")
        ctx.num_text_tokens = None if context is None else int(context.shape[1])
        if not new_step:  # the uncond call of a step whose cond call was counted
            return None
        ctx.step += 1
        step = ctx.step
        local = step - ctx.start_step  # index into the timesteps this call iterates over (a prefix run's are cut)
        if local >= len(scheduler.timesteps):
            raise RuntimeError(
                f"transformer call {local + 1} exceeds the scheduler's {len(scheduler.timesteps)} timesteps "
                "(extra transformer calls per step, e.g. skip-layer guidance or Flux true CFG, are not supported)"
            )
        expected = float(scheduler.timesteps[local])
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        # reading a device tensor waits for the GPU: check it once per run there, every step on the CPU
        if timestep is not None and (timestep.device.type == "cpu" or local == 0):
            got = float(timestep.flatten()[0]) * self.timestep_scale + self.timestep_offset
            # the pipeline may cast t to the model dtype first (Flux: bf16), so allow that rounding
            tol = max(1e-5, 4 * torch.finfo(timestep.dtype).eps) if timestep.is_floating_point() else 1e-5
            if not math.isclose(got, expected, rel_tol=tol, abs_tol=1e-4):
                raise RuntimeError(f"transformer call {step} got timestep {got}, scheduler expects {expected}")
        ctx.timestep = expected
        ctx.sigma = float(scheduler.sigmas[step])
        if local == 0:
            num_steps = len(scheduler.timesteps) + ctx.start_step
            sigmas = [float(s) for s in scheduler.sigmas[:num_steps]]
            ctx.active_steps = [
                None
                if plan.intervention is None or plan.intervention.step_window is None
                else frozenset(plan.intervention.step_window.active_steps(num_steps, sigmas))
                for plan in ctx.elements
            ]
        return None

    def close(self) -> None:
        self._hook.remove()
