"""The `orchestrate` CLI, executors (local, Slurm via submitit, Ray), run status and provenance. No model code."""
