"""The toy model `toy-sd3`: SD3's architecture at toy scale, trained on synthetic shapes (workers.toy.scenes).

Built from diffusers' and transformers' own classes, so the sink processors, the recorder and the
interventions run on it exactly as on SD3: a `StableDiffusion3Pipeline` with an `SD3Transformer2DModel`
(joint attention over image and text tokens, AdaLN-Zero, 6 blocks × 4 heads × 32), a small `AutoencoderKL`
(64² px ↔ 16² × 4 latents, trained on the shapes), two small random `CLIPTextModelWithProjection`
encoders that stay frozen (the transformer learns to read their token features) and no T5 (the pipeline's
256 zero tokens, as SD3 without T5). 64 image tokens + 77 CLIP + 256 zero T5 tokens = 397 keys per query.

It is trained (workers.toy.train) with rectified flow, SD3's objective, and shipped in `weights/` as
fp16 safetensors in diffusers' folder layout with a model card. It is not SD3 and says so: every run made
with it carries TOY_NOTE (manifests.models.MODEL_NOTES).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from manifests.models import TOY_NOTE

TOY_PRESET = "toy-sd3"
WEIGHTS_DIR = Path(__file__).parent / "weights" / TOY_PRESET
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
SCHEDULER_SHIFT = 1.0  # 16² latents: no resolution shift (SD3 uses 3.0 at 128² latents)
INIT_SEED = 20261202  # text encoders (frozen) and the untrained starting point
__all__ = ["TOY_NOTE", "TOY_PRESET", "WEIGHTS_DIR", "build_toy_modules", "toy_pipeline", "load_toy_pipeline"]

TRANSFORMER_CONFIG = dict(
    sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=32,
    num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64,
    pos_embed_max_size=16,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
    sample_size=64, scaling_factor=1.0, shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False,
)


def clip_config():
    """A small CLIP text encoder with the real CLIP vocabulary and special ids (the offline CLIP tokenizer's ids
    index its embedding table); two of them give SD3's 2 × 32 = 64-wide text features."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, vocab_size=49408, hidden_size=32,
        intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, layer_norm_eps=1e-5, hidden_act="quick_gelu",
        projection_dim=32, max_position_embeddings=77,
    )


def build_toy_modules(seed: int = INIT_SEED) -> dict:
    """Untrained modules (transformer, vae, text_encoder, text_encoder_2) on the CPU in fp32, from `seed`."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return dict(
            transformer=SD3Transformer2DModel(**TRANSFORMER_CONFIG),
            vae=AutoencoderKL(**VAE_CONFIG),
            text_encoder=CLIPTextModelWithProjection(clip_config()),
            text_encoder_2=CLIPTextModelWithProjection(clip_config()),
        )


def toy_pipeline(modules: dict):
    """A StableDiffusion3Pipeline around `modules`, with the offline CLIP tokenizers and no T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from workers.tokenizer import load_clip_tokenizer

    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT), tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer(pad_token="!"), text_encoder_3=None, tokenizer_3=None, **modules,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_toy_modules(modules: dict, out_dir: Path) -> dict[str, int]:
    """Write each module in diffusers' folder layout (config + fp16 safetensors); {component: bytes}."""
    sizes = {}
    for name in COMPONENTS:
        module = modules[name]
        folder = out_dir / name
        half = _copy_to(module, torch.float16)
        half.save_pretrained(folder, safe_serialization=True)
        sizes[name] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return sizes


def _copy_to(module, dtype: torch.dtype):
    import copy

    clone = copy.deepcopy(module).to("cpu")
    return clone.to(dtype=dtype)


class ToyWeightsMissingError(FileNotFoundError):
    """The shipped weights are not where the package puts them (a broken install or checkout)."""


def load_toy_modules(weights_dir: Path = WEIGHTS_DIR) -> dict:
    """The trained modules, on the CPU in fp32 (stored in fp16), in eval mode."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    missing = [name for name in COMPONENTS if not any((weights_dir / name).glob("*.safetensors"))]
    if missing:
        raise ToyWeightsMissingError(
            f"{TOY_PRESET}: no weights for {', '.join(missing)} under {weights_dir}; they ship with the package "
            f"(retrain with `python -m workers.toy.train`, docs/toy.md)"
        )
    classes = dict(transformer=SD3Transformer2DModel, vae=AutoencoderKL, text_encoder=CLIPTextModelWithProjection,
                   text_encoder_2=CLIPTextModelWithProjection)
    modules = {}
    for name, cls in classes.items():
        kwargs = {"torch_dtype": torch.float32} if name in ("transformer", "vae") else {"dtype": torch.float32}
        modules[name] = cls.from_pretrained(str(weights_dir / name), **kwargs).eval()
    return modules


def load_toy_pipeline(weights_dir: Path = WEIGHTS_DIR):
    """The shipped toy model as a StableDiffusion3Pipeline on the CPU in fp32 (never downloads anything)."""
    return toy_pipeline(load_toy_modules(weights_dir))


def model_card(weights_dir: Path = WEIGHTS_DIR) -> dict:
    """The machine-readable card written by training (card.json): hashes, steps, losses, device, scores."""
    path = weights_dir / "card.json"
    if not path.is_file():
        raise ToyWeightsMissingError(f"{path} is missing: the toy model's card ships with its weights")
    return json.loads(path.read_text(encoding="utf-8"))
