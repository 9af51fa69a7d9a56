"""Per-step sink records → a pyarrow Table with a fixed schema (one row per step × layer × head × branch).

The columns are `jobs.runformat.SINK_STEP_RECORD_SCHEMA` (docs/design.md "Sink record"); jobs prepends the
unit key. The schema is explicit so that a column that is all-null in one file (e.g. entropy when not
requested) never makes the dataset unreadable.

`layer` is an integer id that is stable for a given architecture: the block index for modules that integer
layers address (SD3 `transformer_blocks.{i}.attn`, SDXL's i-th `attn2`, Flux's i-th block, PixArt's
`transformer_blocks.{i}.attn2`), and num_blocks + rank (in module order) for modules reachable by glob only
(SD3.5 `.attn2`, SDXL / PixArt `attn1`), so two modules never share an id. `layer_name` is the module name.

Atlas columns (after `layer_name`): the top-1 key of each row (`sink_idx`, so distinct sinks can be counted
across prompts and seeds) and where it sits (`manifests.keys`: `sink_region` such as "image:corner" or
"text:padding", the patch `sink_frame` / `sink_row` / `sink_col`, or the text `sink_segment` / `sink_position`
/ `sink_token`), filled whenever `mass` is recorded; `sink_ratio` / `sink_ratio_median` (stat `ratio`): the
sink-to-random key-importance ratios of `workers.processors.common.sink_ratios`.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from jobs.runformat import SINK_STEP_RECORD_SCHEMA as SINK_STEP_SCHEMA  # the run format owns the schema
from manifests.keys import ImageGrid, KeyRegion, key_region
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


def sink_region(rec: CallRecord, index: int, grids: dict) -> KeyRegion:
    """Where key `index` of this call sits (manifests.keys); `grids` caches the patch grid per image-key count."""
    grid = None
    if index < rec.num_image:
        if rec.image_size is None:
            raise ValueError(f"{rec.layer_name}: image key {index} but the run did not give the image size")
        key = (rec.num_image, rec.image_size, rec.frames)
        if key not in grids:
            grids[key] = ImageGrid.for_tokens(rec.num_image, *rec.image_size, frames=rec.frames)
        grid = grids[key]
    return key_region(index, rec.num_image, grid, rec.text_keys)


_NO_REGION = (None, KeyRegion(-1, "", ""))


def _list(t: torch.Tensor | None):
    """A host tensor as (nested) Python lists, once per record: indexing a tensor per head costs microseconds each."""
    return None if t is None else _host(t).tolist()


def records_to_table(records: list[CallRecord]) -> pa.Table:
    """Expand per-call records into per-head rows (one device→host copy per tensor, at the end of a run)."""
    columns: dict[str, list] = {field.name: [] for field in SINK_STEP_SCHEMA}
    grids: dict = {}
    regions: dict = {}  # text_keys tuples are shared by the records of one element and live as long as this call
    for rec in records:
        topk_idx, topk_mass, max_mass = _list(rec.topk_idx), _list(rec.topk_mass), _list(rec.max_mass)
        entropy, top5, selected, after = _list(rec.entropy), _list(rec.top5), _list(rec.selected), _list(rec.removed_mass_after)
        ratio, ratio_median = _list(rec.sink_ratio), _list(rec.sink_ratio_median)
        intervened = selected is not None
        for head in range(rec.heads):
            idx = None if topk_idx is None else topk_idx[head]
            label, where = _NO_REGION
            if idx is not None:  # heads and steps share few distinct sinks: look each (layout, key) up once
                key = (rec.num_image, rec.image_size, rec.frames, id(rec.text_keys), idx[0])
                if key not in regions:
                    found = sink_region(rec, idx[0], grids)
                    regions[key] = (found.label, found)
                label, where = regions[key]
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
            columns["topk_mass"].append(None if topk_mass is None else topk_mass[head])
            columns["max_mass"].append(None if max_mass is None else max_mass[head])
            columns["entropy"].append(None if entropy is None else entropy[head])
            columns["top5_conc"].append(None if top5 is None else top5[head])
            columns["intervened"].append(intervened)
            columns["selected_idx"].append(selected[head] if intervened else None)
            columns["removed_mass_after"].append(after[head] if intervened and after is not None else None)
            columns["layer_name"].append(rec.layer_name)
            columns["sink_idx"].append(None if idx is None else idx[0])
            columns["sink_region"].append(label)
            columns["sink_frame"].append(where.frame)
            columns["sink_row"].append(where.row)
            columns["sink_col"].append(where.col)
            columns["sink_segment"].append(where.segment)
            columns["sink_position"].append(where.position)
            columns["sink_token"].append(where.token)
            columns["sink_ratio"].append(None if ratio is None else ratio[head])
            columns["sink_ratio_median"].append(None if ratio_median is None else ratio_median[head])
    return pa.Table.from_pydict(columns, schema=SINK_STEP_SCHEMA)
