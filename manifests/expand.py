"""Expansion of a sweep into units (prompt × seed × arm) and shards, and the sweep's content hash.

A shard holds whole prompts with all their seeds and all arms, so the arms of a pair always run in one
job, from the same initial noise and one model load. The expansion is a pure function of the resolved
sweep: same sweep → same hash, same units, same shards.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.prompts import Prompt
from manifests.schema import Sweep

MANIFEST_SCHEMA = pa.schema(
    [
        ("unit_id", pa.string()),
        ("shard_id", pa.int32()),
        ("group_index", pa.int32()),  # position of the (prompt, seed) group inside its shard
        ("prompt_id", pa.int32()),
        ("seed_index", pa.int32()),
        ("seed", pa.int64()),
        ("arm", pa.string()),
        ("prompt", pa.string()),
        ("tag", pa.string()),
        ("geneval_index", pa.int32()),
        ("prompt_metadata", pa.string()),
    ]
)


def unit_id(prompt_id: int, seed_index: int, arm: str) -> str:
    return f"p{prompt_id:05d}-s{seed_index:03d}-{arm}"


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}"


@dataclass(frozen=True)
class Manifest:
    sweep: Sweep
    prompts: list[Prompt]
    config_hash: str
    table: pa.Table  # one row per unit, MANIFEST_SCHEMA

    @property
    def num_units(self) -> int:
        return self.table.num_rows

    @property
    def shard_ids(self) -> list[int]:
        return sorted(set(self.table.column("shard_id").to_pylist()))

    @property
    def num_groups(self) -> int:
        return len(self.prompts) * self.sweep.seeds.count

    def write(self, path: Path) -> None:
        pq.write_table(self.table, path)


def config_hash(sweep: Sweep, prompts: list[Prompt]) -> str:
    """Hash of what determines the results: everything but where and how the jobs run."""
    content = sweep.model_dump(mode="json", exclude={"executor", "output_root", "description", "analysis", "cache"})
    content["prompts"] = [[p.prompt_id, p.text] for p in prompts]
    blob = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def expand(sweep: Sweep, prompts: list[Prompt]) -> Manifest:
    per_shard = sweep.sharding.prompts_per_shard
    rows: dict[str, list] = {f.name: [] for f in MANIFEST_SCHEMA}
    for position, prompt in enumerate(prompts):
        shard_id, prompt_in_shard = divmod(position, per_shard)
        for seed_index in range(sweep.seeds.count):
            group_index = prompt_in_shard * sweep.seeds.count + seed_index
            for arm in sweep.arms:
                rows["unit_id"].append(unit_id(prompt.prompt_id, seed_index, arm.name))
                rows["shard_id"].append(shard_id)
                rows["group_index"].append(group_index)
                rows["prompt_id"].append(prompt.prompt_id)
                rows["seed_index"].append(seed_index)
                rows["seed"].append(sweep.seeds.seed(prompt.prompt_id, seed_index))
                rows["arm"].append(arm.name)
                rows["prompt"].append(prompt.text)
                rows["tag"].append(prompt.tag)
                rows["geneval_index"].append(prompt.geneval_index)
                rows["prompt_metadata"].append(prompt.metadata)
    table = pa.table(rows, schema=MANIFEST_SCHEMA)
    return Manifest(sweep, prompts, config_hash(sweep, prompts), table)
