"""Fixtures for the tests on a REAL Slurm and a REAL Ray: starting them, tiny sweeps, the local reference.

Slurm: if `scontrol ping` fails, scripts/slurm/start_slurm.sh starts a single-host cluster (root + apt
needed). Ray: scripts/ray/start_ray.sh starts a head in its own process group; both are stopped at the
end of the session when these fixtures started them. Without root/apt the tests skip with the reason,
unless SINKSCOPE_CLUSTER_TESTS=require (CI), where they fail instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import yaml

from jobs import verify_done_shard
from jobs.rundir import RunDir
from tests.conftest import REPO, run_cli

SLURM_SCRIPT = REPO / "scripts" / "slurm" / "start_slurm.sh"
RAY_SCRIPT = REPO / "scripts" / "ray" / "start_ray.sh"
# The cluster the tests start: MaxArraySize 4 (sweeps of 5+ shards must be split), 4 fake GPUs so that
# --gpus-per-task is exercised, 4 job slots on the 2 real cores.
SLURM_TEST_ENV = {"SINKSCOPE_SLURM_MAX_ARRAY_SIZE": "4", "SINKSCOPE_SLURM_GPUS": "4", "SINKSCOPE_SLURM_NCPUS": "4",
                  "SINKSCOPE_SLURM_NNODES": "1"}
# two nodes of 2 CPUs: a shard job of cpus_per_task=2 fills a node, so two shards run on two nodes
TWO_NODE_ENV = {"SINKSCOPE_SLURM_MAX_ARRAY_SIZE": "4", "SINKSCOPE_SLURM_GPUS": "0", "SINKSCOPE_SLURM_NCPUS": "2",
                "SINKSCOPE_SLURM_NNODES": "2"}
RAY_PORT, RAY_DASHBOARD_PORT = 6390, 8266
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}

# GenEval prompt ids of every cluster sweep; the reference run covers them all
REF_PROMPTS = [0, 80, 179, 259, 400]
ARMS = [
    {"name": "baseline", "intervention": None},
    {"name": "sink", "intervention": {"preset": "fixed.m1", "layers": [1]}},
]
SINK_KEY = ["unit_id", "step", "layer", "head", "branch"]


def skip_or_fail(reason: str) -> None:
    if os.environ.get("SINKSCOPE_CLUSTER_TESTS") == "require":
        pytest.fail(f"{reason} (SINKSCOPE_CLUSTER_TESTS=require: cluster tests may not be skipped)")
    pytest.skip(reason)


# ---- sweeps and comparisons ----------------------------------------------------------------------
def cluster_sweep(tmp: Path, name: str, ids=None, prompts_file: Path | None = None, per_shard: int = 1,
                  executor: dict | None = None) -> Path:
    """tiny-sd3, 64², 2 steps, {baseline, sink}; GenEval ids or a prompt file; the executor block given."""
    data = {
        "name": name,
        "model": {"preset": "tiny-sd3"},
        "prompts": {"file": str(prompts_file)} if prompts_file else {"set": "geneval", "ids": list(ids or REF_PROMPTS[:2])},
        "seeds": {"base": 42, "count": 1},
        "generation": {"steps": 2, "guidance": 5.0, "height": 64, "width": 64},
        "arms": ARMS,
        "recording": {"layers": [0, 1], "topk": 3},
        "sharding": {"prompts_per_shard": per_shard},
        "executor": executor or {"kind": "local"},
        "output_root": str(tmp / "runs"),
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def only_run(output_root: Path) -> RunDir:
    (root,) = [p for p in output_root.iterdir() if p.is_dir()]
    return RunDir(root)


def table(run: RunDir, name: str):
    return ds.dataset(run.tables_dir / name, format="parquet").to_table().to_pandas()


def pixels(run: RunDir) -> dict[str, str]:
    return {p.relative_to(run.root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in run.images_dir.rglob("*.png")}


def _comparable(frame, drop=()):
    frame = frame.drop(columns=[c for c in drop if c in frame.columns])
    for column in frame.columns:
        if frame[column].dtype == object:
            frame[column] = frame[column].map(lambda v: tuple(v) if hasattr(v, "__len__") and not isinstance(v, str) else v)
    return frame


def assert_same_as_reference(run: RunDir, reference: RunDir) -> None:
    """Every unit of `run` exactly once, with the reference's rows, sink records and pixels."""
    expected_units = set(run.manifest_table().column("unit_id").to_pylist())
    assert run.done_shards() == set(run.all_shard_ids()), diagnose(run)
    for shard in run.all_shard_ids():
        assert verify_done_shard(run, shard) == [], (shard, verify_done_shard(run, shard))
    units = table(run, "units")
    assert units.unit_id.is_unique, units.unit_id[units.unit_id.duplicated()].tolist()
    assert set(units.unit_id) == expected_units
    ref_units = table(reference, "units").set_index("unit_id").loc[sorted(expected_units)].reset_index()
    units = units.sort_values("unit_id").reset_index(drop=True)
    skip = ("shard_id", "seconds")
    mine, theirs = _comparable(units, skip), _comparable(ref_units, skip)[_comparable(units, skip).columns]
    differ = [c for c in mine.columns if not mine[c].equals(theirs[c])]
    assert not differ, f"unit columns {differ} differ from the local executor's:\n{mine[differ]}\n{theirs[differ]}"
    sinks = table(run, "sink_steps")
    assert not sinks.duplicated(SINK_KEY).any(), "duplicate sink rows"
    ref_sinks = table(reference, "sink_steps")
    ref_sinks = ref_sinks[ref_sinks.unit_id.isin(expected_units)]
    a = _comparable(sinks.sort_values(SINK_KEY).reset_index(drop=True))
    b = _comparable(ref_sinks.sort_values(SINK_KEY).reset_index(drop=True))[a.columns]
    assert len(a) == len(b) and a.equals(b), "sink rows differ from the local executor's"
    ref_pixels = pixels(reference)
    mine = pixels(run)
    assert set(mine) == set(units.image_path)
    assert {k: ref_pixels[k] for k in mine} == mine, "pixels differ from the local executor's"
    # nothing readers could mistake for data: only final part files (hidden temp files are ignored by readers)
    for folder in (run.tables_dir / "units", run.tables_dir / "sink_steps"):
        visible = sorted(p.name for p in folder.iterdir() if not p.name.startswith((".", "_")))
        assert visible == sorted(f"part-{run.shard_name(s)}.parquet" for s in run.all_shard_ids()), visible


def diagnose(run: RunDir) -> str:
    """What to print when a cluster test times out: queue, accounting, markers, shard logs."""
    out = [f"run {run.root}", f"done={sorted(run.done_shards())} failed={sorted(run.failed_shards())} running={sorted(run.running_shards())}"]
    for cmd in (["squeue", "-r", "-o", "%i %T %R %M"], ["sacct", "-X", "--duplicates", "-P", "-o", "JobID,State,ExitCode,Elapsed", "-S", "now-1hour"]):
        if shutil.which(cmd[0]):
            out.append(subprocess.run(cmd, capture_output=True, text=True).stdout[-3000:])
    for log in sorted(run.logs_dir.glob("*.log")):
        out.append(f"--- {log.name}\n{log.read_text()[-1500:]}")
    for err in sorted(run.executor_dir.glob("*_log.err"))[-4:] if run.executor_dir.is_dir() else []:
        out.append(f"--- {err.name}\n{err.read_text()[-1500:]}")
    return "\n".join(out)


def wait_for(predicate, timeout: float, what: str, run: RunDir | None = None, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n" + (diagnose(run) if run else ""))


def wait_done(run: RunDir, timeout: float = 180) -> None:
    wait_for(lambda: run.done_shards() == set(run.all_shard_ids()), timeout, "every shard done", run)


def scratch_groups(run: RunDir, shard: int) -> int:
    folder = run.scratch_dir(shard)
    return len(list(folder.glob("units-g*.parquet"))) if folder.is_dir() else 0


def submission_records(run: RunDir, executor: str, event: str) -> list[dict]:
    return [r for r in run.submissions() if r.get("executor") == executor and r.get("event") == event]


# ---- the reference: the same units through the local executor -----------------------------------------
@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> RunDir:
    tmp = tmp_path_factory.mktemp("reference")
    run_cli("submit", str(cluster_sweep(tmp, "ref", ids=REF_PROMPTS, per_shard=len(REF_PROMPTS))))
    return only_run(tmp / "runs")


# ---- Slurm -------------------------------------------------------------------------------------------
@dataclass
class SlurmInfo:
    max_array_size: int
    gpus_per_node: int
    started_here: bool
    root: Path | None = None  # SINKSCOPE_SLURM_ROOT of the cluster


def _slurm_usable() -> bool:
    if not shutil.which("scontrol"):
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if "UP" not in ping.stdout:
        return False
    return subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True).returncode == 0


def running_slurm_root() -> Path | None:
    """SINKSCOPE_SLURM_ROOT of the running test cluster (its StateSaveLocation is ROOT/state), if one runs."""
    if not shutil.which("scontrol"):
        return None
    shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    for line in shown.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "StateSaveLocation" and value.strip().endswith("/state"):
            return Path(value.strip()).parent
    return None


def start_slurm(env: dict, root: Path) -> None:
    """scripts/slurm/start_slurm.sh start with `env` (idempotent; restarts cold when the config differs)."""
    proc = subprocess.run(["bash", str(SLURM_SCRIPT), "start"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env, "SINKSCOPE_SLURM_ROOT": str(root)})
    if proc.returncode != 0:
        pytest.fail(f"scripts/slurm/start_slurm.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def _slurm_info(started: bool, root: Path | None) -> "SlurmInfo":
    from orchestrate.executors.slurm import cluster_config

    config = cluster_config()
    node = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True).stdout
    gpus = max((int(g.split(":")[-1].split("(")[0]) for g in node.split() if g.startswith("gpu:")), default=0)
    return SlurmInfo(int(config["MaxArraySize"]), gpus, started, root)


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmInfo:
    """The test cluster in its single-node configuration. As root, start_slurm.sh always runs (0.2 s when the
    cluster is up as wanted): a cluster left in another configuration is brought back to this one. A new
    cluster lives in a fresh 0700 folder (`mkdtemp`), where MariaDB (user mysql) cannot reach its datadir:
    the script must cope (it once failed there with "permission denied")."""
    root = running_slurm_root()
    started = False
    if os.geteuid() == 0 and (shutil.which("slurmctld") or shutil.which("apt-get")):
        started = root is None
        root = root or Path(tempfile.mkdtemp(prefix="sinkscope-slurm-"))
        start_slurm(SLURM_TEST_ENV, root)
    elif not _slurm_usable():
        skip_or_fail("no usable Slurm here and not root (or no apt-get): cannot run scripts/slurm/start_slurm.sh")
    yield _slurm_info(started, root)
    if started and os.environ.get("SINKSCOPE_KEEP_SLURM") != "1":
        subprocess.run(["bash", str(SLURM_SCRIPT), "stop"], capture_output=True, timeout=120,
                       env={**os.environ, "SINKSCOPE_SLURM_ROOT": str(root)})
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm_two_nodes(slurm_cluster) -> SlurmInfo:
    """Two nodes of 2 CPUs (two slurmd daemons, Slurm's multiple-slurmd mode, node1 and node2) for one module;
    the single-node configuration is restored afterwards (both restarts are cold: ~5 s each)."""
    if slurm_cluster.root is None:
        skip_or_fail("the running Slurm was not started by scripts/slurm/start_slurm.sh: cannot reconfigure it")
    start_slurm(TWO_NODE_ENV, slurm_cluster.root)
    yield _slurm_info(False, slurm_cluster.root)
    start_slurm(SLURM_TEST_ENV, slurm_cluster.root)


def slurm_block(info: SlurmInfo, **extra) -> dict:
    """An executor block for the test cluster: 1 CPU, a (fake) GPU when the cluster has them."""
    return {"kind": "slurm", "cpus_per_task": 1, "gpus_per_task": 1 if info.gpus_per_node else 0, "time": 5, **extra}


def executor_of(run: RunDir):
    """The executor of the run's latest submission (what `orchestrate status` asks)."""
    from pydantic import TypeAdapter

    from manifests.schema import ExecutorConfig
    from orchestrate.executors.base import make_executor

    config = [r["config"] for r in run.submissions() if r.get("event") == "submit"][-1]
    return make_executor(TypeAdapter(ExecutorConfig).validate_python(config))


# ---- Ray ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ray_head():
    """A Ray head on 127.0.0.1 (2 fake GPUs, 4 CPUs); yields its GCS address."""
    if not (REPO / ".venv" / "bin" / "ray").exists() and not shutil.which("ray"):
        skip_or_fail("ray is not installed (pip install sinkscope[ray])")
    env = {**os.environ, **RAY_ENV, "SINKSCOPE_RAY_NUM_GPUS": "2", "SINKSCOPE_RAY_NUM_CPUS": "4",
           "SINKSCOPE_RAY_PORT": str(RAY_PORT), "SINKSCOPE_RAY_DASHBOARD_PORT": str(RAY_DASHBOARD_PORT)}
    with socket.socket() as s:
        busy = s.connect_ex(("127.0.0.1", RAY_DASHBOARD_PORT)) == 0
    status = subprocess.run(["bash", str(RAY_SCRIPT), "status"], capture_output=True, env=env)
    started = False
    if status.returncode != 0:
        if busy:
            pytest.fail(f"port {RAY_DASHBOARD_PORT} is taken by something that is not this test's Ray head")
        proc = subprocess.run(["bash", str(RAY_SCRIPT), "start"], capture_output=True, text=True, env=env, timeout=180)
        if proc.returncode != 0:
            pytest.fail(f"scripts/ray/start_ray.sh failed:\n{proc.stdout}\n{proc.stderr}")
        started = True
    yield f"127.0.0.1:{RAY_PORT}"
    if started:
        # a test head has nothing to save: 3 s of SIGTERM grace, then SIGKILL
        subprocess.run(["bash", str(RAY_SCRIPT), "stop"], capture_output=True, timeout=120,
                       env={**env, "SINKSCOPE_RAY_STOP_WAIT": "3"})


@pytest.fixture(scope="module")
def ray_two_nodes(ray_head):
    """The head plus a second raylet joined to it (scripts/ray/start_ray.sh join): 4 CPUs and 2 fake GPUs each."""
    env = {**os.environ, **RAY_ENV, "SINKSCOPE_RAY_PORT": str(RAY_PORT), "SINKSCOPE_RAY_DASHBOARD_PORT": str(RAY_DASHBOARD_PORT),
           "SINKSCOPE_RAY_NODE_CPUS": "4", "SINKSCOPE_RAY_NODE_GPUS": "2"}
    proc = subprocess.run(["bash", str(RAY_SCRIPT), "join"], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"scripts/ray/start_ray.sh join failed:\n{proc.stdout}\n{proc.stderr}")
    yield ray_head
    subprocess.run(["bash", str(RAY_SCRIPT), "leave"], capture_output=True, env=env, timeout=60)


def lose_ray_node() -> None:
    """SIGKILL the joined raylet's whole process group (raylet, its agents and its workers): a node loss."""
    subprocess.run(["bash", str(RAY_SCRIPT), "leave"], check=True, capture_output=True, timeout=60,
                   env={**os.environ, **RAY_ENV})


# ---- a real small filesystem, for disk-full faults ----------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A 48 MiB tmpfs (root only): output_root goes there; the fill_disk fault hook fills it for real."""
    mount = tmp_path / "small-fs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "sinkscope-test", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        skip_or_fail(f"cannot mount a small tmpfs for the disk-full faults (root needed): {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def free_disk(mount: Path) -> None:
    """Remove what the fill_disk hook wrote."""
    from jobs.faults import FILLER_NAME

    for filler in mount.rglob(FILLER_NAME):
        filler.unlink()


def temp_files(run: RunDir) -> list[Path]:
    """Hidden temporary files anywhere in the run directory (atomic writes that never finished)."""
    return [p for p in run.root.rglob(".*") if ".tmp-" in p.name]
