"""Tiny, randomly initialised diffusers pipelines, built offline with a fixed init seed.

They exercise the real diffusers code paths (the pipelines, SD3Transformer2DModel, UNet2DConditionModel,
FluxTransformer2DModel, PixArtTransformer2DModel, WanTransformer3DModel, their attention processors, the VAE, the CLIP / T5
encoders) in well under a second per image on a CPU, so the processors, the recorder and the whole sweep
machinery can be tested end to end without weights. The same name always gives the same weights: the init
runs under a forked, seeded torch RNG on the CPU. T5 encoders are tiny random `T5EncoderModel`s with the
offline stand-in tokenizer of `workers.tokenizer.load_t5_tokenizer` (T5's own vocabulary cannot be fetched).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INIT_SEED = 20260101  # fixed: a preset's weights are part of its identity
CLIP_HIDDEN = 32
T5_HIDDEN = 32


@dataclass(frozen=True)
class TinySD3Config:
    num_layers: int
    heads: int = 4
    head_dim: int = 8
    latent_side: int = 8  # → default 64 px (VAE scale 8)
    qk_norm: str | None = None
    dual_attention_layers: tuple[int, ...] = ()


TINY_PRESETS: dict[str, TinySD3Config] = {
    "tiny-sd3": TinySD3Config(num_layers=2),
    "tiny-sd3-deep": TinySD3Config(num_layers=4),
    # SD3.5-medium-like: RMS QK-norm on both streams, and a dual-attention (.attn2) self-attention in block 0.
    "tiny-sd35": TinySD3Config(num_layers=2, qk_norm="rms_norm", dual_attention_layers=(0,)),
}


TINY_SDXL = "tiny-sdxl"  # UNet (8, 16, 32) channels, 4 heads everywhere, 11 transformer blocks, 64 px
TINY_FLUX = "tiny-flux"  # FLUX.1-dev-like: 2 joint + 2 single blocks, 4 heads × 16, RoPE, guidance embedding, 64 px
TINY_PIXART = "tiny-pixart"  # PixArt-Σ-like: 2 blocks (self attn1 + cross attn2 over T5), 4 heads × 8, 64 px
TINY_PIXART_ALPHA = "tiny-pixart-alpha"  # PixArt-α-like (PixArtAlphaPipeline, T5 × 120); the same blocks as tiny-pixart
# Wan 2.1-like video model: 2 blocks (self attn1 over frames × patches with 3-D RoPE + cross attn2 over UMT5), 4 heads × 16,
# Wan's causal 3-D VAE (temporal scale 4, spatial 8), UniPC flow sampler: 64 px, 5 frames → 2 latent frames of 4 × 4 patches
TINY_WAN = "tiny-wan"
# LTX-Video-like: 2 blocks (self attn1 + cross attn2 over T5 with its padding masked), 4 heads × 12, LTX's RoPE and its
# causal VAE at 8× space (LTX-Video's is 32×, which would leave 2 × 2 patches at 64 px) and 8× time: 64 px, 9 frames →
# 2 latent frames of 8 × 8 patches; FLUX-style dynamic-shift Euler with LTX-Video's shift settings
TINY_LTX = "tiny-ltx-video"
QWEN_PRESETS = {"tiny-qwen-image": "qwen_image", "tiny-z-image": "z_image"}  # preset -> family; built by workers.tiny_qwen (Qwen text encoders)


def tiny_family(name: str) -> str:
    """The workers family of a tiny preset ("sd3", "sdxl", "flux", "pixart")."""
    if name == TINY_SDXL:
        return "sdxl"
    if name == TINY_FLUX:
        return "flux"
    if name in (TINY_PIXART, TINY_PIXART_ALPHA):
        return "pixart"
    if name == TINY_WAN:
        return "wan"
    if name == TINY_LTX:
        return "ltx"
    if name in TINY_PRESETS:
        return "sd3"
    if name in QWEN_PRESETS:
        return QWEN_PRESETS[name]
    raise ValueError(f"unknown tiny preset {name!r}; known: {', '.join(all_presets())}")


def all_presets() -> list[str]:
    return [*TINY_PRESETS, TINY_SDXL, TINY_FLUX, TINY_PIXART, TINY_PIXART_ALPHA, *QWEN_PRESETS, TINY_WAN, TINY_LTX]


def _tiny_clip_config():
    from transformers import CLIPTextConfig

    # Real CLIP vocabulary size and special ids, so the real tokenizer's ids index the embedding table.
    return CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, vocab_size=49408,
        hidden_size=CLIP_HIDDEN, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        layer_norm_eps=1e-5, hidden_act="quick_gelu", projection_dim=CLIP_HIDDEN, max_position_embeddings=77,
    )


def _tiny_vae(latent_channels: int = 16, scaling_factor: float | None = None, shift_factor: float | None = None):
    from diffusers import AutoencoderKL

    # 4 levels → vae_scale_factor 8 as in the real VAEs. SD3: 16 latent channels, its shift/scale; SDXL: 4.
    sd3 = latent_channels == 16
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64,
        scaling_factor=scaling_factor or (1.5035 if sd3 else 0.13025),
        shift_factor=shift_factor if shift_factor is not None else (0.0609 if sd3 else None),
        use_quant_conv=not sd3, use_post_quant_conv=not sd3,
    )


def _tiny_t5(vocab_size: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    # T5 v1.1 layout (gated-GELU, no bias), tiny widths; UMT5 (Wan): the same, with a relative bias in every layer
    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(
        vocab_size=vocab_size, d_model=T5_HIDDEN, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return model_class(config)


def _randomise_qk_norms(module) -> None:
    """RMSNorm weights start at 1 for every norm, which would make norm_k and norm_added_k interchangeable;
    random weights make per-stream QK-norm observable in tests."""
    for name, param in module.named_parameters():
        if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
            param.data.copy_(1.0 + 0.5 * torch.randn(param.shape))


def _build_tiny_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from workers.tokenizer import load_clip_tokenizer, load_t5_tokenizer

    tokenizer_2 = load_t5_tokenizer(model_max_length=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
            joint_attention_dim=T5_HIDDEN, pooled_projection_dim=CLIP_HIDDEN, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
        )
        _randomise_qk_norms(transformer)
        text_encoder = CLIPTextModel(_tiny_clip_config())
        text_encoder_2 = _tiny_t5(len(tokenizer_2))
        vae = _tiny_vae(16, scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's VAE scale / shift
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=load_clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    pipe.default_sample_size = 8  # 64 px (the pipeline hard-codes 128 → 1024 px)
    for module in (transformer, text_encoder, text_encoder_2, vae):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_tiny_pixart(alpha: bool = False):
    """PixArt-Σ-like (T5 × 300), or PixArt-α-like (alpha: PixArtAlphaPipeline, T5 × 120). The α pipeline feeds
    resolution / aspect-ratio micro-conditions only to its 1024-px transformer (sample_size 128), so the tiny one is
    built like PixArt-α-512, without them."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    from workers.tokenizer import load_t5_tokenizer

    tokenizer = load_t5_tokenizer(model_max_length=120 if alpha else 300)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        transformer = PixArtTransformer2DModel(
            num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=T5_HIDDEN, norm_type="ada_norm_single",
            use_additional_conditions=False, num_embeds_ada_norm=1000,
        )
        text_encoder = _tiny_t5(len(tokenizer))
        vae = _tiny_vae(4)  # PixArt-α and -Σ use the SDXL VAE (4 channels, scale 0.13025)
    scheduler = DPMSolverMultistepScheduler()  # PixArt's default: DPM-Solver++ order 2, ε-prediction, linear betas
    pipeline_class = PixArtAlphaPipeline if alpha else PixArtSigmaPipeline
    pipe = pipeline_class(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
    for module in (transformer, text_encoder, vae):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _video_pipeline(pipe, frames: int):
    """A tiny video pipeline made ready: eval mode, progress bar off, and its defaults of 64 px (8 latent pixels) and
    `frames` frames, which video pipelines lack and workers.loading reads."""
    pipe.default_sample_size, pipe.default_num_frames = 8, frames
    for module in (pipe.transformer, pipe.text_encoder, pipe.vae):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_tiny_wan():
    """Wan 2.1 T2V-like: WanPipeline with its own transformer, causal VAE, UMT5 encoder and UniPC flow sampler."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    from workers.tokenizer import load_t5_tokenizer

    tokenizer = load_t5_tokenizer(model_max_length=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
            text_dim=T5_HIDDEN, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
        )
        _randomise_qk_norms(transformer)
        text_encoder = _tiny_t5(len(tokenizer), umt5=True)
        # 3 down levels (spatial 8), temporal downsampling in the last two (temporal 4), as in Wan 2.1's VAE
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
    # Wan 2.1 T2V's scheduler config: UniPC over flow sigmas, shift 3 (its 480p setting)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000)
    return _video_pipeline(WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer),
                           frames=5)


def _build_tiny_ltx():
    """LTX-Video-like: LTXPipeline with its transformer, causal video VAE, T5 encoder and dynamic-shift Euler sampler."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    from workers.tokenizer import load_t5_tokenizer

    tokenizer = load_t5_tokenizer(model_max_length=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        transformer = LTXVideoTransformer3DModel(
            in_channels=16, out_channels=16, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=12,
            cross_attention_dim=48, num_layers=2, caption_channels=T5_HIDDEN,
        )
        _randomise_qk_norms(transformer)
        text_encoder = _tiny_t5(len(tokenizer))
        # three space-time downsampling levels without LTX's 4 × 4 input patching: 8× in space and in time
        vae = AutoencoderKLLTXVideo(
            latent_channels=16, block_out_channels=(8, 8, 16), decoder_block_out_channels=(8, 8, 16),
            down_block_types=("LTXVideoDownBlock3D",) * 3, layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, True), decoder_spatio_temporal_scaling=(True, True, True),
            decoder_inject_noise=(False,) * 4, downsample_type=("conv",) * 3, upsample_residual=(False,) * 3,
            upsample_factor=(1,) * 3, patch_size=1, patch_size_t=1,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(  # LTX-Video's scheduler config
        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1,
    )
    return _video_pipeline(LTXPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer),
                           frames=9)


def _build_tiny_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from workers.tokenizer import load_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=4,
            block_out_channels=(8, 16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(4, 4, 4),  # diffusers' historical name: the number of heads
            transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
            cross_attention_dim=2 * CLIP_HIDDEN,  # CLIP-L ⊕ CLIP-G hidden, as in SDXL
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + CLIP_HIDDEN,  # 6 size/crop conditions + pooled CLIP-G
        )
        text_encoder = CLIPTextModel(_tiny_clip_config())
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config())
        vae = _tiny_vae(latent_channels=4)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer(pad_token="!"), unet=unet, scheduler=scheduler,
    )
    for module in (unet, text_encoder, text_encoder_2, vae):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_pipeline(name: str):
    """Build the named tiny preset (`all_presets()`) on the CPU in fp32, eval mode, progress bar off."""
    family = tiny_family(name)
    if family == "sdxl":
        return _build_tiny_sdxl()
    if family == "flux":
        return _build_tiny_flux()
    if family == "pixart":
        return _build_tiny_pixart(alpha=name == TINY_PIXART_ALPHA)
    if family == "wan":
        return _build_tiny_wan()
    if family == "ltx":
        return _build_tiny_ltx()
    if name in QWEN_PRESETS:
        from workers.tiny_qwen import build_tiny_qwen

        return build_tiny_qwen(name)
    cfg = TINY_PRESETS[name]
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from workers.tokenizer import load_clip_tokenizer

    inner = cfg.heads * cfg.head_dim
    with torch.random.fork_rng(devices=[]):  # do not disturb the caller's global RNG
        torch.manual_seed(INIT_SEED)
        transformer = SD3Transformer2DModel(
            sample_size=cfg.latent_side, patch_size=2, in_channels=16, out_channels=16,
            num_layers=cfg.num_layers, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
            joint_attention_dim=2 * CLIP_HIDDEN,  # CLIP-L ⊕ CLIP-G hidden (the T5 width in the real model)
            caption_projection_dim=inner, pooled_projection_dim=2 * CLIP_HIDDEN, pos_embed_max_size=32,
            qk_norm=cfg.qk_norm, dual_attention_layers=cfg.dual_attention_layers,
        )
        if cfg.qk_norm is not None:
            _randomise_qk_norms(transformer)
        text_encoder = CLIPTextModelWithProjection(_tiny_clip_config())
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config())
        vae = _tiny_vae()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=load_clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=load_clip_tokenizer(pad_token="!"),  # SD3's CLIP-G pads with "!"
        text_encoder_3=None, tokenizer_3=None,
    )
    for module in (transformer, text_encoder, text_encoder_2, vae):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
