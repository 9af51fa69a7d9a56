"""Creating (or re-opening) the run directory of a sweep: resolved sweep, manifest, provenance.

The directory name carries the config hash, so submitting the same sweep again re-opens the same run
(and resumes it), while any change to what determines the results starts a new one. The submitted YAML is
kept for reference; every process reads the resolved sweep (`jobs.frozen_sweep`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import yaml

from jobs import runformat as rf
from jobs.frozen_sweep import resolved_record, write_resolved_sweep
from jobs.rundir import RunDir, run_dir_for
from manifests import Manifest, expand, read_sweep_file, resolve_prompts
from orchestrate.provenance import write_provenance


def build_manifest(sweep_path: str | Path, overrides: Sequence[str] = ()) -> tuple[Manifest, dict]:
    """`overrides`: `--set KEY=VALUE` strings; they are part of the frozen sweep (and so of the hash)."""
    sweep, raw = read_sweep_file(sweep_path, overrides)
    prompts = resolve_prompts(sweep, base_dir=Path(sweep_path).parent, source=str(sweep_path))
    return expand(sweep, prompts), raw


def create_run(
    sweep_path: str | Path, output_root: str | None = None, overrides: Sequence[str] = ()
) -> tuple[RunDir, Manifest, bool]:
    """Returns (run, manifest, created). An existing run with the same hash is re-opened untouched."""
    manifest, raw = build_manifest(sweep_path, overrides)
    root = run_dir_for(manifest)
    if output_root is not None:
        root = Path(output_root) / root.name
    run = RunDir(root)
    if run.exists() or (run.manifest_path.is_file() and run.provenance_path.is_file()):
        # (the second case: a run made before resolved sweeps; its provenance is kept, and every use of the run
        # stops with a message until `resume --accept-sweep-drift` resolves its sweep.yaml once)
        return run, manifest, False
    run.root.mkdir(parents=True, exist_ok=True)
    sweep = manifest.sweep
    frozen_raw = dict(raw)
    if sweep.prompts.file is not None:
        # the run must not depend on where it was submitted from: keep a copy of the prompt file
        source = Path(sweep.prompts.file)
        if not source.is_absolute():
            source = Path(sweep_path).parent / source
        copy = run.root / f"prompts{source.suffix}"
        shutil.copyfile(source, copy)
        frozen_raw["prompts"] = {**raw["prompts"], "file": copy.name}
        sweep = sweep.model_copy(update={"prompts": sweep.prompts.model_copy(update={"file": copy.name})})
    sweep = sweep.model_copy(update={"output_root": str(run.root.parent)})
    frozen_raw["output_root"] = str(run.root.parent)
    run.create_layout()
    rf.atomic_write_parquet(run.manifest_path, manifest.table, rf.MANIFEST_SCHEMA)
    rf.atomic_write_bytes(run.sweep_path, yaml.safe_dump(frozen_raw, sort_keys=False).encode())  # for reference only
    # the resolved sweep goes after provenance: RunDir.exists() checks it, so a half-created run is re-created
    resolved = resolved_record(sweep)
    write_provenance(run, manifest, resolved)
    write_resolved_sweep(run, resolved)
    return run, manifest, True
