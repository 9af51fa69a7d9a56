"""Attention processor for SDXL's UNet (`...transformer_blocks.{j}.attn1` self, `...attn2` cross-attention).

`SDXLSinkAttnProcessor` repeats diffusers 0.42.1's `AttnProcessor2_0` op for op, so without an active
intervention the output is bit-identical to stock (also while recorded). Queries are always image tokens;
keys are image tokens (attn1) or the 77 CLIP tokens (attn2; CLIP-L and CLIP-G are concatenated along
features, so there is one key per token). Integer layer i names the cross-attention `attn2` of the i-th
transformer block in module order (SDXL base: 70 blocks); self-attention is addressed by glob (`*.attn1`).
"""

from __future__ import annotations

import torch.nn.functional as F

from workers.identification import KeyLayout
from workers.processors.common import apply_sinks


class SDXLSinkAttnProcessor:
    def __init__(self, session, layer_name: str, block_index: int | None, num_clip_tokens: int = 77):
        self.session = session
        self.layer_name = layer_name
        self.block_index = block_index  # set for attn2 modules only
        self.num_clip_tokens = num_clip_tokens

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
        if ctx is not None:
            if attention_mask is not None:
                raise NotImplementedError(f"{self.layer_name}: sink interventions with an attention mask are not supported")
            num_queries = query.shape[2]
            if cross:  # image queries, CLIP keys
                layout = KeyLayout(num_image=0, num_clip=key.shape[2], num_t5=0, query_image=num_queries, query_text=0)
            else:  # image queries and keys
                layout = KeyLayout(num_image=key.shape[2], num_clip=0, num_t5=0)
            hidden_states = apply_sinks(ctx, self.layer_name, self.block_index, query, key, value, hidden_states, layout)
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


def install_sdxl_processors(unet, session) -> list[str]:
    """Replace every UNet attention processor; attn2 modules get integer block indices in module order."""
    processors, names = {}, []
    block = 0
    for name in unet.attn_processors:
        module = name.removesuffix(".processor")
        index = None
        if module.endswith(".attn2"):
            index = block
            block += 1
        processors[name] = SDXLSinkAttnProcessor(session, module, index)
        names.append(module)
    unet.set_attn_processor(processors)
    return names
