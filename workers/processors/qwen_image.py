"""Attention processor for Qwen-Image (`transformer_blocks.{i}.attn`, double-stream joint attention).

`QwenImageSinkAttnProcessor` repeats diffusers 0.42.1's `QwenDoubleStreamAttnProcessor2_0` op for op: the joint
boolean mask [text mask | image ones], per-stream projections and QK RMS-norm, Qwen's complex RoPE on each stream,
concatenation [text | image], the same `dispatch_attention_fn` call with the processor's `_attention_backend`, the
same split and output projections. Without an active intervention the output is bit-identical to stock.

Keys reach the sink logic in the canonical order [image | text]: Qwen2.5-VL's tokens take the sequence-text slot
that T5 holds in SD3 / Flux / PixArt (segment "t5" of records and prompt edits), so a key index means the same
thing on every family. The text is the prompt's chat turn after the system prefix the pipeline drops, at its own
length: one prompt per call is never padded (the pipeline then passes no mask). When a call does carry a text mask
(prompts of different lengths in one batch), identification and interventions run over the attended keys only,
per group of batch elements with the same mask, and records keep the full key index (`key_index`), as on PixArt.

CFG: QwenImagePipeline calls the transformer twice per step (cond, then uncond, "true CFG"); the session tells
from diffusers' `cache_context` name which branch a call is and which of the run's elements it carries
(`RunContext.call_elements`).
"""

from __future__ import annotations

import re

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from workers.identification import KeyLayout
from workers.processors.common import DispatcherSinkProcessor, apply_sinks, apply_sinks_per_kept_keys, install_dispatcher_processors
from workers.session import LayerInfo

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.attn$")


class QwenImageSinkAttnProcessor(DispatcherSinkProcessor):
    def __init__(self, session, layer: LayerInfo):
        super().__init__(session, layer)
        self._orders: dict = {}  # (image, text, device) -> index orders Qwen ↔ canonical

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None, attention_mask=None,
                 image_rotary_emb=None):
        if encoder_hidden_states is None:
            raise ValueError("QwenImageSinkAttnProcessor requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError("QwenImageSinkAttnProcessor does not accept an external attention_mask (as diffusers' processor)")
        if encoder_hidden_states_mask is not None:
            seq_img = hidden_states.shape[1]
            image_mask = torch.ones((hidden_states.shape[0], seq_img), dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)
            attention_mask = attention_mask[:, None, None, :]
        seq_txt = encoder_hidden_states.shape[1]

        img_query = attn.to_q(hidden_states)
        img_key = attn.to_k(hidden_states)
        img_value = attn.to_v(hidden_states)
        txt_query = attn.add_q_proj(encoder_hidden_states)
        txt_key = attn.add_k_proj(encoder_hidden_states)
        txt_value = attn.add_v_proj(encoder_hidden_states)
        head_dim = attn.inner_dim // attn.heads
        img_query = img_query.unflatten(-1, (-1, head_dim))
        img_key = img_key.unflatten(-1, (-1, head_dim))
        img_value = img_value.unflatten(-1, (-1, head_dim))
        txt_query = txt_query.unflatten(-1, (-1, head_dim))
        txt_key = txt_key.unflatten(-1, (-1, head_dim))
        txt_value = txt_value.unflatten(-1, (-1, head_dim))
        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)
        joint_query = torch.cat([txt_query, img_query], dim=1)
        joint_key = torch.cat([txt_key, img_key], dim=1)
        joint_value = torch.cat([txt_value, img_value], dim=1)

        joint_hidden_states = dispatch_attention_fn(
            joint_query, joint_key, joint_value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )
        ctx = self.session.context if self.session is not None else None
        if ctx is not None and ctx.wants(self.layer.name, self.layer.block_index):
            joint_hidden_states = self._apply(ctx, joint_query, joint_key, joint_value, joint_hidden_states, seq_txt,
                                              encoder_hidden_states_mask)

        joint_hidden_states = joint_hidden_states.flatten(2, 3)
        joint_hidden_states = joint_hidden_states.to(joint_query.dtype)
        txt_attn_output = joint_hidden_states[:, :seq_txt, :]
        img_attn_output = joint_hidden_states[:, seq_txt:, :]
        img_attn_output = attn.to_out[0](img_attn_output.contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)
        txt_attn_output = attn.to_add_out(txt_attn_output.contiguous())
        return img_attn_output, txt_attn_output

    def _apply(self, ctx, query, key, value, out, num_text: int, text_mask):
        """The sink logic on copies in the canonical order [image | text] ([B, H, S, D]); the result back in Qwen's order."""
        total = query.shape[1]
        num_image = total - num_text
        order_key = (num_image, num_text, query.device)
        if order_key not in self._orders:
            to_canonical = torch.cat([torch.arange(num_text, total), torch.arange(num_text)]).to(query.device)
            self._orders[order_key] = (to_canonical, torch.argsort(to_canonical))
        to_canonical, to_qwen = self._orders[order_key]

        def canonical(x):
            return x.index_select(1, to_canonical).transpose(1, 2)  # [B, H, S, D], a copy

        q, k, v, o = canonical(query), canonical(key), canonical(value), canonical(out)
        layout = KeyLayout(num_image=num_image, num_clip=0, num_t5=num_text)
        if text_mask is None or bool(text_mask.all()):
            o = apply_sinks(ctx, self.layer, q, k, v, o, layout)  # the batch rows are the denoiser call's elements
        else:  # attended keys only: every image key, the text keys of the row's mask
            kept_rows = [[True] * num_image + row for row in text_mask.bool().cpu().tolist()]
            apply_sinks_per_kept_keys(ctx, self.layer, q, k, v, o, kept_rows, layout, ctx.batch_elements())
        return o.transpose(1, 2).index_select(1, to_qwen)


def block_index(module_name: str) -> int | None:
    match = _BLOCK.match(module_name)
    return int(match.group(1)) if match else None


def install_qwen_image_processors(transformer, session) -> list[LayerInfo]:
    """Replace every double-stream attention processor; block i's `.attn` is integer layer i (Qwen-Image: 60)."""
    layers = install_dispatcher_processors(transformer, session, QwenImageSinkAttnProcessor, block_index)
    session.track_cfg_calls(transformer)
    return layers
