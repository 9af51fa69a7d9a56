"""A content-addressed store of generated units, shared by runs (and shards, and hosts) that see the same folder.

Why: the paper catalogue generates the same image many times (the six Table 2 sweeps each make the same 553
baselines; Tables 6/7 make 256 units that Table 19 makes too). A unit's pixels are a pure function of what
`workers.baseline_identity` puts in its identity (model weights' hashes, dtype, device kind, library versions,
the workers' code, prompt, seed, generation settings, scheduler, recording; for an intervened unit also its
resolved intervention and, when it ran batched, the whole batch), so a run that finds an entry under that
identity's key reuses its image and sink records (and a baseline's latents) instead of generating them again.

Storage: one file per entry, `<root>/entries/<key[:2]>/<key>.zip`, holding `meta.json` (the identity, who
produced it, the sha256 of every other member), `image.png`, `sink_steps.parquet` and `latents.safetensors`
(a baseline's latents entering each captured step and its final ones, opaque bytes here, so this module needs no
torch; empty for an intervened unit).
An entry is written to a hidden temporary name in its folder, fsynced and renamed into place, so a reader on
any host sees a whole entry or none (rename is atomic on POSIX file systems and NFS); two shards publishing the
same key write the same pixels, and the later rename simply wins. A member whose checksum does not match makes
the entry a miss (and it is regenerated and republished), never an error.

Where and whether: the sweep's `cache.baselines` (auto | off | a folder) or the environment variable
SINKSCOPE_BASELINE_CACHE (off | a folder), which wins, so an operator can turn it off for one submission;
`cache.units: false` keeps intervened units out of it (baselines only).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.runformat import atomic_write_bytes
from manifests.schema import sinkscope_cache_root

ENV_VAR = "SINKSCOPE_BASELINE_CACHE"
DEFAULT_FOLDER = "baselines"  # under $SINKSCOPE_CACHE
FORMAT_VERSION = 1
MEMBERS = ("image.png", "sink_steps.parquet", "latents.safetensors")


def identity_key(identity: dict[str, Any]) -> str:
    """The entry key: sha256 of the identity as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps({"format": FORMAT_VERSION, **identity}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def resolve_root(setting: str) -> Path | None:
    """Where the cache lives for a run: None when it is off. The environment variable overrides the sweep.

    auto: `$SINKSCOPE_CACHE/baselines` (default ~/.cache/sinkscope/baselines; the same rule as the tokenizer
    cache in workers.tokenizer), which on a cluster is usually the shared home; name a shared folder to be sure.
    """
    value = os.environ.get(ENV_VAR, "").strip() or setting
    if value == "off":
        return None
    if value == "auto":
        return sinkscope_cache_root().resolve() / DEFAULT_FOLDER
    return Path(value).expanduser().resolve()


@dataclass(frozen=True)
class CachedBaseline:
    """One entry, read whole: what a run needs to stand in for generating the baseline."""

    key: str
    path: Path
    meta: dict
    image_png: bytes
    sink_steps_parquet: bytes
    latents: bytes  # safetensors: "step_<i>" = latents entering step i, "final" = after the last step

    @property
    def latent_steps(self) -> list[int]:
        return list(self.meta.get("latent_steps", []))


class BaselineCache:
    """Read and publish entries under one root folder (local disk or shared storage)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry_path(self, key: str) -> Path:
        return self.root / "entries" / key[:2] / f"{key}.zip"

    def get(self, key: str) -> CachedBaseline | None:
        """The entry, or None when absent or not intact (a damaged entry is a miss, and will be republished)."""
        path = self.entry_path(key)
        try:
            with zipfile.ZipFile(path) as archive:
                meta = json.loads(archive.read("meta.json"))
                members = {name: archive.read(name) for name in MEMBERS}
        except (FileNotFoundError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, OSError):
            return None
        if meta.get("key") != key:
            return None
        for name, data in members.items():
            if hashlib.sha256(data).hexdigest() != meta.get("sha256", {}).get(name):
                return None
        return CachedBaseline(key, path, meta, members["image.png"], members["sink_steps.parquet"], members["latents.safetensors"])

    def publish(self, key: str, identity: dict, *, image_png: bytes, sink_steps_parquet: bytes, latents: bytes,
                latent_steps: list[int], producer: dict) -> Path:
        """Write one entry atomically (temp file, fsync, rename). Returns its path.

        An entry that already holds at least the same latent steps is kept as it is (its pixels are the same);
        one with fewer steps is replaced, so a later run that needs a prefix at another step can add it.
        """
        path = self.entry_path(key)
        existing = self.get(key)
        if existing is not None and set(latent_steps) <= set(existing.latent_steps):
            return path
        members = {"image.png": image_png, "sink_steps.parquet": sink_steps_parquet, "latents.safetensors": latents}
        meta = {
            "key": key,
            "format": FORMAT_VERSION,
            "identity": identity,
            "latent_steps": sorted(set(latent_steps)),
            "producer": {**producer, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()},
            "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()},
        }
        buffer = io.BytesIO()
        # members are PNG / Parquet / float tensors: stored, not deflated (compression would cost CPU for little)
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr("meta.json", json.dumps(meta, indent=1, sort_keys=True, default=str))
            for name, data in members.items():
                archive.writestr(name, data)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def entries(self) -> list[Path]:
        return sorted((self.root / "entries").glob("*/*.zip"))
