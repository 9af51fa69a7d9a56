"""provenance.json: enough to say later exactly what produced a run (code, packages, host, resolved sweep).

`jobs.frozen_sweep` compares every use of the run against `resolved_sweep` and appends accepted differences
to `sweep_overrides`.
"""

from __future__ import annotations

import platform
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path

from jobs import runformat as rf
from jobs.rundir import RunDir
from manifests import Manifest

PACKAGES = ("sinkscope", "torch", "diffusers", "transformers", "open_clip_torch", "pyarrow", "pandas", "pydantic",
            "submitit", "ray", "lpips", "clean-fid", "image-reward", "numpy", "scipy")


def _git(*args: str) -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_provenance(run: RunDir, manifest: Manifest, resolved: dict) -> dict:
    """`resolved` is `jobs.frozen_sweep.resolved_record` of the run's sweep."""
    geometry = manifest.sweep.model.geometry()
    payload = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config_hash": manifest.config_hash,
        "resolved_sweep": {"hash": resolved["hash"], "sweep": resolved["sweep"]},
        "sweep_overrides": [],
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
        "packages": package_versions(),
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "model": manifest.sweep.model.label,
        "random_weights": bool(geometry and geometry.random_weights),
        # the CPU thread count every shard runs with, whatever executor or node runs it (it changes CPU pixels)
        "torch_threads": manifest.sweep.generation.torch_threads,
        "units": manifest.num_units,
        "shards": len(manifest.shard_ids),
        "note": "the GPU and host of each shard are recorded in its done marker (state/done/)",
    }
    rf.atomic_write_json(run.provenance_path, payload)
    return payload
