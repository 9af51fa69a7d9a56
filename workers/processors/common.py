"""The per-call sink logic shared by the attention processors: identify, select, intervene, record.

`apply_sinks` takes the q / k / v that the stock attention used and the stock attention output, and returns
that output with the in-scope query rows of the intervened batch elements replaced. Rows and elements
that are not intervened keep the stock values bit for bit; identification never touches the output.

Processors call it with q / k / v in `[b, H, L, D]` and keys in the canonical order [image | CLIP | T5]
(Flux reorders its [text | image] sequence first). A processor may pass a subset of the batch (`elements`)
and of the keys (`key_index`, e.g. PixArt's unmasked T5 tokens); records and selections are reported in
the full key index space.
"""

from __future__ import annotations

from dataclasses import dataclass

import os

import torch
import torch.nn.functional as F

from workers.attention_ops import apply_value_op, intervened_attention
from workers.kernels import attention_with_lse, remove_keys
from workers.identification import KeyLayout, key_mass_stats, rank_keys, select_keys, selection_seed
from workers.session import CallRecord, LayerInfo, RunContext

# selections that rank keys by incoming mass (they need queries in mass_queries); loading and verify import it
MASS_SELECTIONS = ("topk", "bottomk", "union_topk", "union_bottomk", "modality_random")


@dataclass
class ProbeCall:
    """One intervened attention call as `workers.verify` sees it (local batch rows, local keys)."""

    layer: LayerInfo
    step: int
    elements: list[int]  # ctx element index of each local batch row
    plans: list  # the ElementPlan of each local batch row
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: KeyLayout
    key_index: torch.Tensor | None
    stock: torch.Tensor  # the attention output before the intervention
    out: torch.Tensor  # after
    interventions: dict  # local row -> Intervention
    selected: dict  # local row -> [H, n] local key indices
    removed_after: dict  # local row -> [H]
    noise_seeds: dict  # local row -> seed of value_op=noise


# (shape, dtype, device, SDPA backend flags) -> whether cuDNN attention with lse gives SDPA's exact bits
_LSE_BITWISE: dict[tuple, bool] = {}


def stock_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, want_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stock `F.scaled_dot_product_attention(q, k, v)` output, bit for bit, and when possible its lse.

    With `want_lse` on CUDA in fp16/bf16, the output comes from cuDNN attention with its log-sum-exp
    (`workers.kernels.attention_with_lse`), but only where that was checked to give exactly SDPA's bits:
    the first call per (shape, dtype, device, SDPA backend flags) runs both and compares them (one host
    sync), and the verdict is cached. Elsewhere (CPU, fp32, a mismatch, env SINKSCOPE_STOCK_LSE=0) the
    output is SDPA's and the lse is None: the statistics kernel then computes its own.
    """
    if not (want_lse and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)) or os.environ.get("SINKSCOPE_STOCK_LSE") == "0":
        return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False), None
    b = torch.backends.cuda
    sig = (tuple(query.shape), tuple(key.shape), tuple(query.stride()), tuple(key.stride()), tuple(value.stride()), query.dtype,
           query.device.index, b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled())
    verdict = _LSE_BITWISE.get(sig)
    if verdict is False:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False), None
    try:
        out, lse = attention_with_lse(query, key, value, query.shape[-1] ** -0.5, backend="cudnn")
    except (RuntimeError, ValueError):
        _LSE_BITWISE[sig] = False
        return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False), None
    if verdict is None:
        stock = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        verdict = _LSE_BITWISE[sig] = bool(out.shape == stock.shape and out.stride() == stock.stride() and torch.equal(out, stock))
        if not verdict:
            return stock, None
    return out, lse


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without a host sync (pinned staging, non-blocking copy) on CUDA."""
    if t.device == device:
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _row_index(rows: list[int], device: torch.device) -> torch.Tensor:
    return _to_device(torch.tensor(rows, dtype=torch.long), device)


def sink_ratios(mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sink-to-random key-importance ratios of incoming mass [..., K] (the key's importance μ_k), per row.

    `ratio`: the top key's mass over the mean mass of the layer's (attended) keys, i.e. over the expected
    importance of a key drawn uniformly at random (= K · max mass, since the masses sum to one);
    `ratio_median`: over the median key's mass (a typical key, robust to a few other heavy keys; the lower
    median for an even K). Both stay on the device (no host sync).
    """
    top = mass.amax(dim=-1)
    return top / mass.mean(dim=-1), top / mass.median(dim=-1).values


def layer_ids(entries: list[tuple[str, int | None]]) -> list[LayerInfo]:
    """Integer-addressable modules keep their block index as id; the others get num_blocks + their rank, in module order."""
    blocks = [b for _, b in entries if b is not None]
    next_id = (max(blocks) + 1) if blocks else 0
    out = []
    for name, block in entries:
        if block is None:
            out.append(LayerInfo(name, None, next_id))
            next_id += 1
        else:
            out.append(LayerInfo(name, block, block))
    return out


class DispatcherSinkProcessor:
    """Base of the processors for diffusers' attention-dispatcher classes (Flux, Qwen-Image, Z-Image, Wan, LTX-Video): the backend attributes
    diffusers' `set_attention_backend` writes on a processor, and the session and layer every processor needs."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, session, layer: LayerInfo):
        self.session = session
        self.layer = layer


def install_dispatcher_processors(transformer, session, processor_class, block_index) -> list[LayerInfo]:
    """Put `processor_class(session, info)` on every attention module of a dispatcher-attention transformer (Flux,
    Qwen-Image, Wan, LTX-Video), keeping each stock processor's attention backend; `block_index(module name)` gives the integer
    index of the integer-addressable modules (None: glob only)."""
    stock = transformer.attn_processors
    names = [name.removesuffix(".processor") for name in stock]
    layers = layer_ids([(name, block_index(name)) for name in names])
    transformer.set_attn_processor({
        f"{info.name}.processor": keep_dispatch_settings(processor_class(session, info), stock[f"{info.name}.processor"])
        for info in layers
    })
    return layers


def _budget(iv, heads: int) -> int:
    if iv.selection == "static":
        return len(iv.indices or [])
    return iv.k * heads if iv.selection in ("union_topk", "union_bottomk", "random_union") else iv.k


def _static_local(iv, key_index: torch.Tensor, full_layout: KeyLayout):
    """A static intervention re-expressed in the local (subset) key space; fails on a masked key."""
    joint = full_layout.to_joint_order(list(iv.indices or []), iv.key_order)
    position = {int(j): i for i, j in enumerate(key_index.tolist())}
    missing = [j for j in joint if j not in position]
    if missing:
        raise ValueError(f"static keys {missing} are masked (padding) in this call; a static selection must name attended keys")
    return iv.model_copy(update={"indices": [position[j] for j in joint], "key_order": "image_text"})


def apply_sinks(
    ctx: RunContext,
    layer: LayerInfo,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_out: torch.Tensor,
    layout: KeyLayout,
    elements: list[int] | None = None,
    key_index: torch.Tensor | None = None,
    full_layout: KeyLayout | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Identify / intervene / record for one call; `attn_out` [b,H,Lq,D] is modified in place and returned.

    `lse` [b,H,Lq] (optional): the natural-log log-sum-exp of the stock attention that produced `attn_out`
    from these q / k (`stock_attention`); the statistics kernel then skips its own pass, and a per-head
    removal of the selected keys goes through the closed form with its exactness guard (`remove_keys`).
    """
    batch, heads = q.shape[:2]
    if elements is None:
        elements = ctx.batch_elements()  # the run's elements, or those of this denoiser call (one call per CFG branch)
        if batch != len(elements):
            raise RuntimeError(f"{layer.name}: batch of {batch} but the denoiser call plans {len(elements)} elements")
    layer_name, block_index = layer.name, layer.block_index
    active = {}
    for pos, e in enumerate(elements):
        iv = ctx.intervention_active(e, layer_name, block_index)
        if iv is not None:
            active[pos] = iv
    recorded = [pos for pos, e in enumerate(elements) if ctx.records_layer(e, layer_name, block_index)]
    if not active and not recorded:
        return attn_out
    scale = q.shape[-1] ** -0.5  # SDPA's default, which the stock processors use
    full_layout = full_layout or layout
    stock = attn_out.clone() if ctx.probe is not None and active else None

    # 1. identification: one key_mass_stats pass per distinct query range that someone needs
    rec = ctx.recording
    wants: dict[str, set[int]] = {}
    for pos, iv in active.items():
        if iv.selection in MASS_SELECTIONS:
            wants.setdefault(iv.mass_queries, set()).add(pos)
    if recorded and rec.stats:
        wants.setdefault(rec.mass_queries, set()).update(recorded)
    stats = {}
    whole = list(range(batch))

    def rows_of(x: torch.Tensor | None, idx: list[int]):
        if x is None or idx == whole:
            return x
        if idx == list(range(idx[0], idx[-1] + 1)):
            return x[idx[0] : idx[-1] + 1]
        return x.index_select(0, _row_index(idx, x.device))

    for scope, rows in wants.items():
        idx = sorted(rows)
        start, end = layout.query_range(scope)
        if end <= start:
            raise ValueError(f"{layer_name}: mass over {scope!r} queries, but this layer has none")
        need_extra = rec is not None and scope == rec.mass_queries and any(p in recorded for p in idx)
        result = key_mass_stats(
            rows_of(q, idx), rows_of(k, idx), scale, start, end,
            want_entropy=need_extra and "entropy" in rec.stats,
            want_top5=need_extra and "top5" in rec.stats,
            max_chunk_bytes=ctx.max_chunk_bytes,
            lse=rows_of(lse, idx),
            top5_query_stride=rec.top5_query_stride if need_extra else 1,
        )
        top_idx = top_mass = ratio = ratio_median = None
        if need_extra and "mass" in rec.stats:  # the records' top keys, ranked once for all rows
            top_idx = rank_keys(result.mass, min(rec.topk, result.mass.shape[-1]))
            top_mass = torch.gather(result.mass, -1, top_idx)
        if need_extra and "ratio" in rec.stats:
            ratio, ratio_median = sink_ratios(result.mass)
        for i, pos in enumerate(idx):
            stats[(scope, pos)] = (
                result.mass[i],
                None if result.entropy is None else result.entropy[i],
                None if result.top5 is None else result.top5[i],
                None if top_idx is None else top_idx[i],
                None if top_mass is None else top_mass[i],
                None if ratio is None else ratio[i],
                None if ratio_median is None else ratio_median[i],
            )

    # 2. selection and intervention, grouped by identical op so each group is one batched call
    selected: dict[int, torch.Tensor] = {}
    for pos, iv in list(active.items()):
        plan = ctx.elements[elements[pos]]
        if key_index is not None and _budget(iv, heads) >= layout.num_keys:
            # a masked layer (PixArt cross-attention) with no more attended keys than the budget, e.g. the
            # unconditional prompt's lone EOS token: removing them all is undefined, so this call is left stock
            del active[pos]
            continue
        if key_index is not None and iv.selection == "static":
            iv = _static_local(iv, key_index, full_layout)
        mass = stats[(iv.mass_queries, pos)][0] if iv.selection in MASS_SELECTIONS else None
        seed = selection_seed(plan.unit_seed, iv.random_seed_offset, ctx.step, layer_name, plan.branch)
        selected[pos] = _to_device(select_keys(iv, layout, mass, heads, seed), q.device)
    groups: dict[tuple, list[int]] = {}
    for pos, iv in list(active.items()):
        start, end = layout.query_range(iv.query_scope)
        if end <= start:  # e.g. text queries in a self-attention layer (SD3.5 .attn2): nothing to change
            del active[pos]
            del selected[pos]
            continue
        key = (iv.query_scope, iv.score_op, iv.bias, iv.eta, iv.value_op, iv.sigma, iv.alpha, selected[pos].shape[-1])
        groups.setdefault(key, []).append(pos)
    removed_after: dict[int, torch.Tensor] = {}
    noise_seeds: dict[int, int] = {}
    for (scope, score_op, bias, eta, value_op, sigma, alpha, n_sel), rows in groups.items():
        idx = _row_index(rows, q.device)
        start, end = layout.query_range(scope)
        sel = torch.stack([selected[p] for p in rows])
        seeds = []
        for p in rows:
            plan = ctx.elements[elements[p]]
            noise_seeds[p] = selection_seed(plan.unit_seed, active[p].random_seed_offset, ctx.step, layer_name, plan.branch, "value_noise")
            seeds.append(noise_seeds[p])
        distinct = n_sel == 1 or all(active[p].selection in ("topk", "bottomk") for p in rows)
        if score_op == "remove" and value_op == "none" and lse is not None and distinct:
            # closed form from the stock output and lse, rows it would amplify recomputed exactly; sync-free
            b_rows = rows_of(attn_out, rows)
            result = remove_keys(rows_of(q, rows), rows_of(k, rows), rows_of(v, rows), b_rows, rows_of(lse, rows), sel, start, end, scale,
                                 method="auto", check=False)
            attn_out[idx, :, start:end] = result[:, :, start:end]
            zero = torch.zeros(len(rows), heads, dtype=torch.float32, device=q.device)
            for i, p in enumerate(rows):
                removed_after[p] = zero[i]
            continue
        q_rows, k_g = q[idx, :, start:end], k[idx]
        v_g = apply_value_op(v[idx], sel, value_op, sigma=sigma, alpha=alpha, noise_seeds=seeds)
        out, after = intervened_attention(q_rows, k_g, v_g, sel, score_op, bias=bias, eta=eta)
        attn_out[idx, :, start:end] = out
        for i, p in enumerate(rows):
            removed_after[p] = after[i]
    if stock is not None and active:
        ctx.probe(ProbeCall(layer, ctx.step, list(elements), [ctx.elements[e] for e in elements], q, k, v, layout, key_index, stock, attn_out,
                            dict(active), dict(selected), dict(removed_after), noise_seeds))

    # 3. records (device tensors; converted to a table when the run ends), in the full key index space
    def to_full(indices: torch.Tensor | None) -> torch.Tensor | None:
        if indices is None or key_index is None:
            return indices
        return key_index.to(indices.device)[indices]

    for pos in recorded:
        plan = ctx.elements[elements[pos]]
        _, entropy, top5, topk_idx, topk_mass, ratio, ratio_median = stats.get((rec.mass_queries, pos), (None,) * 7)
        max_mass = None if topk_mass is None else topk_mass[:, 0]
        ctx.records.append(
            CallRecord(
                arm=plan.arm, branch=plan.branch, element=elements[pos], step=ctx.step, timestep=ctx.timestep, sigma=ctx.sigma,
                layer=layer.layer_id, layer_name=layer_name, heads=heads,
                num_image=full_layout.num_image, num_clip=full_layout.num_clip, t5_valid=plan.t5_valid,
                topk_idx=to_full(topk_idx), topk_mass=topk_mass, max_mass=max_mass, entropy=entropy, top5=top5,
                selected=to_full(selected.get(pos)), removed_mass_after=removed_after.get(pos),
                sink_ratio=ratio, sink_ratio_median=ratio_median, text_keys=plan.text_keys, image_size=ctx.image_size,
                frames=ctx.frames,
            )
        )
    return attn_out


def apply_sinks_per_kept_keys(ctx: RunContext, layer: LayerInfo, q, k, v, out, kept_rows, layout: KeyLayout, elements: list[int]) -> None:
    """The sink logic when batch rows attend to different subsets of the keys (masked padding: PixArt's and
    LTX-Video's T5, Qwen-Image's text, Z-Image's padded captions; masked keys have exactly zero weight): one
    `apply_sinks` per group of rows with the same kept keys, over those keys only, records and selections in the
    full key index of `layout`; the rows are written back into `out` [B, H, Lq, D].

    `kept_rows`: per batch row, whether each key is attended (a sequence of bools over the keys); `elements`: the
    run element of each batch row."""
    groups: dict[tuple[bool, ...], list[int]] = {}
    for row, kept in enumerate(kept_rows):
        groups.setdefault(tuple(kept), []).append(row)
    for kept, rows in groups.items():
        valid = [j for j, attended in enumerate(kept) if attended]
        key_index = torch.tensor(valid, device=k.device)
        idx = torch.tensor(rows, device=k.device)
        out[idx] = apply_sinks(ctx, layer, q[idx], k[idx][:, :, key_index], v[idx][:, :, key_index], out[idx], layout.restricted(valid),
                               elements=[elements[r] for r in rows], key_index=key_index, full_layout=layout)


def denoiser_processors(denoiser) -> dict:
    """"<module>.processor" -> processor of every attention module: diffusers' `attn_processors`, or, for a model
    without diffusers' AttentionMixin (ZImageTransformer2DModel), the same mapping read from its Attention modules."""
    if hasattr(type(denoiser), "attn_processors"):
        return dict(denoiser.attn_processors)
    return {f"{name}.processor": module.processor for name, module in denoiser.named_modules()
            if hasattr(module, "set_processor") and hasattr(module, "processor")}


def set_denoiser_processors(denoiser, processors: dict) -> None:
    """Install a `denoiser_processors`-shaped mapping (the inverse of it)."""
    if hasattr(type(denoiser), "set_attn_processor"):
        denoiser.set_attn_processor(dict(processors))  # set_attn_processor empties the dict it gets
        return
    for name, processor in processors.items():
        denoiser.get_submodule(name.removesuffix(".processor")).set_processor(processor)


def keep_dispatch_settings(processor, original):
    """Carry the stock processor's attention-dispatcher settings (`set_attention_backend`, context parallelism) over
    to ours, so `dispatch_attention_fn` runs the same backend; returns `processor`."""
    processor._attention_backend = getattr(original, "_attention_backend", None)
    processor._parallel_config = getattr(original, "_parallel_config", None)
    return processor
