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
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import faults
from jobs.baseline_cache import BaselineCache, identity_key, resolve_root
from jobs.tables import UNITS_SCHEMA, conform
from manifests import read_sweep_file
from jobs.rundir import RunDir, atomic_write_bytes, atomic_write_json

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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class _ShardLog:
    """Appends this shard's log records to logs/shard-XXXXX.log for the duration of the shard."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(path)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def __enter__(self):
        root = logging.getLogger("sinkscope")
        root.addHandler(self.handler)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        logging.getLogger("sinkscope").removeHandler(self.handler)
        self.handler.close()


def _scratch_group_ok(scratch: Path, group_index: int, run: RunDir) -> bool:
    """A finished group is reused only if its tables and every image it names are intact."""
    units_file = scratch / f"units-g{group_index:05d}.parquet"
    sinks_file = scratch / f"sink_steps-g{group_index:05d}.parquet"
    if not (units_file.is_file() and sinks_file.is_file()):
        return False
    try:
        units = pq.read_table(units_file)
        pq.read_metadata(sinks_file)
    except Exception:  # noqa: BLE001 — any unreadable scratch file means "redo the group"
        return False
    for rel, digest in zip(units.column("image_path").to_pylist(), units.column("image_sha256").to_pylist()):
        image = run.root / rel
        if not image.is_file() or sha256_file(image) != digest:
            return False
    return True


def run_shard(run_dir: str | Path, shard_id: int, *, progress: ProgressCallback | None = None, loaded_pipeline=None) -> dict:
    """Run one shard to completion (or resume it) and return its done marker.

    `loaded_pipeline` lets a long-lived worker reuse a pipeline across shards of the same run.
    """
    run = RunDir(run_dir)
    done = run.read_marker("done", shard_id)
    if done is not None:
        return done
    started = time.time()
    atomic_write_json(
        run.running_path(shard_id),
        {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "job_id": os.environ.get("SINKSCOPE_JOB_ID")},
    )
    with _ShardLog(run.log_path(shard_id)):
        try:
            marker = _run(run, shard_id, progress, loaded_pipeline, started)
        except (SystemExit, KeyboardInterrupt):
            # a requeue (submitit exits from its signal handler), a preemption or Ctrl-C: not a failure
            log.warning("shard %s interrupted (requeue, preemption or Ctrl-C); finished groups are kept", shard_id)
            run.running_path(shard_id).unlink(missing_ok=True)
            raise
        except BaseException as error:  # noqa: BLE001 — record every failure, then let it propagate
            log.error("shard %s failed: %s", shard_id, error, exc_info=True)
            atomic_write_json(
                run.failed_path(shard_id),
                {
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc(),
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "time": time.time(),
                },
            )
            run.running_path(shard_id).unlink(missing_ok=True)
            raise
    return marker


def _run(run: RunDir, shard_id: int, progress: ProgressCallback | None, loaded, started: float) -> dict:
    import torch  # heavy, as workers: imported only where a shard really runs

    import workers

    sweep, _ = read_sweep_file(run.sweep_path)
    units = run.units_of_shard(shard_id)
    if units.num_rows == 0:
        raise ValueError(f"{run.manifest_path}: shard {shard_id} has no units")
    arms_by_name = {arm.name: arm for arm in sweep.arms}
    rows = units.to_pylist()
    groups: dict[int, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group_index"], []).append(row)
    scratch = run.scratch_dir(shard_id)
    scratch.mkdir(parents=True, exist_ok=True)
    cache_root = resolve_root(sweep.cache.baselines)
    cache = BaselineCache(cache_root) if cache_root is not None else None
    log.info("baseline cache: %s", cache_root or "off")
    # the pid tells which worker ran the shard; benchmarks/bench_executor_scaling.py reads these lines
    log.info("shard %s: %d groups, %d units (pid %d, %d torch threads)", shard_id, len(groups), len(rows), os.getpid(),
             torch.get_num_threads())
    finished = 0
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
        faults.maybe_kill_after_groups(finished)
        faults.maybe_sleep_after_groups(finished)

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
            lookups = _cache_lookup(cache, loaded, sweep, first, arm_specs) if cache is not None else {}
            reused = {name: found.reused for name, found in lookups.items() if found.reused is not None}
            results = workers.generate_group(loaded, first["prompt"], first["seed"], arm_specs, sweep.generation, sweep.recording,
                                             reused=reused)
            to_publish = _latents_to_publish(lookups, results, sweep, arm_specs)  # device → host here, not in the writer
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
    """One baseline arm's cache key and, on a hit, what stands in for generating it."""

    def __init__(self, key: str, identity: dict, reused=None, entry_path: Path | None = None):
        self.key, self.identity, self.reused, self.entry_path = key, identity, reused, entry_path


def _cache_lookup(cache: BaselineCache, loaded, sweep, first: dict, arm_specs) -> dict[str, _Lookup]:
    """Look up every baseline arm of a group; a hit must also hold the latents the group's prefix arms start from."""
    import PIL.Image

    import workers
    from workers.baseline_identity import baseline_identity, latents_from_bytes

    out = {}
    for arm in arm_specs:
        if arm.intervention is not None:
            continue
        identity = baseline_identity(loaded, sweep.model, first["prompt"], first["seed"], sweep.generation, sweep.recording)
        key = identity_key(identity)
        entry = cache.get(key)
        out[arm.name] = _Lookup(key, identity)
        if entry is None:
            continue
        trajectory, final, sigmas = latents_from_bytes(entry.latents)
        needed = workers.latents_needed(arm_specs, sweep.generation, sigmas)
        if not set(needed) <= set(trajectory):
            log.info("baseline %s: cache entry %s lacks the latents of steps %s, regenerating", arm.name, entry.path,
                     sorted(set(needed) - set(trajectory)))
            continue
        image = PIL.Image.open(io.BytesIO(entry.image_png))
        image.load()
        device = {"device": loaded.device}
        out[arm.name].reused = workers.ReusedBaseline(
            image=image, png=entry.image_png, sink_rows=pq.read_table(io.BytesIO(entry.sink_steps_parquet)),
            trajectory={step: t.to(**device) for step, t in trajectory.items()}, final_latents=final.to(**device), sigmas=sigmas,
        )
        out[arm.name].entry_path = entry.path
        log.info("baseline %s of prompt %d seed %d reused from %s", arm.name, first["prompt_id"], first["seed_index"], entry.path)
    return out


def _latents_to_publish(lookups: dict, results, sweep, arm_specs) -> dict[str, tuple[bytes, list[int]]]:
    """Per baseline generated here (a cache miss): its serialised latents and which steps they hold, made on the
    GPU's thread (a copy from the writer thread would queue behind the next group's kernels)."""
    import workers
    from workers.baseline_identity import latents_to_bytes

    out = {}
    for result in results:
        lookup = lookups.get(result.arm)
        if lookup is None or lookup.reused is not None:
            continue
        steps = workers.latents_needed(arm_specs, sweep.generation, result.sigmas)
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
        rel = Path("images") / f"arm={row['arm']}" / f"p{row['prompt_id']:05d}-s{row['seed_index']:03d}.png"
        png = result.png if result.png is not None else _png_bytes(result.image)
        lookup = lookups.get(row["arm"])
        if cache is not None and to_publish and row["arm"] in to_publish:
            latents, steps = to_publish[row["arm"]]
            cache.publish(lookup.key, lookup.identity, image_png=png, sink_steps_parquet=_parquet_bytes(result.sink_rows),
                          latents=latents, latent_steps=steps,
                          producer={"run": str(run.root), "unit_id": row["unit_id"], "shard_id": shard_id})
        faults.maybe_die_during_write(run.root / rel)
        atomic_write_bytes(run.root / rel, png)
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
                "image_path": rel.as_posix(),
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
        sink_tables.append(_with_unit_columns(result.sink_rows, row))
    atomic_write_bytes(scratch / f"sink_steps-g{group_index:05d}.parquet", _parquet_bytes(_concat(sink_tables)))
    # the units file is written last: it is what marks the group finished
    atomic_write_bytes(scratch / f"units-g{group_index:05d}.parquet", _parquet_bytes(pa.Table.from_pylist(unit_rows, schema=UNITS_SCHEMA)))
    return time.perf_counter() - began


def _reused_from(lookup, result, group: list[dict]) -> str | None:
    """Provenance of a unit not generated by its own pipeline call: a cache entry, or the group's unit it equals."""
    if lookup is not None and lookup.entry_path is not None:
        return str(lookup.entry_path)
    if result.same_as is not None:
        return next(f"unit:{row['unit_id']}" for row in group if row["arm"] == result.same_as)
    return None


def _with_unit_columns(table: pa.Table, row: dict) -> pa.Table:
    n = table.num_rows
    prefix = {
        "unit_id": pa.array([row["unit_id"]] * n, pa.string()),
        "prompt_id": pa.array([row["prompt_id"]] * n, pa.int32()),
        "seed_index": pa.array([row["seed_index"]] * n, pa.int32()),
        "arm": pa.array([row["arm"]] * n, pa.string()),
    }
    for position, (name, column) in enumerate(prefix.items()):
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.add_column(position, name, column)
    return table


def _concat(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables) if tables else pa.table({})


def _finalise(run: RunDir, shard_id: int, group_indices: list[int], loaded, started: float) -> dict:
    scratch = run.scratch_dir(shard_id)
    units = pa.concat_tables([pq.read_table(scratch / f"units-g{g:05d}.parquet") for g in group_indices])
    sinks = _concat([pq.read_table(scratch / f"sink_steps-g{g:05d}.parquet") for g in group_indices])
    units = conform(units, UNITS_SCHEMA)
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
        "started": started,
        "finished": time.time(),
    }
    for name, (path, table) in parts.items():
        data = _parquet_bytes(table)
        atomic_write_bytes(path, data)
        marker["rows"][name] = table.num_rows
        marker["parts"][name] = {"path": path.relative_to(run.root).as_posix(), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    atomic_write_json(run.done_path(shard_id), marker)  # LAST: from here on the shard is done
    run.failed_path(shard_id).unlink(missing_ok=True)
    run.running_path(shard_id).unlink(missing_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)
    log.info("shard %s done: %s", shard_id, json.dumps(marker["rows"]))
    return marker


def verify_done_shard(run: RunDir, shard_id: int) -> list[str]:
    """Problems with a done shard's files (missing, truncated, altered); empty when intact."""
    marker = run.read_marker("done", shard_id)
    if marker is None:
        return ["no done marker"]
    problems = []
    for name, part in marker.get("parts", {}).items():
        path = run.root / part["path"]
        if not path.is_file():
            problems.append(f"{part['path']} is missing")
        elif path.stat().st_size != part["bytes"] or sha256_file(path) != part["sha256"]:
            problems.append(f"{part['path']} does not match its checksum (truncated or altered)")
    for rel, digest in marker.get("images", {}).items():
        path = run.root / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{rel} does not match its checksum")
    return problems
