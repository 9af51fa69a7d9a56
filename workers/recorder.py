"""Per-step sink records → a pyarrow Table with a fixed schema (one row per step × layer × head × branch).

The columns are `jobs.runformat.SINK_STEP_RECORD_SCHEMA` (docs/design.md "Sink record"); jobs prepends the
unit key. The schema is explicit so that a column that is all-null in one file (e.g. entropy when not
requested) never makes the dataset unreadable.

`layer` is an integer id that is stable for a given architecture: the block index for modules that integer
layers address (SD3 `transformer_blocks.{i}.attn`, SDXL's i-th `attn2`, Flux's i-th block, PixArt's
`transformer_blocks.{i}.attn2`), and num_blocks + rank (in module order) for modules reachable by glob only
(SD3.5 `.attn2`, SDXL / PixArt `attn1`), so two modules never share an id. `layer_name` (last column) is
the module name.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from jobs.runformat import SINK_STEP_RECORD_SCHEMA as SINK_STEP_SCHEMA  # the run format owns the schema
from workers.session import CallRecord


def key_modality(index: int, num_image: int, num_clip: int, t5_valid: tuple[bool, ...] | None) -> str:
    """image | clip | t5 | t5_pad for a key index in the joint order [image | CLIP | T5]."""
    if index < num_image:
        return "image"
    if index < num_image + num_clip:
        return "clip"
    slot = index - num_image - num_clip
    if t5_valid is None or slot >= len(t5_valid):  # T5 absent: the 256 slots are zero vectors
        return "t5_pad"
    return "t5" if t5_valid[slot] else "t5_pad"


def _host(t: torch.Tensor | None):
    return None if t is None else t.detach().float().cpu() if t.is_floating_point() else t.detach().cpu()


def records_to_table(records: list[CallRecord]) -> pa.Table:
    """Expand per-call records into per-head rows (one device→host copy per tensor, at the end of a run)."""
    columns: dict[str, list] = {field.name: [] for field in SINK_STEP_SCHEMA}
    for rec in records:
        topk_idx, topk_mass, max_mass = _host(rec.topk_idx), _host(rec.topk_mass), _host(rec.max_mass)
        entropy, top5, selected, after = _host(rec.entropy), _host(rec.top5), _host(rec.selected), _host(rec.removed_mass_after)
        intervened = selected is not None
        for head in range(rec.heads):
            idx = None if topk_idx is None else topk_idx[head].tolist()
            columns["step"].append(rec.step)
            columns["timestep"].append(rec.timestep)
            columns["sigma"].append(rec.sigma)
            columns["layer"].append(rec.layer)
            columns["head"].append(head)
            columns["branch"].append(rec.branch)
            columns["topk_idx"].append(idx)
            columns["topk_modality"].append(
                None if idx is None else [key_modality(j, rec.num_image, rec.num_clip, rec.t5_valid) for j in idx]
            )
            columns["topk_mass"].append(None if topk_mass is None else topk_mass[head].tolist())
            columns["max_mass"].append(None if max_mass is None else float(max_mass[head]))
            columns["entropy"].append(None if entropy is None else float(entropy[head]))
            columns["top5_conc"].append(None if top5 is None else float(top5[head]))
            columns["intervened"].append(intervened)
            columns["selected_idx"].append(selected[head].tolist() if intervened else None)
            columns["removed_mass_after"].append(float(after[head]) if intervened and after is not None else None)
            columns["layer_name"].append(rec.layer_name)
    return pa.Table.from_pydict(columns, schema=SINK_STEP_SCHEMA)
