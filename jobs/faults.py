"""Fault injection for tests of resume and requeue, driven by one environment variable.

`SINKSCOPE_FAULT_INJECT` holds comma-separated hooks:
  raise_on_prompt:<substring>   raise RuntimeError before a group whose prompt contains <substring>
  kill_after_groups:<n>         SIGKILL this process right after its n-th finished group of a shard
  die_during_write              SIGKILL this process halfway through writing the first image file
  sleep_after_groups:<n>:<s>    sleep <s> seconds right after the n-th group was generated (not when it is
                                kept from scratch), so a scheduler can time out, preempt or requeue the shard
Nothing happens when the variable is unset. The hooks sit at the points where real failures hurt most.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _hooks() -> dict[str, str]:
    spec = os.environ.get("SINKSCOPE_FAULT_INJECT", "")
    hooks = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, value = item.partition(":")
        hooks[name] = value
    return hooks


def maybe_raise_on_prompt(prompt: str) -> None:
    needle = _hooks().get("raise_on_prompt")
    if needle and needle in prompt:
        raise RuntimeError(f"injected failure on prompt {prompt!r} (SINKSCOPE_FAULT_INJECT)")


def maybe_kill_after_groups(finished_groups: int) -> None:
    limit = _hooks().get("kill_after_groups")
    if limit and finished_groups >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_die_during_write(path: Path) -> None:
    if "die_during_write" in _hooks():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.tmp-{os.getpid()}", "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n-partial")
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_sleep_after_groups(finished_groups: int) -> None:
    spec = _hooks().get("sleep_after_groups")
    if spec:
        count, _, seconds = spec.partition(":")
        # `==`, not `>=`: a requeued job keeps its environment and must not sleep again after resuming
        if finished_groups == int(count):
            time.sleep(float(seconds or 60))
