"""Attention processor for Wan 2.1 (`WanAttention`, diffusers' attention-dispatcher class).

`WanSinkAttnProcessor` repeats diffusers 0.42.1's `WanAttnProcessor` op for op: the same projection helper (fused
or not), RMS QK-norm across heads before the head split, Wan's interleaved 3-D rotary embedding (frame, row,
column bands) on q and k in self-attention, and the same `dispatch_attention_fn` calls with the processor's
`_attention_backend`. Without an active intervention the output is bit-identical to stock.

Keys: `blocks.{i}.attn1` is self-attention over the video's image tokens, latent frames × patch rows × patch
columns, flattened frame by frame, row by row (the order of Wan's patch embedding), so image key j sits at
`manifests.keys.ImageGrid.position(j)`; `blocks.{i}.attn2` is cross-attention from those tokens to the UMT5
tokens. Wan has no text attention mask: its pipeline zeroes the embeddings past the prompt's last token, so the
padding keys are attended (each is the text projection of a zero vector) and the sink logic sees every slot.
q and k are taken after RoPE: identification measures the attention the model really computes.

Integer layer i names `blocks.{i}.attn2` (as PixArt's cross-attention); self-attention is addressed by glob
(`blocks.*.attn1`). The image-to-video variant's extra image-context attention (`add_k_proj`) runs stock and is
not seen by the sink logic.
"""

from __future__ import annotations

import re

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import _get_added_kv_projections, _get_qkv_projections

from workers.identification import KeyLayout
from workers.processors.common import DispatcherSinkProcessor, apply_sinks, install_dispatcher_processors
from workers.session import LayerInfo

_CROSS = re.compile(r"^blocks\.(\d+)\.attn2$")


def _rotary(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding (pairs (0, 1), (2, 3), … rotated), as its processor computes it."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanSinkAttnProcessor(DispatcherSinkProcessor):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            # image-to-video: the first tokens are image context; the last 512 are text (diffusers hard-codes 512)
            image_context_length = encoder_hidden_states.shape[1] - 512
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _rotary(query, *rotary_emb)
            key = _rotary(key, *rotary_emb)

        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img)
            key_img = key_img.unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states_img = dispatch_attention_fn(
                query, key_img, value_img, attn_mask=None, dropout_p=0.0, is_causal=False, backend=self._attention_backend,
                parallel_config=None,
            )
            hidden_states_img = hidden_states_img.flatten(2, 3)
            hidden_states_img = hidden_states_img.type_as(query)

        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, backend=self._attention_backend,
            parallel_config=(self._parallel_config if encoder_hidden_states is None else None),
        )
        ctx = self.session.context if self.session is not None else None
        if ctx is not None and ctx.wants(self.layer.name, self.layer.block_index):
            if attention_mask is not None:
                raise NotImplementedError(f"{self.layer.name}: sink logic with an attention mask is not supported on Wan")
            hidden_states = self._apply(ctx, query, key, value, hidden_states, cross=encoder_hidden_states is not None)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states

    def _apply(self, ctx, query, key, value, out, cross: bool) -> torch.Tensor:
        """[B, S, H, D] tensors → the sink logic in [B, H, S, D] (keys [image] or [T5]) → output in [B, S, H, D]."""
        num_queries, num_keys = query.shape[1], key.shape[1]
        if cross:
            layout = KeyLayout(num_image=0, num_clip=0, num_t5=num_keys, query_image=num_queries, query_text=0)
        else:
            layout = KeyLayout(num_image=num_keys, num_clip=0, num_t5=0)
        result = apply_sinks(ctx, self.layer, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                             out.transpose(1, 2), layout)  # a view: rows are written into `out` itself
        return result.transpose(1, 2)


def block_index(module_name: str) -> int | None:
    m = _CROSS.match(module_name)
    return int(m.group(1)) if m else None


def install_wan_processors(transformer, session) -> list[LayerInfo]:
    """Replace every WanAttention processor; `blocks.{i}.attn2` is integer layer i, attn1 by glob. WanPipeline calls
    the transformer once per CFG branch, inside `cache_context("cond" | "uncond")`: the session reads the branch there."""
    layers = install_dispatcher_processors(transformer, session, WanSinkAttnProcessor, block_index)
    session.track_cfg_calls(transformer)
    return layers
