"""Plan-time checks against this machine: the model folder, the prompt file and the output root.

Kept apart from `read_sweep_file`, which also reads frozen sweeps on compute nodes and for `status`,
where the submitting machine's paths need not exist. `orchestrate plan` and `submit` run these before
anything is written, so a typo in a path is reported with the key, not as a traceback mid-run.
"""

from __future__ import annotations

import os
from pathlib import Path

from manifests.load import SweepError, prompt_file_path, read_sweep_file, resolve_prompts
from manifests.prompts import Prompt
from manifests.schema import Sweep


def _readable_dir(path: Path, key: str) -> list[str]:
    if not path.exists():
        return [f"{key}: {str(path)!r} does not exist"]
    if not path.is_dir():
        return [f"{key}: {str(path)!r} is not a directory"]
    if not os.access(path, os.R_OK | os.X_OK):
        return [f"{key}: {str(path)!r} is not readable by this user"]
    return []


def check_model_path(sweep: Sweep) -> list[str]:
    if sweep.model.path is None:
        return []
    path = Path(sweep.model.path).expanduser()
    problems = _readable_dir(path, "model.path")
    if not problems and not (path / "model_index.json").is_file():
        problems.append(f"model.path: {str(path)!r} is not a diffusers folder (no model_index.json in it)")
    return problems


def check_output_root(root: str | Path, key: str = "output_root") -> list[str]:
    """The root, or the nearest part of it that exists, must be a writable directory (nothing is created here)."""
    path = Path(root).expanduser()
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            return [f"{key}: {str(probe)!r} is a broken symbolic link"]
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        where = "" if probe == path else f" (its part {str(probe)!r} is not a directory)"
        return [f"{key}: cannot create run directories under {str(path)!r}{where}; choose a directory"]
    if not os.access(probe, os.W_OK | os.X_OK):
        return [f"{key}: {str(probe)!r} is not writable by this user"]
    return []


def check_prompt_file(sweep: Sweep, base_dir: Path) -> list[str]:
    path = prompt_file_path(sweep, base_dir)
    if path is None or not path.is_file():
        return []  # a missing file is reported by resolve_prompts
    if not os.access(path, os.R_OK):
        return [f"prompts.file: {str(path)!r} is not readable by this user"]
    return []


def check_machine(
    sweep: Sweep, base_dir: Path, source: str, output_root: str | Path | None = None, model: bool = True
) -> None:
    """Raise SweepError listing every path of the sweep this machine cannot use (`model=False`: not the model
    folder, for a smoke run that replaces the model by a tiny one)."""
    root_key = "output_root" if output_root is None else "--output-root"
    problems = (check_model_path(sweep) if model else []) + check_prompt_file(sweep, base_dir)
    problems += check_output_root(sweep.output_root if output_root is None else output_root, root_key)
    if problems:
        raise SweepError(source, problems)


def plan_sweep_file(
    path: str | Path, overrides=(), output_root: str | Path | None = None, model: bool = True
) -> tuple[Sweep, dict, list[Prompt]]:
    """Everything `orchestrate plan` checks: the file, the overrides, the prompts and this machine's paths."""
    sweep, raw = read_sweep_file(path, overrides)
    base_dir = Path(path).parent
    check_machine(sweep, base_dir, str(path), output_root, model=model)
    return sweep, raw, resolve_prompts(sweep, base_dir=base_dir, source=str(path))
