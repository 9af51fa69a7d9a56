"""Metric interface and registry.

A metric is registered by name with a lazy ``"module:Class"`` entry so that importing the
registry never imports torch or a metric's heavy library. Three kinds exist:

* ``unit``: one score per image (CLIP-T, ImageReward, HPS); Δ = arm − baseline.
* ``pair``: a distance between an image and its paired baseline image (LPIPS); Δ = value.
* ``set``: per-image features, reduced to one number per arm set (FID-shift).
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, ClassVar, Iterator

import numpy as np

# name → ("module:Class", kind, higher_is_better). Kind and direction live here too so that the
# statistics can read them without importing a metric's module.
_REGISTRY: dict[str, tuple[str, str, bool]] = {
    "lpips": ("analysis.metrics.lpips:LPIPSMetric", "pair", False),
    "clip_t": ("analysis.metrics.clip_t:ClipTMetric", "unit", True),
    "imagereward": ("analysis.metrics.imagereward:ImageRewardMetric", "unit", True),
    "hpsv2": ("analysis.metrics.hpsv2:HPSv2Metric", "unit", True),
    "fid_shift": ("analysis.metrics.fid_shift:FIDShiftMetric", "set", False),
    "toy_geneval": ("analysis.metrics.toy_geneval:ToyGenEvalMetric", "unit", True),  # toy-world prompts only
}
_KINDS = ("unit", "pair", "set")

# Seed for randomly initialised backbones: every job must build the *same* random network,
# or scores of different shards would not be comparable even as a smoke test.
RANDOM_INIT_SEED = 0


class UnknownMetricError(KeyError):
    """Asked for a metric name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register(name: str, target: str, kind: str, higher_is_better: bool) -> None:
    """Register ``"module:Class"`` under ``name`` (third-party metrics use this too)."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    _REGISTRY[name] = (target, kind, bool(higher_is_better))


def available() -> list[str]:
    """Registered metric names."""
    return sorted(_REGISTRY)


def get_metric_class(name: str) -> type["Metric"]:
    """Import and return the class registered under ``name``."""
    target, kind, hib = _entry(name)
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if (getattr(cls, "name", None), getattr(cls, "kind", None), getattr(cls, "higher_is_better", None)) != (
        name,
        kind,
        hib,
    ):
        raise TypeError(f"{target} does not match its registry entry {name!r} ({kind}, higher_is_better={hib})")
    return cls


def _entry(name: str) -> tuple[str, str, bool]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMetricError(f"unknown metric {name!r}; registered: {available()}") from None


def metric_info(name: str) -> dict[str, Any]:
    """Kind and direction of a registered metric, without importing it."""
    _, kind, hib = _entry(name)
    return {"name": name, "kind": kind, "higher_is_better": hib}


class Metric:
    """Base class. Subclasses load their model once in :meth:`load` and score in batches."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "unit" | "pair" | "set"
    higher_is_better: ClassVar[bool]
    default_batch_size: ClassVar[int] = 8

    def __init__(
        self,
        *,
        random_weights: bool = False,
        device: str | None = None,
        batch_size: int | None = None,
        **options: Any,
    ) -> None:
        self.random_weights = bool(random_weights)
        self.device = device or _default_device()
        self.batch_size = int(batch_size or self.default_batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.options = dict(options)
        self._loaded = False
        accepted = self.accepted_options()
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise TypeError(f"metric {self.name!r}: unknown options {unknown}; accepted: {sorted(accepted)}")
        self.configure(**options)

    @classmethod
    def accepted_options(cls) -> set[str]:
        """Keyword options ``configure`` (and a ``configure_extra`` it forwards to) accept."""
        import inspect

        names: set[str] = set()
        for fn_name in ("configure", "configure_extra"):
            fn = getattr(cls, fn_name, None)
            if fn is None:
                continue
            params = list(inspect.signature(fn).parameters.values())[1:]
            names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        return names

    # -- to override -------------------------------------------------------------------
    def configure(self, **options: Any) -> None:
        """Validate options (no model loading here)."""
        if options:
            raise TypeError(f"metric {self.name!r} takes no options, got {sorted(options)}")

    @property
    def backbone(self) -> str:
        """Description of the weights used; known before loading, stored in every row."""
        raise NotImplementedError

    def _load(self) -> None:
        raise NotImplementedError

    def score_images(self, images: list, prompts: list[str]) -> np.ndarray:
        """``unit`` metrics: one score per (image, prompt)."""
        raise NotImplementedError

    def score_pairs(self, images: list, references: list) -> np.ndarray:
        """``pair`` metrics: one distance per (image, reference image)."""
        raise NotImplementedError

    def features(self, images: list) -> np.ndarray:
        """``set`` metrics: one feature vector per image."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------
    def load(self) -> "Metric":
        """Load the model once; later calls are free."""
        if not self._loaded:
            self._load()
            self._loaded = True
        return self


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


@contextlib.contextmanager
def seeded_init(seed: int = RANDOM_INIT_SEED) -> Iterator[None]:
    """Build random networks reproducibly without disturbing the caller's torch RNG."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def random_label(arch: str) -> str:
    """Backbone label for randomly initialised weights (stored with every score)."""
    return f"RANDOM-INIT(seed={RANDOM_INIT_SEED}):{arch}"
