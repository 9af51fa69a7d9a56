"""Attention processor for LTX-Video (`LTXAttention`, diffusers' attention-dispatcher class).

`LTXSinkAttnProcessor` repeats diffusers 0.42.1's `LTXVideoAttnProcessor` op for op: the legacy mask preparation,
projections, RMS QK-norm across heads, LTX's rotary embedding on the flat q and k (self-attention), the head split
and the same `dispatch_attention_fn` call with the processor's `_attention_backend`. Without an active intervention
the output is bit-identical to stock.

Keys: `transformer_blocks.{i}.attn1` is self-attention over the video's image tokens, latent frames × patch rows ×
patch columns in the order LTXPipeline packs them (frame by frame, row by row: `manifests.keys.ImageGrid`);
`transformer_blocks.{i}.attn2` is cross-attention to the T5 tokens, whose padding carries the transformer's −10000
additive mask, handled like PixArt's (`workers.processors.sdxl.apply_masked_sinks`: identification and interventions
over the attended keys only, indices in T5 slots). Integer layer i names `transformer_blocks.{i}.attn2`;
self-attention by glob (`transformer_blocks.*.attn1`).
"""

from __future__ import annotations

import re

from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

from workers.identification import KeyLayout
from workers.processors.common import DispatcherSinkProcessor, apply_sinks, install_dispatcher_processors
from workers.processors.sdxl import apply_masked_sinks
from workers.session import LayerInfo

_CROSS = re.compile(r"^transformer_blocks\.(\d+)\.attn2$")


class LTXSinkAttnProcessor(DispatcherSinkProcessor):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        ctx = self.session.context if self.session is not None else None
        if ctx is not None and ctx.wants(self.layer.name, self.layer.block_index):
            self._apply(ctx, query, key, value, hidden_states, attention_mask, cross)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states

    def _apply(self, ctx, query, key, value, out, mask, cross: bool) -> None:
        """The sink logic on [B, H, S, D] views of the [B, S, H, D] tensors; rows are written into `out` itself."""
        num_queries, num_keys = query.shape[1], key.shape[1]
        if cross:
            layout = KeyLayout(num_image=0, num_clip=0, num_t5=num_keys, query_image=num_queries, query_text=0)
        else:
            layout = KeyLayout(num_image=num_keys, num_clip=0, num_t5=0)
        q, k, v, o = (x.transpose(1, 2) for x in (query, key, value, out))
        if mask is None:
            apply_sinks(ctx, self.layer, q, k, v, o, layout)
        else:
            apply_masked_sinks(ctx, self.layer, q, k, v, o, mask, layout)


def block_index(module_name: str) -> int | None:
    m = _CROSS.match(module_name)
    return int(m.group(1)) if m else None


def install_ltx_processors(transformer, session) -> list[LayerInfo]:
    """Replace every LTXAttention processor; `transformer_blocks.{i}.attn2` is integer layer i, attn1 by glob."""
    return install_dispatcher_processors(transformer, session, LTXSinkAttnProcessor, block_index)
