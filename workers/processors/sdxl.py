"""Processor for diffusers' legacy `Attention` + `AttnProcessor2_0`: SDXL's UNet and PixArt-Σ's transformer.

`SDXLSinkAttnProcessor` repeats diffusers 0.42.1's `AttnProcessor2_0` op for op, so without an active
intervention the output is bit-identical to stock (also while recorded). Queries are always image tokens;
keys are image tokens (`attn1`, self-attention) or text tokens (`attn2`, cross-attention: SDXL's 77 CLIP
tokens, CLIP-L and CLIP-G concatenated along features so one key per token; PixArt's T5 tokens).

SDXL: integer layer i names the `attn2` of the i-th transformer block in module order (SDXL base: 70).
PixArt-Σ: integer layer i names `transformer_blocks.{i}.attn2`. Self-attention is addressed by glob (`*.attn1`).

PixArt masks its T5 padding with an additive −10000 bias, under which those keys get exactly zero weight
(exp underflows in every dtype). Identification and interventions therefore run over the attended keys
only (grouping batch elements with the same mask); records and selections use the full T5 slot index.
An element with no more attended keys than the selection budget (the unconditional "" prompt has only its
EOS token) is left stock at that call and not recorded as intervened: removing every key is undefined.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.identification import KeyLayout
from workers.processors.common import apply_sinks, apply_sinks_per_kept_keys, layer_ids
from workers.session import LayerInfo

_MASKED = -1000.0  # an additive bias at or below this is a dropped key (exp(-1000) is 0 in every float dtype)


class SDXLSinkAttnProcessor:
    def __init__(self, session, layer: LayerInfo, cross_keys: str = "clip"):
        self.session = session
        self.layer = layer
        self.cross_keys = cross_keys  # modality of cross-attention keys: "clip" (SDXL) or "t5" (PixArt)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        ctx = self.session.context if self.session is not None else None
        if ctx is not None and ctx.wants(self.layer.name, self.layer.block_index):
            layout = self._layout(cross, query.shape[2], key.shape[2])
            if attention_mask is None:
                hidden_states = apply_sinks(ctx, self.layer, query, key, value, hidden_states, layout)
            else:
                apply_masked_sinks(ctx, self.layer, query, key, value, hidden_states, attention_mask, layout)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def _layout(self, cross: bool, num_queries: int, num_keys: int) -> KeyLayout:
        if not cross:  # image queries and keys
            return KeyLayout(num_image=num_keys, num_clip=0, num_t5=0)
        if self.cross_keys == "t5":
            return KeyLayout(num_image=0, num_clip=0, num_t5=num_keys, query_image=num_queries, query_text=0)
        return KeyLayout(num_image=0, num_clip=num_keys, num_t5=0, query_image=num_queries, query_text=0)

def apply_masked_sinks(ctx, layer: LayerInfo, query, key, value, out, mask, layout: KeyLayout) -> None:
    """The sink logic under an additive per-key mask (PixArt's and LTX-Video's masked T5 keys): run per group of
    elements with the same attended keys, over those keys only; write their rows back into `out` [B, H, Lq, D]."""
    bias = mask.float()
    per_key = bias[:, :1, :1, :]
    if not torch.equal(bias, per_key.expand_as(bias)):
        raise NotImplementedError(f"{layer.name}: sink logic needs a per-key mask (the same for every head and query)")
    per_key = per_key[:, 0, 0, :]
    dropped = per_key <= _MASKED
    if not bool(((per_key == 0) | dropped).all()):
        raise NotImplementedError(f"{layer.name}: sink logic supports masks of 0 (kept) and ≤ {_MASKED} (dropped) only")
    if layout.num_image and (layout.num_clip or layout.num_t5):
        raise NotImplementedError(f"{layer.name}: masks over mixed image/text keys are not supported")
    apply_sinks_per_kept_keys(ctx, layer, query, key, value, out, (~dropped).cpu().tolist(), layout, ctx.batch_elements())


def install_sdxl_processors(unet, session) -> list[LayerInfo]:
    """Replace every UNet attention processor; attn2 modules get integer block indices in module order."""
    entries, block = [], 0
    for name in unet.attn_processors:
        module = name.removesuffix(".processor")
        index = None
        if module.endswith(".attn2"):
            index = block
            block += 1
        entries.append((module, index))
    layers = layer_ids(entries)
    unet.set_attn_processor({f"{info.name}.processor": SDXLSinkAttnProcessor(session, info, "clip") for info in layers})
    return layers


def install_pixart_processors(transformer, session) -> list[LayerInfo]:
    """PixArt-Σ: `transformer_blocks.{i}.attn2` (cross-attention over T5) is integer layer i; attn1 by glob."""
    entries = []
    for name in transformer.attn_processors:
        module = name.removesuffix(".processor")
        parts = module.split(".")
        index = int(parts[1]) if len(parts) == 3 and parts[0] == "transformer_blocks" and parts[2] == "attn2" else None
        entries.append((module, index))
    layers = layer_ids(entries)
    transformer.set_attn_processor({f"{info.name}.processor": SDXLSinkAttnProcessor(session, info, "t5") for info in layers})
    return layers
