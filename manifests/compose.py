"""Sweep composition on the raw mapping, before validation: `--set` overrides and arm grids.

- An override `generation.steps=4` (or `arms[0].intervention.k=2`, `arms.0.intervention.k=2`) replaces one
  key of the file; the value is read as YAML (`4` is an int, `[1, 2]` a list, `null` None). The result is
  validated exactly like the file, and problems under an overridden key say so.
- `arm_grid` entries generate arms: the product of the `vary` lists, each combination laid over `base`
  (intervention fields, a preset name, or `{preset: ..., <fields>}`), named by `name` (a template with
  `{key}` placeholders) or, by default, from the varied values. Generated arms are validated like
  hand-written ones, after them, in grid order.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from typing import Any

MAX_GRID_ARMS = 1000  # arms one sweep may generate (a typo in a grid should not build a million arms)
KEY_LABELS = {"preset": "", "layers": "L", "step_window": "w"}  # short labels in derived arm names
_SLUG_BAD = re.compile(r"[^A-Za-z0-9_.-]+")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class Override:
    """One `--set KEY=VALUE`: the dotted key as typed, its path, the parsed value."""

    key: str
    path: tuple[str | int, ...]
    value: Any

    @property
    def text(self) -> str:
        return f"--set {self.key}"


_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def parse_override(pair: str, source: str = "--set") -> Override:
    from manifests.safe_yaml import YamlLimitError, load_bounded

    key, sep, value = pair.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"{source}: expected KEY=VALUE with a dotted key (e.g. generation.steps=4), got {pair[:80]!r}")
    path: list[str | int] = []
    position = 0
    for match in _PART.finditer(key):
        if match.start() != position and key[position:match.start()] != ".":
            break
        name, index = match.groups()
        path.append(int(index) if index is not None else (int(name) if name.isdigit() else name))
        position = match.end()
    if position != len(key) or not path or isinstance(path[0], int):
        raise ValueError(f"--set {key[:80]}: not a dotted key (expected e.g. generation.steps or arms[0].intervention.k)")
    try:
        parsed = load_bounded(value.encode(), what=f"--set {key} value") if value.strip() else ""
    except YamlLimitError as e:
        raise ValueError(f"--set {key}: {e}") from None
    return Override(key, tuple(path), parsed)


def apply_overrides(data: dict, overrides: list[Override]) -> dict:
    """A copy of `data` with every override set; intermediate mappings are created as needed."""
    if not overrides:
        return data
    out = copy.deepcopy(data)
    for o in overrides:
        node: Any = out
        for depth, part in enumerate(o.path):
            last = depth == len(o.path) - 1
            where = _dotted(o.path[:depth]) or "the top level"
            if isinstance(part, int):
                if not isinstance(node, list):
                    raise ValueError(f"{o.text}: {where} is not a list, so [{part}] does not apply")
                if part >= len(node):
                    raise ValueError(f"{o.text}: {where} has {len(node)} item(s); positions are 0..{len(node) - 1}")
            elif not isinstance(node, dict):
                raise ValueError(f"{o.text}: {where} is a {type(node).__name__}, not a mapping, so .{part} does not apply")
            if last:
                node[part] = copy.deepcopy(o.value)
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = [] if isinstance(o.path[depth + 1], int) else {}
                node = node[part]
    return out


def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def slug(value: Any) -> str:
    """A value as a piece of an arm name: lists and mappings joined by '_', other characters made '_'."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "_".join(slug(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return "_".join(slug(v) for v in value)
    return _SLUG_BAD.sub("_", str(value))


def _label(key: str, value: Any) -> str:
    return f"{KEY_LABELS.get(key, key)}{slug(value)}"


def grid_size(grid: dict) -> int:
    size = 1
    for values in grid.get("vary", {}).values():
        size *= max(len(values), 1)
    return size


def _arm_name(grid: dict, combo: dict, where: str) -> str:
    template = grid.get("name")
    if template is None:
        base = grid.get("base")
        preset = base if isinstance(base, str) else (base or {}).get("preset")
        parts = ([preset] if preset and "preset" not in combo else []) + [_label(k, v) for k, v in combo.items()]
        return "-".join(parts)
    unknown = [p for p in _PLACEHOLDER.findall(template) if p not in combo]
    if unknown:
        raise ValueError(f"{where}.name: placeholder(s) {unknown} are not varied keys (varied: {', '.join(combo)})")
    return _PLACEHOLDER.sub(lambda m: slug(combo[m.group(1)]), template)


def expand_arm_grids(data: dict) -> tuple[dict, dict[int, str]]:
    """`data` with the arms of every `arm_grid` entry appended to `arms` (the grid stays, for the record),
    and, for each generated arm's position, where it came from ('arm_grid[0] (k=1, layers=[6])').

    The grid entries are assumed to have passed `ArmGridSpec` validation (types); this checks the rest:
    size, placeholders and name collisions.
    """
    grids = data.get("arm_grid") or []
    if not grids:
        return data, {}
    hand = list(data.get("arms") or [])
    taken = {a.get("name"): f"arms[{i}]" for i, a in enumerate(hand) if isinstance(a, dict)}
    total = sum(grid_size(g) for g in grids)
    if total > MAX_GRID_ARMS:
        raise ValueError(f"arm_grid: the grids generate {total} arms; at most {MAX_GRID_ARMS} (split the sweep, or vary fewer keys)")
    generated: list[dict] = []
    origins: dict[int, str] = {}
    problems: list[str] = []
    for g, grid in enumerate(grids):
        where = f"arm_grid[{g}]"
        base = grid.get("base")
        base = {"preset": base} if isinstance(base, str) else dict(base or {})
        keys = list(grid["vary"])
        for values in itertools.product(*(grid["vary"][k] for k in keys)):
            combo = dict(zip(keys, values))
            described = ", ".join(f"{k}={v!r}" for k, v in combo.items())
            name = _arm_name(grid, combo, where)
            origin = f"{where} ({described})"
            if name in taken:
                problems.append(f"{origin}: generated arm name {name!r} is already the name of {taken[name]}; "
                                f"give the grid a `name` template that tells them apart")
                continue
            taken[name] = origin
            origins[len(hand) + len(generated)] = f"{origin}, arm {name!r}"
            generated.append({"name": name, "intervention": {**copy.deepcopy(base), **copy.deepcopy(combo)}})
    if problems:
        raise ValueError("\n".join(problems))
    return {**data, "arms": hand + generated}, origins


def materialise_arm_grids(data: dict) -> dict:
    """`data` with grids replaced by the arms they generate (for tools that edit arms, e.g. the smoke shrink)."""
    expanded, _ = expand_arm_grids(data)
    expanded = dict(expanded)
    expanded.pop("arm_grid", None)
    return expanded
