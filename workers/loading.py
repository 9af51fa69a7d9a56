"""Load a diffusers pipeline for a ModelSpec (preset, hub id through the normal HF cache, or local folder), move
it to its device and dtype, and install the sink processors once.

Presets: the tiny ones (workers.tiny, random weights) are built on the CPU in fp32 and moved, as is the trained
toy model `toy-sd3` (workers.toy, weights shipped in the package, labelled manifests.models.TOY_NOTE); the real-scale ones
(workers.scale_presets, e.g. sd3-medium-random, for cost measurement only) are built directly on the device
in the target dtype.

Families: "sd3" (SD3 / SD3.5), "sdxl", "flux" (FLUX.1), "pixart" (PixArt-Σ and PixArt-α), "qwen_image" (Qwen-Image),
"z_image" (Z-Image), "wan" (Wan 2.1 text-to-video), "ltx" (LTX-Video), chosen by the pipeline class.
The stock processors are kept (`LoadedPipeline.stock_processors`) so `workers.verify` can swap them back in
for a reference run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import torch

from manifests.models import MODEL_NOTES, PRESET_GEOMETRY, Geometry
from manifests.schema import ArmSpec, ModelSpec, RecordingSpec
from workers.processors import install_flux_processors, install_pixart_processors, install_sd3_processors, install_sdxl_processors
from workers.processors.common import MASS_SELECTIONS, denoiser_processors
from workers.processors.ltx import install_ltx_processors
from workers.processors.qwen_image import install_qwen_image_processors
from workers.processors.wan import install_wan_processors
from workers.processors.z_image import install_z_image_processors
from workers.session import LayerInfo, SinkSession, layer_matches

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelNotAvailableError(FileNotFoundError):
    """The weights are not on this machine. Workers never download: fetch them beforehand."""


@dataclass
class LoadedPipeline:
    pipe: object  # diffusers StableDiffusion3Pipeline, StableDiffusionXLPipeline, FluxPipeline or PixArtSigmaPipeline
    family: str  # "sd3" | "sdxl" | "flux" | "pixart" | "qwen_image" | "z_image"
    random_weights: bool
    geometry: Geometry  # measured on the loaded model, not taken from the manifests table
    description: str
    device: str
    dtype: torch.dtype
    session: SinkSession
    attention_layers: list[str]  # module names the processors are installed on, e.g. "transformer_blocks.3.attn"
    layers: list[LayerInfo] = field(default_factory=list)  # the same modules: integer index and record id of each
    stock_processors: dict = field(default_factory=dict)  # "<module>.processor" -> diffusers' own processor
    text_query_layers: tuple[str, ...] = ()  # modules whose queries are all text (Z-Image's caption refiner)

    @property
    def denoiser(self):
        return self.pipe.unet if self.family == "sdxl" else self.pipe.transformer

    def layer_name(self, layer_id: int) -> str:
        """The module name behind a sink record's `layer` value."""
        for info in self.layers:
            if info.layer_id == layer_id:
                return info.name
        raise KeyError(f"no attention module of {self.description} has layer id {layer_id}")

    def check_layers(self, arms: list[ArmSpec], recording: RecordingSpec) -> None:
        """Fail early, naming the offender, if a layer index or glob does not exist in this model."""
        last = self.geometry.num_layers - 1

        def check(layer, where: str) -> None:
            if isinstance(layer, int) and layer > last:
                raise ValueError(f"{where} layer {layer} is outside {self.description} (layers 0..{last})")
            if isinstance(layer, str) and not any(fnmatch(name, layer) for name in self.attention_layers):
                raise ValueError(
                    f"{where} layer pattern {layer!r} matches no attention module of {self.description} "
                    f"(e.g. {', '.join(self.attention_layers[:3])})"
                )

        for layer in recording.layers:
            check(layer, "recording.layers:")
        for arm in arms:
            if arm.intervention is not None and arm.intervention.acts_on_attention:
                for layer in arm.intervention.layers:
                    check(layer, f"arm {arm.name!r}: intervention")
        self._check_text_query_layers(arms, recording)

    def _check_text_query_layers(self, arms: list[ArmSpec], recording: RecordingSpec) -> None:
        """Mass over image queries is undefined where a layer has text queries only: refuse it before any work."""
        def reached(layers) -> list[str]:
            return [info.name for info in self.layers if info.name in self.text_query_layers
                    and layer_matches(list(layers), info.name, info.block_index)]

        hint = "it has text queries only; identify over `mass_queries: all` (or text)"
        if recording.stats and recording.mass_queries == "image" and (hit := reached(recording.layers)):
            raise ValueError(f"recording.layers reach {hit[0]} of {self.description}: {hint} (recording.mass_queries)")
        for arm in arms:
            iv = arm.intervention
            if iv is not None and iv.acts_on_attention and iv.selection in MASS_SELECTIONS and iv.mass_queries == "image":
                if hit := reached(iv.layers):
                    raise ValueError(f"arm {arm.name!r}: intervention.layers reach {hit[0]} of {self.description}: {hint}")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


_PIPELINE_FAMILY = {
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux",
    "PixArtSigmaPipeline": "pixart",
    "PixArtAlphaPipeline": "pixart",
    "WanPipeline": "wan",
    "LTXPipeline": "ltx",
    "QwenImagePipeline": "qwen_image",
    "ZImagePipeline": "z_image",
}


def _not_available(model: ModelSpec, exc: Exception) -> ModelNotAvailableError:
    if model.path is not None:
        return ModelNotAvailableError(f"could not load the diffusers folder {model.path}: {exc}")
    revision = f" --revision {model.revision}" if model.revision else ""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return ModelNotAvailableError(
        f"model {model.hub_id!r}{' @ ' + model.revision if model.revision else ''} is not available in the Hugging Face "
        f"cache ({cache}). Workers do not download weights; fetch them beforehand on a machine with network access:\n"
        f"    huggingface-cli download {model.hub_id}{revision}     (or: hf download {model.hub_id}{revision})\n"
        f"gated models need `huggingface-cli login` and accepting the license first; or set model.path to a local "
        f"diffusers folder. Underlying error: {type(exc).__name__}: {exc}"
    )


def _pipeline_class_name(model: ModelSpec) -> str:
    """The `_class_name` of model_index.json, from the local folder or the HF cache (never the network)."""
    from diffusers import DiffusionPipeline

    if model.path is not None:
        index = Path(model.path) / "model_index.json"
        if not index.is_file():
            raise ModelNotAvailableError(f"model.path {model.path} is not a diffusers folder (no model_index.json)")
        return json.loads(index.read_text()).get("_class_name", "")
    try:
        return DiffusionPipeline.load_config(model.hub_id, revision=model.revision).get("_class_name", "")
    except (OSError, ValueError) as exc:
        raise _not_available(model, exc) from exc


def _from_pretrained(model: ModelSpec, dtype: torch.dtype):
    import diffusers

    class_name = _pipeline_class_name(model)
    family = _PIPELINE_FAMILY.get(class_name)
    if family is None:
        raise ValueError(f"{model.label}: pipeline class {class_name!r} is not supported (supported: {', '.join(_PIPELINE_FAMILY)})")
    if not model.load_t5 and family in ("flux", "pixart", "qwen_image", "z_image", "wan", "ltx"):
        raise ValueError(f"{model.label}: load_t5=false is only possible for SD3 ({class_name} conditions on T5 alone)")
    pipeline_class = getattr(diffusers, class_name)
    source = model.hub_id or model.path
    kwargs = {"dtype": dtype, "revision": model.revision}
    try:
        if family == "sd3" and not model.load_t5:
            kwargs.update(text_encoder_3=None, tokenizer_3=None)
        if family == "sdxl" and dtype == torch.float16:  # SDXL repos ship an fp16 variant (the paper loads it)
            try:
                return pipeline_class.from_pretrained(source, variant="fp16", **kwargs), family
            except (OSError, ValueError):
                pass  # fall back to the main files
        return pipeline_class.from_pretrained(source, **kwargs), family
    except (OSError, ValueError) as exc:
        raise _not_available(model, exc) from exc


def _measured_geometry(pipe, family: str, random_weights: bool) -> Geometry:
    if family in ("wan", "ltx"):
        return _measured_video_geometry(pipe, family, random_weights)
    common = dict(vae_scale=pipe.vae_scale_factor, random_weights=random_weights)
    if family == "sdxl":
        unet = pipe.unet
        cross = [m for n, m in unet.named_modules() if n.endswith(".attn2")]
        return Geometry(
            family="sdxl", num_layers=len(cross), heads=unet.mid_block.attentions[0].transformer_blocks[0].attn2.heads,
            patch_size=1, clip_tokens=pipe.tokenizer.model_max_length, t5_tokens=0,
            default_resolution=pipe.default_sample_size * pipe.vae_scale_factor, **common,
        )
    cfg = pipe.transformer.config
    if family == "flux":  # 2×2 latent packing acts as patch size 2; CLIP is pooled only, T5 is the text sequence
        return Geometry(
            family="flux", num_layers=cfg.num_layers + cfg.num_single_layers, heads=cfg.num_attention_heads, patch_size=2,
            clip_tokens=0, t5_tokens=512, default_resolution=pipe.default_sample_size * pipe.vae_scale_factor, **common,
        )
    if family == "pixart":  # cross-attention keys are the T5 tokens (the pipeline's default: Σ 300, α 120)
        t5_tokens = 120 if type(pipe).__name__ == "PixArtAlphaPipeline" else 300
        return Geometry(
            family="pixart", num_layers=cfg.num_layers, heads=cfg.num_attention_heads, patch_size=cfg.patch_size,
            clip_tokens=0, t5_tokens=t5_tokens, default_resolution=cfg.sample_size * pipe.vae_scale_factor, **common,
        )
    if family == "qwen_image":  # 2×2 latent packing (patch size 2); the text is the prompt's Qwen2.5-VL tokens, ≤ 1024
        return Geometry(
            family="qwen_image", num_layers=cfg.num_layers, heads=cfg.num_attention_heads, patch_size=cfg.patch_size,
            clip_tokens=0, t5_tokens=pipe.tokenizer_max_length, default_resolution=pipe.default_sample_size * pipe.vae_scale_factor,
            **common,
        )
    if family == "z_image":  # single stream [image | caption]; caption = the prompt's Qwen3 tokens, padded to 32s; 1024 px
        return Geometry(
            family="z_image", num_layers=cfg.n_layers, heads=cfg.n_heads, patch_size=cfg.all_patch_size[0], clip_tokens=0,
            t5_tokens=512, default_resolution=getattr(pipe, "default_sample_size", 128) * pipe.vae_scale_factor, **common,
        )
    return Geometry(
        family="sd3", num_layers=cfg.num_layers, heads=cfg.num_attention_heads, patch_size=cfg.patch_size,
        clip_tokens=pipe.tokenizer_max_length, t5_tokens=256, default_resolution=pipe.default_sample_size * pipe.vae_scale_factor,
        **common,
    )


def _measured_video_geometry(pipe, family: str, random_weights: bool) -> Geometry:
    """Video pipelines name their VAE factors per axis (spatial, temporal) and have no default sample size (a tiny
    preset sets `default_sample_size` / `default_num_frames` on its pipeline). Cross-attention keys are the T5 tokens
    at the pipeline's default length (Wan: UMT5 × 512; LTX-Video: T5 × 128, padding masked)."""
    cfg = pipe.transformer.config
    if family == "wan":  # WanPipeline's call defaults to 480 × 832 px, 81 frames; sinkscope's default is square
        spatial, temporal, patch, t5_tokens, side, frames = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal, cfg.patch_size[1], 512, 60, 81
    else:  # LTXPipeline's call defaults to 512 × 704 px, 161 frames
        spatial, temporal, patch, t5_tokens, side, frames = pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio, cfg.patch_size, 128, 16, 161
    return Geometry(
        family=family, num_layers=cfg.num_layers, heads=cfg.num_attention_heads, patch_size=patch, clip_tokens=0,
        t5_tokens=t5_tokens, vae_scale=spatial, random_weights=random_weights,
        default_resolution=getattr(pipe, "default_sample_size", side) * spatial,
        temporal_scale=temporal, default_frames=getattr(pipe, "default_num_frames", frames),
    )


_INSTALL = {
    "sd3": install_sd3_processors,
    "sdxl": install_sdxl_processors,
    "flux": install_flux_processors,
    "pixart": install_pixart_processors,
    "wan": install_wan_processors,
    "ltx": install_ltx_processors,
    "qwen_image": install_qwen_image_processors,
    "z_image": install_z_image_processors,
}
_TIMESTEP_SCALE = {"flux": 1000.0, "qwen_image": 1000.0, "z_image": -1000.0}  # the pipelines pass t / 1000 (Z-Image: (1000 − t) / 1000)
_TIMESTEP_OFFSET = {"z_image": 1000.0}
_TEXT_QUERY_LAYERS = {"z_image": "context_refiner.*"}  # family -> glob of its text-only self-attention modules


def _build_preset(name: str, device: str, dtype: torch.dtype):
    """(pipe on `device` in `dtype`, family) of a preset: random weights, or the shipped toy model."""
    from workers.scale_presets import SCALE_PRESETS, build_scale_pipeline, scale_family
    from workers.toy.controls import PLANTED_PRESET, plant_sink
    from workers.toy.model import TOY_PRESET, load_toy_pipeline

    if name in SCALE_PRESETS:  # billions of parameters: created where they will run, in their dtype
        return build_scale_pipeline(name, device, dtype), scale_family(name)
    if name in (TOY_PRESET, PLANTED_PRESET):  # trained, shipped with the package: fp32 on the CPU, 15 MB
        pipe, family = load_toy_pipeline(), "sd3"
        if name == PLANTED_PRESET:  # positive control: hooks that plant a known sink (workers.toy.controls)
            plant_sink(pipe.transformer)
    else:
        from workers.tiny import build_tiny_pipeline, tiny_family

        pipe, family = build_tiny_pipeline(name), tiny_family(name)  # fp32 on the CPU, a few MB
    pipe.to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    return pipe, family


def load_pipeline(model: ModelSpec, device: str | None = None) -> LoadedPipeline:
    """Load `model` onto `device` (default: model.device, else cuda if available, else cpu) in model.dtype."""
    device = device or model.device or default_device()
    dtype = DTYPES[model.dtype]
    if model.preset is not None:
        pipe, family = _build_preset(model.preset, device, dtype)
        random_weights = PRESET_GEOMETRY[model.preset].random_weights
    else:
        pipe, family = _from_pretrained(model, dtype)
        random_weights = False
        pipe.to(device)
    # the manifests table, when it knows the model (a tiny preset it lacks is checked against the build only)
    table = PRESET_GEOMETRY.get(model.preset) if model.preset is not None else model.geometry()
    if model.preset is not None:
        kind = MODEL_NOTES.get(model.preset) or ("random weights" if random_weights else "preset")
    else:
        kind = (model.hub_id or model.path) + (f"@{model.revision}" if model.revision else "")
    return prepare_pipeline(pipe, family, random_weights=random_weights, device=str(device), dtype=dtype,
                            label=model.label, kind=kind, expected=table)


def prepare_pipeline(pipe, family: str, *, random_weights: bool, device: str, dtype: torch.dtype, label: str, kind: str,
                     expected: Geometry | None = None) -> LoadedPipeline:
    """Wrap a pipeline already on `device` in `dtype`: measure its geometry, check it against `expected` (the
    manifests table), install the sink processors. Also what benchmarks use for models built by hand."""
    pipe.set_progress_bar_config(disable=True)
    geometry = _measured_geometry(pipe, family, random_weights)
    if expected is not None and (expected.num_layers, expected.heads) != (geometry.num_layers, geometry.heads):
        raise ValueError(
            f"{label}: the manifests geometry table says {expected.num_layers} layers × {expected.heads} heads, "
            f"the loaded model has {geometry.num_layers} × {geometry.heads}: fix manifests/models.py"
        )
    session = SinkSession(pipe, timestep_scale=_TIMESTEP_SCALE.get(family, 1.0), timestep_offset=_TIMESTEP_OFFSET.get(family, 0.0))
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    stock = denoiser_processors(denoiser)
    layers = _INSTALL[family](denoiser, session)
    text_query = tuple(info.name for info in layers if fnmatch(info.name, _TEXT_QUERY_LAYERS.get(family, "")))
    t5 = ""
    if family == "sd3" and not random_weights:
        t5 = ", T5" if getattr(pipe, "text_encoder_3", None) is not None else ", no T5"
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    description = f"{label} ({kind}, {geometry.num_layers} layers × {geometry.heads} heads, {dtype_name}{t5})"
    return LoadedPipeline(
        pipe=pipe, family=family, random_weights=random_weights, geometry=geometry, description=description,
        device=str(device), dtype=dtype, session=session, attention_layers=[info.name for info in layers],
        layers=layers, stock_processors=stock, text_query_layers=text_query,
    )
