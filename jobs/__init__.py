"""What runs on a node: `run_shard`, atomic writes, shard markers and logs. Knows no scheduler."""

from jobs.rundir import RunDir
from jobs.run_shard import run_shard, verify_done_shard

__all__ = ["RunDir", "run_shard", "verify_done_shard"]
