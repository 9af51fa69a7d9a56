"""Reading a sweep file: bounded YAML → composition (arm grids, --set overrides) → `Sweep` → resolved prompts.

Every error names the file, the key (dotted path, list positions in brackets) and what was expected,
is raised before anything runs, and is short: at most `MAX_PROBLEMS` problems of at most
`MAX_PROBLEM_CHARS` characters each, whatever the input.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from pydantic import ValidationError

from manifests.compose import Override, apply_overrides, expand_arm_grids, parse_override
from manifests.suggest import closest_key, keys_related, models_at, unknown_key_message, valid_keys
from manifests.prompts import Prompt, load_bundled, load_file
from manifests.safe_yaml import MAX_SWEEP_BYTES, YamlLimitError, load_bounded
from manifests.schema import ArmGridSpec, Sweep

MAX_PROBLEMS = 20
MAX_PROBLEM_CHARS = 400
MAX_INPUT_SHOWN = 60  # characters of a rejected value quoted back


class SweepError(ValueError):
    """A sweep file that cannot run. `problems` holds one line per mistake (bounded in number and length)."""

    def __init__(self, source: str, problems: list[str], total: int | None = None):
        """`total`: how many problems there are when only the first few were described (describing costs time)."""
        self.source = source
        total = len(problems) if total is None else total
        shown = [p if len(p) <= MAX_PROBLEM_CHARS else p[:MAX_PROBLEM_CHARS] + "…" for p in problems[:MAX_PROBLEMS]]
        if total > len(shown):
            shown.append(f"… and {total - len(shown)} more problem(s)")
        self.problems = shown
        super().__init__(f"{source}: invalid sweep\n" + "\n".join(f"  - {p}" for p in shown))


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


def short_repr(value: Any) -> str:
    """repr of a rejected value, cut: a value may be a huge list (never expand it in a message)."""
    if isinstance(value, (dict, list, tuple)) and len(value) > 8:
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= MAX_INPUT_SHOWN else text[:MAX_INPUT_SHOWN] + "…"


def describe_error(error: dict, root: type = Sweep, prefix: str = "") -> str:
    """One line for one pydantic error: key path, what was expected, the value given (cut)."""
    loc = tuple(error["loc"])
    key = prefix + _key_path(loc) if loc else (prefix.rstrip(".") or "(top level)")
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = prefix + _key_path(loc[:-1]) if len(loc) > 1 else (prefix.rstrip(".") or "the top level")
        keys = valid_keys(models_at(root, loc[:-1]))
        return f"{key}: {unknown_key_message(str(loc[-1]), keys)} (under {parent})"
    if kind == "missing":
        return f"{key}: required key is missing"
    msg = error["msg"].removeprefix("Value error, ")
    given = error.get("input")
    ctx = error.get("ctx") or {}
    choices = re.findall(r"'([^']*)'", str(ctx.get("expected", ctx.get("expected_tags", ""))))
    if kind in ("literal_error", "union_tag_invalid") and choices:
        typed = given if isinstance(given, str) else ctx.get("tag")
        hint = closest_key(typed, choices) if isinstance(typed, str) else None
        if hint is not None:
            msg += f"; did you mean {hint!r}?"
    if kind.endswith("_type") or kind.endswith("_parsing") or kind in (
        "literal_error", "string_pattern_mismatch", "enum", "finite_number", "string_too_long",
    ) or kind.startswith(("greater_than", "less_than")):
        return f"{key}: {msg} (got {short_repr(given)})"
    return f"{key}: {msg}"


def parse_sweep(data: Any, source: str = "<sweep>", overrides: Sequence[str | Override] = ()) -> Sweep:
    """Validate a sweep mapping (as read from YAML), after applying `--set` overrides and expanding arm grids."""
    if data is None:
        raise SweepError(source, ["(top level): the file is empty; expected a mapping of keys (name, model, prompts, arms, ...)"])
    if not isinstance(data, dict):
        raise SweepError(source, [f"(top level): expected a mapping of keys (name, model, prompts, arms, ...), got {type(data).__name__}"])
    try:
        parsed = [o if isinstance(o, Override) else parse_override(o) for o in overrides]
        data = apply_overrides(data, parsed)
    except ValueError as e:
        raise SweepError(source, str(e).splitlines()) from None
    grid_problems = _grid_problems(data.get("arm_grid"))
    if grid_problems:
        raise SweepError(source, _attribute(grid_problems, parsed))
    try:
        data, origins = expand_arm_grids(data)
        data = {k: v for k, v in data.items() if k != "arm_grid"}  # expanded: the Sweep holds the arms only
    except ValueError as e:
        raise SweepError(source, _attribute(str(e).splitlines(), parsed)) from None
    try:
        return Sweep.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        problems = [_from_grid(describe_error(err), err["loc"], origins) for err in errors[:MAX_PROBLEMS]]
        raise SweepError(source, _attribute(problems, parsed), total=len(errors)) from None


def _grid_problems(grids: Any) -> list[str]:
    """The arm_grid block's own shape (lists to vary over, known fields), before anything is generated from it."""
    if grids is None:
        return []
    if not isinstance(grids, list):
        return [f"arm_grid: expected a list of grids, got {short_repr(grids)}"]
    problems = []
    for g, grid in enumerate(grids):
        try:
            ArmGridSpec.model_validate(grid)
        except ValidationError as e:
            problems += [describe_error(err, ArmGridSpec, f"arm_grid[{g}].") for err in e.errors()]
    return problems


def _from_grid(problem: str, loc: tuple, origins: dict[int, str]) -> str:
    """A problem of a generated arm names the grid and the values that made it, not a position the file lacks."""
    if len(loc) >= 2 and loc[0] == "arms" and loc[1] in origins:
        return problem.replace(f"arms[{loc[1]}]", origins[loc[1]], 1)
    # cross-checks name arms in their message: "arms[7] (k4-L12).intervention…"
    return re.sub(r"arms\[(\d+)\] \([^)]*\)", lambda m: origins.get(int(m.group(1)), m.group(0)), problem)


def _attribute(problems: list[str], overrides: list[Override]) -> list[str]:
    """Mark problems under a key set on the command line, so the user looks there and not in the file."""
    out = []
    for problem in problems:
        key, _, rest = problem.partition(": ")
        if key == "(top level)":  # a cross-check: "(top level): arms[1] (sink).intervention.layers: …"
            key = re.sub(r" \([^)]*\)", "", rest.partition(": ")[0])
        hits = [o for o in overrides if keys_related(_normal(key), _normal(o.key))]
        out.append(f"{problem} (from {hits[-1].text}={short_repr(hits[-1].value)})" if hits else problem)
    return out


def _normal(key: str) -> str:
    """arms[0].k and arms.0.k name the same key."""
    return re.sub(r"\[(\d+)\]", r".\1", key)


def read_sweep_file(path: str | Path, overrides: Sequence[str | Override] = ()) -> tuple[Sweep, dict]:
    """Parse and validate a sweep file. Returns the Sweep and the raw mapping with the overrides applied
    (kept for the frozen copy; arm grids stay grids there, and expand the same way when it is read again)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(str(path), ["file not found" if not path.exists() else "not a regular file"])
    try:
        size = path.stat().st_size
        if size > MAX_SWEEP_BYTES:  # refuse before reading a huge file into memory
            raise YamlLimitError(f"file is {size} bytes; a sweep file may be at most {MAX_SWEEP_BYTES} bytes")
        data = load_bounded(path.read_bytes())
    except YamlLimitError as e:
        raise SweepError(str(path), [str(e)]) from None
    except OSError as e:
        raise SweepError(str(path), [f"cannot read the file ({e.strerror})"]) from None
    parsed = [o if isinstance(o, Override) else parse_override(o, source=str(path)) for o in overrides]
    sweep = parse_sweep(data, str(path), parsed)
    resolve_prompts(sweep, base_dir=path.parent, source=str(path))  # fail now on a missing or empty prompt set
    return sweep, apply_overrides(data, parsed) if parsed else data


def prompt_file_path(sweep: Sweep, base_dir: Path) -> Path | None:
    if sweep.prompts.file is None:
        return None
    file = Path(sweep.prompts.file)
    return file if file.is_absolute() else base_dir / file


def resolve_prompts(sweep: Sweep, base_dir: Path = Path("."), source: str = "<sweep>") -> list[Prompt]:
    spec = sweep.prompts
    file = prompt_file_path(sweep, base_dir)
    if file is not None:
        if not file.exists():
            raise SweepError(source, [f"prompts.file: prompt file {str(file)!r} not found"])
        if not file.is_file():
            raise SweepError(source, [f"prompts.file: {str(file)!r} is not a regular file"])
        try:
            prompts = load_file(file)
        except OSError as e:
            raise SweepError(source, [f"prompts.file: cannot read {str(file)!r} ({e.strerror})"]) from None
        except ValueError as e:
            raise SweepError(source, [f"prompts.file: {line}" for line in str(e).splitlines()]) from None
    else:
        prompts = load_bundled(spec.set)
    if spec.tags is not None:
        prompts = [p for p in prompts if p.tag in set(spec.tags)]
    if spec.ids is not None:
        by_id = {p.prompt_id: p for p in prompts}
        missing = [i for i in spec.ids if i not in by_id]
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (f", … ({len(missing)} in all)" if len(missing) > 8 else "")
            raise SweepError(source, [f"prompts.ids: ids [{shown}] are not in the prompt set (it has ids {_id_range(by_id)})"])
        if len(set(spec.ids)) != len(spec.ids):
            raise SweepError(source, ["prompts.ids: duplicate ids"])
        prompts = [by_id[i] for i in spec.ids]
    else:
        end = None if spec.limit is None else spec.start + spec.limit
        prompts = prompts[spec.start : end]
    if not prompts:
        raise SweepError(source, ["prompts: the prompt set is empty after slicing and filtering"])
    return prompts


def _id_range(by_id: dict) -> str:
    if not by_id:
        return "none"
    ids = sorted(by_id)
    contiguous = ids == list(range(ids[0], ids[-1] + 1))
    return f"{ids[0]}..{ids[-1]}" + ("" if contiguous else f", {len(ids)} in all")
