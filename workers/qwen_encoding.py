"""Text conditioning and initial noise of the Qwen-text-encoder families, for workers.generate.

Qwen-Image (`QwenImagePipeline`): the prompt is wrapped in the pipeline's chat template, tokenized at its own
length, encoded by Qwen2.5-VL, and the hidden states of the system prefix (the first
`prompt_template_encode_start_idx` tokens) are dropped; what remains — `<|im_start|>user\n`'s successor tokens,
the prompt, `<|im_end|>\n<|im_start|>assistant\n` — are the denoiser's text keys, cut to `max_sequence_length`.
Nothing is padded, so a prompt edit can only truncate (`max_length`); the others are refused
(`PromptEdit.unsupported_reason`). CFG is the pipeline's "true CFG": `true_cfg_scale` = `generation.guidance`
(> 1 enables it) with the negative prompt " " (a space: the pipeline's documented way to enable it with an empty
negative), encoded the same way, in a second denoiser call per step.
"""

from __future__ import annotations

import logging

import torch

from manifests.interventions import PromptEdit
from workers import prompt_side

QWEN_IMAGE_NEGATIVE = " "


class _AllOnesMaskNote(logging.Filter):
    """QwenImagePipeline.encode_prompt returns no mask when every text token is attended (always, for one prompt);
    passing that None back makes the pipeline warn at every call that padding might be unmasked. It is not."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "prompt_embeds_mask` is not provided" not in record.getMessage()


logging.getLogger("diffusers.pipelines.qwenimage.pipeline_qwenimage").addFilter(_AllOnesMaskNote())
QWEN_IMAGE_MAX_TEXT = 1024  # QwenImagePipeline.tokenizer_max_length: its limit on max_sequence_length


def encode_qwen_image(pipe, prompt: str, guidance: float, msl: int, edit: PromptEdit | None, device):
    """(embeds, extra pipeline kwargs, use_cfg, cond text keys, uncond text keys) of one prompt."""
    if edit is not None and edit.max_length:
        msl = edit.max_length
    if msl > QWEN_IMAGE_MAX_TEXT:
        raise ValueError(f"max_sequence_length {msl} > {QWEN_IMAGE_MAX_TEXT}, Qwen-Image's limit")
    use_cfg = guidance > 1.0
    with torch.no_grad(), prompt_side.capture(pipe, "qwen_image", prompt, None) as log:
        pe, mask = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1, max_sequence_length=msl)
        npe = nmask = None
        if use_cfg:
            npe, nmask = pipe.encode_prompt(prompt=QWEN_IMAGE_NEGATIVE, device=device, num_images_per_prompt=1, max_sequence_length=msl)
    embeds = dict(prompt_embeds=pe, prompt_embeds_mask=mask, negative_prompt_embeds=npe, negative_prompt_embeds_mask=nmask)
    extra = dict(true_cfg_scale=guidance, max_sequence_length=msl)
    start = pipe.prompt_template_encode_start_idx
    keys = [
        prompt_side.call_keys(pipe.tokenizer, log.nth("tokenizer", which), "t5", start, start + msl)
        for which in ((0, 1) if use_cfg else (0,))
    ]
    for which, (embedding, text) in enumerate(zip((pe, npe), keys)):
        if embedding.shape[1] != len(text):
            raise RuntimeError(f"Qwen-Image {('cond', 'uncond')[which]} text: {embedding.shape[1]} embeddings but {len(text)} logged tokens")
    return embeds, extra, use_cfg, keys[0], keys[1] if use_cfg else ()


def qwen_image_latents(pipe, generator: torch.Generator, height: int, width: int) -> torch.Tensor:
    """Batch-1 noise in the pipeline's unpacked shape (1, 1 frame, C, h, w), packed into 2×2 patches as it does."""
    channels = pipe.transformer.config.in_channels // 4
    h, w = 2 * (height // (pipe.vae_scale_factor * 2)), 2 * (width // (pipe.vae_scale_factor * 2))
    noise = torch.randn((1, 1, channels, h, w), generator=generator, dtype=torch.float32)
    return pipe._pack_latents(noise, 1, channels, h, w)


# --- Z-Image -----------------------------------------------------------------------------------------
# ZImagePipeline renders the prompt with the tokenizer's chat template (one user turn, generation prompt, thinking
# enabled), tokenizes it to `max_sequence_length` with padding, and passes Qwen3's second-to-last hidden states of
# the real (attended) tokens only; the transformer pads that caption to a multiple of 32 with its learned
# `cap_pad_token`. The denoiser's text keys are therefore the template's real tokens, then `padded − real` pad
# slots (kind padding, no token). Tokenizer padding never reaches the transformer, so only `max_length` edits apply.
# CFG: `guidance_scale` > 0 (not > 1) enables it, with the negative prompt "" and the batch [cond × A, uncond × A].


def check_z_image_size(height: int, width: int, vae_scale: int, patch: int) -> None:
    """Z-Image pads its image sequence to a multiple of 32 with a learned pad token; those keys have no place on
    the patch grid, so sizes that would need them are refused."""
    from workers.processors.z_image import SEQ_MULTI_OF

    patches = (height // (vae_scale * patch)) * (width // (vae_scale * patch))
    if patches % SEQ_MULTI_OF:
        raise ValueError(f"{height}×{width} gives {patches} image patches on Z-Image, not a multiple of {SEQ_MULTI_OF}: the "
                         f"transformer would add image pad tokens; choose a size whose patch count is (e.g. 1024×1024, 512×512)")


def encode_z_image(pipe, prompt: str, guidance: float, msl: int, edit: PromptEdit | None, device):
    """(embeds, extra pipeline kwargs, use_cfg, cond text keys, uncond text keys) of one prompt."""
    from manifests.keys import TextKey
    from workers.processors.z_image import padded

    use_cfg = guidance > 0.0
    with torch.no_grad(), prompt_side.capture(pipe, "z_image", prompt, edit) as log:
        pe, npe = pipe.encode_prompt(prompt=prompt, device=device, do_classifier_free_guidance=use_cfg, negative_prompt="",
                                     max_sequence_length=msl)
    embeds = dict(prompt_embeds=pe, negative_prompt_embeds=npe if use_cfg else None)
    extra = dict(guidance_scale=guidance, max_sequence_length=msl)
    keys = []
    for which, embedding in enumerate([pe[0]] + ([npe[0]] if use_cfg else [])):
        call = log.nth("tokenizer", which)
        real = tuple(k for k in prompt_side.call_keys(pipe.tokenizer, call, "t5") if k.kind != "padding")
        if len(real) != embedding.shape[0]:
            raise RuntimeError(f"Z-Image {('cond', 'uncond')[which]} text: {embedding.shape[0]} embeddings but {len(real)} logged tokens")
        keys.append(real + tuple(TextKey("t5", j, None, "padding") for j in range(len(real), padded(len(real)))))
    return embeds, extra, use_cfg, keys[0], keys[1] if use_cfg else ()
