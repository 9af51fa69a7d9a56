"""Attention processor for Flux (`FluxAttention`, diffusers' attention-dispatcher class, not the legacy one).

`FluxSinkAttnProcessor` repeats diffusers 0.42.1's `FluxAttnProcessor` op for op: the same projection helper
(fused or not), per-stream QK RMS-norm, concatenation [text | image], rotary embeddings on q and k, and the
same `dispatch_attention_fn` call with the processor's `_attention_backend` (set by
`transformer.set_attention_backend`). Without an active intervention the output is bit-identical to stock.

The sink logic sees the keys in the canonical order [image | T5] used by every family (Flux has no CLIP
tokens in the sequence: CLIP only gives the pooled embedding), so indices in records and `static` selections
mean the same thing as on SD3; the processor reorders copies of q / k / v / output only for layers that are
recorded or intervened at the current step, and writes the output back in Flux's order. q and k are taken
after RoPE: identification measures the attention the model really computes.

Integer layers: i < num_layers names `transformer_blocks.{i}.attn` (joint blocks), the next ones
`single_transformer_blocks.{i - num_layers}.attn` (single-stream blocks), in forward order (FLUX.1: 19 + 38).
"""

from __future__ import annotations

import re

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from workers.identification import KeyLayout
from workers.processors.common import DispatcherSinkProcessor, apply_sinks, install_dispatcher_processors
from workers.session import LayerInfo

_JOINT = re.compile(r"^transformer_blocks\.(\d+)\.attn$")
_SINGLE = re.compile(r"^single_transformer_blocks\.(\d+)\.attn$")


class FluxSinkAttnProcessor(DispatcherSinkProcessor):
    def __init__(self, session, layer: LayerInfo):
        super().__init__(session, layer)
        self._orders: dict = {}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        ctx = self.session.context if self.session is not None else None
        if ctx is not None and ctx.wants(self.layer.name, self.layer.block_index):
            if attention_mask is not None:
                raise NotImplementedError(f"{self.layer.name}: sink logic with an attention mask is not supported on Flux")
            num_text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else ctx.num_text_tokens
            if num_text is None:
                raise RuntimeError(f"{self.layer.name}: the number of text tokens is unknown (no encoder_hidden_states in the denoiser call)")
            hidden_states = self._apply(ctx, query, key, value, hidden_states, num_text)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states

    def _apply(self, ctx, query, key, value, out, num_text: int) -> torch.Tensor:
        """[B, S, H, D] tensors in Flux order [text | image] → sink logic in [image | text] → output in Flux order."""
        seq = query.shape[1]
        num_image = seq - num_text
        order_key = (seq, num_text, query.device)
        if order_key not in self._orders:  # built once per shape, not per call
            self._orders[order_key] = (
                torch.cat([torch.arange(num_text, seq), torch.arange(0, num_text)]).to(query.device),
                torch.cat([torch.arange(num_image, seq), torch.arange(0, num_image)]).to(query.device),
            )
        to_canonical, to_flux = self._orders[order_key]

        def canonical(x):
            return x.index_select(1, to_canonical).transpose(1, 2)  # [B, H, S, D], a copy

        layout = KeyLayout(num_image=num_image, num_clip=0, num_t5=num_text)
        result = apply_sinks(ctx, self.layer, canonical(query), canonical(key), canonical(value), canonical(out), layout)
        return result.transpose(1, 2).index_select(1, to_flux)


def block_index(module_name: str, num_joint: int) -> int | None:
    if m := _JOINT.match(module_name):
        return int(m.group(1))
    if m := _SINGLE.match(module_name):
        return num_joint + int(m.group(1))
    return None


def install_flux_processors(transformer, session) -> list[LayerInfo]:
    """Replace every FluxAttention processor; joint then single blocks get integer indices in forward order."""
    num_joint = len(transformer.transformer_blocks)
    return install_dispatcher_processors(transformer, session, FluxSinkAttnProcessor, lambda name: block_index(name, num_joint))
