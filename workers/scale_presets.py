"""Random-weight models at real scale: for measuring cost (time, memory, scaling), never for results.

`sd3-medium-random` has SD3-medium's geometry: the transformer from its config (24 blocks × 24 heads × 64,
2028 M parameters), a full-size 16-channel AutoencoderKL (block_out_channels 128, 256, 512, 512), tiny CLIP
text encoders whose projections give the real 2048-d pooled vector, and no T5: the pipeline pads 77 CLIP +
256 zero T5 tokens = 333 text tokens, as the real model without T5 sees. Every GEMM, attention and VAE
convolution of a 1024² image therefore has the real shapes, so step time, memory and throughput measured on
it are those of SD3-medium; its images are noise and everything made from it says "random weights".

Unlike the tiny presets (workers.tiny: built on the CPU in fp32, then moved), it is built directly on the
target device in the target dtype (an fp32 CPU copy of 2 B parameters would cost 8 GB and a slow copy). The
init runs under a forked RNG seeded with INIT_SEED on that device, so the same name gives the same weights
on the same device type and dtype (CPU and CUDA RNGs differ: the weights of a CPU and a GPU build differ).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

INIT_SEED = 20260203  # fixed: a preset's weights are part of its identity

# diffusers SD3Transformer2DModel config of stabilityai/stable-diffusion-3-medium-diffusers (transformer/config.json)
SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
SD3_MEDIUM_TRANSFORMER_PARAMS = 2_028_328_000  # rounded to 1e3; checked on the meta device by the tests


@dataclass(frozen=True)
class ScaleSD3Config:
    """What a random SD3 pipeline is built from: the transformer config and the VAE widths."""

    transformer: dict = field(default_factory=lambda: dict(SD3_MEDIUM_TRANSFORMER))
    vae_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    vae_norm_num_groups: int = 32
    vae_layers_per_block: int = 2
    clip_projection_dim: int = 1024  # CLIP-L ⊕ CLIP-G pooled = 2 × 1024 = SD3's pooled_projection_dim


SCALE_PRESETS: dict[str, ScaleSD3Config] = {
    "sd3-medium-random": ScaleSD3Config(),
}


def scale_family(name: str) -> str:
    """The workers family of a scale preset (all are "sd3" today)."""
    if name not in SCALE_PRESETS:
        raise ValueError(f"unknown scale preset {name!r}; known: {', '.join(SCALE_PRESETS)}")
    return "sd3"


@contextmanager
def _seeded_on(device: torch.device, seed: int):
    """Seed the RNG that initialises tensors on `device`, and give the caller's RNG state back afterwards."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"), torch.cuda.device(index):
            torch.random.default_generator.manual_seed(seed)
            torch.cuda.manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield


@contextmanager
def _default_dtype(dtype: torch.dtype):
    """Parameters are created in `dtype` (no fp32 copy first); restored afterwards."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_sd3_modules(cfg: ScaleSD3Config, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      seed: int = INIT_SEED) -> dict:
    """transformer, text_encoder, text_encoder_2 and vae of `cfg`, created on `device` in `dtype`, in eval mode.

    device="meta" builds the shapes only (no memory, no init): what the tests use to count parameters.
    """
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from workers.tiny import _tiny_clip_config

    device = torch.device(device)
    clip = _tiny_clip_config()
    clip.projection_dim = cfg.clip_projection_dim
    with _seeded_on(device, seed), _default_dtype(dtype), torch.device(device):
        modules = dict(
            transformer=SD3Transformer2DModel(**cfg.transformer),
            text_encoder=CLIPTextModelWithProjection(clip),
            text_encoder_2=CLIPTextModelWithProjection(clip),
            vae=AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=cfg.vae_block_out_channels,
                layers_per_block=cfg.vae_layers_per_block, norm_num_groups=cfg.vae_norm_num_groups, sample_size=1024,
                scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,  # SD3's VAE
            ),
        )
    for module in modules.values():
        module.eval()
    return modules


def build_sd3_random(cfg: ScaleSD3Config, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     seed: int = INIT_SEED):
    """A StableDiffusion3Pipeline of `cfg` with random weights, on `device` in `dtype`, progress bar off."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from workers.tokenizer import load_clip_tokenizer

    modules = build_sd3_modules(cfg, device, dtype, seed)
    for module in modules.values():
        # buffers diffusers creates in fp32 (the positional embedding) follow the parameters; plain nn.Module.to,
        # because diffusers' own warns about fp32-kept modules these models do not have
        torch.nn.Module.to(module, device=device, dtype=dtype)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer(pad_token="!"),  # SD3's CLIP-G pads with "!"
        text_encoder_3=None, tokenizer_3=None, **modules,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_scale_pipeline(name: str, device: str | torch.device, dtype: torch.dtype):
    """Build the named preset (SCALE_PRESETS) on `device` in `dtype`."""
    scale_family(name)
    return build_sd3_random(SCALE_PRESETS[name], device, dtype)
