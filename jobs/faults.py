"""Fault injection for tests of resume and requeue, driven by one environment variable.

`SINKSCOPE_FAULT_INJECT` holds comma-separated hooks:
  raise_on_prompt:<substring>   raise RuntimeError before a group whose prompt contains <substring>
  kill_after_groups:<n>[:<id>]  SIGKILL this process right after its n-th finished group of a shard (of shard
                                <id> only, when given: one worker of a pool dies, the others go on)
  die_during_write              SIGKILL this process halfway through writing the first image file
  sleep_after_groups:<n>:<s>    sleep <s> seconds right after the n-th group was generated (not when it is
                                kept from scratch), so a scheduler can time out, preempt or requeue the shard
  hold_after_groups:<n>:<file>  right after the n-th newly generated group, wait for as long as <file> exists: the
                                shard is provably mid-run while a test kills, cancels or preempts something, and
                                goes on the moment the test removes the file (no sleep decides anything)
  rendezvous                    at the start of a shard in a worker of the local executor's pool, wait until
                                every worker of that pool has started one (each leaves a file in the run's
                                state/.rendezvous-<pool>/): every worker provably gets a shard, whatever the
                                machine's load (no sleep decides it). No effect outside a pool of 2+ workers.
  fill_disk_after_groups:<n>    after the n-th newly finished group, fill the run directory's filesystem
                                (a file `sinkscope-filler` beside the run directory) until the kernel answers
                                ENOSPC: the next write fails for real (use a small tmpfs or loop mount)
Nothing happens when the variable is unset. The hooks sit at the points where real failures hurt most.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

RENDEZVOUS_TIMEOUT_S = 600  # a safety net only: barriers and holds open as soon as the test lets them
FILLER_NAME = "sinkscope-filler"
POOL_ENV = "SINKSCOPE_LOCAL_POOL"  # "<workers>:<pool id>", set by the local executor in each spawned worker


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


def maybe_kill_after_groups(finished_groups: int, shard_id: int) -> None:
    spec = _hooks().get("kill_after_groups")
    if not spec:
        return
    limit, _, only = spec.partition(":")
    if finished_groups >= int(limit) and (not only or int(only) == shard_id):
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


def maybe_hold_after_groups(finished_groups: int) -> None:
    spec = _hooks().get("hold_after_groups")
    if not spec:
        return
    count, _, path = spec.partition(":")
    # `==`, not `>=`: a requeued or resumed shard keeps the groups it had and does not stop again
    if finished_groups != int(count):
        return
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
    while Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def maybe_rendezvous(run_root: Path) -> None:
    if "rendezvous" not in _hooks():
        return
    size, _, pool = os.environ.get(POOL_ENV, "1:").partition(":")
    if int(size) < 2:
        return
    where = run_root / "state" / f".rendezvous-{pool}"
    where.mkdir(parents=True, exist_ok=True)
    (where / f"pid-{os.getpid()}").touch()
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
    while len(list(where.glob("pid-*"))) < int(size):
        if time.monotonic() > deadline:
            raise RuntimeError(f"rendezvous: fewer than {size} workers reached {where} (SINKSCOPE_FAULT_INJECT)")
        time.sleep(0.05)


def maybe_fill_disk(finished_groups: int, run_root: Path) -> None:
    limit = _hooks().get("fill_disk_after_groups")
    if not limit or finished_groups != int(limit):
        return
    filler = run_root.parent / FILLER_NAME
    block = b"\0" * (1 << 16)
    with open(filler, "ab") as f:
        try:
            while True:  # until the filesystem itself says it is full
                f.write(block)
                f.flush()
                os.fsync(f.fileno())
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
    try:  # whatever a 64 KiB block left: fill it byte by byte
        with open(filler, "ab") as f:
            for _ in range(1 << 16):
                f.write(b"\0")
                f.flush()
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
