"""The run directory lives in `jobs.rundir` (jobs writes it, orchestrate reads it); re-exported here for the executors."""

from jobs.rundir import RunDir, atomic_write_bytes, atomic_write_json, run_dir_for

__all__ = ["RunDir", "atomic_write_bytes", "atomic_write_json", "run_dir_for"]
