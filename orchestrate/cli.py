"""The `orchestrate` command line: plan, submit, status, resume, cancel, logs, analyze, report, demo.

Every command takes a sweep file or a run directory; all state lives in the run directory, so any
command can run from any machine that sees it.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from jobs.rundir import RunDir, atomic_write_json
from manifests import SweepError
from orchestrate import estimate
from orchestrate.create import build_manifest, create_run
from orchestrate.executors.base import make_executor
from orchestrate.status import RERUNNABLE, eta_seconds, rerunnable, shard_statuses

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run causal attention-sink sweeps on diffusion models (local, Slurm or Ray) and analyse them.",
)
console = Console()


def default_sweep() -> Path:
    """The embedded default: a demo sweep on the toy model (toy-sd3, trained on synthetic shapes), runnable on any CPU."""
    return Path(str(resources.files("manifests").joinpath("examples", "demo.yaml")))


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _parse_overrides(pairs: list[str], source: str) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"{source}: expected KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _executor_for(run: RunDir, sweep, kind: Optional[str], options: list[str]):
    """The sweep's executor block, with the command line's --executor / --executor-opt applied on top."""
    from pydantic import TypeAdapter, ValidationError

    from manifests.schema import ExecutorConfig

    block = sweep.executor.model_dump()
    if kind and kind != block["kind"]:
        block = {"kind": kind}
    block.update(_parse_overrides(options, "--executor-opt"))
    try:
        config = TypeAdapter(ExecutorConfig).validate_python(block)
    except ValidationError as e:
        problems = "; ".join(f"executor.{'.'.join(map(str, err['loc'][1:]))}: {err['msg']}" for err in e.errors())
        _fail(f"command-line executor options: {problems}")
    return make_executor(config)


def _load_run(run_dir: Path) -> tuple[RunDir, object]:
    from manifests import read_sweep_file

    run = RunDir(run_dir)
    if not run.exists():
        _fail(f"{run_dir}: not a sinkscope run directory (no sweep.yaml + manifest.parquet)")
    sweep, _ = read_sweep_file(run.sweep_path)
    return run, sweep


def _dispatch(run: RunDir, executor, shard_ids: list[int], verify: bool = False) -> int:
    """Submit under the run lock, so two submits or resumes of one run never send a shard twice.

    Returns the number of shards that failed (known only for the blocking local executor).
    """
    with run.lock():
        statuses = {s.shard_id: s for s in shard_statuses(run, _scheduler_states(run), verify=verify)}
        todo = [s for s in shard_ids if statuses[s].state in RERUNNABLE]
        skipped = sorted(set(shard_ids) - set(todo))
        if skipped:
            console.print(f"skipping {len(skipped)} shard(s) already done, running or queued: {skipped[:20]}")
        if not todo:
            console.print("nothing to submit")
            return 0
        for shard_id in todo:
            if statuses[shard_id].state == "corrupt":
                run.done_path(shard_id).unlink(missing_ok=True)
            run.failed_path(shard_id).unlink(missing_ok=True)
        run.append_submission({"executor": executor.kind, "event": "submit", "shards": todo, "config": executor.config.model_dump()})
        if not executor.blocking:
            try:
                records = executor.submit(run, todo)
            except RuntimeError as error:  # e.g. sbatch refused an array (queued arrays are recorded by the executor)
                _fail(f"submission to {executor.kind} failed: {error}")
            for record in records:
                run.append_submission(record)
            console.print(f"submitted {len(todo)} shard(s) to {executor.kind}; follow with `orchestrate status {run.root}`")
            return 0
        # a blocking (local) executor runs outside the lock, so claim its shards first: a second submit or
        # resume meanwhile sees them running (this process is alive) and leaves them alone
        claim = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "claimed_by": "orchestrate"}
        for shard_id in todo:
            atomic_write_json(run.running_path(shard_id), claim)
    failed = 0
    try:
        records = executor.submit(run, todo)
    except RuntimeError as error:  # refused before anything ran (e.g. GPUs asked of a CPU-only Ray)
        for shard_id in todo:
            run.running_path(shard_id).unlink(missing_ok=True)
        _fail(f"{executor.kind} executor: {error}")
    for record in records:
        run.append_submission(record)
        failed += len(record.get("failed", []))
    return failed


def _cluster_executors(run: RunDir) -> list:
    """One executor per cluster kind this run was submitted to, built from its latest submitted config."""
    from pydantic import TypeAdapter

    from manifests.schema import ExecutorConfig

    configs: dict[str, dict] = {}
    for record in run.submissions():
        config = record.get("config")
        if record.get("event") == "submit" and config and config.get("kind") != "local":
            configs[config["kind"]] = config
    return [make_executor(TypeAdapter(ExecutorConfig).validate_python(c)) for c in configs.values()]


def _scheduler_states(run: RunDir) -> dict[int, str]:
    """Ask every cluster executor this run has used (from state/submissions.jsonl)."""
    states: dict[int, str] = {}
    for executor in _cluster_executors(run):
        try:
            states.update(executor.scheduler_states(run))
            for note in getattr(executor, "notes", []):
                console.print(f"[yellow]{executor.kind}: {note}[/yellow]")
        except Exception as error:  # noqa: BLE001 — status must still show the markers
            console.print(f"[yellow]could not ask {executor.kind} for job states: {error}[/yellow]")
    return states


@app.command()
def plan(sweep: Path = typer.Argument(..., help="sweep.yaml to check and expand")) -> None:
    """Validate a sweep and print its units, shards and an estimate of GPU time. Runs nothing."""
    try:
        manifest, _ = build_manifest(sweep)
    except SweepError as e:
        _fail(str(e))
    s = manifest.sweep
    height, width = s.resolution()
    table = Table(title=f"{s.name} ({manifest.config_hash[:8]})")
    table.add_column("arm")
    table.add_column("intervention")
    for arm in s.arms:
        iv = arm.intervention
        table.add_row(arm.name, "baseline (none)" if iv is None else iv.model_dump_json(exclude_defaults=True))
    console.print(table)
    geometry = s.model.geometry()
    console.print(
        f"model {s.model.label}{' (random weights)' if geometry and geometry.random_weights else ''}, {height}×{width}, "
        f"{s.generation.steps} steps, guidance {s.generation.guidance}"
    )
    console.print(
        f"{len(manifest.prompts)} prompts × {s.seeds.count} seeds × {len(s.arms)} arms = [bold]{manifest.num_units}[/bold] units "
        f"in [bold]{len(manifest.shard_ids)}[/bold] shards ({s.sharding.prompts_per_shard} prompts per shard)"
    )
    console.print(estimate.describe(s, manifest.num_units))


@app.command()
def submit(
    sweep: Optional[Path] = typer.Argument(None, help="sweep.yaml (default: the embedded demo sweep on toy-sd3)"),
    executor: Optional[str] = typer.Option(None, "--executor", "-e", help="override executor.kind: local, slurm or ray"),
    executor_opt: list[str] = typer.Option([], "--executor-opt", "-o", help="override one executor field, KEY=VALUE (repeatable)"),
    output_root: Optional[Path] = typer.Option(None, help="override output_root"),
    smoke: bool = typer.Option(False, "--smoke", help="run a shrunken copy here first: tiny random model, 2 prompts, 2 steps"),
) -> None:
    """Create (or re-open) the run directory of a sweep and run its unfinished shards.

    The local executor runs them here and returns when they are done; slurm and ray return at once.
    With --smoke, a shrunken copy of the sweep runs locally instead (same arms, tiny random model), to
    check it end to end in a minute before spending GPU hours.
    """
    sweep = sweep or default_sweep()
    if smoke:
        sweep = _write_smoke_copy(sweep, output_root)
        executor, executor_opt = "local", []
    try:
        run, manifest, created = create_run(sweep, None if output_root is None else str(output_root))
    except SweepError as e:
        _fail(str(e))
    console.print(f"{'created' if created else 're-opened'} run [bold]{run.root}[/bold]")
    ex = _executor_for(run, manifest.sweep, executor, executor_opt)
    failed = _dispatch(run, ex, manifest.shard_ids)
    _print_summary(run)
    if failed:
        _fail(f"{failed} shard(s) failed; see `orchestrate status {run.root}` and `orchestrate logs`", code=1)


def _write_smoke_copy(sweep_path: Path, output_root: Optional[Path]) -> Path:
    from manifests import read_sweep_file
    from manifests.shrink import shrink

    try:
        sweep, raw = read_sweep_file(sweep_path)
    except SweepError as e:
        _fail(str(e))
    geometry = sweep.model.geometry()
    if geometry is None:
        _fail(f"{sweep_path}: model {sweep.model.label!r} is not in the geometry table; --smoke cannot map its layers")
    try:
        small = shrink(raw, geometry.family, geometry.num_layers)
    except ValueError as e:
        _fail(f"{sweep_path}: {e}")
    if sweep.prompts.file is not None and not Path(sweep.prompts.file).is_absolute():
        small["prompts"]["file"] = str((sweep_path.parent / sweep.prompts.file).resolve())
    root = Path(output_root or sweep.output_root) / "smoke"
    small["output_root"] = str(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{small['name']}.yaml"
    path.write_text(yaml.safe_dump(small, sort_keys=False))
    console.print(f"smoke run of {sweep_path} on {small['model']['preset']} (random weights): {path}")
    return path


@app.command()
def verify(
    sweep: Path = typer.Argument(..., help="sweep.yaml whose arms to check"),
    prompts: int = typer.Option(2, "--prompts", "-n", min=1, help="how many of the sweep's prompts to run"),
    smoke: bool = typer.Option(False, "--smoke", help="check on the tiny random model of the sweep's family instead"),
) -> None:
    """Check the sweep's processors on a few prompts, here: no-op bit-exactness and every arm's intervention.

    (a) with the processors installed and no intervention, images equal stock diffusers bit for bit;
    (b) per intervened arm: the selection, the intervened output against an fp64 reference, the mass left on
    removed keys, that out-of-scope rows are untouched and that value ops touch only the selected rows.
    Exits 1 if any check fails.
    """
    from manifests import read_sweep_file, resolve_prompts

    path = _write_smoke_copy(sweep, None) if smoke else sweep
    try:
        parsed, _ = read_sweep_file(path)
        prompt_list = resolve_prompts(parsed, base_dir=Path(path).parent, source=str(path))
    except SweepError as e:
        _fail(str(e))
    import workers

    loaded = workers.load_pipeline(parsed.model)
    console.print(f"verifying {len(parsed.arms)} arm(s) of {parsed.name} on {loaded.description} ({loaded.device}, {loaded.dtype})")
    rows = workers.verify_sweep(loaded, parsed, prompt_list, max_prompts=prompts)
    table = Table(title=f"verify {parsed.name}")
    for column in ("arm", "check", "result", "detail"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["arm"], row["check"], "[green]pass[/green]" if row["passed"] else "[red]FAIL[/red]", row["detail"])
    console.print(table)
    failed = [r for r in rows if not r["passed"]]
    if failed:
        _fail(f"{len(failed)} of {len(rows)} checks failed", code=1)
    console.print(f"all {len(rows)} checks passed")


@app.command()
def resume(
    run_dir: Path = typer.Argument(..., help="run directory"),
    executor: Optional[str] = typer.Option(None, "--executor", "-e", help="override executor.kind: local, slurm or ray"),
    executor_opt: list[str] = typer.Option([], "--executor-opt", "-o", help="override one executor field, KEY=VALUE (repeatable)"),
) -> None:
    """Rerun only the shards that are neither done nor running or queued (failed, interrupted, corrupt, ...)."""
    run, sweep = _load_run(run_dir)
    statuses = shard_statuses(run, _scheduler_states(run), verify=True)
    todo = rerunnable(statuses)
    if not todo:
        console.print("nothing to resume")
        _print_summary(run)
        return
    failed = _dispatch(run, _executor_for(run, sweep, executor, executor_opt), todo, verify=True)
    _print_summary(run)
    if failed:
        _fail(f"{failed} shard(s) failed; see `orchestrate status {run.root}` and `orchestrate logs`", code=1)


@app.command()
def status(
    run_dir: Path = typer.Argument(..., help="run directory"),
    verify: bool = typer.Option(False, help="check every done shard's files against its checksums"),
    all_shards: bool = typer.Option(False, "--all", help="list every shard, not only those not done"),
) -> None:
    """Per-shard state (done, running, pending, failed, cancelled, timeout, interrupted, corrupt), counts and ETA."""
    run, _ = _load_run(run_dir)
    _print_summary(run, verify=verify, list_all=all_shards, table=True)


def _print_summary(run: RunDir, verify: bool = False, list_all: bool = False, table: bool = False) -> None:
    statuses = shard_statuses(run, _scheduler_states(run), verify=verify)
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    if table:
        t = Table(title=str(run.root))
        for column in ("shard", "state", "groups", "elapsed", "error"):
            t.add_column(column)
        for s in statuses:
            if list_all or s.state != "done":
                elapsed = "" if s.elapsed_s is None else f"{s.elapsed_s:.1f}s"
                t.add_row(str(s.shard_id), s.state, f"{s.groups_done}/{s.groups_total}", elapsed, (s.error or "")[:120])
        console.print(t)
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    eta = eta_seconds(run, statuses)
    eta_text = "" if eta is None or counts.get("done", 0) == len(statuses) else f"; ETA ≈ {eta / 60:.1f} min at one worker"
    console.print(f"shards: {summary}{eta_text}")


@app.command()
def cancel(run_dir: Path = typer.Argument(..., help="run directory")) -> None:
    """Cancel every Slurm job or Ray task this run submitted."""
    run, _ = _load_run(run_dir)
    cancelled: list[str] = []
    with run.lock():
        for executor in _cluster_executors(run):
            cancelled += executor.cancel(run)
        run.append_submission({"event": "cancel", "job_ids": cancelled})
    console.print(f"cancelled {len(cancelled)} job(s): {' '.join(cancelled)}" if cancelled else "nothing to cancel")


@app.command()
def logs(
    run_dir: Path = typer.Argument(..., help="run directory"),
    shard: int = typer.Argument(..., help="shard id"),
    lines: int = typer.Option(40, "--lines", "-n", help="how many lines of the log's tail"),
) -> None:
    """Print the tail of a shard's log and its recorded error, if any."""
    run, _ = _load_run(run_dir)
    path = run.log_path(shard)
    if path.is_file():
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        console.print(f"[bold]{path}[/bold]")
        console.print("\n".join(tail), markup=False, highlight=False)
    else:
        console.print(f"no log yet at {path}")
    for extra in sorted(run.executor_dir.glob(f"**/*{run.shard_name(shard)}*")) if run.executor_dir.is_dir() else []:
        console.print(f"scheduler log: {extra}")
    failed = run.read_marker("failed", shard)
    if failed:
        console.print(f"[red]error[/red]: {failed['error']}", markup=True, highlight=False)
        console.print(failed.get("traceback", ""), markup=False, highlight=False)


@app.command()
def analyze(
    run_dir: Path = typer.Argument(..., help="run directory"),
    metric: list[str] = typer.Option([], "--metric", "-m", help="metrics to compute (default: the sweep's analysis.metrics)"),
    executor: Optional[str] = typer.Option(
        None, "--executor", "-e", help="score the shards as jobs on slurm or ray (default: here, in this process)"
    ),
    executor_opt: list[str] = typer.Option([], "--executor-opt", "-o", help="override one executor field, KEY=VALUE (repeatable)"),
) -> None:
    """Score the run's images (only what is missing) and write report/summary.md with paired statistics.

    With --executor slurm|ray, one metric job per finished shard is submitted through that executor and the
    command returns; run `orchestrate analyze RUN_DIR` again once they are done to reduce set metrics
    (FID-shift) and write the summary (already scored shards are not scored again).
    """
    import analysis
    from jobs.tasks import ShardJob
    from manifests.schema import METRICS

    run, sweep = _load_run(run_dir)
    metrics = metric or list(sweep.analysis.metrics)
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        _fail(f"--metric: unknown metric(s) {unknown}; expected some of {', '.join(METRICS)}")
    if executor and executor != "local":
        done = sorted(run.done_shards())
        if not done:
            _fail(f"{run.root}: no finished shard to score yet")
        ex = _executor_for(run, sweep, executor, executor_opt)
        job = ShardJob("metrics", tuple(metrics))
        with run.lock():
            try:
                records = ex.submit(run, done, job)
            except RuntimeError as error:
                _fail(f"metric jobs on {ex.kind}: {error}")
            for record in records:
                run.append_submission(record)
        console.print(f"submitted metric jobs ({', '.join(metrics)}) for {len(done)} shard(s) to {ex.kind}")
        if not ex.blocking:
            console.print(f"when they finish: `orchestrate analyze {run.root}` reduces set metrics and writes the summary")
            return
    random_weights = True if sweep.analysis.random_metric_weights else None
    analysis.compute_metrics(run.root, metrics=metrics, random_weights=random_weights)
    summary = analysis.write_summary(run.root)
    console.print(f"summary: [bold]{summary}[/bold]")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="run directory")) -> None:
    """Assemble tables and figures of an analysed run into report/report.md."""
    import analysis

    run, _ = _load_run(run_dir)
    path = analysis.build_report(run.root)
    console.print(f"report: [bold]{path}[/bold]")


@app.command()
def demo(output_root: Path = typer.Option(Path("runs"), help="where the demo run directory goes")) -> None:
    """The whole pipeline on the embedded default (toy-sd3: toy model trained on synthetic shapes, local executor):
    submit, analyze (LPIPS, toy-GenEval), report."""
    from manifests.models import MODEL_NOTES

    run, manifest, _ = create_run(default_sweep(), str(output_root))
    model = manifest.sweep.model
    note = MODEL_NOTES.get(model.label) or ("random weights, numbers mean nothing" if model.geometry().random_weights else "")
    console.print(f"run [bold]{run.root}[/bold] ({model.label}{': ' + note if note else ''})")
    _dispatch(run, make_executor(manifest.sweep.executor), manifest.shard_ids)
    statuses = shard_statuses(run)
    if any(s.state != "done" for s in statuses):
        _print_summary(run, table=True)
        _fail("some shards did not finish; see `orchestrate status` and `orchestrate logs`", code=1)
    analyze(run.root, metric=[], executor=None, executor_opt=[])  # called as plain functions: pass every option
    report(run.root)
    console.print(f"images:      {run.images_dir}")
    console.print(f"tables:      {run.tables_dir}  (load with analysis.load_run('{run.root}'))")
    console.print(f"report:      {run.root / 'report'}")


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
