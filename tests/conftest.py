"""Shared fixtures: tiny sweeps written to temporary folders, and a runner for the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tests never share generated baselines through ~/.cache; tests/orchestrate/test_baseline_cache.py turns the cache on
os.environ.setdefault("SINKSCOPE_BASELINE_CACHE", "off")
REPO = Path(__file__).resolve().parents[1]


def tiny_sweep(tmp_path: Path, name: str = "t", prompts: int = 2, seeds: int = 1, per_shard: int = 1, **extra) -> Path:
    """A sweep on tiny-sd3: `prompts` GenEval prompts × `seeds` × {baseline, sink, random}, 2 steps, 64²."""
    data = {
        "name": name,
        "model": {"preset": "tiny-sd3"},
        "prompts": {"set": "geneval", "ids": [0, 80, 179, 259, 400, 500][:prompts]},
        "seeds": {"base": 42, "count": seeds},
        "generation": {"steps": 2, "guidance": 5.0, "height": 64, "width": 64},
        "arms": [
            {"name": "baseline", "intervention": None},
            {"name": "sink", "intervention": {"preset": "fixed.m1", "layers": [1]}},
            {"name": "random", "intervention": {"preset": "fixed.random", "layers": [1]}},
        ],
        "recording": {"layers": [0, 1], "topk": 3},
        "sharding": {"prompts_per_shard": per_shard},
        "analysis": {"metrics": ["lpips"], "random_metric_weights": True},
        "output_root": str(tmp_path / "runs"),
    }
    data.update(extra)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(*args: str, env: dict | None = None, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real `orchestrate` entry point in a fresh process (what a user or a cluster job runs)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "orchestrate", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"orchestrate {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def sweep_factory(tmp_path):
    def make(**kw):
        return tiny_sweep(tmp_path, **kw)

    return make
