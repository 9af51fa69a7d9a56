"""Creating (or re-opening) the run directory of a sweep: frozen sweep, manifest, provenance.

The directory name carries the config hash, so submitting the same sweep again re-opens the same run
(and resumes it), while any change to what determines the results starts a new one.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Sequence

import pyarrow.parquet as pq
import yaml

from jobs.rundir import RunDir, atomic_write_bytes, run_dir_for
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
    if run.exists():
        return run, manifest, False
    run.root.mkdir(parents=True, exist_ok=True)
    frozen = dict(raw)
    if manifest.sweep.prompts.file is not None:
        # the frozen sweep must not depend on where it was submitted from: keep a copy of the prompt file
        source = Path(manifest.sweep.prompts.file)
        if not source.is_absolute():
            source = Path(sweep_path).parent / source
        copy = run.root / f"prompts{source.suffix}"
        shutil.copyfile(source, copy)
        frozen["prompts"] = {**raw["prompts"], "file": copy.name}
    frozen["output_root"] = str(run.root.parent)
    for sub in ("state/done", "state/failed", "state/running", "logs", "tables", "images"):
        (run.root / sub).mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    pq.write_table(manifest.table, buffer)
    atomic_write_bytes(run.manifest_path, buffer.getvalue())
    write_provenance(run, manifest)
    # the frozen sweep goes last: RunDir.exists() checks it, so a half-created run is re-created
    atomic_write_bytes(run.sweep_path, yaml.safe_dump(frozen, sort_keys=False).encode())
    return run, manifest, True
