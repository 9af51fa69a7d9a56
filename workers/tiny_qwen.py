"""Tiny, randomly initialised Qwen-Image and Z-Image pipelines (the two Qwen-text-encoder DiTs), built offline.

Like workers.tiny (whose init seed they share), they run the real diffusers code paths — QwenImagePipeline with
QwenImageTransformer2DModel, AutoencoderKLQwenImage and a `Qwen2_5_VLForConditionalGeneration` text encoder;
ZImagePipeline with ZImageTransformer2DModel, AutoencoderKL and a `Qwen3Model` — at toy widths, in well under a
second per 64-px image on a CPU. The tokenizer is the offline Qwen stand-in of `workers.tokenizer.load_qwen_tokenizer`.
"""

from __future__ import annotations

import torch

TINY_QWEN_IMAGE = "tiny-qwen-image"  # Qwen-Image-like: 2 double-stream blocks, 4 heads × 8, 2×2 packing, 64 px
TINY_Z_IMAGE = "tiny-z-image"  # Z-Image-like: 1+1 refiner and 2 main single-stream blocks, 4 heads × 8, VAE scale 4, 64 px
QWEN_TEXT_HIDDEN = 32


def _tiny_qwen2_5_vl(vocab_size: int, pad_token_id: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # Qwen2.5-VL's layout (GQA, multimodal RoPE split over head_dim / 2) at toy widths; the vision tower is
    # never run for text prompts but is part of the class the pipeline loads
    text = dict(
        vocab_size=vocab_size, hidden_size=QWEN_TEXT_HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                                 "mrope_section": [2, 1, 1]},
        pad_token_id=pad_token_id, bos_token_id=None, eos_token_id=None,
    )
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=QWEN_TEXT_HIDDEN, fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab_size - 1, video_token_id=vocab_size - 1,
                              vision_start_token_id=vocab_size - 1, vision_end_token_id=vocab_size - 1)
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_qwen_image():
    """QwenImagePipeline at toy scale: 16 latent channels (64 packed), VAE scale 8, Qwen-Image's scheduler."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    from workers.tiny import INIT_SEED, _randomise_qk_norms
    from workers.tokenizer import load_qwen_tokenizer

    tokenizer = load_qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
            joint_attention_dim=QWEN_TEXT_HIDDEN, axes_dims_rope=(2, 2, 4),
        )
        _randomise_qk_norms(transformer)
        text_encoder = _tiny_qwen2_5_vl(len(tokenizer), tokenizer.pad_token_id)
        # temperal_downsample of length 3 → vae_scale_factor 8, as the real VAE
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen-Image's scheduler config (exponential time shift, dynamic)
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
        shift_terminal=0.02, time_shift_type="exponential",
    )
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.default_sample_size = 8  # 64 px (vae scale 8 × 8); the pipeline's default 128 gives 1024 px
    # the system prefix the pipeline drops from the hidden states, counted in the stand-in tokenizer's tokens
    prefix = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(tokenizer(prefix).input_ids)
    for module in (transformer, text_encoder, vae):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_qwen3(vocab_size: int, pad_token_id: int):
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=QWEN_TEXT_HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=2048, pad_token_id=pad_token_id, bos_token_id=None,
        eos_token_id=None, tie_word_embeddings=False,
    )
    return Qwen3Model(config)


def build_tiny_z_image():
    """ZImagePipeline at toy scale. Its VAE has 3 levels (scale 4): a 64-px image is 8 × 8 = 64 patches, a multiple of
    the 32 Z-Image pads its image sequence to, so no image pad tokens appear (scale 8 would give 16 + 16 pad)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    from workers.tiny import INIT_SEED, _randomise_qk_norms
    from workers.tokenizer import load_qwen_tokenizer

    tokenizer = load_qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1, n_heads=4,
            n_kv_heads=4, cap_feat_dim=QWEN_TEXT_HIDDEN, axes_dims=[2, 2, 4], axes_lens=[256, 64, 64],
        )
        _randomise_qk_norms(transformer)
        for pad in (transformer.x_pad_token, transformer.cap_pad_token):  # zero at init; trained in the real model
            pad.data.copy_(torch.randn(pad.shape))
        text_encoder = _tiny_qwen3(len(tokenizer), tokenizer.pad_token_id)
        vae = AutoencoderKL(  # the FLUX.1 VAE's layout (16 channels, scale / shift) at toy widths, 3 levels
            in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4,
            sample_size=64, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)  # Z-Image-Turbo's
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.default_sample_size = 16  # 64 px at VAE scale 4 (the pipeline itself defaults to 1024 px, i.e. 128 at scale 8)
    for module in (transformer, text_encoder, vae):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_qwen(name: str):
    """Build the named Qwen-text-encoder preset (workers.tiny.QWEN_PRESETS)."""
    if name == TINY_QWEN_IMAGE:
        return build_tiny_qwen_image()
    if name == TINY_Z_IMAGE:
        return build_tiny_z_image()
    raise ValueError(f"unknown Qwen tiny preset {name!r}")
