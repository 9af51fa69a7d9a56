"""The sweep file schema (pydantic). Every field a sweep.yaml may hold is declared here, nothing else.

Checks that need more than one block (layer indices against the model, k against the token count)
live in `Sweep._cross_checks`, so every mistake is reported before anything runs.
"""

from __future__ import annotations

import os
import re
import typing
import unicodedata
from fnmatch import fnmatch
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from manifests.interventions import PRESETS, Intervention, resolve_preset
from manifests.models import HUB_GEOMETRY, PRESET_GEOMETRY, Geometry, geometry_from_folder
from manifests.prompts import BUNDLED_SETS

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # safe as a path component and a shell word
MAX_SWEEP_NAME = 100  # the run directory is <name>-<hash8>: well under any file system's 255-byte limit
MAX_ARM_NAME = 64  # arm names end up in unit ids and image file names


def _one_line(value: str) -> str:
    """Values written into job scripts or command lines: no line breaks or other control characters."""
    bad = sorted({f"U+{ord(c):04X}" for c in value if unicodedata.category(c) in ("Cc", "Zl", "Zp")})
    if bad:
        raise ValueError(f"must be one line without control characters (found {', '.join(bad)})")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


OneLine = Annotated[str, AfterValidator(_one_line)]  # may be empty (a bare sbatch flag)
SingleLine = Annotated[str, AfterValidator(_one_line), AfterValidator(_not_blank)]
# A Slurm word (partition, account, qos): what `sinfo`/`sacctmgr` print; comma-separated lists allowed.
SlurmWord = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.,+-]+$", max_length=200)]

# sbatch options sinkscope sets itself (directly, through submitit, or through the executor fields of the same meaning):
# giving them again in `sbatch_extra` would break logs, array indexing or the job's resources.
# orchestrate.executors.slurm refuses the same set at submit time (tested equal).
RESERVED_SBATCH_OPTIONS = {
    "array": "a", "output": "o", "error": "e", "open-mode": None, "signal": None, "wrap": None, "parsable": None,
    "job-name": "J", "export": None, "partition": "p", "account": "A", "qos": "q", "time": "t", "mem": None,
    "constraint": "C", "cpus-per-task": "c", "gpus-per-task": None, "ntasks-per-node": None,
    "nodes": "N", "wckey": None,  # submitit writes these two into every job script
}
_SBATCH_SHORT = {short: long for long, short in RESERVED_SBATCH_OPTIONS.items() if short}


def _admits_number(annotation) -> bool:
    return annotation in (int, float) or any(_admits_number(arg) for arg in typing.get_args(annotation))


def _admits_bool(annotation) -> bool:
    if annotation is bool or annotation is Any:
        return True
    return any(_admits_bool(arg) for arg in typing.get_args(annotation))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        """pydantic reads `steps: true` as 1: a YAML true/false where a number belongs is a mistake, not 1 or 0."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if isinstance(value, bool) and field is not None and _admits_number(field.annotation) and not _admits_bool(field.annotation):
                    raise ValueError(f"`{name}` expects a number, got a boolean ({str(value).lower()})")
        return data


class ModelSpec(_Strict):
    """Exactly one of preset (random-weight model), hub_id (Hugging Face cache) or path (local folder)."""

    preset: str | None = Field(
        None, description=f"random-weight model built offline (tiny ones for tests; sd3-medium-random: real shapes, "
        f"for cost measurement only): {', '.join(PRESET_GEOMETRY)}",
    )
    hub_id: SingleLine | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=200,
        description="Hugging Face repo id (owner/name), resolved through the normal cache",
    )
    path: SingleLine | None = Field(None, description="local diffusers folder (checked at plan time: exists, readable)")
    revision: SingleLine | None = None
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    device: str | None = Field(
        None, pattern=r"^(cpu|cuda|mps|xpu)(:[0-9]+)?$", description="torch device; default cuda if available else cpu"
    )
    load_t5: bool = Field(True, description="load SD3's T5 encoder (False: 256 zero tokens, as the paper's variant without T5)")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        given = [n for n in ("preset", "hub_id", "path") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of preset, hub_id or path (got {given or 'none'})")
        if self.preset is not None and self.preset not in PRESET_GEOMETRY:
            from manifests.suggest import closest_key

            hint = closest_key(self.preset, list(PRESET_GEOMETRY))
            meant = f"; did you mean {hint!r}?" if hint else ""
            raise ValueError(f"unknown model preset {self.preset!r}{meant} (expected one of {', '.join(PRESET_GEOMETRY)})")
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
    file: SingleLine | None = Field(
        None, description=".txt (one prompt per line) or .jsonl with a 'prompt' field; relative to the sweep file"
    )
    start: int = Field(0, ge=0, le=10_000_000)
    limit: int | None = Field(None, ge=1, le=10_000_000)
    ids: list[Annotated[int, Field(ge=0, le=10_000_000)]] | None = Field(
        None, max_length=20_000, description="explicit prompt ids (positions in the set; in a file, line number − 1)"
    )
    tags: list[str] | None = Field(None, max_length=100, description="keep only prompts with these GenEval tags")

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
    # bounds keep base + prompt_id + (count − 1) · stride inside int64 (the manifest's seed column, torch.Generator)
    base: int = Field(42, ge=0, le=2**62, description="seed of seed_index 0 of prompt 0")
    count: int = Field(1, ge=1, le=10_000)
    stride: int = Field(1_000_000, ge=1, le=2**48, description="seed = base + prompt_id + seed_index * stride")

    def seed(self, prompt_id: int, seed_index: int) -> int:
        return self.base + prompt_id + seed_index * self.stride


class GenerationSpec(_Strict):
    steps: int = Field(20, ge=1, le=1000)
    guidance: float = Field(7.0, ge=0.0, le=100.0, description="classifier-free guidance scale (finite, 0..100)")
    height: int | None = Field(None, ge=16, le=8192, description="pixels; default: the model's native resolution")
    width: int | None = Field(None, ge=16, le=8192)
    num_frames: int | None = Field(
        None, ge=1, le=1025,
        description="video models only (Wan: 4k+1, LTX-Video: 8k+1, the VAE's temporal compression); default: the model's "
        "own. A video unit is stored as one frame-strip PNG (jobs.runformat.frame_strip)",
    )
    scheduler: Literal["default", "flow_euler", "flow_dpmpp"] = Field(
        "default", description="default = the pipeline's own; flow_* are valid flow-matching samplers (paper bug §5.11 avoided)"
    )
    max_sequence_length: int = Field(256, ge=1, le=512)
    arms_per_batch: int = Field(
        1, ge=1, le=64,
        description="arms of one (prompt, seed) group run in one batched forward (1: one after another). "
        "Changes GEMM shapes, so pixels match the unbatched path only within the dtype's tolerance; part of the config hash. "
        "Baselines always run alone (batch 1).",
    )
    compile: Literal["none", "inductor"] = Field(
        "none",
        description="inductor: torch.compile the denoiser (attention processors stay eager) for every arm of the run, "
        "≈1.2× the images per hour on an H200 (benchmarks/RESULTS.md). Opt-in: fused kernels round differently from "
        "stock, so images differ from compile: none within the dtype's tolerance; part of the config hash and of the "
        "baseline cache key",
    )
    prefix_sharing: bool = Field(
        True,
        description="an arm whose intervention starts at step s > 0 runs only steps s.. from the group baseline's latents "
        "entering step s (single-step schedulers: the default flow-matching Euler); bit-identical to running it from step 0 "
        "at arms_per_batch 1. Part of the config hash (with arms_per_batch > 1 it decides which arms share a batch)",
    )
    torch_threads: int = Field(
        1, ge=1, le=256,
        description="torch CPU threads of every shard, whatever executor or node runs it: CPU kernels reduce in an "
        "order that depends on the thread count, so pixels computed on a CPU change with it. Only bounds CPU-side "
        "work on a GPU. Part of the config hash.",
    )


class RecordingSpec(_Strict):
    """What the per-step sink recorder computes. Only what is asked for is computed."""

    layers: list[int | SingleLine] = Field(
        default_factory=list, max_length=1000,
        description="block indices, or glob patterns on attention-module names, to record (empty: none)",
    )
    topk: int = Field(5, ge=1, le=64)
    stats: list[Literal["mass", "entropy", "top5", "ratio"]] = Field(
        default_factory=lambda: ["mass", "entropy", "top5"],
        description="mass: top-k keys and masses (and the top-1 sink's identity and region); entropy; top5: top-5 "
        "concentration; ratio: sink-to-random key-importance ratios (top-1 mass over the mean and the median key mass)",
    )
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


def sinkscope_cache_root() -> Path:
    """Where sinkscope keeps what it builds once for many runs (tokenizer files, the baseline cache):
    `$SINKSCOPE_CACHE`, else ~/.cache/sinkscope."""
    env = os.environ.get("SINKSCOPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sinkscope"


class CacheSpec(_Strict):
    """Reuse of generated units across runs (jobs.baseline_cache). Not part of the config hash: a reused unit
    is bit-identical to the one the run would generate."""

    baselines: str = Field(
        "auto",
        description="auto: $SINKSCOPE_CACHE/baselines (default ~/.cache/sinkscope/baselines); off: generate every "
        "baseline; or a folder (shared storage on a cluster). The environment variable SINKSCOPE_BASELINE_CACHE "
        "(off | a folder) overrides it",
    )
    units: bool = Field(
        True,
        description="also reuse intervened units from the same cache (an arm whose model, settings, prompt, seed, "
        "recording, resolved intervention, batch and workers' code equal a cached one's); false: baselines only",
    )

    @field_validator("baselines", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        """YAML 1.1 reads an unquoted `off` (what the docs say to write) as false: take it as "off"."""
        return "off" if v is False else v


class ShardingSpec(_Strict):
    prompts_per_shard: int = Field(8, ge=1, le=100_000)


class LocalExecutorConfig(_Strict):
    kind: Literal["local"] = "local"
    workers: int | None = Field(None, ge=1, le=1024, description="parallel workers; default one per visible GPU, else 1")
    threads_per_worker: int | None = Field(
        None, ge=0, le=4096,
        description="CPU threads of each worker (torch intra-op, OpenMP, MKL), so workers on one host do not contend. "
        "Default: this machine's CPUs split evenly among the workers when there are several, torch's own default "
        "with one; 0: torch's own default always (every worker sizes its pools for the whole host)",
    )


class SlurmExecutorConfig(_Strict):
    kind: Literal["slurm"]
    partition: SlurmWord | None = None
    account: SlurmWord | None = None
    qos: SlurmWord | None = None
    gpus_per_task: int = Field(1, ge=0, le=64)
    cpus_per_task: int = Field(8, ge=1, le=1024)
    mem: str | None = Field(None, pattern=r"^[0-9]+[KMGT]?$", description="e.g. '64G' (sbatch --mem: a number, optional K/M/G/T)")
    time: int = Field(60, ge=1, le=525_600, description="minutes per shard job (at most a year)")
    constraint: SingleLine | None = Field(None, max_length=1000)
    array_parallelism: int = Field(64, ge=1, le=1_000_000)
    max_array_size: int | None = Field(None, ge=1, le=100_000_000, description="default: MaxArraySize from `scontrol show config`")
    setup: list[SingleLine] = Field(default_factory=list, description="shell lines run before the job (module load ...), one per item")
    sbatch_extra: dict[str, OneLine] = Field(
        default_factory=dict,
        description="more sbatch options, name -> value ('' or 'true' for a bare flag); options sinkscope sets itself are refused",
    )
    max_requeues: int = Field(3, ge=0, le=1000)

    @field_validator("sbatch_extra", mode="before")
    @classmethod
    def _extra_values_as_text(cls, value: Any) -> Any:
        """YAML reads `exclusive: true` or `nice: 10` as bool / int; sbatch takes them as text."""
        if isinstance(value, dict):
            return {k: ("" if v is None else str(v).lower() if isinstance(v, bool) else str(v) if isinstance(v, (int, float)) else v)
                    for k, v in value.items()}
        return value

    @field_validator("sbatch_extra")
    @classmethod
    def _extra_options(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            flag = key.lstrip("-")
            if not re.match(r"^[A-Za-z][A-Za-z0-9_-]*$", flag):
                raise ValueError(f"{key!r} is not an sbatch option name (letters, digits, '-' and '_', e.g. 'exclusive')")
            long = _SBATCH_SHORT.get(flag, flag.replace("_", "-").lower()) if len(flag) == 1 else flag.replace("_", "-").lower()
            if long in RESERVED_SBATCH_OPTIONS:
                field = {"cpus-per-task": "cpus_per_task", "gpus-per-task": "gpus_per_task", "time": "time", "mem": "mem",
                         "partition": "partition", "account": "account", "qos": "qos", "constraint": "constraint"}.get(long)
                instead = f"; use executor.{field} instead" if field else ""
                given = "" if key == long else f" (given as {key!r})"
                raise ValueError(f"--{long} is set by sinkscope itself{given} and cannot be given in sbatch_extra{instead}")
        return value


class RayExecutorConfig(_Strict):
    kind: Literal["ray"]
    address: SingleLine = Field(
        "local", max_length=500,
        description="'local' (an in-process Ray; submit blocks), or a running cluster: 'auto', 'host:port', "
        "'ray://host:port' or the dashboard 'http://host:8265' (a detached Ray job; submit returns at once)",
    )
    num_gpus: float = Field(1, ge=0, le=1024)
    num_cpus: float = Field(1, ge=0, le=4096)
    max_retries: int = Field(3, ge=0, le=1000)


ExecutorConfig = Annotated[
    Union[LocalExecutorConfig, SlurmExecutorConfig, RayExecutorConfig], Field(discriminator="kind")
]


METRICS = ("clip_t", "imagereward", "hpsv2", "lpips", "fid_shift", "toy_geneval")  # analysis.metrics registry (tested equal)


class AnalysisSpec(_Strict):
    metrics: list[Literal["clip_t", "imagereward", "hpsv2", "lpips", "fid_shift", "toy_geneval"]] = Field(default_factory=lambda: ["lpips"])
    baseline: str | None = Field(None, description="reference arm (default: the one arm without intervention)")
    bootstrap_resamples: int = Field(10_000, ge=100, le=10_000_000)
    bootstrap_seed: int = Field(0, ge=0, le=2**32 - 1)
    random_metric_weights: bool = Field(False, description="use random metric backbones (tests / demo only; labelled)")


class ArmSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=MAX_ARM_NAME)
    intervention: Intervention | None = None

    @field_validator("intervention", mode="before")
    @classmethod
    def _presets(cls, value: Any) -> Any:
        """Accept a preset name, or {preset: name, <field overrides>}."""
        if isinstance(value, str):
            return resolve_preset(value)
        if isinstance(value, dict) and "preset" in value:
            if not isinstance(value["preset"], str):
                raise ValueError(f"preset: expected a preset name, got {type(value['preset']).__name__}")
            overrides = {k: v for k, v in value.items() if k != "preset"}
            # only what the preset sets, so a field it leaves at its default is not "given" (see Intervention._consistent)
            base = resolve_preset(value["preset"]).model_dump(exclude_unset=True)
            return {**base, **overrides}
        return value


class ArmGridSpec(_Strict):
    """Arms generated from a grid: the product of `vary`'s lists, each laid over `base` (see manifests.compose)."""

    base: str | dict[str, Any] | None = Field(
        None, description="intervention fields every generated arm shares: a preset name, or {preset: ..., <fields>}"
    )
    vary: dict[str, list[Any]] = Field(
        min_length=1, description="intervention field -> list of values (a list of lists for `layers`); the grid is their product"
    )
    name: str | None = Field(
        None, max_length=MAX_ARM_NAME,
        description="arm name template with {field} placeholders of varied fields (default: derived from the varied values)",
    )

    @field_validator("vary")
    @classmethod
    def _non_empty(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [k for k, v in value.items() if not v]
        if empty:
            raise ValueError(f"{', '.join(empty)}: give at least one value to vary over")
        unknown = [k for k in value if k != "preset" and k not in Intervention.model_fields]
        if unknown:
            from manifests.suggest import unknown_key_message

            raise ValueError("; ".join(unknown_key_message(k, ["preset", *Intervention.model_fields]) for k in unknown))
        return value


class Sweep(_Strict):
    """A whole experiment: model × prompts × seeds × arms, how to record, shard, execute and analyse."""

    name: str = Field(pattern=NAME_PATTERN, max_length=MAX_SWEEP_NAME)
    description: str = Field("", max_length=10_000)
    model: ModelSpec
    prompts: PromptSpec
    seeds: SeedSpec = SeedSpec()
    generation: GenerationSpec = GenerationSpec()
    arms: list[ArmSpec] = Field(min_length=1, max_length=1000)
    arm_grid: list[ArmGridSpec] = Field(
        default_factory=list, max_length=0, exclude=True,  # always empty once validated: not part of any dump or hash
        description="arms generated from grids, appended to `arms` (docs/sweeps.md, Sweep composition). Expanded before "
        "validation (`_expand_grids`), so a validated Sweep holds the generated arms in `arms` and an empty `arm_grid`",
    )

    @model_validator(mode="before")
    @classmethod
    def _expand_grids(cls, data: Any) -> Any:
        """For callers that validate a mapping directly (parse_sweep expands first, to name grids in errors)."""
        if isinstance(data, dict) and data.get("arm_grid"):
            from manifests.compose import materialise_arm_grids

            try:
                return materialise_arm_grids(data)
            except (TypeError, AttributeError, KeyError) as e:  # a malformed grid (parse_sweep describes it key by key)
                raise ValueError(f"arm_grid: not a list of {{base, vary, name}} grids ({type(e).__name__}: {e})") from None
        return data
    recording: RecordingSpec = RecordingSpec()
    sharding: ShardingSpec = ShardingSpec()
    cache: CacheSpec = CacheSpec()
    executor: ExecutorConfig = LocalExecutorConfig()
    analysis: AnalysisSpec = AnalysisSpec()
    output_root: SingleLine = Field(
        "runs", max_length=1000,
        description="run directories are created below it; relative to the current directory (checked writable at plan time)",
    )

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
        if geo is not None and self.generation.num_frames is not None:
            problem = geo.frames_error(self.generation.num_frames)
            if problem:
                raise ValueError(f"generation.num_frames: {problem} ({self.model.label})")
        if geo is not None and geo.modules:
            self._check_patterns(geo)
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
                if iv is None or not iv.acts_on_attention:
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
        for i, arm in enumerate(self.arms):
            edit = arm.intervention.prompt if arm.intervention is not None else None
            why = edit.unsupported_reason(geo.family) if edit is not None and geo is not None else None
            if why:
                raise ValueError(f"arms[{i}] ({arm.name}).intervention.prompt: {why} ({self.model.label})")
            if edit is not None and edit.max_length and geo is not None and geo.clip_tokens and edit.applies_to("clip"):
                if edit.max_length > geo.clip_tokens:
                    raise ValueError(
                        f"arms[{i}] ({arm.name}).intervention.prompt.max_length: {edit.max_length} > CLIP's {geo.clip_tokens} "
                        "positions; limit the edit to T5 with `encoders: [t5]`"
                    )
        return self

    def _check_patterns(self, geo: Geometry) -> None:
        """Every layer glob must match an attention module of the model (known here for presets and the table's hub ids)."""
        def check(layers, where: str) -> None:
            for layer in layers:
                if isinstance(layer, str) and not any(fnmatch(name, layer) for name in geo.modules):
                    raise ValueError(
                        f"{where}: layer pattern {layer!r} matches no attention module of {self.model.label} "
                        f"(its attention modules: {', '.join(geo.modules[:3])}{', …' if len(geo.modules) > 3 else ''})"
                    )

        check(self.recording.layers, "recording.layers")
        for i, arm in enumerate(self.arms):
            if arm.intervention is not None:
                check(arm.intervention.layers, f"arms[{i}] ({arm.name}).intervention.layers")

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
