"""SIGKILL processes with everything they started: `python scripts/kill_tree.py PID [PID ...]`.

Used to simulate losing a node of the test clusters (scripts/ray/start_ray.sh leave, tests/cluster): a node's
daemon, the process group it leads and every descendant, wherever they moved to another session or group
(Ray workers and Slurm job steps do). The whole tree is collected from /proc first and killed at once, so that
nothing is re-parented away in between. Only the given pids and their descendants are touched.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))
    return table


def tree(roots: set[int]) -> set[int]:
    """The roots, the members of process groups they lead, and all their descendants."""
    table = process_table()
    found = set(roots) | {pid for pid, (_, group) in table.items() if group in roots}
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def kill_tree(roots: set[int]) -> set[int]:
    victims = tree(roots)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return victims


if __name__ == "__main__":
    killed = kill_tree({int(arg) for arg in sys.argv[1:]})
    print(f"SIGKILLed {len(killed)} process(es)")
