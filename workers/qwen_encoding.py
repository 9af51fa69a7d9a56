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
