"""The sweep file schema (pydantic). Every field a sweep.yaml may hold is declared here, nothing else.

Checks that need more than one block (layer indices against the model, k against the token count)
live in `Sweep._cross_checks`, so every mistake is reported before anything runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from manifests.interventions import PRESETS, Intervention, resolve_preset
from manifests.models import HUB_GEOMETRY, PRESET_GEOMETRY, Geometry, geometry_from_folder
from manifests.prompts import BUNDLED_SETS

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # safe as a path component and a shell word


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Exactly one of preset (random-weight model), hub_id (Hugging Face cache) or path (local folder)."""

    preset: str | None = Field(
        None, description=f"random-weight model built offline (tiny ones for tests; sd3-medium-random: real shapes, "
        f"for cost measurement only): {', '.join(PRESET_GEOMETRY)}",
    )
    hub_id: str | None = Field(None, description="Hugging Face repo id, resolved through the normal cache")
    path: str | None = Field(None, description="local diffusers folder")
    revision: str | None = None
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    device: str | None = Field(None, description="torch device; default cuda if available else cpu")
    load_t5: bool = Field(True, description="load SD3's T5 encoder (False: 256 zero tokens, as the paper's variant without T5)")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        given = [n for n in ("preset", "hub_id", "path") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of preset, hub_id or path (got {given or 'none'})")
        if self.preset is not None and self.preset not in PRESET_GEOMETRY:
            raise ValueError(f"unknown model preset {self.preset!r}; expected one of {', '.join(PRESET_GEOMETRY)}")
        return self

    def geometry(self) -> Geometry | None:
        if self.preset:
            return PRESET_GEOMETRY[self.preset]
        if self.hub_id:
            return HUB_GEOMETRY.get(self.hub_id)
        return geometry_from_folder(Path(self.path))

    @property
    def label(self) -> str:
        return self.preset or self.hub_id or str(self.path)


class PromptSpec(_Strict):
    """A bundled set or a file, optionally sliced. Slicing keeps each prompt's id (its position in the set)."""

    set: str | None = Field(None, description=f"bundled set: {', '.join(BUNDLED_SETS)}")
    file: str | None = Field(None, description=".txt (one prompt per line) or .jsonl with a 'prompt' field; relative to the sweep file")
    start: int = Field(0, ge=0)
    limit: int | None = Field(None, ge=1)
    ids: list[int] | None = Field(None, description="explicit prompt ids (positions in the set)")
    tags: list[str] | None = Field(None, description="keep only prompts with these GenEval tags")

    @model_validator(mode="after")
    def _one_source(self) -> "PromptSpec":
        if (self.set is None) == (self.file is None):
            raise ValueError("give exactly one of `set` (a bundled prompt set) or `file`")
        if self.set is not None and self.set not in BUNDLED_SETS:
            raise ValueError(f"unknown prompt set {self.set!r}; expected one of {', '.join(BUNDLED_SETS)}")
        if self.ids is not None and (self.start or self.limit):
            raise ValueError("give either `ids` or `start`/`limit`, not both")
        return self


class SeedSpec(_Strict):
    base: int = Field(42, ge=0, description="seed of seed_index 0 of prompt 0")
    count: int = Field(1, ge=1, le=10_000)
    stride: int = Field(1_000_000, ge=1, description="seed = base + prompt_id + seed_index * stride")

    def seed(self, prompt_id: int, seed_index: int) -> int:
        return self.base + prompt_id + seed_index * self.stride


class GenerationSpec(_Strict):
    steps: int = Field(20, ge=1, le=1000)
    guidance: float = Field(7.0, ge=0.0)
    height: int | None = Field(None, ge=16, description="pixels; default: the model's native resolution")
    width: int | None = Field(None, ge=16)
    scheduler: Literal["default", "flow_euler", "flow_dpmpp"] = Field(
        "default", description="default = the pipeline's own; flow_* are valid flow-matching samplers (paper bug §5.11 avoided)"
    )
    max_sequence_length: int = Field(256, ge=1, le=512)
    arms_per_batch: int = Field(
        1, ge=1, le=64,
        description="arms of one (prompt, seed) group run in one batched forward (1: one after another). "
        "Changes GEMM shapes, so pixels match the unbatched path only within the dtype's tolerance; part of the config hash.",
    )


class RecordingSpec(_Strict):
    """What the per-step sink recorder computes. Only what is asked for is computed."""

    layers: list[int | str] = Field(
        default_factory=list, description="block indices, or glob patterns on attention-module names, to record (empty: none)"
    )
    topk: int = Field(5, ge=1, le=64)
    stats: list[Literal["mass", "entropy", "top5"]] = Field(default_factory=lambda: ["mass", "entropy", "top5"])
    branches: list[Literal["cond", "uncond"]] = Field(default_factory=lambda: ["cond", "uncond"])
    mass_queries: Literal["image", "all"] = "image"
    top5_query_stride: int = Field(
        1, ge=1, le=64,
        description="top-5 concentration over every n-th query of the range (1: all queries, exact); n > 1 estimates "
        "the same mean from a regular 1/n subsample at about 1/n of the top-5 cost (mass and entropy stay exact)",
    )

    @field_validator("layers")
    @classmethod
    def _unique(cls, v: list[int | str]) -> list[int | str]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate layer indices {v}")
        if any(isinstance(x, int) and x < 0 for x in v):
            raise ValueError(f"layer indices must be ≥ 0, got {v}")
        return sorted(x for x in v if isinstance(x, int)) + [x for x in v if isinstance(x, str)]


class ShardingSpec(_Strict):
    prompts_per_shard: int = Field(8, ge=1)


class LocalExecutorConfig(_Strict):
    kind: Literal["local"] = "local"
    workers: int | None = Field(None, ge=1, description="parallel workers; default one per visible GPU, else 1")
    threads_per_worker: int | None = Field(
        None, ge=0,
        description="CPU threads of each worker (torch intra-op, OpenMP, MKL), so workers on one host do not contend. "
        "Default: this machine's CPUs split evenly among the workers when there are several, torch's own default "
        "with one; 0: torch's own default always (every worker sizes its pools for the whole host)",
    )


class SlurmExecutorConfig(_Strict):
    kind: Literal["slurm"]
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_task: int = Field(1, ge=0)
    cpus_per_task: int = Field(8, ge=1)
    mem: str | None = Field(None, description="e.g. '64G'")
    time: int = Field(60, ge=1, description="minutes per shard job")
    constraint: str | None = None
    array_parallelism: int = Field(64, ge=1)
    max_array_size: int | None = Field(None, ge=1, description="default: MaxArraySize from `scontrol show config`")
    setup: list[str] = Field(default_factory=list, description="shell lines run before the job (module load ...)")
    sbatch_extra: dict[str, str] = Field(default_factory=dict)
    max_requeues: int = Field(3, ge=0)


class RayExecutorConfig(_Strict):
    kind: Literal["ray"]
    address: str = Field(
        "local",
        description="'local' (an in-process Ray; submit blocks), or a running cluster: 'auto', 'host:port', "
        "'ray://host:port' or the dashboard 'http://host:8265' (a detached Ray job; submit returns at once)",
    )
    num_gpus: float = Field(1, ge=0)
    num_cpus: float = Field(1, ge=0)
    max_retries: int = Field(3, ge=0)


ExecutorConfig = Annotated[
    Union[LocalExecutorConfig, SlurmExecutorConfig, RayExecutorConfig], Field(discriminator="kind")
]


METRICS = ("clip_t", "imagereward", "hpsv2", "lpips", "fid_shift", "toy_geneval")  # analysis.metrics registry (tested equal)


class AnalysisSpec(_Strict):
    metrics: list[Literal["clip_t", "imagereward", "hpsv2", "lpips", "fid_shift", "toy_geneval"]] = Field(default_factory=lambda: ["lpips"])
    baseline: str | None = Field(None, description="reference arm (default: the one arm without intervention)")
    bootstrap_resamples: int = Field(10_000, ge=100)
    bootstrap_seed: int = 0
    random_metric_weights: bool = Field(False, description="use random metric backbones (tests / demo only; labelled)")


class ArmSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    intervention: Intervention | None = None

    @field_validator("intervention", mode="before")
    @classmethod
    def _presets(cls, value: Any) -> Any:
        """Accept a preset name, or {preset: name, <field overrides>}."""
        if isinstance(value, str):
            return resolve_preset(value)
        if isinstance(value, dict) and "preset" in value:
            overrides = {k: v for k, v in value.items() if k != "preset"}
            base = resolve_preset(value["preset"]).model_dump(exclude_unset=False)
            return {**base, **overrides}
        return value


class Sweep(_Strict):
    """A whole experiment: model × prompts × seeds × arms, how to record, shard, execute and analyse."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    model: ModelSpec
    prompts: PromptSpec
    seeds: SeedSpec = SeedSpec()
    generation: GenerationSpec = GenerationSpec()
    arms: list[ArmSpec] = Field(min_length=1)
    recording: RecordingSpec = RecordingSpec()
    sharding: ShardingSpec = ShardingSpec()
    executor: ExecutorConfig = LocalExecutorConfig()
    analysis: AnalysisSpec = AnalysisSpec()
    output_root: str = Field("runs", description="run directories are created below it; relative to the current directory")

    @model_validator(mode="after")
    def _cross_checks(self) -> "Sweep":
        names = [a.name for a in self.arms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"arms: duplicate arm names {dupes}")
        if self.analysis.baseline is not None and self.analysis.baseline not in names:
            raise ValueError(f"analysis.baseline: {self.analysis.baseline!r} is not an arm name (arms: {names})")
        geo = self.model.geometry()
        height, width = self.resolution()
        if geo is not None and geo.family in ("sd3", "flux"):  # token-level checks need a joint [image | text] layout
            side = geo.vae_scale * geo.patch_size
            for label, px in (("height", height), ("width", width)):
                if px % side:
                    raise ValueError(f"generation.{label}: {px} is not a multiple of {side} (VAE scale × patch size)")
            for layer in self.recording.layers:
                if isinstance(layer, int) and layer >= geo.num_layers:
                    raise ValueError(
                        f"recording.layers: layer {layer} is outside the model ({self.model.label} has layers 0..{geo.num_layers - 1})"
                    )
            n_keys = geo.total_tokens(height, width)
            if geo.family == "flux":  # Flux's text length is the T5 sequence length the pipeline is called with
                n_keys = geo.image_tokens(height, width) + self.generation.max_sequence_length
            if self.recording.topk > n_keys:
                raise ValueError(f"recording.topk: {self.recording.topk} is larger than the {n_keys} keys of the model at {height}×{width}")
            for i, arm in enumerate(self.arms):
                iv = arm.intervention
                if iv is None:
                    continue
                where = f"arms[{i}] ({arm.name}).intervention"
                for layer in iv.layers:
                    if isinstance(layer, int) and layer >= geo.num_layers:
                        raise ValueError(
                            f"{where}.layers: layer {layer} is outside the model ({self.model.label} has layers 0..{geo.num_layers - 1})"
                        )
                budget = iv.k * (geo.heads if iv.selection in ("union_topk", "union_bottomk", "random_union") else 1)
                if iv.selection != "static" and budget >= n_keys:
                    raise ValueError(
                        f"{where}.k: k={iv.k} selects {budget} keys but the model has only {n_keys} keys at {height}×{width}"
                    )
                if iv.indices and max(iv.indices) >= n_keys:
                    raise ValueError(f"{where}.indices: index {max(iv.indices)} ≥ the {n_keys} keys of the model at {height}×{width}")
        return self

    def resolution(self) -> tuple[int, int]:
        geo = self.model.geometry()
        native = geo.default_resolution if geo else 1024
        return (self.generation.height or native, self.generation.width or native)

    def baseline_arm(self) -> str | None:
        if self.analysis.baseline:
            return self.analysis.baseline
        plain = [a.name for a in self.arms if a.intervention is None]
        return plain[0] if len(plain) == 1 else None


def known_presets() -> list[str]:
    return sorted(PRESETS)


def is_safe_name(value: str) -> bool:
    return re.match(NAME_PATTERN, value) is not None
