"""Two nodes for real: Slurm with two slurmd daemons (node1, node2) and Ray with a second raylet joined to the
head. Shards spread over both nodes; one node is lost mid-shard (its daemon and its tasks SIGKILLed); the run
ends, through Slurm's requeue or Ray's retry, with the reference's rows, no duplicate and identical pixels.

Both "clusters" live on this one host (one kernel, one filesystem — what a shared-filesystem cluster looks
like to a shard): what is real is that each node is its own daemon the scheduler tracks, fails and
schedules around; what is not is a network between them (docs/cluster.md, "The fault matrix").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobs.rundir import RunDir
from tests.cluster.conftest import (
    RAY_ENV, REF_PROMPTS, assert_same_as_reference, cluster_sweep, executor_of, lose_ray_node, only_run,
    scratch_groups, submission_records, wait_done, wait_for,
)
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow


def _hold(tmp_path: Path) -> tuple[Path, dict]:
    """A file that keeps every shard waiting after its first group (fault hook hold_after_groups)."""
    hold = tmp_path / "hold"
    hold.touch()
    return hold, {"SINKSCOPE_FAULT_INJECT": f"hold_after_groups:1:{hold}"}


def _both_held(run: RunDir) -> bool:
    return all(scratch_groups(run, s) == 1 for s in (0, 1)) and run.running_shards() == {0, 1}


def _running_nodes(run: RunDir) -> dict[int, str]:
    return {s: (run.read_marker("running", s) or {}).get("node") for s in (0, 1)}


def lose_slurm_node(root: Path, node: str) -> None:
    """SIGKILL `node`'s slurmd and the job steps it runs (slurmstepd and everything under it): the controller
    hears nothing more from that node and marks it DOWN after SlurmdTimeout, as for a machine that died."""
    jobs = subprocess.run(["squeue", "-h", "-w", node, "-o", "%A"], capture_output=True, text=True, check=True).stdout.split()
    victims = {int((root / "run" / f"slurmd-{node}.pid").read_text())}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            title = cmdline.read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("slurmstepd: [") and title[len("slurmstepd: ["):].split(".")[0].split("]")[0] in jobs:
            victims.add(int(cmdline.parent.name))
    subprocess.run([sys.executable, str(REPO / "scripts" / "kill_tree.py"), *map(str, victims)], check=True, capture_output=True)


@pytest.mark.slurm
def test_slurm_two_nodes_spread_then_node_loss_requeues(slurm_two_nodes, reference, tmp_path):
    """cpus_per_task=2 fills a 2-CPU node: the two shards run on node1 and node2 at once (and with another
    CPU count than the reference's single local process: same pixels, since torch threads come from the sweep)."""
    hold, env = _hold(tmp_path)
    sweep = cluster_sweep(tmp_path, "twonode", ids=REF_PROMPTS[:4], per_shard=2,
                          executor={"kind": "slurm", "cpus_per_task": 2, "gpus_per_task": 0, "time": 10})
    run_cli("submit", str(sweep), env=env)
    run = only_run(tmp_path / "runs")
    wait_for(lambda: _both_held(run), 240, "both shards held after one group", run)
    nodes = _running_nodes(run)
    assert sorted(nodes.values()) == ["node1", "node2"], nodes
    lost = next(s for s, n in nodes.items() if n == "node2")
    lose_slurm_node(slurm_two_nodes.root, "node2")
    hold.unlink()  # the shard on node1 goes on; the one on node2 is gone with its node
    wait_for(lambda: "down" in subprocess.run(["sinfo", "-h", "-n", "node2", "-o", "%T"], capture_output=True,
                                              text=True).stdout, 120, "the controller to mark node2 DOWN", run)
    wait_done(run, timeout=300)
    assert run.read_marker("done", lost)["node"] == "node1"
    job = executor_of(run).latest_job_ids(run)[lost]
    history = subprocess.run(["sacct", "-n", "-P", "-X", "--duplicates", "-o", "JobID,State,NodeList", "-j", job.split("_")[0]],
                             capture_output=True, text=True).stdout
    assert "NODE_FAIL" in history and "node2" in history, history
    assert len(submission_records(run, "slurm", "array")) == 1, "requeued by Slurm, not resubmitted"
    assert "group 0 already finished, kept" in run.log_path(lost).read_text()
    assert_same_as_reference(run, reference)


@pytest.mark.ray
def test_ray_two_nodes_spread_then_node_loss_is_retried(ray_two_nodes, reference, tmp_path):
    """num_cpus=4 fills a 4-CPU node: one shard on the head, one on the joined node. Losing the joined node
    (raylet and workers SIGKILLed) makes Ray retry its task on the head, which keeps the finished group."""
    from ray.util.state import list_nodes

    hold, env = _hold(tmp_path)
    sweep = cluster_sweep(tmp_path, "raytwonode", ids=REF_PROMPTS[:4], per_shard=2,
                          executor={"kind": "ray", "address": ray_two_nodes, "num_cpus": 4, "num_gpus": 0, "max_retries": 3})
    run_cli("submit", str(sweep), env={**RAY_ENV, **env})
    run = only_run(tmp_path / "runs")
    wait_for(lambda: _both_held(run), 240, "both shards held after one group", run)
    nodes = _running_nodes(run)
    assert len(set(nodes.values())) == 2 and all(n and n.startswith("ray:") for n in nodes.values()), nodes
    (record,) = submission_records(run, "ray", "job")
    head = next(n.node_id for n in list_nodes(address=record["dashboard"], detail=True) if n.is_head_node)
    lost = next(s for s, n in nodes.items() if n != f"ray:{head}")
    lose_ray_node()
    hold.unlink()
    wait_done(run, timeout=300)
    assert run.read_marker("done", lost)["node"] == f"ray:{head}"
    assert "group 0 already finished, kept" in run.log_path(lost).read_text()
    assert_same_as_reference(run, reference)
