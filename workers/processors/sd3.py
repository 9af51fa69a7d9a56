"""Joint-attention processor for SD3 / SD3.5 (`transformer_blocks.{i}.attn`, and SD3.5's `.attn2`).

`SD3SinkAttnProcessor` repeats diffusers 0.42.1's `JointAttnProcessor2_0` op for op (same projections,
norms, concatenation order [image | text], one SDPA call, same split), so without an active intervention
the output is bit-identical to stock, also while the layer is recorded: identification reads the same q/k
on the side, and interventions only overwrite the in-scope rows of the intervened batch elements afterwards.
QK-norm is applied per stream as diffusers does (norm_k on image keys, norm_added_k on text keys; the
paper's processors applied norm_k to the concatenation, paper-spec §5.6).
"""

from __future__ import annotations

import re

import torch

from workers.identification import KeyLayout
from workers.processors.common import apply_sinks, layer_ids, stock_attention
from workers.session import LayerInfo

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.attn$")


class SD3SinkAttnProcessor:
    def __init__(self, session, layer: LayerInfo):
        self.session = session
        self.layer = layer  # name e.g. "transformer_blocks.12.attn"; integer layers address the joint `.attn` only

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            context_query = attn.add_q_proj(encoder_hidden_states)
            context_key = attn.add_k_proj(encoder_hidden_states)
            context_value = attn.add_v_proj(encoder_hidden_states)
            context_query = context_query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            context_key = context_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            context_value = context_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                context_query = attn.norm_added_q(context_query)
            if attn.norm_added_k is not None:
                context_key = attn.norm_added_k(context_key)
            query = torch.cat([query, context_query], dim=2)
            key = torch.cat([key, context_key], dim=2)
            value = torch.cat([value, context_value], dim=2)

        ctx = self.session.context if self.session is not None else None
        wanted = ctx is not None and ctx.wants(self.layer.name, self.layer.block_index)
        # stock SDPA bits; on CUDA half precision also the lse, from the same cuDNN attention (checked bitwise)
        hidden_states, lse = stock_attention(query, key, value, want_lse=wanted)
        if wanted:
            num_image = residual.shape[1]
            num_text = key.shape[2] - num_image
            num_clip = min(ctx.num_clip_tokens, num_text)
            layout = KeyLayout(num_image=num_image, num_clip=num_clip, num_t5=num_text - num_clip)
            hidden_states = apply_sinks(ctx, self.layer, query, key, value, hidden_states, layout, lse=lse)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def block_index(module_name: str) -> int | None:
    match = _BLOCK.match(module_name)
    return int(match.group(1)) if match else None


def install_sd3_processors(transformer, session) -> list[LayerInfo]:
    """Replace every joint attention processor (`...attn` and `...attn2`) with an SD3SinkAttnProcessor."""
    names = [name.removesuffix(".processor") for name in transformer.attn_processors]
    layers = layer_ids([(name, block_index(name)) for name in names])
    transformer.set_attn_processor({f"{info.name}.processor": SD3SinkAttnProcessor(session, info) for info in layers})
    return layers
