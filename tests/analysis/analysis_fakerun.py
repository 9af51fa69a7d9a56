"""Builds a small but real run directory (PNG images + Parquet tables) for the analysis tests.

It is written through the run format's own writers (`jobs.runformat` schemas and atomic writer, the resolved
sweep of `jobs.frozen_sweep`, `RunDir` markers), so a drift between writer and reader fails these tests too.
Images are random pixels; intervened arms are the baseline image plus noise
of an arm-specific strength, so LPIPS and pixel distances order arms predictably.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from jobs import runformat as rf
from jobs.frozen_sweep import resolved_record, write_resolved_sweep
from jobs.rundir import RunDir
from manifests import parse_sweep

TAGS = ["single_object", "two_object", "counting", "colors"]
MODALITIES = ["image", "clip", "t5", "t5_pad"]


def default_arms() -> list[dict]:
    """A baseline, a measure-only no-op twin, and sink/random arms at k=1 and k=5."""
    arms = [{"name": "base", "intervention": None}, {"name": "noop", "intervention": None}]
    for k in (1, 5):
        common = {"k": k, "layers": [12], "score_op": "remove"}
        arms.append({"name": f"sink_k{k}", "intervention": {"selection": "union_topk", **common}})
        arms.append({"name": f"rand_k{k}", "intervention": {"selection": "random_union", **common}})
    return arms


# noise standard deviation (in uint8 units) added to the baseline image per arm
DEFAULT_NOISE = {"base": 0.0, "noop": 0.0, "sink_k1": 40.0, "rand_k1": 8.0, "sink_k5": 70.0, "rand_k5": 12.0}


@dataclass
class FakeRunSpec:
    n_prompts: int = 6
    n_seeds: int = 2
    prompts_per_shard: int = 3
    size: int = 64
    arms: list[dict] = field(default_factory=default_arms)
    noise: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_NOISE))
    baseline: str | None = "base"  # written as analysis.baseline (needed: two null arms)
    random_model: bool = True
    steps: int = 4
    layers: tuple[int, ...] = (6, 12, 18)
    heads: int = 2
    done_shards: list[int] | None = None  # None: every shard gets a done marker
    with_sink_steps: bool = True


def unit_id(prompt_id: int, seed_index: int, arm: str) -> str:
    return f"p{prompt_id:05d}-s{seed_index:03d}-{arm}"


def make_run(root: Path, spec: FakeRunSpec | None = None) -> Path:
    spec = spec or FakeRunSpec()
    run_dir = RunDir(Path(root) / "demo-0123abcd")
    run = run_dir.root
    run_dir.create_layout()
    sweep = {
        "name": "demo",
        "model": {"preset": "sd3-medium-random"},  # 24 layers: the arms' layer 12 validates; nothing is loaded
        "prompts": {"set": "geneval", "limit": spec.n_prompts},
        "seeds": {"base": 42, "count": spec.n_seeds},
        "arms": spec.arms,
        "sharding": {"prompts_per_shard": spec.prompts_per_shard},
    }
    if spec.baseline:
        sweep["analysis"] = {"baseline": spec.baseline}
    write_resolved_sweep(run_dir, resolved_record(parse_sweep(sweep, "fake run")))
    arm_names = [a["name"] for a in spec.arms]
    n_shards = (spec.n_prompts + spec.prompts_per_shard - 1) // spec.prompts_per_shard
    done = list(range(n_shards)) if spec.done_shards is None else spec.done_shards
    for shard in range(n_shards):
        prompts = range(shard * spec.prompts_per_shard, min(spec.n_prompts, (shard + 1) * spec.prompts_per_shard))
        units, steps = [], []
        for p in prompts:
            for s in range(spec.n_seeds):
                seed = 42 + p + s * 1_000_000
                rng = np.random.default_rng(seed)
                base = rng.integers(0, 256, (spec.size, spec.size, 3)).astype(np.float64)
                for a_i, arm in enumerate(arm_names):
                    noise = spec.noise.get(arm, 20.0)
                    arm_rng = np.random.default_rng([seed, a_i])
                    img = np.clip(base + arm_rng.normal(0, noise, base.shape), 0, 255) if noise else base
                    rel = rf.image_relpath(arm, p, s)
                    (run / rel).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(img.round().astype(np.uint8)).save(run / rel)
                    uid = unit_id(p, s, arm)
                    units.append(
                        {
                            "unit_id": uid, "shard_id": shard, "prompt_id": p, "seed_index": s, "seed": seed, "arm": arm,
                            "prompt": f"a photo of object number {p}", "tag": TAGS[p % len(TAGS)],
                            "shard_id": shard, "image_path": rel, "width": spec.size, "height": spec.size,
                            "random_weights": spec.random_model, "model": "tiny-sd3", "image_sha256": None,
                            "intervention": None, "geneval_index": None, "steps": spec.steps, "guidance": 7.0,
                            "seconds": 0.1,
                        }
                    )  # fmt: skip
                    if spec.with_sink_steps:
                        steps.extend(_sink_rows(uid, shard, p, s, arm, spec, arm_rng))
        rf.atomic_write_parquet(run_dir.part_path("units", shard), pa.Table.from_pylist(units, schema=rf.UNITS_SCHEMA))
        if spec.with_sink_steps:
            rf.atomic_write_parquet(run_dir.part_path("sink_steps", shard), pa.Table.from_pylist(steps, schema=rf.SINK_STEPS_SCHEMA))
        if shard in done:
            run_dir.write_marker("done", shard, {"rows": {"units": len(units)}})
    return run


def set_analysis(run_dir: Path, **fields) -> None:
    """Rewrite the fake run's resolved sweep as if it had been created with these `analysis:` settings."""
    from jobs.frozen_sweep import load_resolved_sweep

    run = RunDir(run_dir)
    sweep = load_resolved_sweep(run)
    sweep = sweep.model_copy(update={"analysis": sweep.analysis.model_copy(update=fields)})
    write_resolved_sweep(run, resolved_record(sweep))


def _sink_rows(uid, shard, p, s, arm, spec, rng):
    rows = []
    for step in range(spec.steps):
        for layer in spec.layers:
            for head in range(spec.heads):
                for branch in ("cond", "uncond"):
                    mass = rng.uniform(0.01, 0.1, 3)
                    mods = [MODALITIES[int(i)] for i in rng.integers(0, len(MODALITIES), 3)]
                    idx = [_key_index(m, spec, rng) for m in mods]
                    rows.append(
                        {
                            "unit_id": uid, "shard_id": shard, "prompt_id": p, "seed_index": s, "arm": arm, "step": step,
                            "timestep": 1000.0 * (1 - step / spec.steps), "sigma": 1 - step / spec.steps,
                            "layer": layer, "head": head, "branch": branch,
                            "topk_idx": idx, "topk_modality": mods,
                            "topk_mass": sorted(mass.tolist(), reverse=True),
                            "max_mass": float(mass.max()) * (1 + layer / 10), "entropy": float(rng.uniform(4, 7)),
                            "top5_conc": float(rng.uniform(0.1, 0.45)), "intervened": arm.startswith(("sink", "rand")),
                            "selected_idx": None, "removed_mass_after": None, "layer_name": f"transformer_blocks.{layer}.attn",
                        }
                    )  # fmt: skip
    return rows


def _key_index(modality: str, spec: FakeRunSpec, rng) -> int:
    """A key index in the joint order [image (size/16)² | CLIP 77 | T5 256] that has the given modality."""
    n_image = (spec.size // 16) ** 2
    if modality == "image":
        return int(rng.integers(0, n_image))
    if modality == "clip":
        return n_image + int(rng.integers(0, 77))
    return n_image + 77 + int(rng.integers(0, 256))
