"""The frozen, resolved sweep of a run: written once at creation, re-validated and hash-checked at every use.

`sweep.resolved.json` holds the pydantic dump of the sweep (every preset expanded, every default filled) and
its hash; `provenance.json` holds the same hash and dump as the record of what the run was created with.
Shard starts, `resume` and `analyze` call `load_resolved_sweep`, which re-validates the dump with the installed
sinkscope and compares three hashes: recorded, of the file, and of the re-validated dump. Any difference (an
edited file, a sinkscope that resolves differently) stops with both hashes and the differing fields, unless
an override accepting exactly that new hash is recorded in provenance.json (`--accept-sweep-drift`).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from jobs import runformat as rf
from jobs.rundir import RunDir
from manifests import SweepError, Sweep, parse_sweep

FORMAT_VERSION = 1


class SweepDriftError(ValueError):
    """The run's resolved sweep no longer matches the one it was created with."""


def resolve(sweep: Sweep) -> dict[str, Any]:
    """The fully resolved sweep as plain JSON data."""
    return sweep.model_dump(mode="json")


def sweep_hash(resolved: dict[str, Any]) -> str:
    blob = json.dumps(resolved, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def resolved_record(sweep: Sweep) -> dict[str, Any]:
    """{'format', 'hash', 'sweep'}: the content of sweep.resolved.json (provenance.json records hash and sweep)."""
    resolved = resolve(sweep)
    return {"format": FORMAT_VERSION, "hash": sweep_hash(resolved), "sweep": resolved}


def write_resolved_sweep(run: RunDir, record: dict[str, Any]) -> None:
    rf.atomic_write_json(run.resolved_sweep_path, record)


def differences(before: Any, after: Any, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two JSON trees, with both values."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in sorted(set(before) | set(after), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in before:
                out.append(f"{path}: absent → {json.dumps(after[key])}")
            elif key not in after:
                out.append(f"{path}: {json.dumps(before[key])} → absent")
            else:
                out += differences(before[key], after[key], path)
        return out
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [d for i, (b, a) in enumerate(zip(before, after)) for d in differences(b, a, f"{prefix}[{i}]")]
    return [] if before == after else [f"{prefix or '(top level)'}: {json.dumps(before)} → {json.dumps(after)}"]


@dataclass
class SweepCheck:
    """What `check_resolved_sweep` found. `sweep` is None when the stored dump no longer validates."""

    sweep: Sweep | None
    recorded_hash: str
    file_hash: str
    current_hash: str | None
    differences: list[str] = field(default_factory=list)
    problem: str | None = None  # why the dump does not validate
    accepted: bool = False  # a recorded override accepts current_hash

    @property
    def drifted(self) -> bool:
        return self.problem is not None or not (self.recorded_hash == self.file_hash == self.current_hash)


def _read_json(path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SweepDriftError(
            f"{path}: missing. The run was created by an older sinkscope (or the file was deleted); "
            "`orchestrate resume RUN --accept-sweep-drift` resolves sweep.yaml once with this sinkscope and records it"
        ) from None
    except json.JSONDecodeError as error:
        raise SweepDriftError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("sweep"), dict) or not isinstance(data.get("hash"), str):
        raise SweepDriftError(f"{path}: expected an object with keys 'hash' (string) and 'sweep' (mapping)")
    return data


def _provenance(run: RunDir) -> dict:
    try:
        return json.loads(run.provenance_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as error:
        raise SweepDriftError(f"{run.provenance_path}: not valid JSON ({error})") from None


def check_resolved_sweep(run: RunDir) -> SweepCheck:
    stored = _read_json(run.resolved_sweep_path)
    provenance = _provenance(run)
    recorded = provenance.get("resolved_sweep") or {"hash": stored["hash"], "sweep": stored["sweep"]}
    file_hash = sweep_hash(stored["sweep"])
    try:
        sweep = parse_sweep(stored["sweep"], str(run.resolved_sweep_path))
    except SweepError as error:
        return SweepCheck(None, recorded["hash"], file_hash, None, differences(recorded["sweep"], stored["sweep"]),
                          problem="; ".join(error.problems))
    current = resolve(sweep)
    current_hash = sweep_hash(current)
    accepted = any(o.get("from_hash") == recorded["hash"] and o.get("to_hash") == current_hash
                   for o in provenance.get("sweep_overrides", []))
    return SweepCheck(sweep, recorded["hash"], file_hash, current_hash, differences(recorded["sweep"], current), accepted=accepted)


def drift_message(run: RunDir, check: SweepCheck) -> str:
    if check.problem is not None:
        head = (f"{run.resolved_sweep_path}: the run's resolved sweep no longer validates with the installed sinkscope "
                f"(recorded hash {check.recorded_hash[:12]}): {check.problem}")
    else:
        cause = "the file was edited" if check.file_hash != check.recorded_hash else "the installed sinkscope resolves it differently"
        head = (f"{run.resolved_sweep_path}: the resolved sweep differs from the one this run was created with ({cause}): "
                f"recorded hash {check.recorded_hash[:12]}, now {check.current_hash[:12]}")
    fields = check.differences[:20] + ([f"... and {len(check.differences) - 20} more"] if len(check.differences) > 20 else [])
    detail = "".join(f"\n  - {d}" for d in fields) if fields else "\n  (no field differs; the file's hash was altered)"
    remedy = "" if check.problem else ("\nTo continue with the sweep as it now resolves, pass --accept-sweep-drift to "
                                       "`orchestrate resume` or `orchestrate analyze` (recorded in provenance.json).")
    return f"{head}; differing fields:{detail}{remedy}"


def load_resolved_sweep(run: RunDir) -> Sweep:
    """The run's sweep, re-validated; raises SweepDriftError on any unaccepted difference."""
    check = check_resolved_sweep(run)
    if check.drifted and not (check.accepted and check.sweep is not None):
        raise SweepDriftError(drift_message(run, check))
    return check.sweep


def accept_drift(run: RunDir, command: str) -> SweepCheck | None:
    """Record in provenance.json that the run continues with the sweep as it now resolves (callers hold run.lock()).

    A run without sweep.resolved.json (made by an older sinkscope) gets one, resolved from its sweep.yaml.
    Returns the check that was accepted, or None when there was nothing to accept.
    """
    if not run.resolved_sweep_path.is_file():
        from manifests import read_sweep_file

        sweep, _ = read_sweep_file(run.sweep_path)
        record = resolved_record(sweep)
        write_resolved_sweep(run, record)
        _record_override(run, {"command": command, "reason": "no sweep.resolved.json; resolved from sweep.yaml",
                               "from_hash": None, "to_hash": record["hash"]}, resolved=record)
        return check_resolved_sweep(run)
    check = check_resolved_sweep(run)
    if not check.drifted or check.accepted:
        return None
    if check.sweep is None:
        raise SweepDriftError(drift_message(run, check))
    _record_override(run, {"command": command, "from_hash": check.recorded_hash, "to_hash": check.current_hash,
                           "file_hash": check.file_hash, "differences": check.differences})
    check.accepted = True
    return check


def _record_override(run: RunDir, override: dict, resolved: dict | None = None) -> None:
    provenance = _provenance(run)
    if resolved is not None:
        provenance["resolved_sweep"] = {"hash": resolved["hash"], "sweep": resolved["sweep"]}
    override = {**override, "user": getpass.getuser(), "host": socket.gethostname(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    provenance.setdefault("sweep_overrides", []).append(override)
    rf.atomic_write_json(run.provenance_path, provenance)
