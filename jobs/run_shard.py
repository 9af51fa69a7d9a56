"""`run_shard(run_dir, shard_id)`: the one function every executor calls on a node.

Contract (docs/design.md): load the pipeline once, run every (prompt, seed) group through all arms from
the same initial noise, write PNGs and Parquet to temporary names, fsync, rename, and only then write
the shard's done marker with row counts and checksums. Each finished group is kept in the shard's
scratch folder, so a requeued or resumed shard continues after its last finished group; the final part
files have fixed names, so a rerun replaces its own rows and never duplicates one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import faults
from jobs.baseline_cache import BaselineCache, identity_key, resolve_root
from jobs import runformat as rf
from jobs.frozen_sweep import load_resolved_sweep
from jobs.rundir import RunDir, node_name

log = logging.getLogger("sinkscope.jobs")

ProgressCallback = Callable[[int, int], None]  # (groups finished in this shard, groups in this shard)

# One pipeline per process and model: a worker that runs several shards of a run loads the model once.
_PIPELINES: dict[str, object] = {}


def _pipeline_for(model) -> object:
    import workers  # heavy (torch, diffusers): imported only where a shard really runs

    key = model.model_dump_json()
    if key not in _PIPELINES:
        _PIPELINES.clear()  # never hold two models at once
        started = time.perf_counter()
        _PIPELINES[key] = workers.load_pipeline(model)
        loaded = _PIPELINES[key]
        log.info("loaded %s on %s (%s) in %.1f s", loaded.description, loaded.device, loaded.dtype, time.perf_counter() - started)
    return _PIPELINES[key]


def _scratch_group_ok(scratch: Path, group_index: int, run: RunDir) -> bool:
    """A finished group is reused only if its tables and every image it names are intact."""
    units_name, sinks_name = rf.scratch_group_names(group_index)
    units_file, sinks_file = scratch / units_name, scratch / sinks_name
    if not (units_file.is_file() and sinks_file.is_file()):
        return False
    try:
        units = pq.read_table(units_file)
        pq.read_metadata(sinks_file)
    except Exception:  # noqa: BLE001 — any unreadable scratch file means "redo the group"
        return False
    for rel, digest in zip(units.column("image_path").to_pylist(), units.column("image_sha256").to_pylist()):
        image = run.root / rel
        if not image.is_file() or rf.sha256_file(image) != digest:
            return False
    return True


def run_shard(run_dir: str | Path, shard_id: int, *, progress: ProgressCallback | None = None) -> dict:
    """Run one shard to completion (or resume it) and return its done marker."""
    run = RunDir(run_dir)
    done = run.read_marker("done", shard_id)
    if done is not None:
        return done
    with run.tracked(shard_id, "generate") as started:
        return _run(run, shard_id, progress, started)


def _run(run: RunDir, shard_id: int, progress: ProgressCallback | None, started: float) -> dict:
    import torch  # heavy, as workers: imported only where a shard really runs

    sweep = load_resolved_sweep(run)  # re-validated and hash-checked at every shard start
    units = run.units_of_shard(shard_id)
    if units.num_rows == 0:
        raise ValueError(f"{run.manifest_path}: shard {shard_id} has no units")
    rows = units.to_pylist()
    groups: dict[int, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group_index"], []).append(row)
    scratch = run.scratch_dir(shard_id)
    scratch.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    # CPU kernels reduce in an order that depends on the thread count: the sweep fixes it, not the executor or node
    torch.set_num_threads(sweep.generation.torch_threads)
    try:
        # the pid tells which worker ran the shard; benchmarks/bench_executor_scaling.py reads these lines
        log.info("shard %s: %d groups, %d units (pid %d, %d torch threads, OMP_NUM_THREADS=%s)", shard_id, len(groups),
                 len(rows), os.getpid(), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS", "unset"))
        faults.maybe_rendezvous(run.root)
        return _run_groups(run, shard_id, progress, started, sweep, groups, scratch)
    finally:
        torch.set_num_threads(threads_before)


def _run_groups(run: RunDir, shard_id: int, progress, started: float, sweep, groups: dict, scratch: Path) -> dict:
    import workers

    arms_by_name = {arm.name: arm for arm in sweep.arms}
    cache_root = resolve_root(sweep.cache.baselines)
    cache = BaselineCache(cache_root) if cache_root is not None else None
    log.info("baseline cache: %s", cache_root or "off")
    finished = 0
    loaded = None
    # Images and tables of a group are encoded and written by one background thread while the GPU generates the
    # next group (PNG encoding of three 1024² images took ~1.5 s a group on the GPU machine, idling the GPU).
    # At most one group is in flight, and it is settled (written, or its error raised here) before the next one
    # is handed over, so groups finish in order and a crash loses at most the groups not yet written, as before.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
    pending = None

    def settle() -> None:
        nonlocal finished, pending
        future, group_index, first, generated_s = pending
        pending = None
        written_s = future.result()
        finished += 1
        log.info("group %d (prompt %d, seed %d) finished in %.3f s (generated in %.3f s, written in %.3f s)", group_index,
                 first["prompt_id"], first["seed_index"], generated_s + written_s, generated_s, written_s)
        if progress:
            progress(finished, len(groups))
        faults.maybe_kill_after_groups(finished, shard_id)
        faults.maybe_sleep_after_groups(finished)
        faults.maybe_hold_after_groups(finished)
        faults.maybe_fill_disk(finished, run.root)

    try:
        for group_index in sorted(groups):
            group = groups[group_index]
            if _scratch_group_ok(scratch, group_index, run):
                finished += 1
                log.info("group %d already finished, kept", group_index)
                if progress:
                    progress(finished, len(groups))
                continue
            first = group[0]
            faults.maybe_raise_on_prompt(first["prompt"])
            if loaded is None:
                loaded = _pipeline_for(sweep.model)
            arm_specs = [arms_by_name[row["arm"]] for row in group]
            group_started = time.perf_counter()
            lookups, reuse_chunk = {}, None
            if cache is not None:  # one identity per group: its baselines' and the base of its intervened units'
                from workers.baseline_identity import baseline_identity

                identity = baseline_identity(loaded, sweep.model, first["prompt"], first["seed"], sweep.generation, sweep.recording)
                lookups = _cache_lookup(cache, loaded, sweep, identity, first, arm_specs)
                if sweep.cache.units:
                    reuse_chunk = _unit_lookup(cache, sweep, identity, first, lookups)
            reused = {name: found.reused for name, found in lookups.items() if found.reused is not None}
            results = workers.generate_group(loaded, first["prompt"], first["seed"], arm_specs, sweep.generation, sweep.recording,
                                             reused=reused, reuse_chunk=reuse_chunk)
            to_publish = _latents_to_publish(loaded, lookups, results, sweep, arm_specs)  # device → host here, not in the writer
            generated_s = time.perf_counter() - group_started
            if pending is not None:
                settle()
            future = writer.submit(_write_group, run, scratch, shard_id, group_index, group, results, arms_by_name, sweep,
                                   bool(loaded.random_weights), cache, lookups, to_publish)
            pending = (future, group_index, first, generated_s)
        if pending is not None:
            settle()
    finally:
        writer.shutdown(wait=True)  # on an error, the group being written still finishes (or fails) first
    return _finalise(run, shard_id, sorted(groups), loaded, started)


class _Lookup:
    """One arm's cache key and, on a hit, what stands in for generating it (`held`: the latent steps of a baseline
    entry found without all the steps the group needs, kept when it is republished)."""

    def __init__(self, key: str, identity: dict, reused=None, entry_path: Path | None = None, held: tuple = ()):
        self.key, self.identity, self.reused, self.entry_path, self.held = key, identity, reused, entry_path, held


def _cache_lookup(cache: BaselineCache, loaded, sweep, identity: dict, first: dict, arm_specs) -> dict[str, _Lookup]:
    """Look up every baseline arm of a group (all under the group's baseline `identity`); a hit must also hold the
    latents the group's prefix arms start from."""
    import workers
    from workers.baseline_identity import latents_from_bytes

    out = {}
    key = identity_key(identity)
    for arm in arm_specs:
        if arm.intervention is not None:
            continue
        entry = cache.get(key)
        out[arm.name] = _Lookup(key, identity)
        if entry is None:
            continue
        trajectory, final, sigmas = latents_from_bytes(entry.latents)
        needed = workers.prefix_latents_needed(loaded, arm_specs, sweep.generation, sigmas)
        if not set(needed) <= set(trajectory):
            out[arm.name].held = tuple(entry.latent_steps)
            log.info("baseline %s: cache entry %s lacks the latents of steps %s, regenerating", arm.name, entry.path,
                     sorted(set(needed) - set(trajectory)))
            continue
        device = {"device": loaded.device}
        out[arm.name].reused = workers.ReusedBaseline(
            **_reused_members(entry), trajectory={step: t.to(**device) for step, t in trajectory.items()},
            final_latents=final.to(**device), sigmas=sigmas,
        )
        out[arm.name].entry_path = entry.path
        log.info("baseline %s of prompt %d seed %d reused from %s", arm.name, first["prompt_id"], first["seed_index"], entry.path)
    return out


def _reused_members(entry) -> dict:
    """A cache entry's image (decoded, and its PNG bytes as cached) and sink rows: what a reused unit stands on."""
    import PIL.Image

    image = PIL.Image.open(io.BytesIO(entry.image_png))
    image.load()
    return dict(image=image, png=entry.image_png, sink_rows=pq.read_table(io.BytesIO(entry.sink_steps_parquet)))


def _unit_lookup(cache: BaselineCache, sweep, group: dict, first: dict, lookups: dict):
    """generate_group's `reuse_chunk` for one group (baseline identity `group`): looks every arm of a planned
    pipeline call up in the cache by its unit identity (recorded in `lookups`, so a miss is published once
    generated); the call is reused only when every arm of it is cached."""
    import workers
    from workers.baseline_identity import unit_identity

    def reuse_chunk(step: int, chunk) -> dict | None:
        entries = {}
        for position, arm in enumerate(chunk):
            identity = unit_identity(group, chunk, position, step, sweep.generation.steps)
            key = identity_key(identity)
            lookups[arm.name] = _Lookup(key, identity)
            entries[arm.name] = cache.get(key)
        if any(entry is None for entry in entries.values()):
            return None
        for name, entry in entries.items():
            lookups[name].entry_path = entry.path
            log.info("unit %s of prompt %d seed %d reused from %s", name, first["prompt_id"], first["seed_index"], entry.path)
        return {name: workers.ReusedUnit(**_reused_members(entry)) for name, entry in entries.items()}

    return reuse_chunk


def _latents_to_publish(loaded, lookups: dict, results, sweep, arm_specs) -> dict[str, tuple[bytes, list[int]]]:
    """Per baseline generated here (a cache miss): its serialised latents and which steps they hold, made on the
    GPU's thread (a copy from the writer thread would queue behind the next group's kernels)."""
    import workers
    from workers.baseline_identity import latents_to_bytes

    out = {}
    for result in results:
        lookup = lookups.get(result.arm)
        if lookup is None or lookup.entry_path is not None:
            continue  # not cached here, or reused
        if result.trajectory is None:  # an intervened unit: its image and sink rows are the entry
            out[result.arm] = (b"", [])
            continue
        # the steps this group needs, and those the entry it replaces held (its other consumers need them)
        steps = sorted(set(workers.prefix_latents_needed(loaded, arm_specs, sweep.generation, result.sigmas)) | set(lookup.held))
        out[result.arm] = (latents_to_bytes({s: result.trajectory[s] for s in steps}, result.final_latents, result.sigmas), steps)
    for result in results:  # the trajectory is no longer needed: free it before the next group
        result.trajectory = None
    return out


def _write_group(run: RunDir, scratch: Path, shard_id: int, group_index: int, group: list[dict], results, arms_by_name, sweep,
                 random_weights: bool, cache: BaselineCache | None = None, lookups: dict | None = None,
                 to_publish: dict | None = None) -> float:
    """Write one generated group: images, then its sink-step part, then its units part (which marks it finished).

    Baselines generated here are published to the baseline cache (when on) before the group counts as finished.
    """
    began = time.perf_counter()
    lookups = lookups or {}
    unit_rows, sink_tables = [], []
    for row, result in zip(group, results):
        assert result.arm == row["arm"], (result.arm, row["arm"])
        rel = rf.image_relpath(row["arm"], row["prompt_id"], row["seed_index"])
        png = result.png if result.png is not None else rf.png_bytes(result.image)
        lookup = lookups.get(row["arm"])
        if cache is not None and to_publish and row["arm"] in to_publish:
            latents, steps = to_publish[row["arm"]]
            cache.publish(lookup.key, lookup.identity, image_png=png, sink_steps_parquet=rf.parquet_bytes(result.sink_rows),
                          latents=latents, latent_steps=steps,
                          producer={"run": str(run.root), "unit_id": row["unit_id"], "shard_id": shard_id})
        faults.maybe_die_during_write(run.root / rel)
        rf.atomic_write_bytes(run.root / rel, png)
        arm = arms_by_name[row["arm"]]
        unit_rows.append(
            {
                "unit_id": row["unit_id"],
                "shard_id": shard_id,
                "prompt_id": row["prompt_id"],
                "seed_index": row["seed_index"],
                "seed": row["seed"],
                "arm": row["arm"],
                "intervention": None if arm.intervention is None else arm.intervention.model_dump_json(),
                "prompt": row["prompt"],
                "tag": row["tag"],
                "geneval_index": row["geneval_index"],
                "image_path": rel,
                "image_sha256": hashlib.sha256(png).hexdigest(),
                "width": result.image.width,
                "height": result.image.height,
                "steps": sweep.generation.steps,
                "guidance": sweep.generation.guidance,
                "model": sweep.model.label,
                "random_weights": random_weights,
                "seconds": float(result.seconds),
                "reused_from": _reused_from(lookup, result, group),
                "start_step": int(result.start_step),
            }
        )
        sink_tables.append(_with_unit_key(result.sink_rows, row, shard_id))
    units_name, sinks_name = rf.scratch_group_names(group_index)
    rf.atomic_write_parquet(scratch / sinks_name, _concat(sink_tables), rf.SINK_STEPS_SCHEMA)
    # the units file is written last: it is what marks the group finished
    rf.atomic_write_parquet(scratch / units_name, pa.Table.from_pylist(unit_rows, schema=rf.UNITS_SCHEMA))
    return time.perf_counter() - began


def _reused_from(lookup, result, group: list[dict]) -> str | None:
    """Provenance of a unit not generated by its own pipeline call: a cache entry, or the group's unit it equals."""
    if lookup is not None and lookup.entry_path is not None:
        return str(lookup.entry_path)
    if result.same_as is not None:
        return next(f"unit:{row['unit_id']}" for row in group if row["arm"] == result.same_as)
    return None


def _with_unit_key(table: pa.Table, row: dict, shard_id: int) -> pa.Table:
    """The recorder's rows of one unit, prefixed with the unit key columns of the run format."""
    n = table.num_rows
    values = {"unit_id": row["unit_id"], "shard_id": shard_id, "prompt_id": row["prompt_id"], "seed_index": row["seed_index"],
              "arm": row["arm"]}
    key = {f.name: pa.array([values[f.name]] * n, f.type) for f in rf.UNIT_KEY_FIELDS}
    record = rf.conform(table, rf.SINK_STEP_RECORD_SCHEMA, "worker sink rows")
    return pa.Table.from_arrays([*key.values(), *record.columns], schema=rf.SINK_STEPS_SCHEMA)


def _concat(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables) if tables else rf.SINK_STEPS_SCHEMA.empty_table()


def temp_files_of_shard(run: RunDir, shard_id: int) -> list[Path]:
    """Hidden temporary files (`runformat.atomic_writer`) a killed writer of this shard left behind: its images,
    parts, scratch groups, markers. Only meaningful when no writer of the shard is alive (resume checks that)."""
    def temps(path: Path) -> list[Path]:
        return list(path.parent.glob(f".{path.name}.tmp-*")) if path.parent.is_dir() else []

    units = run.units_of_shard(shard_id).select(["arm", "prompt_id", "seed_index"]).to_pylist()
    found = [t for u in units for t in temps(run.root / rf.image_relpath(u["arm"], u["prompt_id"], u["seed_index"]))]
    found += [t for table in ("units", "sink_steps") for t in temps(run.part_path(table, shard_id))]
    found += [t for kind in rf.MARKER_KINDS for t in temps(run.marker_path(kind, shard_id))]
    scratch = run.scratch_dir(shard_id)
    found += list(scratch.glob(".*.tmp-*")) if scratch.is_dir() else []
    return sorted(set(found))


def _finalise(run: RunDir, shard_id: int, group_indices: list[int], loaded, started: float) -> dict:
    import torch

    scratch = run.scratch_dir(shard_id)
    names = [rf.scratch_group_names(g) for g in group_indices]
    units = rf.conform(pa.concat_tables([pq.read_table(scratch / u) for u, _ in names]), rf.UNITS_SCHEMA, str(scratch))
    sinks = rf.conform(_concat([pq.read_table(scratch / k) for _, k in names]), rf.SINK_STEPS_SCHEMA, str(scratch))
    parts = {"units": (run.part_path("units", shard_id), units), "sink_steps": (run.part_path("sink_steps", shard_id), sinks)}
    marker = {
        "shard_id": shard_id,
        "rows": {},
        "parts": {},
        "images": dict(zip(units.column("image_path").to_pylist(), units.column("image_sha256").to_pylist())),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "job_id": os.environ.get("SINKSCOPE_JOB_ID"),
        "device": getattr(loaded, "device", None) if loaded is not None else None,
        "random_weights": bool(units.column("random_weights").to_pylist()[0]),
        "torch_threads": torch.get_num_threads(),
        "node": node_name(),
        "started": started,
        "finished": time.time(),
    }
    for name, (path, table) in parts.items():
        data = rf.parquet_bytes(table)
        rf.atomic_write_bytes(path, data)
        marker["rows"][name] = table.num_rows
        marker["parts"][name] = {"path": path.relative_to(run.root).as_posix(), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    run.write_marker("done", shard_id, marker)  # LAST: from here on the shard is done
    shutil.rmtree(scratch, ignore_errors=True)
    log.info("shard %s done: %s", shard_id, json.dumps(marker["rows"]))
    return marker


def verify_done_shard(run: RunDir, shard_id: int, covered: dict[str, dict[int, str]] | None = None) -> list[str]:
    """Problems with a done shard's files (missing, truncated, altered); empty when intact.

    A part that compaction has absorbed is intact if the compaction state records it with the same sha256
    (`covered`: table -> shard -> sha256, from `jobs.compaction.covered_parts`; the compacted files themselves
    are checked once per command by `jobs.compaction.verify_compacted`).
    """
    marker = run.read_marker("done", shard_id)
    if marker is None:
        return ["no done marker"]
    problems = []
    for name, part in marker.get("parts", {}).items():
        path = run.root / part["path"]
        if not path.is_file():
            if covered is None or (covered.get(name) or {}).get(shard_id) != part["sha256"]:
                problems.append(f"{part['path']} is missing")
        elif path.stat().st_size != part["bytes"] or rf.sha256_file(path) != part["sha256"]:
            problems.append(f"{part['path']} does not match its checksum (truncated or altered)")
    for rel, digest in marker.get("images", {}).items():
        path = run.root / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif rf.sha256_file(path) != digest:
            problems.append(f"{rel} does not match its checksum")
    return problems
