"""Read a run directory: the one entry point for notebooks, metrics and reports.

Small tables (units, metrics, set metrics) come back as pandas DataFrames; the sink steps, hundreds of millions
of rows at paper scale, as a lazy `SinkSteps` relation that is queried (DuckDB; pyarrow datasets when DuckDB is
not installed) without being loaded. The sweep is the run's resolved sweep (`jobs.frozen_sweep`), re-validated
and hash-checked; raw YAML is never parsed here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from jobs import runformat as rf
from jobs.compaction import DatasetFiles, dataset_files, dataset_folders, list_parts
from jobs.frozen_sweep import load_resolved_sweep, resolve, sweep_hash
from jobs.rundir import RunDir

from ._io import read_datasets, read_table


class RunDirError(ValueError):
    """The run directory lacks something the analysis needs."""


@dataclass
class RunData:
    """Everything the analysis needs from one run.

    ``units`` and ``metrics`` hold only shards that have a done marker: a shard without its marker is
    unfinished whatever files exist. ``sweep`` is the resolved sweep as plain data (every preset expanded,
    every default filled); ``sink_steps`` is lazy (see :class:`SinkSteps`).
    """

    run_dir: Path
    sweep: dict[str, Any]
    sweep_hash: str
    manifest: pd.DataFrame | None
    units: pd.DataFrame
    sink_steps: "SinkSteps"
    metrics: pd.DataFrame
    set_metrics: pd.DataFrame
    done_shards: list[int] | None = None
    unfinished_shards: list[int] = field(default_factory=list)

    @property
    def baseline(self) -> str:
        """Name of the reference arm (see :func:`baseline_arm`)."""
        return baseline_arm(self.sweep)

    @property
    def arms(self) -> list[str]:
        """Arms in sweep order."""
        return [a["name"] for a in self.sweep["arms"]]

    @property
    def random_weights(self) -> bool:
        """True if any image or score of this run came from random weights."""
        flags = [self.units["random_weights"], self.metrics["random_weights"], self.set_metrics["random_weights"]]
        return any(bool(f.fillna(False).astype(bool).any()) for f in flags)

    def image_path(self, unit_id: str) -> Path:
        """Absolute path of a unit's PNG."""
        rows = self.units.loc[self.units["unit_id"] == unit_id, "image_path"]
        if rows.empty:
            raise KeyError(f"unit {unit_id!r} is not in {self.run_dir}/tables/units")
        return self.run_dir / rows.iloc[0]

    def image(self, unit_id: str):
        """A unit's image as an RGB PIL image (a video unit: its scored frame, `jobs.runformat.scored_frame`)."""
        from PIL import Image

        with Image.open(self.image_path(unit_id)) as im:
            return rf.scored_frame(im).convert("RGB")

    def paired(self, metric: str, arm: str, baseline: str | None = None) -> pd.DataFrame:
        """Per (prompt_id, seed_index) values of ``arm`` and the baseline and their difference.

        For distance-to-baseline metrics (LPIPS) the baseline value is 0 by definition.
        """
        from .stats import paired_frame

        return paired_frame(self, metric, arm, baseline or self.baseline)


def baseline_arm(sweep: dict[str, Any]) -> str:
    """The reference arm: ``analysis.baseline`` if the sweep names one, else the single arm without an
    intervention. Every paired statistic is taken against it."""
    names = [a["name"] for a in sweep["arms"]]
    named = sweep["analysis"]["baseline"]
    if named is not None:
        return named  # validated against the arm names by the sweep schema
    nulls = [a["name"] for a in sweep["arms"] if a["intervention"] is None]
    if len(nulls) == 1:
        return nulls[0]
    if not nulls:
        raise RunDirError(
            f"no baseline arm: no arm has 'intervention: null' (arms: {names}); "
            "add one, or name the reference arm in 'analysis: {baseline: <arm>}'"
        )
    raise RunDirError(f"several arms have 'intervention: null' ({nulls}); name the reference one in 'analysis: {{baseline: <arm>}}'")


class SinkSteps:
    """The run's sink-step rows (tables/sink_steps, schema `jobs.runformat.SINK_STEPS_SCHEMA`), never loaded whole.

    ``relation`` is a lazy DuckDB relation (``sql`` runs a query on the view ``sink_steps``); ``arrow`` / ``df``
    read selected columns and rows; ``mean_max_mass`` and ``top1_counts`` answer the common questions with a
    grouped query. Only rows of done shards are visible. ``engine="pyarrow"`` (the fallback when DuckDB is not
    installed) answers the same methods with pyarrow datasets, except ``sql`` and ``relation``.
    """

    def __init__(self, datasets: list[DatasetFiles], engine: str | None = None):
        self.datasets = datasets
        self.engine = engine or _default_engine()
        if self.engine not in ("duckdb", "pyarrow"):
            raise ValueError(f"engine: expected 'duckdb' or 'pyarrow', got {self.engine!r}")
        self._connection = None

    # ---- DuckDB --------------------------------------------------------------------------------
    @property
    def connection(self):
        """A DuckDB connection with the view ``sink_steps`` (created on first use)."""
        if self.engine != "duckdb":
            raise RuntimeError("SQL needs DuckDB (pip install duckdb); this SinkSteps uses the pyarrow engine")
        if self._connection is None:
            import duckdb

            con = duckdb.connect()
            try:  # notebooks and logs get results, not progress bars
                con.execute("SET enable_progress_bar = false")
            except duckdb.InvalidInputException:
                pass  # inside Jupyter without ipywidgets DuckDB refuses to touch the setting (and draws no bar either)
            selects = []
            for d in self.datasets:
                if d.parts:
                    selects.append(f"SELECT * FROM read_parquet({_sql_list(d.parts)}, hive_partitioning=false)")
                if d.compacted:
                    where = f" WHERE shard_id NOT IN ({', '.join(map(str, sorted(d.exclude)))})" if d.exclude else ""
                    selects.append(f"SELECT * FROM read_parquet({_sql_list(d.compacted)}, hive_partitioning=false){where}")
            if not selects:
                con.register("_empty_sink_steps", rf.SINK_STEPS_SCHEMA.empty_table())
                selects = ["SELECT * FROM _empty_sink_steps"]
            con.execute("CREATE VIEW sink_steps AS " + " UNION ALL ".join(selects))
            self._connection = con
        return self._connection

    @property
    def relation(self):
        """The lazy DuckDB relation of every visible row."""
        return self.connection.table("sink_steps")

    def sql(self, query: str) -> pd.DataFrame:
        """Run SQL over the view ``sink_steps``; returns a DataFrame (make it small with GROUP BY / LIMIT)."""
        return self.connection.sql(query).df()

    # ---- reading selected rows -----------------------------------------------------------------------
    def arrow(self, columns: list[str] | None = None, *, arm: str | None = None) -> pa.Table:
        """Selected columns (all by default) of every row, or of one arm's rows."""
        columns = columns or rf.SINK_STEPS_SCHEMA.names
        if self.engine == "duckdb":
            where = "" if arm is None else " WHERE arm = $arm"
            query = f"SELECT {', '.join(_quote(c) for c in columns)} FROM sink_steps{where}"
            table = self.connection.sql(query, params=None if arm is None else {"arm": arm}).to_arrow_table()
            return table.cast(pa.schema([rf.SINK_STEPS_SCHEMA.field(c) for c in columns]))
        return read_datasets(self.datasets, rf.SINK_STEPS_SCHEMA, columns) if arm is None else self._filtered(columns, arm)

    def _filtered(self, columns: list[str], arm: str) -> pa.Table:
        table = read_datasets(self.datasets, rf.SINK_STEPS_SCHEMA, sorted(set(columns) | {"arm"}))
        return table.filter(pc.equal(table["arm"], arm)).select(columns)

    def df(self, columns: list[str] | None = None, *, arm: str | None = None) -> pd.DataFrame:
        return self.arrow(columns, arm=arm).to_pandas()

    def __len__(self) -> int:
        if self.engine == "duckdb":
            return int(self.connection.sql("SELECT count(*) FROM sink_steps").fetchall()[0][0])
        return sum(_count(d) for d in self.datasets)

    # ---- the common questions -----------------------------------------------------------------------
    def mean_max_mass(self, by: tuple[str, ...] = ("arm", "step", "layer")) -> pd.DataFrame:
        """Mean of ``max_mass`` (and the row count) per group, sorted by the group columns."""
        by = list(by)
        if self.engine == "duckdb":
            cols = ", ".join(_quote(c) for c in by)
            return self.sql(f"SELECT {cols}, avg(max_mass) AS mean_max_mass, count(*) AS n FROM sink_steps "
                            f"GROUP BY {cols} ORDER BY {cols}")
        table = self.arrow(by + ["max_mass"])
        out = table.group_by(by).aggregate([("max_mass", "mean"), ([], "count_all")]).to_pandas()
        out = out.rename(columns={"max_mass_mean": "mean_max_mass", "count_all": "n"})
        return out[by + ["mean_max_mass", "n"]].sort_values(by).reset_index(drop=True)

    def top1_counts(self, by: tuple[str, ...] = ("layer", "step")) -> pd.DataFrame:
        """How often each key is the top-1 sink (``top1_idx``, with its modality) per group."""
        by = list(by)
        if self.engine == "duckdb":
            cols = ", ".join(_quote(c) for c in by)
            return self.sql(f"SELECT {cols}, topk_idx[1] AS top1_idx, topk_modality[1] AS top1_modality, count(*) AS n "
                            f"FROM sink_steps WHERE len(topk_idx) > 0 GROUP BY ALL ORDER BY {cols}, n DESC, top1_idx")
        table = self.arrow(by + ["topk_idx", "topk_modality"])
        table = table.filter(pc.greater(pc.list_value_length(table["topk_idx"]), 0))
        flat = pa.table({**{c: table[c] for c in by}, "top1_idx": pc.list_element(table["topk_idx"], 0),
                         "top1_modality": pc.list_element(table["topk_modality"], 0)})
        out = flat.group_by(by + ["top1_idx", "top1_modality"]).aggregate([("top1_idx", "count")]).to_pandas()
        out = out.rename(columns={"top1_idx_count": "n"})
        return out.sort_values(by + ["n", "top1_idx"], ascending=[True] * len(by) + [False, True]).reset_index(drop=True)


def _default_engine() -> str:
    try:
        import duckdb  # noqa: F401
    except ImportError:
        return "pyarrow"
    return "duckdb"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def _count(d: DatasetFiles) -> int:
    n = ds.dataset([str(p) for p in d.parts], format="parquet").count_rows() if d.parts else 0
    if d.compacted:
        keep = None if not d.exclude else ~ds.field("shard_id").isin(sorted(d.exclude))
        n += ds.dataset([str(p) for p in d.compacted], format="parquet").count_rows(filter=keep)
    return n


def load_run(run_dir: str | Path, *, only_done: bool = True, engine: str | None = None) -> RunData:
    """Load a run directory: small tables as pandas, the sink steps as a lazy relation.

    ``only_done`` (default) leaves out part files of shards without a done marker. ``engine`` picks the
    sink-step engine: "duckdb" (default when installed) or "pyarrow". Raises ``SweepDriftError`` when the run's
    resolved sweep does not match its recorded hash (see `orchestrate analyze --accept-sweep-drift`).
    """
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise RunDirError(f"run directory {run.root} does not exist")
    sweep_model = load_resolved_sweep(run)
    sweep = resolve(sweep_model)
    manifest = pd.read_parquet(run.manifest_path) if run.manifest_path.is_file() else None
    done = run.done_shards() if only_done else None
    units_dir = run.table_dir("units")
    unfinished = sorted(set(list_parts(units_dir)) - done) if done is not None else []
    units = read_datasets([dataset_files(units_dir, "units", done)], rf.UNITS_SCHEMA).to_pandas()
    dup = units["unit_id"].duplicated()
    if dup.any():
        raise RunDirError(f"{units_dir}: unit {units.loc[dup, 'unit_id'].iloc[0]!r} appears in more than one row; "
                          "a part file was duplicated (only one part per shard may exist)")
    metrics = read_datasets([dataset_files(f, "metrics", done) for f in dataset_folders(run.root, "metrics")],
                            rf.METRICS_SCHEMA).to_pandas()
    if not units.empty:
        metrics = metrics[metrics["unit_id"].isin(units["unit_id"])].reset_index(drop=True)
    dup = metrics.duplicated(["unit_id", "metric"])
    if dup.any():
        first = metrics.loc[dup].iloc[0]
        raise RunDirError(f"{run.table_dir('metrics')}: metric {first['metric']!r} has more than one value for unit "
                          f"{first['unit_id']!r}; remove the stale file under metric={first['metric']}/")
    set_metrics = read_table(run.table_dir("set_metrics"), rf.SET_METRICS_SCHEMA).to_pandas()
    if unfinished:
        warnings.warn(f"{run.root}: shards {unfinished} have part files but no done marker; they are left out", stacklevel=2)
    return RunData(
        run_dir=run.root,
        sweep=sweep,
        sweep_hash=sweep_hash(sweep),
        manifest=manifest,
        units=units,
        sink_steps=SinkSteps([dataset_files(run.table_dir("sink_steps"), "sink_steps", done)], engine),
        metrics=metrics,
        set_metrics=set_metrics,
        done_shards=None if done is None else sorted(done),
        unfinished_shards=unfinished,
    )
