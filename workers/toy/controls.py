"""Positive control: a planted attention sink whose place is known.

`plant_sink` makes one key of one joint-attention layer take most of the attention mass of every query, in
every head and every step: forward hooks on that layer's query projections note the call's queries, and a
hook on its text-key projection replaces the key of one text token with a long vector along the mean query
direction of each head (`strength` × √head_dim / mean query norm), so q·k of that key is large for every
query that points the way most queries point. The token is the CLIP start token (text position 0): its
features are the same for every prompt, as a real sink's often are. Nothing else in the model changes.

Where it is planted, identification must find it (top-1 key = PLANT_KEY in nearly every step and head),
removing it must move the output more than removing a random key, and the statistics must call the
difference sink-specific (tests/workers/test_toy_controls.py). The preset `toy-sd3-planted` is toy-sd3
with this plant at PLANT_LAYER, labelled as such in every output.
"""

from __future__ import annotations

import torch

PLANTED_PRESET = "toy-sd3-planted"
PLANT_LAYER = 3  # transformer_blocks.3.attn of toy-sd3 (of 0..5)
PLANT_TEXT_POSITION = 0  # the CLIP start token
PLANT_STRENGTH = 40.0


def planted_key_index(num_image_tokens: int, text_position: int = PLANT_TEXT_POSITION) -> int:
    """The planted key's index in the canonical key order [image | CLIP | T5]."""
    return num_image_tokens + text_position


def plant_sink(transformer, layer: int = PLANT_LAYER, text_position: int = PLANT_TEXT_POSITION,
               strength: float = PLANT_STRENGTH) -> list:
    """Install the planted sink on `transformer.transformer_blocks[layer].attn`; returns the hook handles
    (call `.remove()` on each to undo it)."""
    attn = transformer.transformer_blocks[layer].attn
    heads = attn.heads
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, output):
            seen[name] = output.detach()

        return hook

    def replace_key(module, args, output):
        queries = torch.cat([seen.pop("image"), seen.pop("text")], dim=1)  # [B, N, H·D]
        b, n, inner = queries.shape
        head_dim = inner // heads
        q = queries.view(b, n, heads, head_dim).float()
        direction = torch.nn.functional.normalize(q.mean(dim=1), dim=-1)  # [B, H, D]
        scale = strength * head_dim**0.5 / q.norm(dim=-1).mean(dim=1, keepdim=True).clamp_min(1e-6)  # [B, 1, H]
        planted = (direction * scale.transpose(1, 2)).reshape(b, inner).to(output.dtype)
        output = output.clone()
        output[:, text_position] = planted
        return output

    return [
        attn.to_q.register_forward_hook(keep("image")),
        attn.add_q_proj.register_forward_hook(keep("text")),
        attn.add_k_proj.register_forward_hook(replace_key),
    ]
