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


_NO_SINK = KeyRegion(-1, "", "")  # a row without a top-1 key: every place column is null


def _list(t: torch.Tensor | None):
    """A host tensor as (nested) Python lists, once per record: indexing a tensor per head costs microseconds each."""
    return None if t is None else _host(t).tolist()


def records_to_table(records: list[CallRecord]) -> pa.Table:
    """Expand per-call records into per-head rows (one device→host copy per tensor, at the end of a run).

    Built column-wise, a record (all its heads) at a time: a paper-configuration image has ~3k rows, and
    appending row by row to 26 columns was most of the host time between two images (benchmarks/bench_sharing.py
    `records`). Modalities and regions are looked up once per distinct (layout, key), as few keys act as sinks.
    """
    columns: dict[str, list] = {field.name: [] for field in SINK_STEP_SCHEMA}
    grids: dict = {}
    regions: dict = {}  # text_keys tuples are shared by the records of one element and live as long as this call
    modalities: dict = {}
    for rec in records:
        heads = rec.heads

        def same(value):
            return [value] * heads

        def per_head(values):
            return same(None) if values is None else values

        topk_idx = _list(rec.topk_idx)
        selected = _list(rec.selected)
        intervened = selected is not None
        after = _list(rec.removed_mass_after) if intervened else None
        for name, value in (("step", rec.step), ("timestep", rec.timestep), ("sigma", rec.sigma), ("layer", rec.layer),
                            ("branch", rec.branch), ("intervened", intervened), ("layer_name", rec.layer_name)):
            columns[name] += same(value)
        columns["head"] += range(heads)
        for name, tensor in (("topk_mass", rec.topk_mass), ("max_mass", rec.max_mass), ("entropy", rec.entropy),
                             ("top5_conc", rec.top5), ("sink_ratio", rec.sink_ratio), ("sink_ratio_median", rec.sink_ratio_median)):
            columns[name] += per_head(_list(tensor))
        columns["selected_idx"] += per_head(selected)
        columns["removed_mass_after"] += per_head(after)
        columns["topk_idx"] += per_head(topk_idx)
        if topk_idx is None:
            columns["topk_modality"] += same(None)
            sinks = same(_NO_SINK)
            columns["sink_idx"] += same(None)
            columns["sink_region"] += same(None)
        else:
            layout = (rec.num_image, rec.num_clip, rec.t5_valid)
            names = modalities.setdefault(layout, {})
            columns["topk_modality"] += [
                [names[j] if j in names else names.setdefault(j, key_modality(j, *layout)) for j in idx] for idx in topk_idx
            ]
            sinks = []
            for idx in topk_idx:  # heads and steps share few distinct sinks: look each (layout, key) up once
                key = (rec.num_image, rec.image_size, rec.frames, id(rec.text_keys), idx[0])
                if key not in regions:
                    regions[key] = sink_region(rec, idx[0], grids)
                sinks.append(regions[key])
            columns["sink_idx"] += [idx[0] for idx in topk_idx]
            columns["sink_region"] += [where.label for where in sinks]
        for name in ("frame", "row", "col", "segment", "position", "token"):
            columns[f"sink_{name}"] += [getattr(where, name) for where in sinks]
    return pa.Table.from_pydict(columns, schema=SINK_STEP_SCHEMA)
