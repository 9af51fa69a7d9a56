"""Reading a sweep file: YAML → `Sweep` → resolved prompts, with one clear error per mistake.

Every error names the file, the key (dotted path, list positions in brackets) and what was expected,
and is raised before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from manifests.prompts import Prompt, load_bundled, load_file
from manifests.schema import Sweep


class SweepError(ValueError):
    """A sweep file that cannot run. `problems` holds one line per mistake."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid sweep\n" + "\n".join(f"  - {p}" for p in problems))


def _key_path(loc: tuple) -> str:
    out = ""
    previous = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) and "(" in str(part):
            continue  # pydantic's internal validator frames carry no key of the user's
        elif previous == "executor" and part in ("local", "slurm", "ray"):
            continue  # the discriminated union's tag is not a key of the file
        else:
            out += ("." if out else "") + str(part)
        previous = part
    return out or "(top level)"


def _describe(error: dict) -> str:
    key = _key_path(tuple(error["loc"]))
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key (check the spelling; see `orchestrate plan --help` and docs/sweeps.md)"
    if kind == "missing":
        return f"{key}: required key is missing"
    msg = error["msg"].removeprefix("Value error, ")
    given = error.get("input")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind in ("literal_error", "string_pattern_mismatch", "enum"):
        return f"{key}: {msg} (got {given!r})"
    return f"{key}: {msg}"


def parse_sweep(data: Any, source: str = "<sweep>") -> Sweep:
    if not isinstance(data, dict):
        raise SweepError(source, [f"(top level): expected a mapping of keys (name, model, prompts, arms, ...), got {type(data).__name__}"])
    try:
        return Sweep.model_validate(data)
    except ValidationError as e:
        raise SweepError(source, [_describe(err) for err in e.errors()]) from None


def read_sweep_file(path: str | Path) -> tuple[Sweep, dict]:
    """Parse and validate a sweep file. Returns the Sweep and the raw mapping (kept for the frozen copy)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(str(path), ["file not found"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SweepError(str(path), [f"{where}not valid YAML ({getattr(e, 'problem', e)})"]) from None
    sweep = parse_sweep(data, str(path))
    resolve_prompts(sweep, base_dir=path.parent, source=str(path))  # fail now on a missing or empty prompt set
    return sweep, data


def resolve_prompts(sweep: Sweep, base_dir: Path = Path("."), source: str = "<sweep>") -> list[Prompt]:
    spec = sweep.prompts
    if spec.file is not None:
        file = Path(spec.file)
        if not file.is_absolute():
            file = base_dir / file
        if not file.is_file():
            raise SweepError(source, [f"prompts.file: prompt file {str(file)!r} not found"])
        try:
            prompts = load_file(file)
        except ValueError as e:
            raise SweepError(source, [f"prompts.file: {e}"]) from None
    else:
        prompts = load_bundled(spec.set)
    if spec.tags is not None:
        prompts = [p for p in prompts if p.tag in set(spec.tags)]
    if spec.ids is not None:
        by_id = {p.prompt_id: p for p in prompts}
        missing = [i for i in spec.ids if i not in by_id]
        if missing:
            raise SweepError(source, [f"prompts.ids: ids {missing} are not in the prompt set (it has {len(by_id)} prompts)"])
        if len(set(spec.ids)) != len(spec.ids):
            raise SweepError(source, ["prompts.ids: duplicate ids"])
        prompts = [by_id[i] for i in spec.ids]
    else:
        end = None if spec.limit is None else spec.start + spec.limit
        prompts = prompts[spec.start : end]
    if not prompts:
        raise SweepError(source, ["prompts: the prompt set is empty after slicing and filtering"])
    return prompts
