"""The `orchestrate` command line: plan, submit, status, resume, cancel, logs, compact, analyze, report, demo.

Every command takes a sweep file or a run directory; all state lives in the run directory, so any
command can run from any machine that sees it.
"""

from __future__ import annotations

import json
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

from jobs.frozen_sweep import SweepDriftError, accept_drift, check_resolved_sweep, drift_message, load_resolved_sweep
from jobs.rundir import RunDir
from manifests import SweepError
from orchestrate import estimate
from orchestrate import status as run_status
from orchestrate.create import build_manifest, create_run
from orchestrate.executors.base import make_executor
from orchestrate.status import RERUNNABLE, shard_statuses

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run causal attention-sink sweeps on diffusion models (local, Slurm or Ray) and analyse them.",
)
console = Console()


def default_sweep() -> Path:
    """The embedded default: a demo sweep on the tiny random SD3, runnable on any CPU."""
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


ACCEPT_DRIFT_HELP = ("continue although the run's resolved sweep no longer matches its recorded hash (an edited "
                     "sweep.resolved.json, or a sinkscope that resolves it differently); recorded in provenance.json")


def _load_run(run_dir: Path, accept_sweep_drift: bool = False, command: str = "") -> tuple[RunDir, object]:
    """The run and its resolved sweep, re-validated and hash-checked (a mismatch stops unless accepted)."""
    run = RunDir(run_dir)
    if not run.manifest_path.is_file():
        _fail(f"{run_dir}: not a sinkscope run directory (no manifest.parquet)")
    try:
        if accept_sweep_drift:
            with run.lock():
                accepted = accept_drift(run, command)
            if accepted is not None:
                console.print(f"[yellow]accepted sweep drift {accepted.recorded_hash[:12] if accepted.recorded_hash else '(none)'} → "
                              f"{accepted.current_hash[:12]} (recorded in {run.provenance_path.name})[/yellow]")
        sweep = load_resolved_sweep(run)
    except (SweepDriftError, SweepError) as error:
        _fail(str(error))
    return run, sweep


def _open_run(run_dir: Path) -> RunDir:
    """The run, for commands that only read or stop it (status, logs, cancel, compact): no sweep check."""
    run = RunDir(run_dir)
    if not run.manifest_path.is_file():
        _fail(f"{run_dir}: not a sinkscope run directory (no manifest.parquet)")
    return run


def _dispatch(run: RunDir, executor, shard_ids: list[int] | None = None, verify: bool = False, dry_run: bool = False) -> int:
    """Submit the rerunnable ones of `shard_ids` (default: all) under the run lock, so two submits or resumes of
    one run never send a shard twice. Shard states are computed once, here; outputs are hashed only if `verify`.

    Returns the number of shards that failed (known only for the blocking local executor).
    """
    with run.lock():
        statuses = shard_statuses(run, _scheduler_states(run), verify=verify, errors=False)
        if verify:
            problems = run_status.verify_compacted(run)
            if problems:
                _fail("compacted tables are damaged (restore them from a backup or delete the run's tables/*/_compact* "
                      "and the done markers of their shards):\n  " + "\n  ".join(problems))
        wanted = None if shard_ids is None else set(shard_ids)
        todo = [s.shard_id for s in statuses if s.state in RERUNNABLE and (wanted is None or s.shard_id in wanted)]
        considered = len(statuses) if wanted is None else len(wanted)
        skipped = considered - len(todo)
        if skipped:
            console.print(f"skipping {skipped} shard(s) already done, running or queued")
        if not todo:
            console.print("nothing to submit")
            return 0
        corrupt = [s.shard_id for s in statuses if s.state == "corrupt" and s.shard_id in set(todo)]
        if dry_run:
            counts: dict[str, int] = {}
            for s in statuses:
                if s.shard_id in set(todo):
                    counts[s.state] = counts.get(s.state, 0) + 1
            how = "run here" if executor.blocking else f"queued on {executor.kind}"
            console.print(f"dry run: {len(todo)} shard(s) would be {how} ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}): "
                          f"{_id_ranges(todo)}; nothing was started")
            return 0
        for shard_id in todo:
            if shard_id in corrupt:
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
            run.write_marker("running", shard_id, claim)
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


def _id_ranges(ids: list[int], limit: int = 12) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8' (at most `limit` ranges, then a count)."""
    ranges: list[list[int]] = []
    for i in sorted(ids):
        if ranges and i == ranges[-1][1] + 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges[:limit])
    return text + (f", … ({len(ranges) - limit} more ranges)" if len(ranges) > limit else "")


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


def _scheduler_states(run: RunDir, task: str = "generate") -> dict[int, str]:
    """Ask every cluster executor this run has used (from state/submissions.jsonl) about its jobs of `task`."""
    states: dict[int, str] = {}
    for executor in _cluster_executors(run):
        try:
            states.update(executor.scheduler_states(run, task))
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
    sweep: Optional[Path] = typer.Argument(None, help="sweep.yaml (default: the embedded demo sweep on tiny-sd3)"),
    executor: Optional[str] = typer.Option(None, "--executor", "-e", help="override executor.kind: local, slurm or ray"),
    executor_opt: list[str] = typer.Option([], "--executor-opt", "-o", help="override one executor field, KEY=VALUE (repeatable)"),
    output_root: Optional[Path] = typer.Option(None, help="override output_root"),
    smoke: bool = typer.Option(False, "--smoke", help="run a shrunken copy here first: tiny random model, 2 prompts, 2 steps"),
    dry_run: bool = typer.Option(False, "--dry-run", help="create (or re-open) the run directory and print what would run; run nothing"),
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
    if not created:
        try:
            load_resolved_sweep(run)
        except SweepDriftError as error:
            _fail(f"{error}\n(re-opened run; use `orchestrate resume {run.root} --accept-sweep-drift` to continue it)")
    ex = _executor_for(run, manifest.sweep, executor, executor_opt)
    failed = _dispatch(run, ex, dry_run=dry_run)
    if dry_run:
        return
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
    verify: bool = typer.Option(False, "--verify", help="hash every done shard's files (and compacted tables) against their "
                                "checksums first and rerun the corrupt ones"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print what would be rerun; run nothing"),
    accept_sweep_drift: bool = typer.Option(False, "--accept-sweep-drift", help=ACCEPT_DRIFT_HELP),
) -> None:
    """Rerun only the shards that are neither done nor running or queued (failed, interrupted, corrupt, ...).

    The run's resolved sweep is re-validated first: a hash mismatch stops here unless --accept-sweep-drift.
    """
    run, sweep = _load_run(run_dir, accept_sweep_drift, "resume")
    failed = _dispatch(run, _executor_for(run, sweep, executor, executor_opt), verify=verify, dry_run=dry_run)
    if dry_run:
        return
    _print_summary(run)
    if failed:
        _fail(f"{failed} shard(s) failed; see `orchestrate status {run.root}` and `orchestrate logs`", code=1)


@app.command()
def status(
    run_dir: Path = typer.Argument(..., help="run directory"),
    verify: bool = typer.Option(False, help="hash every done shard's files (and compacted tables) against their checksums"),
    all_shards: bool = typer.Option(False, "--all", help="also print the per-shard table (reads every done marker)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (the summary; per shard with --all) for scripts"),
    watch: Optional[float] = typer.Option(None, "--watch", min=0.1, help="redraw the summary every SECONDS until nothing "
                                          "runs or is queued (Ctrl-C stops)"),
) -> None:
    """Summary of a run: shards per state, failures by error, oldest running, ETA; metric jobs too.

    Lists each marker folder once and reads only running/failed markers and a sample of done ones, so it
    stays fast at 10,000 shards. --all adds the per-shard table (reads every done marker)."""
    run = _open_run(run_dir)
    while True:
        if watch:
            console.clear()
        active = _print_summary(run, verify=verify, list_all=all_shards, as_json=as_json)
        if not watch or not active:
            return
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return


def _print_summary(run: RunDir, verify: bool = False, list_all: bool = False, as_json: bool = False) -> bool:
    """Print the run's status; returns whether any shard or metric job is still running or queued."""
    statuses = shard_statuses(run, _scheduler_states(run), verify=verify, per_shard=list_all)
    summary = run_status.summarise(run, statuses)
    metric_scheduler = _scheduler_states(run, "metrics")
    metric_ids = sorted(set(run_status.metric_job_ids(run)) | set(metric_scheduler))
    metric_statuses = shard_statuses(run, metric_scheduler, task="metrics", shard_ids=metric_ids) if metric_ids else []
    metric_summary = run_status.summarise(run, metric_statuses, "metrics") if metric_ids else None
    compacted_problems = run_status.verify_compacted(run) if verify else []
    check = None
    if run.resolved_sweep_path.is_file():
        try:
            check = check_resolved_sweep(run)
        except SweepDriftError:
            check = None
    drift = drift_message(run, check) if check is not None and check.drifted and not check.accepted else None
    active = any(s.state in ("running", "pending") for s in statuses + metric_statuses)
    if as_json:
        payload = {"run": str(run.root), "generate": run_status.as_json(summary, statuses if list_all else None),
                   "metrics": None if metric_summary is None else run_status.as_json(metric_summary),
                   "compacted_problems": compacted_problems, "sweep_drift": drift}
        sys.stdout.write(json.dumps(payload, indent=1, default=str) + "\n")
        return active
    if list_all:
        t = Table(title=str(run.root))
        for column in ("shard", "state", "groups", "elapsed", "error"):
            t.add_column(column)
        for s in statuses:
            elapsed = "" if s.elapsed_s is None else f"{s.elapsed_s:.1f}s"
            t.add_row(str(s.shard_id), s.state, f"{s.groups_done}/{s.groups_total}", elapsed, (s.error or "")[:120])
        console.print(t)
    _print_task_summary("shards", summary)
    if metric_summary is not None:
        _print_task_summary("metric jobs", metric_summary)
    for problem in compacted_problems:
        console.print(f"[red]corrupt compacted table[/red]: {problem}", highlight=False)
    if drift:
        console.print(f"[red]sweep drift[/red]: {drift}", highlight=False)
    return active


def _print_task_summary(label: str, summary) -> None:
    order = {state: i for i, state in enumerate(run_status.STATES)}
    counts = ", ".join(f"{n} {state}" for state, n in sorted(summary.counts.items(), key=lambda kv: order.get(kv[0], 99)))
    line = f"{label}: {summary.total} total: {counts}"
    if summary.workers_running:
        line += f"; {summary.workers_running} worker(s)/task(s) running"
    if summary.throughput_per_h:
        line += f"; {summary.throughput_per_h:.1f} shards/h"
    if summary.eta_s is not None:
        line += f"; ETA ≈ {summary.eta_s / 60:.1f} min"
    console.print(line, highlight=False)
    for group in summary.failures:
        console.print(f"  [red]{group['count']} failed[/red] with {group['error']} (e.g. shard {group['example_shard']}; "
                      f"`orchestrate logs RUN {group['example_shard']}{' --task metrics' if summary.task == 'metrics' else ''}`)",
                      highlight=False)
    if summary.oldest_running:
        oldest = ", ".join(f"{r['shard_id']} ({(r['age_s'] or 0) / 60:.1f} min on {r['host']})" for r in summary.oldest_running)
        console.print(f"  oldest running: {oldest}", highlight=False)


@app.command()
def cancel(run_dir: Path = typer.Argument(..., help="run directory")) -> None:
    """Cancel every Slurm job or Ray task this run submitted."""
    run = _open_run(run_dir)
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
    task: str = typer.Option("generate", "--task", help="generate (the shard's generation job) or metrics (its metric job)"),
) -> None:
    """Print the tail of a shard's log and its recorded error, if any."""
    run = _open_run(run_dir)
    if task not in ("generate", "metrics"):
        _fail(f"--task: expected generate or metrics, got {task!r}")
    path = run.log_path(shard, task)
    if path.is_file():
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        console.print(f"[bold]{path}[/bold]")
        console.print("\n".join(tail), markup=False, highlight=False)
    else:
        console.print(f"no log yet at {path}")
    for extra in sorted(run.executor_dir.glob(f"**/*{run.shard_name(shard)}*")) if run.executor_dir.is_dir() else []:
        console.print(f"scheduler log: {extra}")
    failed = run.read_marker("failed", shard, task)
    if failed:
        console.print(f"[red]error[/red]: {failed['error']}", markup=True, highlight=False)
        console.print(failed.get("traceback", ""), markup=False, highlight=False)


@app.command()
def compact(run_dir: Path = typer.Argument(..., help="run directory")) -> None:
    """Compact the done shards' part files into a few large Parquet files per table (sink steps split by arm).

    Safe at any time and after a crash at any point: markers stay the truth, the switch to compacted files is one
    atomic rename, and rerunning it never loses or duplicates a row. Metric tables are skipped while metric jobs run.
    """
    _compact(_open_run(run_dir))


def _compact(run: RunDir) -> None:
    from jobs import compaction
    from jobs import runformat as rf

    tables = rf.SHARDED_TABLES
    if run.running_shards("metrics"):
        tables = ("units", "sink_steps")
        console.print("metric jobs are running: metric tables are left for a later `orchestrate compact`")
    try:
        reports = compaction.compact_run(run, tables)
    except TimeoutError as error:
        _fail(f"{run.root}: the run is locked by another submit, resume or compaction ({error})")
    for r in reports:
        if r.shards_added or r.parts_removed or r.skipped:
            console.print(f"compacted {r.folder.relative_to(run.root)}: {r.shards_added} shard(s), {r.rows_written} rows "
                          f"in {r.files_written} file(s); {r.parts_removed} part file(s) removed", highlight=False)
        for shard, why in sorted(r.skipped.items()):
            console.print(f"[yellow]left shard {shard}[/yellow]: {why}", highlight=False)
    if not any(r.shards_added or r.parts_removed for r in reports):
        console.print("nothing to compact")


@app.command()
def analyze(
    run_dir: Path = typer.Argument(..., help="run directory"),
    metric: list[str] = typer.Option([], "--metric", "-m", help="metrics to compute (default: the sweep's analysis.metrics)"),
    executor: Optional[str] = typer.Option(
        None, "--executor", "-e", help="score the shards as jobs on slurm or ray (default: here, in this process)"
    ),
    executor_opt: list[str] = typer.Option([], "--executor-opt", "-o", help="override one executor field, KEY=VALUE (repeatable)"),
    accept_sweep_drift: bool = typer.Option(False, "--accept-sweep-drift", help=ACCEPT_DRIFT_HELP),
    compact_first: bool = typer.Option(True, "--compact/--no-compact", help="compact the done shards' tables first "
                                       "(`orchestrate compact`)"),
) -> None:
    """Score the run's images (only what is missing) and write report/summary.md with paired statistics.

    The run's resolved sweep is re-validated first (a hash mismatch stops unless --accept-sweep-drift), and the
    done shards' part files are compacted. With --executor slurm|ray, one metric job per finished shard is
    submitted through that executor and the command returns; run `orchestrate analyze RUN_DIR` again once they
    are done to reduce set metrics (FID-shift) and write the summary (already scored shards are not scored again).
    """
    import analysis
    from jobs.tasks import ShardJob
    from manifests.schema import METRICS

    run, sweep = _load_run(run_dir, accept_sweep_drift, "analyze")
    if compact_first:
        _compact(run)
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
def atlas(
    run_dirs: list[Path] = typer.Argument(..., help="run directories, one per model (same prompts), shown side by side"),
    out: Path = typer.Option(Path("atlas"), "--out", "-o", help="folder for atlas.md, atlas.png/.pdf and atlas.csv"),
    arm: Optional[str] = typer.Option(None, help="arm to map (default: each run's baseline arm)"),
) -> None:
    """Sink atlas across models: layer × step heat maps of the sink-to-random ratio and of the number of distinct
    top-1 sinks, top-1 region shares per layer and image-sink maps (record the stats mass and ratio)."""
    import analysis.atlas

    roots = [_load_run(d)[0].root for d in run_dirs]
    try:
        path = analysis.atlas.write_atlas(roots, out, arm=arm)
    except ValueError as error:
        _fail(str(error))
    console.print(f"atlas: [bold]{path}[/bold]")


@app.command()
def demo(output_root: Path = typer.Option(Path("runs"), help="where the demo run directory goes")) -> None:
    """The whole pipeline on the embedded default (tiny random SD3, local executor): submit, analyze, report."""
    run, manifest, _ = create_run(default_sweep(), str(output_root))
    console.print(f"run [bold]{run.root}[/bold] (tiny-sd3: random weights, numbers mean nothing)")
    _dispatch(run, make_executor(manifest.sweep.executor))
    statuses = shard_statuses(run)
    if any(s.state != "done" for s in statuses):
        _print_summary(run, list_all=True)
        _fail("some shards did not finish; see `orchestrate status` and `orchestrate logs`", code=1)
    analyze(run.root, metric=[], executor=None, executor_opt=[], accept_sweep_drift=False, compact_first=True)  # plain call: every option
    report(run.root)
    console.print(f"images:      {run.images_dir}")
    console.print(f"tables:      {run.tables_dir}  (load with analysis.load_run('{run.root}'))")
    console.print(f"report:      {run.root / 'report'}")


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
