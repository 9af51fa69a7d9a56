"""Load a diffusers pipeline for a ModelSpec (tiny preset, hub id through the normal HF cache, or local
folder), move it to its device and dtype, and install the sink processors once."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from manifests.models import PRESET_GEOMETRY, Geometry
from manifests.schema import ArmSpec, ModelSpec, RecordingSpec
from workers.processors import install_sd3_processors
from workers.session import SinkSession

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelNotAvailableError(FileNotFoundError):
    """The weights are not on this machine. Workers never download: fetch them beforehand."""


@dataclass
class LoadedPipeline:
    pipe: object  # diffusers StableDiffusion3Pipeline
    family: str  # "sd3"
    random_weights: bool
    geometry: Geometry  # measured on the loaded model, not taken from the manifests table
    description: str
    device: str
    dtype: torch.dtype
    session: SinkSession
    attention_layers: list[str]  # module names the processors are installed on, e.g. "transformer_blocks.3.attn"

    def check_layers(self, arms: list[ArmSpec], recording: RecordingSpec) -> None:
        """Fail early, naming the offender, if a layer index or glob does not exist in this model."""
        last = self.geometry.num_layers - 1
        for layer in recording.layers:
            if layer > last:
                raise ValueError(f"recording.layers: layer {layer} is outside {self.description} (layers 0..{last})")
        from fnmatch import fnmatch

        for arm in arms:
            if arm.intervention is None:
                continue
            for layer in arm.intervention.layers:
                if isinstance(layer, int) and layer > last:
                    raise ValueError(f"arm {arm.name!r}: intervention layer {layer} is outside {self.description} (layers 0..{last})")
                if isinstance(layer, str) and not any(fnmatch(name, layer) for name in self.attention_layers):
                    raise ValueError(
                        f"arm {arm.name!r}: layer pattern {layer!r} matches no attention module of {self.description} "
                        f"(e.g. {', '.join(self.attention_layers[:3])})"
                    )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _from_pretrained(model: ModelSpec, dtype: torch.dtype):
    from diffusers import StableDiffusion3Pipeline

    source = model.hub_id or model.path
    if model.path is not None:
        folder = Path(model.path)
        if not (folder / "model_index.json").is_file():
            raise ModelNotAvailableError(f"model.path {folder} is not a diffusers folder (no model_index.json)")
        class_name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
        if class_name != "StableDiffusion3Pipeline":
            raise ValueError(f"model.path {folder}: pipeline class {class_name!r} is not supported yet (supported: StableDiffusion3Pipeline)")
    kwargs = {"dtype": dtype, "revision": model.revision}
    if not model.load_t5:
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    try:
        return StableDiffusion3Pipeline.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        if model.path is not None:
            raise ModelNotAvailableError(f"could not load the diffusers folder {model.path}: {exc}") from exc
        revision = f" --revision {model.revision}" if model.revision else ""
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise ModelNotAvailableError(
            f"model {model.hub_id!r}{' @ ' + model.revision if model.revision else ''} is not available in the Hugging Face "
            f"cache ({cache}). Workers do not download weights; fetch them beforehand on a machine with network access:\n"
            f"    huggingface-cli download {model.hub_id}{revision}     (or: hf download {model.hub_id}{revision})\n"
            f"gated models need `huggingface-cli login` and accepting the license first; or set model.path to a local "
            f"diffusers folder. Underlying error: {type(exc).__name__}: {exc}"
        ) from exc


def _measured_geometry(pipe, random_weights: bool) -> Geometry:
    cfg = pipe.transformer.config
    return Geometry(
        family="sd3",
        num_layers=cfg.num_layers,
        heads=cfg.num_attention_heads,
        patch_size=cfg.patch_size,
        vae_scale=pipe.vae_scale_factor,
        clip_tokens=pipe.tokenizer_max_length,
        t5_tokens=256,
        default_resolution=pipe.default_sample_size * pipe.vae_scale_factor,
        random_weights=random_weights,
    )


def load_pipeline(model: ModelSpec, device: str | None = None) -> LoadedPipeline:
    """Load `model` onto `device` (default: model.device, else cuda if available, else cpu) in model.dtype."""
    device = device or model.device or default_device()
    dtype = DTYPES[model.dtype]
    if model.preset is not None:
        from workers.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(model.preset)
        random_weights = True
    else:
        pipe = _from_pretrained(model, dtype)
        random_weights = False
    pipe.to(device)
    if random_weights and dtype != torch.float32:  # tiny presets are built in fp32; real weights load in `dtype`
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    geometry = _measured_geometry(pipe, random_weights)
    # the manifests table, when it knows the model (a tiny preset it lacks is checked against the build only)
    table = PRESET_GEOMETRY.get(model.preset) if model.preset is not None else model.geometry()
    if table is not None and (table.num_layers, table.heads) != (geometry.num_layers, geometry.heads):
        raise ValueError(
            f"{model.label}: the manifests geometry table says {table.num_layers} layers × {table.heads} heads, "
            f"the loaded model has {geometry.num_layers} × {geometry.heads}: fix manifests/models.py"
        )
    session = SinkSession(pipe)
    layers = install_sd3_processors(pipe.transformer, session)
    kind = "random weights" if random_weights else (model.hub_id or model.path) + (f"@{model.revision}" if model.revision else "")
    t5 = "" if random_weights else (", T5" if getattr(pipe, "text_encoder_3", None) is not None else ", no T5")
    description = f"{model.label} ({kind}, {geometry.num_layers} layers × {geometry.heads} heads, {model.dtype}{t5})"
    return LoadedPipeline(
        pipe=pipe, family="sd3", random_weights=random_weights, geometry=geometry, description=description,
        device=str(device), dtype=dtype, session=session, attention_layers=layers,
    )
