"""Model geometry known without loading weights: what a sweep can be validated against.

manifests may not import torch, so the number of blocks, heads and text tokens of each model comes
from this table, or from `transformer/config.json` (`unet/config.json`) of a local folder. The worker
checks the same numbers again on the loaded model, so an unknown hub id only delays the check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Geometry:
    family: str  # sd3 | sdxl | flux | pixart (PixArt-α and -Σ) | qwen_image | z_image | wan (Wan 2.1, video) | ltx (LTX-Video)
    num_layers: int  # attention blocks addressable by integer index
    heads: int
    patch_size: int = 2
    vae_scale: int = 8
    clip_tokens: int = 77
    t5_tokens: int = 256
    default_resolution: int = 1024
    random_weights: bool = False
    # names of the attention modules the processors are installed on (what layer patterns match);
    # empty when not known without loading the model (then patterns are checked at load time only)
    modules: tuple[str, ...] = ()
    # video models: the VAE's temporal compression (a video of 1 + t·k frames has 1 + k latent frames) and the
    # frame count generated when the sweep names none; 0 / 1 for image models
    temporal_scale: int = 0
    default_frames: int = 1

    @property
    def is_video(self) -> bool:
        return self.temporal_scale > 0

    def frames_error(self, num_frames: int) -> str | None:
        """Why `num_frames` is not a frame count this model can generate (None: it is)."""
        if not self.is_video:
            return None if num_frames == 1 else f"{num_frames} frames, but {self.family} generates still images (leave it unset)"
        if num_frames < 1 or (num_frames - 1) % self.temporal_scale:
            t = self.temporal_scale
            return f"{num_frames} is not {t}k+1 (the VAE compresses {t} frames into one): valid values are 1, {t + 1}, {2 * t + 1}, …"
        return None

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of a `num_frames` video (the transformer's frames: its image keys are these × patches)."""
        return (num_frames - 1) // self.temporal_scale + 1 if self.is_video else 1

    def image_tokens(self, height: int, width: int) -> int:
        side = self.vae_scale * self.patch_size
        return (height // side) * (width // side)

    def text_tokens(self) -> int:
        return self.clip_tokens + self.t5_tokens

    def total_tokens(self, height: int, width: int, frames: int = 1) -> int:
        """Keys of a joint sequence: image tokens (of every latent frame of a `frames`-frame video) and text tokens."""
        return self.image_tokens(height, width) * self.latent_frames(frames) + self.text_tokens()


# The toy preset: trained weights shipped in the package (workers/toy), SD3's architecture at toy scale, trained on
# synthetic shapes. Everything made with it carries this note, as random-weight output carries "random weights".
TOY_NOTE = "toy model trained on synthetic shapes: not SD3"
MODEL_NOTES: dict[str, str] = {
    "toy-sd3": TOY_NOTE,
    # positive control (workers.toy.controls): the same weights with one key made to take most of the attention mass
    "toy-sd3-planted": TOY_NOTE + "; positive control with a planted sink (block 3, CLIP start token)",
}


def sd3_modules(num_layers: int, dual_attention_layers: tuple[int, ...] = ()) -> tuple[str, ...]:
    names = []
    for i in range(num_layers):
        names.append(f"transformer_blocks.{i}.attn")
        if i in dual_attention_layers:
            names.append(f"transformer_blocks.{i}.attn2")
    return tuple(names)


def flux_modules(joint: int, single: int) -> tuple[str, ...]:
    return tuple(f"transformer_blocks.{i}.attn" for i in range(joint)) + tuple(
        f"single_transformer_blocks.{i}.attn" for i in range(single)
    )


def pixart_modules(num_layers: int) -> tuple[str, ...]:
    return tuple(f"transformer_blocks.{i}.{a}" for i in range(num_layers) for a in ("attn1", "attn2"))


def wan_modules(num_layers: int) -> tuple[str, ...]:
    """Wan 2.1: `blocks.{i}.attn1` (self-attention over frames × patches), `blocks.{i}.attn2` (cross-attention to UMT5)."""
    return tuple(f"blocks.{i}.{a}" for i in range(num_layers) for a in ("attn1", "attn2"))


def ltx_modules(num_layers: int) -> tuple[str, ...]:
    """LTX-Video: `transformer_blocks.{i}.attn1` (self-attention over frames × patches), `.attn2` (cross-attention to T5)."""
    return pixart_modules(num_layers)  # the same module names as PixArt's blocks
def qwen_image_modules(num_layers: int) -> tuple[str, ...]:
    return tuple(f"transformer_blocks.{i}.attn" for i in range(num_layers))


def z_image_modules(num_layers: int, refiner_layers: int) -> tuple[str, ...]:
    return (tuple(f"noise_refiner.{i}.attention" for i in range(refiner_layers))
            + tuple(f"context_refiner.{i}.attention" for i in range(refiner_layers))
            + tuple(f"layers.{i}.attention" for i in range(num_layers)))


def sdxl_modules(attentions: dict[str, int]) -> tuple[str, ...]:
    """`attentions`: '<block>.attentions.<j>' -> transformer blocks in it (in unet.attn_processors order)."""
    return tuple(
        f"{prefix}.transformer_blocks.{b}.{a}" for prefix, blocks in attentions.items() for b in range(blocks) for a in ("attn1", "attn2")
    )


_TINY_SDXL = {"down_blocks.1.attentions.0": 1, "down_blocks.2.attentions.0": 2, "up_blocks.0.attentions.0": 2,
              "up_blocks.0.attentions.1": 2, "up_blocks.1.attentions.0": 1, "up_blocks.1.attentions.1": 1,
              "mid_block.attentions.0": 2}
_SDXL_BASE = {**{f"down_blocks.1.attentions.{j}": 2 for j in range(2)}, **{f"down_blocks.2.attentions.{j}": 10 for j in range(2)},
              **{f"up_blocks.0.attentions.{j}": 10 for j in range(3)}, **{f"up_blocks.1.attentions.{j}": 2 for j in range(3)},
              "mid_block.attentions.0": 10}

# Random-weight presets, built offline: the tiny ones (workers.tiny) for tests and demos, and real-scale ones
# (workers.scale_presets) for cost measurement only: their images are noise. Then the real models the paper uses.
PRESET_GEOMETRY: dict[str, Geometry] = {
    "tiny-sd3": Geometry("sd3", num_layers=2, heads=4, default_resolution=64, random_weights=True, modules=sd3_modules(2)),
    "tiny-sd3-deep": Geometry("sd3", num_layers=4, heads=4, default_resolution=64, random_weights=True, modules=sd3_modules(4)),
    "tiny-sd35": Geometry("sd3", num_layers=2, heads=4, default_resolution=64, random_weights=True, modules=sd3_modules(2, (0,))),
    # SDXL: integer layer i = the attn2 of the i-th transformer block in unet.attn_processors order
    "tiny-sdxl": Geometry("sdxl", num_layers=11, heads=4, patch_size=1, t5_tokens=0, default_resolution=64, random_weights=True,
                          modules=sdxl_modules(_TINY_SDXL)),
    # Flux: integer layer i = the i-th block in forward order (joint blocks, then single blocks)
    "tiny-flux": Geometry("flux", num_layers=4, heads=4, clip_tokens=0, t5_tokens=512, default_resolution=64, random_weights=True,
                          modules=flux_modules(2, 2)),
    # PixArt-Σ: integer layer i = transformer_blocks.{i}.attn2 (cross-attention to T5)
    "tiny-pixart": Geometry("pixart", num_layers=2, heads=4, clip_tokens=0, t5_tokens=300, default_resolution=64, random_weights=True,
                            modules=pixart_modules(2)),
    # PixArt-α (PixArtAlphaPipeline): the same transformer blocks, 120 T5 tokens
    "tiny-pixart-alpha": Geometry("pixart", num_layers=2, heads=4, clip_tokens=0, t5_tokens=120, default_resolution=64, random_weights=True,
                                  modules=pixart_modules(2)),
    # Wan 2.1-like video transformer: integer layer i = blocks.{i}.attn2 (cross-attention to UMT5), attn1 by pattern;
    # 64² px, 5 frames (2 latent frames) by default
    "tiny-wan": Geometry("wan", num_layers=2, heads=4, clip_tokens=0, t5_tokens=512, default_resolution=64, random_weights=True,
                         modules=wan_modules(2), temporal_scale=4, default_frames=5),
    # LTX-Video-like: integer layer i = transformer_blocks.{i}.attn2 (cross-attention to T5, masked padding), attn1 by
    # pattern; VAE 8× in space (LTX-Video's: 32×), 8× in time; 64² px, 9 frames (2 latent frames of 8 × 8 patches)
    "tiny-ltx-video": Geometry("ltx", num_layers=2, heads=4, patch_size=1, clip_tokens=0, t5_tokens=128, default_resolution=64,
                               random_weights=True, modules=ltx_modules(2), temporal_scale=8, default_frames=9),
    # Qwen-Image: integer layer i = transformer_blocks.{i}.attn (joint [text | image] attention); text: the prompt's
    # Qwen2.5-VL tokens at their own length (≤ 1024, the "t5" text segment), not padded
    "tiny-qwen-image": Geometry("qwen_image", num_layers=2, heads=4, clip_tokens=0, t5_tokens=1024, default_resolution=64,
                                random_weights=True, modules=qwen_image_modules(2)),
    # Z-Image: integer layer i = layers.{i}.attention (single stream [image | caption]); the refiners by glob. VAE
    # scale 4 so a 64-px image has 64 patches (Z-Image pads its image sequence to a multiple of 32)
    "tiny-z-image": Geometry("z_image", num_layers=2, heads=4, vae_scale=4, clip_tokens=0, t5_tokens=512, default_resolution=64,
                             random_weights=True, modules=z_image_modules(2, 1)),
    # SD3-medium's shapes (transformer 24 × 24 heads × 64, full VAE; tiny CLIP, no T5: 77 + 256 zero text tokens), 1024²
    "sd3-medium-random": Geometry("sd3", num_layers=24, heads=24, random_weights=True, modules=sd3_modules(24)),
    # trained toy (not random): 64² px, VAE scale 4 × patch 2 → 8 × 8 = 64 image tokens; 77 CLIP + 256 zero T5 tokens
    "toy-sd3": Geometry("sd3", num_layers=6, heads=4, vae_scale=4, default_resolution=64, modules=sd3_modules(6)),
    "toy-sd3-planted": Geometry("sd3", num_layers=6, heads=4, vae_scale=4, default_resolution=64, modules=sd3_modules(6)),
}
# presets whose cost is that of the real model (for estimates and docs); the others are tiny
REAL_SCALE_PRESETS = frozenset({"sd3-medium-random"})

HUB_GEOMETRY: dict[str, Geometry] = {
    "stabilityai/stable-diffusion-3-medium-diffusers": Geometry("sd3", num_layers=24, heads=24, modules=sd3_modules(24)),
    "stabilityai/stable-diffusion-3.5-medium": Geometry("sd3", num_layers=24, heads=24, modules=sd3_modules(24, tuple(range(13)))),
    "stabilityai/stable-diffusion-3.5-large": Geometry("sd3", num_layers=38, heads=38, modules=sd3_modules(38)),
    # SDXL: attention modules are addressed by name pattern (e.g. "mid_block.*.attn2"); 70 transformer blocks
    "stabilityai/stable-diffusion-xl-base-1.0": Geometry("sdxl", num_layers=70, heads=20, patch_size=1, t5_tokens=0,
                                                          modules=sdxl_modules(_SDXL_BASE)),
    "black-forest-labs/FLUX.1-dev": Geometry("flux", num_layers=57, heads=24, clip_tokens=0, t5_tokens=512,
                                                  modules=flux_modules(19, 38)),
    "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": Geometry("pixart", num_layers=28, heads=16, clip_tokens=0, t5_tokens=300,
                                                                modules=pixart_modules(28)),
    "PixArt-alpha/PixArt-XL-2-1024-MS": Geometry("pixart", num_layers=28, heads=16, clip_tokens=0, t5_tokens=120,
                                                 modules=pixart_modules(28)),
    # Wan 2.1 T2V 1.3B: 30 blocks × 12 heads × 128; UMT5 × 512 (the pipeline's default length); 480 px, 81 frames
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": Geometry("wan", num_layers=30, heads=12, clip_tokens=0, t5_tokens=512, default_resolution=480,
                                                 modules=wan_modules(30), temporal_scale=4, default_frames=81),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": Geometry("wan", num_layers=40, heads=40, clip_tokens=0, t5_tokens=512, default_resolution=480,
                                                modules=wan_modules(40), temporal_scale=4, default_frames=81),
    # LTX-Video (0.9.x, 2 B): 28 blocks × 32 heads × 64, patch 1 on a 32× / 8× VAE; T5 × 128 (the pipeline's default);
    # 512 px (the pipeline's default is 512 × 704), 161 frames
    "Lightricks/LTX-Video": Geometry("ltx", num_layers=28, heads=32, patch_size=1, vae_scale=32, clip_tokens=0, t5_tokens=128,
                                     default_resolution=512, modules=ltx_modules(28), temporal_scale=8, default_frames=161),
    # Qwen-Image (transformer/config.json: 60 layers, 24 heads × 128, patch 2; text encoder Qwen2.5-VL-7B)
    "Qwen/Qwen-Image": Geometry("qwen_image", num_layers=60, heads=24, clip_tokens=0, t5_tokens=1024, modules=qwen_image_modules(60)),
    # Z-Image-Turbo (transformer/config.json: 30 layers, 30 heads × 128, 2 + 2 refiner layers; text encoder Qwen3-4B)
    "Tongyi-MAI/Z-Image-Turbo": Geometry("z_image", num_layers=30, heads=30, clip_tokens=0, t5_tokens=512,
                                         modules=z_image_modules(30, 2)),
}


def geometry_from_folder(path: Path) -> Geometry | None:
    """Read block and head counts from a local diffusers folder's transformer config, if present
    (SDXL folders have a unet/ instead: their integer layers are checked at load time)."""
    config = path / "transformer" / "config.json"
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
        name = cfg.get("_class_name")
        if name == "SD3Transformer2DModel":
            layers = cfg["num_layers"]
            return Geometry("sd3", num_layers=layers, heads=cfg["num_attention_heads"], patch_size=cfg.get("patch_size", 2),
                            modules=sd3_modules(layers, tuple(cfg.get("dual_attention_layers") or ())))
        if name == "FluxTransformer2DModel":
            return Geometry("flux", num_layers=cfg["num_layers"] + cfg["num_single_layers"], heads=cfg["num_attention_heads"],
                            clip_tokens=0, t5_tokens=512, modules=flux_modules(cfg["num_layers"], cfg["num_single_layers"]))
        if name == "QwenImageTransformer2DModel":
            return Geometry("qwen_image", num_layers=cfg["num_layers"], heads=cfg["num_attention_heads"], patch_size=cfg.get("patch_size", 2),
                            clip_tokens=0, t5_tokens=1024, modules=qwen_image_modules(cfg["num_layers"]))
        if name == "ZImageTransformer2DModel":
            return Geometry("z_image", num_layers=cfg["n_layers"], heads=cfg["n_heads"], patch_size=cfg.get("all_patch_size", [2])[0],
                            clip_tokens=0, t5_tokens=512, modules=z_image_modules(cfg["n_layers"], cfg.get("n_refiner_layers", 2)))
        if name == "PixArtTransformer2DModel":
            return Geometry("pixart", num_layers=cfg["num_layers"], heads=cfg["num_attention_heads"],
                            patch_size=cfg.get("patch_size", 2), clip_tokens=0, t5_tokens=300, modules=pixart_modules(cfg["num_layers"]))
        if name == "WanTransformer3DModel":
            return Geometry("wan", num_layers=cfg["num_layers"], heads=cfg["num_attention_heads"], clip_tokens=0, t5_tokens=512,
                            default_resolution=480, modules=wan_modules(cfg["num_layers"]), temporal_scale=4, default_frames=81)
        if name == "LTXVideoTransformer3DModel":
            return Geometry("ltx", num_layers=cfg["num_layers"], heads=cfg["num_attention_heads"], patch_size=cfg.get("patch_size", 1),
                            vae_scale=32, clip_tokens=0, t5_tokens=128, default_resolution=512, modules=ltx_modules(cfg["num_layers"]),
                            temporal_scale=8, default_frames=161)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # not readable here, or not a config we know: the worker checks the loaded model
    return None
