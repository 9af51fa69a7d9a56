"""records_to_table (built column-wise for speed) against a naive row-by-row expansion of the same records."""

import torch

from jobs.runformat import SINK_STEP_RECORD_SCHEMA
from manifests.keys import ImageGrid, TextKey, key_region
from workers.recorder import key_modality, records_to_table
from workers.session import CallRecord

HEADS, NUM_IMAGE, NUM_CLIP = 3, 16, 2
TEXT = (TextKey("clip", 0, "<bos>", "special"), TextKey("clip", 1, "a", "content"),
        TextKey("t5", 0, "cat", "content"), TextKey("t5", 1, "<pad>", "padding"))


def _records() -> list[CallRecord]:
    gen = torch.Generator().manual_seed(3)
    records = []
    for step in range(2):
        for with_stats, intervened in ((True, False), (True, True), (False, True), (False, False)):
            records.append(CallRecord(
                arm="a", branch="cond" if step else "uncond", element=0, step=step, timestep=900.0 - step, sigma=0.9 - step / 10,
                layer=step + 1, layer_name=f"transformer_blocks.{step + 1}.attn", heads=HEADS, num_image=NUM_IMAGE, num_clip=NUM_CLIP,
                t5_valid=(True, False),
                topk_idx=torch.randint(0, NUM_IMAGE + len(TEXT), (HEADS, 3), generator=gen) if with_stats else None,
                topk_mass=torch.rand(HEADS, 3, generator=gen) if with_stats else None,
                max_mass=torch.rand(HEADS, generator=gen) if with_stats else None,
                entropy=torch.rand(HEADS, generator=gen) if with_stats else None,
                top5=None,
                selected=torch.randint(0, NUM_IMAGE, (HEADS, 2), generator=gen) if intervened else None,
                removed_mass_after=torch.rand(HEADS, generator=gen) if intervened and with_stats else None,
                sink_ratio=torch.rand(HEADS, generator=gen) if with_stats else None,
                text_keys=TEXT, image_size=(32, 32),
            ))
    return records


def _naive_rows(records: list[CallRecord]) -> list[dict]:
    grid = ImageGrid.for_tokens(NUM_IMAGE, 32, 32)
    rows = []
    for rec in records:
        for head in range(rec.heads):
            def at(t):
                return None if t is None else t[head].tolist()

            idx = at(rec.topk_idx)
            where = key_region(idx[0], rec.num_image, grid, rec.text_keys) if idx is not None else None
            intervened = rec.selected is not None
            rows.append(dict(
                step=rec.step, timestep=rec.timestep, sigma=rec.sigma, layer=rec.layer, head=head, branch=rec.branch,
                topk_idx=idx, topk_modality=None if idx is None else [key_modality(j, rec.num_image, rec.num_clip, rec.t5_valid) for j in idx],
                topk_mass=at(rec.topk_mass), max_mass=at(rec.max_mass), entropy=at(rec.entropy), top5_conc=at(rec.top5),
                intervened=intervened, selected_idx=at(rec.selected), removed_mass_after=at(rec.removed_mass_after),
                layer_name=rec.layer_name, sink_idx=None if idx is None else idx[0],
                sink_region=None if where is None else where.label,
                **{f"sink_{name}": None if where is None else getattr(where, name) for name in ("frame", "row", "col", "segment", "position", "token")},
                sink_ratio=at(rec.sink_ratio), sink_ratio_median=at(rec.sink_ratio_median),
            ))
    return rows


def test_records_to_table_equals_a_row_by_row_expansion():
    records = _records()
    table = records_to_table(records)
    assert table.schema == SINK_STEP_RECORD_SCHEMA
    expected = _naive_rows(records)
    got = table.to_pylist()
    assert len(got) == len(expected) == len(records) * HEADS
    float_columns = {f.name for f in SINK_STEP_RECORD_SCHEMA if "float" in str(f.type)}
    for row_got, row_expected in zip(got, expected):
        for name, value in row_expected.items():
            if name in float_columns and value is not None:  # float32 columns: compare at float32 precision
                assert torch.allclose(torch.tensor(row_got[name]), torch.tensor(value, dtype=torch.float32)), name
            else:
                assert row_got[name] == value, name
