"""A publisher process for tests/orchestrate/test_baseline_cache.py (torch-free, so a spawned child starts fast)."""

from __future__ import annotations

from jobs.baseline_cache import BaselineCache


def publish_many(root: str, payload: int, rounds: int) -> None:
    cache = BaselineCache(root)
    data = bytes([payload]) * 200_000
    for i in range(rounds):
        cache.publish("k" * 64, {"x": 1}, image_png=data, sink_steps_parquet=data, latents=data, latent_steps=[i],
                      producer={"writer": payload})
