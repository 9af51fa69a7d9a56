"""Attention processor for Z-Image (`ZSingleStreamAttnProcessor` on every `Attention` of ZImageTransformer2DModel).

`ZImageSinkAttnProcessor` repeats diffusers 0.42.1's `ZSingleStreamAttnProcessor` op for op (projections, per-head
QK RMS-norm, complex RoPE in fp32, the `[B, 1, 1, L]` boolean mask, the same `dispatch_attention_fn` call and
backend), so without an active intervention the output is bit-identical to stock.

Z-Image is single-stream: its main blocks (`layers.{i}.attention`, integer layer i; 30 on Z-Image-Turbo) attend over
one sequence per batch element, already in the canonical order [image | text]: the image patches, then the caption
(Qwen3's hidden states of the chat-template prompt's real tokens, the "t5" text segment), each padded by the
transformer to a multiple of 32 with a learned pad token (`x_pad_token`, `cap_pad_token`). Caption pad tokens are
attended keys: text keys of kind `padding`. Elements whose captions differ in padded length are padded again to the
batch's longest sequence and masked; identification and interventions then run over each element's own keys (groups
of equal length), with records in the full key index, as on PixArt. Image pad tokens have no place on the patch grid:
a size whose patch count is not a multiple of 32 is refused (workers.qwen_encoding.check_z_image_size).

The refiners are addressed by glob: `noise_refiner.*.attention` (image keys only) and `context_refiner.*.attention`
(text keys only).

The transformer takes lists (one latent and one caption per element); a forward pre-hook reads their lengths for the
processors (`ZImageCallShape`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from workers.identification import KeyLayout
from workers.processors.common import DispatcherSinkProcessor, apply_sinks, apply_sinks_per_kept_keys, keep_dispatch_settings, layer_ids
from workers.session import LayerInfo

SEQ_MULTI_OF = 32  # diffusers.models.transformers.transformer_z_image.SEQ_MULTI_OF: sequences are padded to it
_MAIN = re.compile(r"^layers\.(\d+)\.attention$")


def padded(length: int) -> int:
    return length + (-length) % SEQ_MULTI_OF


@dataclass
class ZImageCallShape:
    """Token counts of the current transformer call (set by a forward pre-hook): image tokens and per-element caption
    tokens, both as padded by the transformer."""

    image: int = 0
    captions: list[int] = field(default_factory=list)

    def read(self, module, args, kwargs) -> None:
        x = kwargs.get("x", args[0] if args else None)
        caps = kwargs.get("cap_feats", args[2] if len(args) > 2 else None)
        patch = kwargs.get("patch_size", 2)
        f_patch = kwargs.get("f_patch_size", 1)
        if not isinstance(x, list) or isinstance(x[0], list):
            raise NotImplementedError("Z-Image sink processors support the basic (text-to-image) mode only, not omni inputs")
        _, frames, height, width = x[0].shape
        self.image = padded((frames // f_patch) * (height // patch) * (width // patch))
        self.captions = [padded(len(c)) for c in caps]


class ZImageSinkAttnProcessor(DispatcherSinkProcessor):
    def __init__(self, session, layer: LayerInfo, kind: str, shape: ZImageCallShape):
        super().__init__(session, layer)
        self.kind = kind  # "main" | "noise_refiner" | "context_refiner"
        self.shape = shape

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        query = query.unflatten(-1, (attn.heads, -1))
        key = key.unflatten(-1, (attn.heads, -1))
        value = value.unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        def apply_rotary_emb(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
            with torch.amp.autocast("cuda", enabled=False):
                x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
                freqs_cis = freqs_cis.unsqueeze(2)
                x_out = torch.view_as_real(x * freqs_cis).flatten(3)
                return x_out.type_as(x_in)

        if freqs_cis is not None:
            query = apply_rotary_emb(query, freqs_cis)
            key = apply_rotary_emb(key, freqs_cis)
        dtype = query.dtype
        query, key = query.to(dtype), key.to(dtype)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]

        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )
        ctx = self.session.context if self.session is not None else None
        if ctx is not None and ctx.wants(self.layer.name, self.layer.block_index):
            hidden_states = self._apply(ctx, query, key, value, hidden_states)

        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(dtype)
        output = attn.to_out[0](hidden_states)
        if len(attn.to_out) > 1:
            output = attn.to_out[1](output)
        return output

    def _lengths(self, batch: int) -> tuple[int, list[int]]:
        """(image keys, per-element text keys) of this layer kind."""
        captions = self.shape.captions
        if len(captions) != batch:
            raise RuntimeError(f"{self.layer.name}: a batch of {batch} but the call had {len(captions)} captions")
        if self.kind == "noise_refiner":
            return self.shape.image, [0] * batch
        if self.kind == "context_refiner":
            return 0, captions
        return self.shape.image, captions

    def _apply(self, ctx, query, key, value, out):
        q, k, v, o = (x.transpose(1, 2) for x in (query, key, value, out))  # [B, H, S, D] views; o is written in place
        batch, seq = q.shape[0], q.shape[2]
        num_image, texts = self._lengths(batch)
        if num_image + min(texts) == seq:  # every element fills the sequence: no mask, no subset
            layout = KeyLayout(num_image=num_image, num_clip=0, num_t5=seq - num_image)
            return apply_sinks(ctx, self.layer, q, k, v, o, layout).transpose(1, 2)
        full = KeyLayout(num_image=num_image, num_clip=0, num_t5=max(texts))
        kept_rows = [[True] * (num_image + n) + [False] * (seq - num_image - n) for n in texts]  # the image, then the row's own caption
        apply_sinks_per_kept_keys(ctx, self.layer, q, k, v, o, kept_rows, full, list(range(batch)))
        return o.transpose(1, 2)


def _kind(module_name: str) -> tuple[str, int | None]:
    if m := _MAIN.match(module_name):
        return "main", int(m.group(1))
    return module_name.split(".")[0], None


def attention_modules(transformer) -> list[str]:
    """Names of the Attention modules (ZImageTransformer2DModel has no `attn_processors`), in module order."""
    return [name for name, module in transformer.named_modules() if hasattr(module, "set_processor") and hasattr(module, "processor")]


def install_z_image_processors(transformer, session) -> list[LayerInfo]:
    """Replace the processor of every Attention (refiners and main layers); `layers.{i}.attention` is integer layer i."""
    shape = ZImageCallShape()
    transformer.register_forward_pre_hook(shape.read, with_kwargs=True)
    names = attention_modules(transformer)
    layers = layer_ids([(name, _kind(name)[1]) for name in names])
    for info in layers:
        module = transformer.get_submodule(info.name)
        module.set_processor(keep_dispatch_settings(ZImageSinkAttnProcessor(session, info, _kind(info.name)[0], shape), module.processor))
    return layers
