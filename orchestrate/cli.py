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
import uuid
from importlib import resources
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from jobs.frozen_sweep import SweepDriftError, accept_drift, check_resolved_sweep, drift_message, load_resolved_sweep
from jobs import runformat as rf
from jobs.rundir import RunDir
from jobs.run_shard import temp_files_of_shard
from jobs.tasks import record_task
from manifests import SweepError
from orchestrate import estimate
from orchestrate import status as run_status
from orchestrate.create import create_run
from orchestrate.executors.base import make_executor
from orchestrate.status import RERUNNABLE, pid_alive, shard_statuses

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


EXECUTOR_KINDS = ("local", "slurm", "ray")
SET_HELP = "override one key of the sweep file, dotted KEY=VALUE (e.g. generation.steps=4, arms[0].intervention.k=2); repeatable"


def executor_config(sweep, kind: Optional[str], options: list[str], base: dict | None = None):
    """The sweep's executor block (or `base`: the one recorded at submission) with --executor / --executor-opt
    applied, validated: raises ValueError naming the option, the key and the valid keys (the run directory
    does not exist yet when this is called)."""
    from pydantic import TypeAdapter, ValidationError

    from manifests.compose import apply_overrides, parse_override
    from manifests.suggest import closest_key, keys_related
    from manifests.load import describe_error, short_repr
    from manifests.schema import ExecutorConfig, LocalExecutorConfig, RayExecutorConfig, SlurmExecutorConfig

    block = dict(base) if base else sweep.executor.model_dump(exclude_unset=True) | {"kind": sweep.executor.kind}
    if kind:
        if kind not in EXECUTOR_KINDS:
            hint = closest_key(kind, list(EXECUTOR_KINDS))
            raise ValueError(f"--executor {kind!r}: unknown executor{f'; did you mean {hint!r}?' if hint else ''} "
                             f"(expected one of {', '.join(EXECUTOR_KINDS)})")
        if kind != block["kind"]:
            block = {"kind": kind}
    classes = {"local": LocalExecutorConfig, "slurm": SlurmExecutorConfig, "ray": RayExecutorConfig}
    model = classes[block["kind"]]
    parsed = []
    for pair in options:
        override = parse_override(pair, source="--executor-opt")
        if override.path[0] == "kind":
            raise ValueError(f"--executor-opt {pair}: choose the executor with --executor, not executor-opt")
        parsed.append(override)
    block = apply_overrides(block, parsed)
    try:
        return TypeAdapter(ExecutorConfig).validate_python(block)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            line = describe_error({**err, "loc": tuple(err["loc"])[1:]}, model, prefix="executor.")  # drop the union's tag
            key, rest = line.split(":", 1)
            given = [o for o in parsed if keys_related(key, f"executor.{o.key}")]
            where = f"--executor-opt {given[-1].key}={short_repr(given[-1].value)}" if given else f"{key} (in the sweep file)"
            problems.append(f"{where}:{rest}")
        raise ValueError(f"invalid {block['kind']} executor options\n" + "\n".join(f"  - {p}" for p in problems)) from None


def _executor_for(run: RunDir, sweep, kind: Optional[str], options: list[str], base: dict | None = None):
    """The sweep's executor block (or `base`), with the command line's --executor / --executor-opt applied on top."""
    try:
        return make_executor(executor_config(sweep, kind, options, base))
    except ValueError as e:
        _fail(str(e))


def recorded_executor(run: RunDir) -> dict | None:
    """The executor block (kind and options) of the run's latest accepted generation submission, or None.

    A blocking executor's `submit` event is written before it runs; a refusal of that attempt (same
    `attempt` id) cancels it, so a refused configuration never becomes the one `resume` goes back to."""
    records = run.submissions()
    refused = {r.get("attempt") for r in records if r.get("event") == "refused" and r.get("attempt")}
    configs = [r["config"] for r in records if r.get("event") == "submit" and r.get("config") and record_task(r) == "generate"
               and r.get("attempt") not in refused]
    return configs[-1] if configs else None


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


def _set_aside(run: RunDir, todo: list[int], corrupt: set[int]) -> list[tuple[Path, Path]]:
    """Move the failed markers (and a corrupt shard's done marker) of shards about to be resubmitted to hidden
    names: a refused submission puts them back unchanged, an accepted one drops them."""
    moved = []
    for shard_id in todo:
        for path in [run.failed_path(shard_id)] + ([run.done_path(shard_id)] if shard_id in corrupt else []):
            if path.exists():
                aside = path.with_name(f".{path.name}.resubmit-{os.getpid()}")
                os.replace(path, aside)
                moved.append((aside, path))
    return moved


def _refused(run: RunDir, submitted: dict, shards: list[int], moved: list[tuple[Path, Path]], error: Exception) -> None:
    """The scheduler refused `shards` of the attempt `submitted`: put their markers back, record why."""
    for aside, path in moved:
        if rf.shard_id_of(path.name) in shards:
            os.replace(aside, path)
        else:
            aside.unlink(missing_ok=True)
    run.append_submission({"executor": submitted["executor"], "event": "refused", "shards": shards, "message": str(error),
                           "config": submitted["config"], "attempt": submitted["attempt"]})


def _dispatch(run: RunDir, executor, shard_ids: list[int] | None = None, verify: bool = False,
              dry_run: bool = False) -> dict[int, str]:
    """Submit the rerunnable ones of `shard_ids` (default: all) under the run lock, so two submits or resumes of
    one run never send a shard twice. Shard states are computed once, here; outputs are hashed only if `verify`.

    Returns the shards a blocking executor (local, Ray `address: local`) left unfinished, with why (queued
    shards: empty). Temporary files of the shards' dead writers are removed first. A refused submission
    changes no shard state: it is recorded as a `refused` event with the scheduler's message; exit 2.
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
            return {}
        corrupt = {s.shard_id for s in statuses if s.state == "corrupt" and s.shard_id in set(todo)}
        if dry_run:
            counts: dict[str, int] = {}
            for s in statuses:
                if s.shard_id in set(todo):
                    counts[s.state] = counts.get(s.state, 0) + 1
            how = "run here" if executor.blocking else f"queued on {executor.kind}"
            console.print(f"dry run: {len(todo)} shard(s) would be {how} ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}): "
                          f"{_id_ranges(todo)}; nothing was started")
            return {}
        # nobody writes these shards now (rerunnable = no live writer): temp files of dead writers go
        stale = [t for s in todo if s not in corrupt for t in temp_files_of_shard(run, s)]
        for temp in stale:
            temp.unlink(missing_ok=True)
        if stale:
            console.print(f"removed {len(stale)} temporary file(s) left by dead writers")
        moved = _set_aside(run, todo, corrupt)
        submitted = {"executor": executor.kind, "event": "submit", "shards": todo, "config": executor.config.model_dump(),
                     "attempt": uuid.uuid4().hex[:12]}
        if not executor.blocking:
            try:
                records = executor.submit(run, todo)
            except RuntimeError as error:  # e.g. sbatch refused (arrays queued before it are recorded by the executor)
                queued = [s for r in getattr(error, "records", []) for s in r["shards"]]
                if queued:
                    run.append_submission({**submitted, "shards": queued, "attempt": f"{submitted['attempt']}-partial"})
                _refused(run, submitted, [s for s in todo if s not in queued], moved, error)
                _fail(f"{executor.kind} refused the submission (no shard state changed; recorded in "
                      f"{run.submissions_path}): {error}")
            for aside, _ in moved:
                aside.unlink(missing_ok=True)
            run.append_submission(submitted)
            for record in records:
                run.append_submission(record)
            console.print(f"submitted {len(todo)} shard(s) to {executor.kind}; follow with `orchestrate status {run.root}`")
            return {}
        # a blocking (local) executor runs outside the lock, so claim its shards first: a second submit or
        # resume meanwhile sees them running (this process is alive) and leaves them alone
        run.append_submission(submitted)
        claim = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "claimed_by": "orchestrate"}
        for shard_id in todo:
            run.write_marker("running", shard_id, claim)
    try:
        records = executor.submit(run, todo)
    except RuntimeError as error:  # refused before anything ran (e.g. GPUs asked of a CPU-only Ray)
        with run.lock():
            for shard_id in todo:
                run.running_path(shard_id).unlink(missing_ok=True)
            _refused(run, submitted, todo, moved, error)
        _fail(f"{executor.kind} executor refused the shards (no shard state changed): {error}")
    with run.lock():
        for aside, _ in moved:
            aside.unlink(missing_ok=True)
        errors: dict[str, str] = {}
        for record in records:
            errors.update(record.get("errors", {}))
            try:
                run.append_submission(record)
            except OSError as error:  # e.g. the disk that failed the shards is still full: say so, go on
                console.print(f"[yellow]could not record the run's outcome in {run.submissions_path}: {error}[/yellow]")
        return _settle(run, todo, errors)


def _settle(run: RunDir, shard_ids: list[int], errors: dict[str, str]) -> dict[int, str]:
    """After a blocking executor returned: every shard it was given is done, or failed with a recorded cause.

    A shard whose worker died without a record (SIGKILL, out of memory) gets a failed marker naming that,
    and this process's claims are dropped, so `status` and the summary show the final state, never "running".
    """
    unfinished: dict[int, str] = {}
    for shard_id in shard_ids:
        if run.done_path(shard_id).exists():
            continue
        failed = run.read_marker("failed", shard_id)
        running = run.read_marker("running", shard_id) or {}
        ours = running.get("host") == socket.gethostname() and (
            running.get("pid") == os.getpid() or not pid_alive(int(running.get("pid", -1))))
        if failed is None:
            why = errors.get(str(shard_id)) or "lost: its worker ended without a done or failed record"
            failed = {"error": why, "cause": "lost", "host": socket.gethostname(), "pid": running.get("pid"), "time": time.time()}
            try:
                run.write_marker("failed", shard_id, failed)
            except OSError as error:
                console.print(f"[yellow]shard {shard_id}: could not write its failed marker: {error}[/yellow]")
        if ours:
            run.running_path(shard_id).unlink(missing_ok=True)
        unfinished[shard_id] = failed.get("error", "failed")
    return unfinished


def _exit_if_unfinished(run: RunDir, unfinished: dict[int, str]) -> None:
    if unfinished:
        named = "; ".join(f"shard {s}: {why}" for s, why in sorted(unfinished.items())[:10])
        _fail(f"{len(unfinished)} shard(s) did not finish ({named}). `orchestrate logs {run.root} SHARD` shows why; "
              f"`orchestrate resume {run.root}` reruns them", code=1)


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
def plan(
    sweeps: list[Path] = typer.Argument(..., help="sweep files (each one is a run) or folders of them (e.g. manifests/paper/)"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    output_root: Optional[Path] = typer.Option(None, help="check this output_root instead of the sweep's"),
    summary: bool = typer.Option(False, "--summary", help="only the table of sweeps and the totals, not each sweep's arms"),
) -> None:
    """Validate sweeps and print their units, shards and GPU time with and without sharing. Runs and writes nothing.

    Every file is checked (syntax, keys, values, the model folder, the prompt file, that the output root is
    writable); exits 2 if any of them is invalid, after reporting all of them. With several sweeps (or a folder),
    a table of them and the total follows, run in the order given with one cache: baselines and intervened units
    reused, baselines generated again for latents, prefix steps taken from baselines.
    """
    paths: list[Path] = []
    for path in sweeps:
        paths += sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    if not paths:
        _print_error(f"no sweep files in {', '.join(map(str, sweeps))}")
        raise typer.Exit(2)
    invalid, manifests = 0, []
    for path in paths:
        try:
            manifests.append(_planned_manifest(path, set_, output_root))
        except SweepError as e:
            _print_error(str(e))
            invalid += 1
    costs = estimate.plan_costs(manifests)
    if not summary or len(manifests) == 1:
        for manifest, cost in zip(manifests, costs):
            _print_plan(manifest, cost)
    if len(manifests) > 1:
        _plan_many(costs)
    if invalid:
        if len(paths) > 1:
            _print_error(f"{invalid} of {len(paths)} sweep files are invalid")
        raise typer.Exit(2)


def _print_error(message: str) -> None:
    console.print("[red]error:[/red] ", end="", highlight=False)
    console.print(message, markup=False, highlight=False)


def _planned_manifest(path: Path, overrides: list[str], output_root: Optional[Path] = None, model: bool = True):
    """The manifest of one sweep file after every plan-time check (nothing is written)."""
    from manifests import expand, plan_sweep_file

    sweep, _, prompts = plan_sweep_file(path, overrides, output_root, model=model)
    return expand(sweep, prompts)


def _print_plan(manifest, cost) -> None:
    s = manifest.sweep
    height, width = s.resolution()
    table = Table(title=f"{s.name} ({manifest.config_hash[:8]})")
    table.add_column("arm")
    table.add_column("intervention")
    table.add_column("prefix steps shared", justify="right")
    starts = estimate.arm_start_steps(s)
    for arm in s.arms:
        iv = arm.intervention
        table.add_row(arm.name, "baseline (none)" if iv is None else iv.model_dump_json(exclude_defaults=True),
                      "" if iv is None else str(starts.get(arm.name, 0)))
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
    console.print(estimate.describe(s, cost))
    console.print(estimate.describe_sharing(cost) + " (a cache shared with other runs saves more)")


def _plan_many(costs) -> None:
    table = Table(title=f"{len(costs)} sweeps, one cache (in this order)")
    columns = ("sweep", "images", "baselines", "reused", "again", "arms", "arms reused", "prefix steps", "without sharing", "with sharing")
    for name in columns:
        table.add_column(name, justify="left" if name == "sweep" else "right")
    for c in costs:
        table.add_row(c.name, str(c.units), str(c.baseline_units), str(c.baselines_reused), str(c.baselines_regenerated),
                      str(c.intervened_units), str(c.units_reused), str(c.prefix_steps_saved),
                      estimate.hours_or_minutes(c.seconds_without, c.where), estimate.hours_or_minutes(c.seconds_with, c.where))
    console.print(table)
    console.print("baselines reused: taken from the cache; again: cached by an earlier sweep without the latents this "
                  "sweep's prefix arms need, so generated again; arms reused: intervened units taken from the cache")
    again = [c for c in costs if c.baselines_regenerated]
    if again:
        console.print(f"hint: {', '.join(c.name for c in again)} generate{'s' if len(again) == 1 else ''} "
                      f"{sum(c.baselines_regenerated for c in again)} baselines again for their prefix latents; run "
                      f"{'it' if len(again) == 1 else 'them'} before the sweeps that share their baselines to avoid that")
    for where in sorted({c.where for c in costs}):
        part = [c for c in costs if c.where == where]
        without, with_ = sum(c.seconds_without for c in part), sum(c.seconds_with for c in part)

        def total(field: str) -> int:
            return sum(getattr(c, field) for c in part)

        console.print(
            f"total on {where}: {total('units')} images in {total('groups')} groups; {total('baselines_reused')} of "
            f"{total('baseline_units')} baselines reused ({total('baselines_regenerated')} generated again for latents), "
            f"{total('units_reused')} of {total('intervened_units')} intervened units reused → {total('images_generated')} "
            f"generated, {total('prefix_steps_saved')} steps taken from baselines; [bold]≈{estimate.hours_or_minutes(without, where)} "
            f"without sharing, ≈{estimate.hours_or_minutes(with_, where)} with ({with_ / without:.0%})[/bold]"
        )


@app.command()
def submit(
    sweeps: Optional[list[Path]] = typer.Argument(
        None, help="sweep files, one run each (default: the embedded demo sweep on toy-sd3)"
    ),
    executor: Optional[str] = typer.Option(None, "--executor", "-e", help="override executor.kind: local, slurm or ray"),
    executor_opt: list[str] = typer.Option(
        [], "--executor-opt", "-o", help="override one executor field, KEY=VALUE (dotted for sbatch_extra.NAME; repeatable)"
    ),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    output_root: Optional[Path] = typer.Option(None, help="override output_root"),
    smoke: bool = typer.Option(False, "--smoke", help="run a shrunken copy here first: tiny random model, 2 prompts, 2 steps"),
    dry_run: bool = typer.Option(False, "--dry-run", help="create (or re-open) the run directory and print what would run; run nothing"),
) -> None:
    """Create (or re-open) the run directory of each sweep and run its unfinished shards.

    Every sweep file, --set and executor option is validated before any run directory is created; one
    invalid file stops them all (exit 2). The local executor runs the shards here and returns when they are
    done; slurm and ray return at once. The exit code is the worst over the runs: 1 if any shard failed.
    With --smoke, a shrunken copy of each sweep runs locally instead (same arms, tiny random model), to
    check it end to end in a minute before spending GPU hours.
    """
    paths = list(sweeps or [default_sweep()])
    overrides = list(set_)
    if smoke:
        executor, executor_opt = "local", []
    planned = []
    invalid = 0
    for path in paths:  # everything is checked before anything is written
        try:
            manifest = _planned_manifest(path, overrides, output_root, model=not smoke)  # smoke: a tiny model instead
            config = executor_config(manifest.sweep, executor, executor_opt)
            _check_run_path(manifest, config, output_root)
        except (SweepError, ValueError) as e:
            _print_error(str(e) if isinstance(e, SweepError) else f"{path}: {e}")
            invalid += 1
            continue
        planned.append((path, config))
    if invalid:
        if len(paths) > 1:
            _print_error(f"{invalid} of {len(paths)} sweep files are invalid; nothing was submitted")
        raise typer.Exit(2)
    codes = [_submit_one(path, config, overrides, output_root, smoke, dry_run) for path, config in planned]
    if len(codes) > 1:
        console.print(f"{len(codes)} runs: {sum(c == 0 for c in codes)} submitted cleanly, {sum(c != 0 for c in codes)} with errors")
    if max(codes):
        raise typer.Exit(max(codes))


def _check_run_path(manifest, config, output_root: Optional[Path]) -> None:
    """Slurm writes the run path into job scripts and expands `%` in it: refuse an unsafe one before creating it."""
    if config.kind != "slurm":
        return
    from jobs.rundir import run_dir_for
    from orchestrate.executors.slurm import SAFE_PATH

    root = run_dir_for(manifest) if output_root is None else Path(output_root) / run_dir_for(manifest).name
    if not SAFE_PATH.match(str(root)):
        key = "--output-root" if output_root is not None else "output_root"
        raise ValueError(
            f"{key}: run directory {str(root)!r} has characters Slurm or a shell would interpret "
            f"(allowed: letters, digits and _./+=,@:-). Choose an output_root without spaces, quotes, % or $."
        )


def _submit_one(path: Path, config, overrides: list[str], output_root: Optional[Path], smoke: bool, dry_run: bool) -> int:
    """Create or re-open one run and dispatch it; returns its exit code (0, 1: shards failed, 2: refused)."""
    try:
        if smoke:
            path = _write_smoke_copy(path, output_root, overrides)
            overrides = []
        run, manifest, created = create_run(path, None if output_root is None else str(output_root), overrides=overrides)
        console.print(f"{'created' if created else 're-opened'} run [bold]{run.root}[/bold]")
        if not created:
            try:
                load_resolved_sweep(run)
            except SweepDriftError as error:
                _fail(f"{error}\n(re-opened run; use `orchestrate resume {run.root} --accept-sweep-drift` to continue it)")
        ex = make_executor(config if not smoke else manifest.sweep.executor)
        unfinished = _dispatch(run, ex, dry_run=dry_run)
        if dry_run:
            return 0
        _print_summary(run)
        _exit_if_unfinished(run, unfinished)
    except SweepError as e:
        _print_error(str(e))
        return 2
    except typer.Exit as e:
        return int(e.exit_code)
    return 0


def _write_smoke_copy(sweep_path: Path, output_root: Optional[Path], overrides: list[str] = ()) -> Path:
    from manifests import read_sweep_file
    from manifests.compose import materialise_arm_grids
    from manifests.shrink import shrink

    try:
        sweep, raw = read_sweep_file(sweep_path, overrides)
    except SweepError as e:
        _fail(str(e))
    geometry = sweep.model.geometry()
    if geometry is None:
        _fail(f"{sweep_path}: model {sweep.model.label!r} is not in the geometry table; --smoke cannot map its layers")
    try:
        small = shrink(materialise_arm_grids(raw), geometry.family, geometry.num_layers)
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
    executor: Optional[str] = typer.Option(
        None, "--executor", "-e", help="executor kind (default: the one recorded at submission, with its options)"
    ),
    executor_opt: list[str] = typer.Option(
        [], "--executor-opt", "-o", help="override one field of the recorded executor, KEY=VALUE (repeatable)"
    ),
    verify: bool = typer.Option(False, "--verify", help="hash every done shard's files (and compacted tables) against their "
                                "checksums first and rerun the corrupt ones"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print what would be rerun; run nothing"),
    accept_sweep_drift: bool = typer.Option(False, "--accept-sweep-drift", help=ACCEPT_DRIFT_HELP),
) -> None:
    """Rerun only the shards that are neither done nor running or queued (failed, interrupted, corrupt, ...).

    They go back to the executor the run was last submitted to (kind and options from state/submissions.jsonl),
    unless --executor / --executor-opt say otherwise. The run's resolved sweep is re-validated first: a hash
    mismatch stops here unless --accept-sweep-drift.
    """
    run, sweep = _load_run(run_dir, accept_sweep_drift, "resume")
    recorded = recorded_executor(run)
    ex = _executor_for(run, sweep, executor, executor_opt, recorded)
    source = "from --executor" if executor and (recorded is None or executor != recorded["kind"]) else (
        "recorded at submission" if recorded else "from the sweep")
    console.print(f"resuming on {ex.kind} (executor {source})")
    unfinished = _dispatch(run, ex, verify=verify, dry_run=dry_run)
    if dry_run:
        return
    _print_summary(run)
    _exit_if_unfinished(run, unfinished)


@app.command()
def status(
    run_dirs: list[Path] = typer.Argument(..., help="run directories (one or more)"),
    verify: bool = typer.Option(False, help="hash every done shard's files (and compacted tables) against their checksums"),
    all_shards: bool = typer.Option(False, "--all", help="also print the per-shard table (reads every done marker)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object per run (the summary; per shard with --all) for scripts"),
    watch: Optional[float] = typer.Option(None, "--watch", min=0.1, help="redraw the summary every SECONDS until nothing "
                                          "runs or is queued (Ctrl-C stops)"),
) -> None:
    """Summary of a run: shards per state, failures by error, oldest running, ETA; metric jobs too.

    Lists each marker folder once and reads only running/failed markers and a sample of done ones, so it
    stays fast at 10,000 shards. --all adds the per-shard table (reads every done marker). With several run
    directories, each is shown in turn; exits 2 if any of them is not a run directory."""
    runs = []
    missing = 0
    for run_dir in run_dirs:
        try:
            runs.append(_open_run(run_dir))
        except typer.Exit:
            missing += 1
    while runs:
        if watch:
            console.clear()
        active = [_print_summary(run, verify=verify, list_all=all_shards, as_json=as_json) for run in runs]
        if not watch or not any(active):
            break
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            break
    if missing:
        raise typer.Exit(2)


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
def report(
    run_dir: Path = typer.Argument(..., help="run directory"),
    statistics: Optional[str] = typer.Option(
        None, "--statistics", help="statistics preset: project (default) or paper (docs/analysis.md §6)"
    ),
) -> None:
    """Assemble tables and figures of an analysed run into report/report.md and report/report.html."""
    import analysis
    from analysis.stats import PRESETS

    if statistics is not None and statistics not in PRESETS:
        _fail(f"--statistics: unknown preset {statistics!r}; expected one of {', '.join(PRESETS)}")
    run, _ = _load_run(run_dir)
    path = analysis.build_report(run.root, statistics=statistics)
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
    """The whole pipeline on the embedded default (toy-sd3: toy model trained on synthetic shapes, local executor):
    submit, analyze (LPIPS, toy-GenEval), report."""
    from manifests.models import MODEL_NOTES
    from manifests.preflight import check_output_root

    problems = check_output_root(output_root, "--output-root")
    if problems:
        _fail("; ".join(problems))
    run, manifest, _ = create_run(default_sweep(), str(output_root))
    model = manifest.sweep.model
    note = MODEL_NOTES.get(model.label) or ("random weights, numbers mean nothing" if model.geometry().random_weights else "")
    console.print(f"run [bold]{run.root}[/bold] ({model.label}{': ' + note if note else ''})")
    _dispatch(run, make_executor(manifest.sweep.executor))
    statuses = shard_statuses(run)
    if any(s.state != "done" for s in statuses):
        _print_summary(run, list_all=True)
        _fail("some shards did not finish; see `orchestrate status` and `orchestrate logs`", code=1)
    analyze(run.root, metric=[], executor=None, executor_opt=[], accept_sweep_drift=False, compact_first=True)  # plain call: every option
    report(run.root, statistics=None)
    console.print(f"images:      {run.images_dir}")
    console.print(f"tables:      {run.tables_dir}  (load with analysis.load_run('{run.root}'))")
    console.print(f"report:      {run.root / 'report'}")


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
