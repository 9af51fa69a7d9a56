"""Tiny, randomly initialised Qwen-Image and Z-Image pipelines (the two Qwen-text-encoder DiTs), built offline.

Like workers.tiny (whose init seed they share), they run the real diffusers code paths — QwenImagePipeline with
QwenImageTransformer2DModel, AutoencoderKLQwenImage and a `Qwen2_5_VLForConditionalGeneration` text encoder;
ZImagePipeline with ZImageTransformer2DModel, AutoencoderKL and a `Qwen3Model` — at toy widths, in well under a
second per 64-px image on a CPU. The tokenizer is the offline Qwen stand-in of `workers.tokenizer.load_qwen_tokenizer`.
"""

from __future__ import annotations

import torch

TINY_QWEN_IMAGE = "tiny-qwen-image"  # Qwen-Image-like: 2 double-stream blocks, 4 heads × 8, 2×2 packing, 64 px
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


def build_tiny_qwen(name: str):
    """Build the named Qwen-text-encoder preset (workers.tiny.QWEN_PRESETS)."""
    if name == TINY_QWEN_IMAGE:
        return build_tiny_qwen_image()
    raise ValueError(f"unknown Qwen tiny preset {name!r}")
