"""Which arms are compared with which: sink vs random-control contrasts and dose series.

Nothing here needs to be declared in the sweep. Contrasts and dose series are read off the arms'
interventions:

* A **contrast** (ΔΔ) pairs a *sink* arm (selection ``topk`` / ``union_topk``) with a *control*
  arm (``random`` / ``random_union`` / ``modality_random``) whose intervention is identical in
  every other field, ``random_seed_offset`` excepted. A sink arm with two controls (uniform and
  modality-matched) gives two contrasts.
* A **dose series** groups arms whose interventions differ only in one numeric field (``k``,
  ``eta``, ``bias``, ``alpha``, ``sigma``). For ``k``, a sink arm's dose value is its ΔΔ when it has
  exactly one control at that k, else its Δ vs baseline.

The sweep is the run's resolved sweep (``RunData.sweep``: every preset expanded, every default filled), so
``{preset: paper.m2, k: 5}`` and the spelled-out dict compare equal without parsing anything here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

SINK_SELECTIONS = {"topk", "union_topk"}
CONTROL_SELECTIONS = {"random", "random_union", "modality_random"}
DOSE_FIELDS = ("k", "eta", "bias", "alpha", "sigma")
_IGNORED_FOR_MATCHING = {"random_seed_offset"}


@dataclass(frozen=True)
class Contrast:
    sink: str
    control: str
    k: int | None
    control_selection: str

    @property
    def name(self) -> str:
        return f"{self.sink} − {self.control}"


@dataclass(frozen=True)
class DoseSeries:
    field: str
    arms: tuple[str, ...]  # ordered by dose value
    values: tuple[float, ...]
    controls: tuple[str | None, ...]  # ΔΔ control per arm (None: Δ vs baseline)

    @property
    def uses_delta_delta(self) -> bool:
        return all(c is not None for c in self.controls)


def normalised_interventions(sweep: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Arm → its resolved intervention (every field present), None for baselines."""
    return {arm["name"]: (None if arm["intervention"] is None else dict(arm["intervention"])) for arm in sweep["arms"]}


def _key(spec: dict[str, Any], drop: set[str]) -> str:
    return json.dumps({k: v for k, v in spec.items() if k not in drop}, sort_keys=True, default=str)


def contrasts(sweep: dict[str, Any]) -> list[Contrast]:
    """Sink/control pairs of a sweep (see module docstring)."""
    specs = normalised_interventions(sweep)
    out = []
    for sink, s in specs.items():
        if not s or s.get("selection") not in SINK_SELECTIONS:
            continue
        skey = _key(s, {"selection"} | _IGNORED_FOR_MATCHING)
        for ctrl, c in specs.items():
            if not c or c.get("selection") not in CONTROL_SELECTIONS:
                continue
            if _key(c, {"selection"} | _IGNORED_FOR_MATCHING) == skey:
                out.append(Contrast(sink, ctrl, s.get("k"), c["selection"]))
    return out


def dose_series(sweep: dict[str, Any], baseline: str) -> list[DoseSeries]:
    """Groups of non-baseline arms that differ only in one numeric dose field."""
    specs = {a: s for a, s in normalised_interventions(sweep).items() if s and a != baseline}
    pairs = contrasts(sweep)
    control_of: dict[str, list[str]] = {}
    for c in pairs:
        control_of.setdefault(c.sink, []).append(c.control)
    series = []
    for field in DOSE_FIELDS:
        groups: dict[str, list[tuple[float, str]]] = {}
        for arm, spec in specs.items():
            value = spec.get(field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            groups.setdefault(_key(spec, {field} | _IGNORED_FOR_MATCHING), []).append((float(value), arm))
        for members in groups.values():
            values = {v for v, _ in members}
            if len(values) < 2 or len(values) != len(members):
                continue
            members.sort()
            controls = tuple(
                control_of[a][0] if field == "k" and len(control_of.get(a, [])) == 1 else None for _, a in members
            )
            series.append(DoseSeries(field, tuple(a for _, a in members), tuple(v for v, _ in members), controls))
    return series


def arm_k(sweep: dict[str, Any]) -> dict[str, int | None]:
    """Keys-per-head budget of each arm (``k``; number of indices for static selections)."""
    out = {}
    for arm, spec in normalised_interventions(sweep).items():
        if not spec:
            out[arm] = None
        elif spec.get("selection") == "static" and spec.get("indices"):
            out[arm] = len(spec["indices"])
        else:
            out[arm] = spec.get("k")
    return out
