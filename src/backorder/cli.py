"""The ``backorder`` command line. Each command is one step of the model's life."""

from __future__ import annotations

# Start-up stays fast (`backorder --help`, a mistyped option): modules that pull in MLflow,
# LightGBM, pandas or pandera, Dask or uvicorn are imported inside the commands that use them.
import json
import logging
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from backorder.config import ROLES, Role, Settings, load_settings
from backorder.errors import BackorderError, ConfigError
from backorder.logs import RedactSecrets, bind, configure_json
from backorder.uris import is_database, redact, redact_text, remember_secrets, with_table

if TYPE_CHECKING:
    from backorder.data import ChunkProgress
    from backorder.io import Source


class _Typer(typer.Typer):
    """An exception no command expected (a bug, a library's own error) still prints its
    traceback and exits 1, with the passwords of URIs in it masked. (Not sys.excepthook: Typer
    installs its own on every call.)"""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            sys.stderr.write(redact_text("".join(traceback.format_exception(exc))))
            raise SystemExit(1) from None


app = _Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Which SKUs are about to go on backorder, how likely that is, and why.",
)
models_app = typer.Typer(no_args_is_help=True, help="List, promote and roll back model versions.")
app.add_typer(models_app, name="models")
keys_app = typer.Typer(
    no_args_is_help=True, help="Create, list and revoke the API keys the server accepts."
)
app.add_typer(keys_app, name="keys")

# soft_wrap: long paths and summaries stay on one line, so logs can be grepped. Results are
# plain text: a path or a message with [brackets] is printed as it is, not read as markup.
err = Console(stderr=True, soft_wrap=True, highlight=False)
out = Console(soft_wrap=True, highlight=False, markup=False)
Result = TypeVar("Result")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="YAML settings file (else BACKORDER_CONFIG, else defaults)."),
]
ModelOption = Annotated[
    str, typer.Option("--model", help="Model alias (champion, challenger) or version number.")
]
SchedulerOption = Annotated[
    str | None,
    typer.Option(
        "--scheduler", help="Dask scheduler address (default: a LocalCluster on 127.0.0.1)."
    ),
]
WorkersOption = Annotated[
    int, typer.Option("--workers", help="LocalCluster worker processes (--engine dask).")
]
# An option checked by hand, not a Typer choice: a wrong value is a one-line error like the rest.
ENGINES = ("local", "dask")
BaseRateOption = Annotated[
    float | None,
    typer.Option(
        "--base-rate",
        help="Known backorder rate of this data (e.g. 0.011); re-calibrates the probabilities.",
    ),
]


# Progress, warnings and errors are log records of the ``backorder`` loggers, whichever module
# writes them; the handler installed here puts them on stderr as timestamped text for people, or
# as JSON lines (BACKORDER_LOG_FORMAT=json) for a log shipper. Results stay on stdout either way.
log = logging.getLogger("backorder.cli")  # not __name__: "__main__" under python -m


class LogFormat(StrEnum):
    text = "text"
    json = "json"


@app.callback()
def _main(
    log_format: Annotated[
        LogFormat,
        typer.Option(
            "--log-format",
            envvar="BACKORDER_LOG_FORMAT",
            help="stderr as timestamped text, or JSON lines carrying batch id and model version.",
        ),
    ] = LogFormat.text,
) -> None:
    # Every URI given on the command line: its password is masked in whatever is printed.
    remember_secrets(*sys.argv[1:])
    if log_format is LogFormat.json:
        configure_json()
    else:
        _configure_text()


class _TextHandler(logging.Handler):
    """Progress (INFO) as a dim UTC time and the message; warnings as ``warning: ...`` and
    errors as ``error: ...``, one line each."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = escape(record.getMessage())
            if record.levelno >= logging.ERROR:
                err.print(f"[bold red]error:[/] {message}")
            elif record.levelno >= logging.WARNING:
                err.print(f"warning: {message}")
            else:
                when = datetime.fromtimestamp(record.created, UTC)
                err.print(f"[dim]{when:%H:%M:%S}[/] {message}")
        except Exception:
            self.handleError(record)


def _configure_text() -> None:
    """Records of the ``backorder`` loggers, INFO and up, on stderr as text lines."""
    logger = logging.getLogger("backorder")
    for stale in [handler for handler in logger.handlers if isinstance(handler, _TextHandler)]:
        logger.removeHandler(stale)  # one handler, however many commands run in a process
    handler = _TextHandler(logging.INFO)
    handler.addFilter(RedactSecrets())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _one_line_warning(message: Any, *_args: Any, **_kwargs: Any) -> None:
    """Warnings (compiled trees unavailable, for one) as one log line, not Python's two."""
    log.warning(str(message))


warnings.showwarning = _one_line_warning


def _fail(message: str, code: int) -> NoReturn:
    log.error(message, extra={"exit_code": code})
    raise typer.Exit(code)


def _guard(action: Callable[[], Result]) -> Result:
    """Run a command; user-facing errors become one line on stderr and a non-zero exit."""
    try:
        return action()
    except BackorderError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; no partial output was kept", 130)
    except OSError as exc:  # e.g. an output folder that is not writable
        where = exc.filename or "file system"
        _fail(f"{where}: {exc.strerror or exc}", 1)


def _settings(config: Path | None, **overrides: Any) -> Settings:
    given = {name: value for name, value in overrides.items() if value is not None}
    settings = _guard(lambda: load_settings(config, **given))
    remember_secrets(
        settings.resolved_tracking_uri,
        settings.artifact_location,
        settings.resolved_state_url,
        settings.resolved_landing_root,
        settings.pushgateway_url,
    )
    return settings


@contextmanager
def _reading_progress() -> Iterator[ChunkProgress]:
    """A progress bar over bytes of input read; silent when stderr is not a terminal."""
    progress = Progress(
        TextColumn("reading"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    tasks: dict[str, Any] = {}

    def on_chunk(table: Source) -> None:
        if table.uri not in tasks:
            tasks[table.uri] = progress.add_task(redact(table.uri), total=table.size_bytes)
        progress.update(tasks[table.uri], completed=table.position())

    with progress:
        yield on_chunk


def _with_tables(uris: list[str], tables: list[str]) -> list[str]:
    """Pair each database URI that names no table (``URI#TABLE``) with the next --data-table."""
    remaining = list(tables)
    paired = []
    for uri in uris:
        if is_database(uri) and "#" not in uri:
            if not remaining:
                raise ConfigError(f"{redact(uri)}: a database input needs --data-table NAME")
            paired.append(f"{uri}#{remaining.pop(0)}")
        else:
            paired.append(uri)
    if remaining:
        raise ConfigError(f"--data-table {remaining[0]}: no database --data left to pair it with")
    return paired


# A Typer command's parameters are its options, so those with many carry `noqa: PLR0913,
# PLR0917` (RUF100 too, while pyproject.toml does not select the size rules yet).
@app.command()
def train(  # noqa: PLR0913, PLR0917
    data: Annotated[
        list[str],
        typer.Option(
            "--data",
            help="Labelled CSV/Parquet path or URL, or database URI (then --data-table); "
            "repeatable.",
        ),
    ],
    data_table: Annotated[
        list[str] | None,
        typer.Option("--data-table", help="Table for each database --data, in order."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="Folder for report, metrics and rejects.")
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="'local' (one process) or 'dask': --data is then one folder or prefix of "
            "Parquet/CSV partitions, trained on with lightgbm.dask across the cluster.",
        ),
    ] = "local",
    scheduler: SchedulerOption = None,
    workers: WorkersOption = 2,
    config: ConfigOption = None,
) -> None:
    """Train on labelled history, register the model, and promote it if it beats the champion."""
    from backorder.train import run_training

    settings = _settings(config)
    if engine not in ENGINES:
        _fail(f"--engine {engine}: expected local or dask", 2)
    if engine == "dask":
        from backorder.dask_engine import train_partitioned

        if len(data) != 1 or data_table:
            _fail("--engine dask: give one --data folder or prefix of partitions", 2)
        outcome = _guard(
            lambda: train_partitioned(
                data[0], settings, output_dir=output, scheduler=scheduler, workers=workers
            )
        )
    else:
        sources = _guard(lambda: _with_tables(data, data_table or []))
        with _reading_progress() as on_chunk:
            outcome = _guard(lambda: run_training(sources, settings, output, on_chunk=on_chunk))
    validation = outcome.validation
    out.print(
        f"model v{outcome.version} ({'champion' if outcome.promoted else 'challenger'}): "
        f"validation ROC AUC {validation['roc_auc']:.4f}, "
        f"average precision {validation['average_precision']:.4f}, "
        f"threshold {validation['threshold']:.4f}"
    )
    out.print(f"promotion: {outcome.decision.reason}")
    out.print(f"report:  {outcome.report}")
    out.print(f"metrics: {outcome.metrics_file}")
    out.print(f"rejects: {outcome.rejects_file}")


@app.command()
def evaluate(
    data: Annotated[list[str], typer.Option("--data", help="Labelled CSV/Parquet; repeatable.")],
    output: Annotated[Path, typer.Option("--output", help="Folder for metrics.json, report.html.")],
    model: ModelOption = "champion",
    base_rate: BaseRateOption = None,
    config: ConfigOption = None,
) -> None:
    """Score labelled data with a model; write metrics.json and report.html."""
    from backorder.evaluate import run_evaluation

    settings = _settings(config, scoring_base_rate=base_rate)
    with _reading_progress() as on_chunk:
        outcome = _guard(lambda: run_evaluation(data, output, settings, model, on_chunk=on_chunk))
    metrics = outcome.metrics
    out.print(
        f"read {metrics['n_read']:,} rows: evaluated {metrics['n_rows']:,} "
        f"({metrics['n_positive']:,} backorders), rejected {metrics['n_rejected']:,}; "
        f"model v{metrics['model_version']}: ROC AUC {_four_places(metrics['roc_auc'], 'n/a')}, "
        f"average precision {_four_places(metrics['average_precision'], 'n/a')}"
    )
    out.print(f"report:  {outcome.report}")
    out.print(f"metrics: {outcome.metrics_file}")
    out.print(f"rejects: {outcome.rejects_file}")


def _four_places(figure: float | None, missing: str = "–") -> str:
    return missing if figure is None else f"{figure:.4f}"


@app.command()
def predict(  # noqa: PLR0913, PLR0917
    input: Annotated[
        str,
        typer.Option(
            "--input",
            help="Batch to score: CSV/Parquet path or URL (s3://...), or a database URI "
            "(postgresql://..., mongodb://...) with --input-table.",
        ),
    ],
    output: Annotated[
        str,
        typer.Option(
            "--output",
            help="Predictions: .parquet, .csv or .csv.gz path or URL, or a database URI with "
            "--output-table.",
        ),
    ],
    input_table: Annotated[
        str | None, typer.Option("--input-table", help="Table or collection to read.")
    ] = None,
    output_table: Annotated[
        str | None, typer.Option("--output-table", help="Table or collection to write.")
    ] = None,
    rejects: Annotated[
        str | None,
        typer.Option("--rejects", help="Rejected rows (default: beside the output)."),
    ] = None,
    rejects_table: Annotated[
        str | None,
        typer.Option("--rejects-table", help="Table for rejects (default: OUTPUT_TABLE_rejects)."),
    ] = None,
    batch_id: Annotated[
        str | None,
        typer.Option(
            "--batch-id",
            help="Id of this batch; re-scoring the same id replaces its rows in tables "
            "(default: the time now, UTC, made unique: 20261128T172342Z_048213-9f3ac1).",
        ),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="'local' (one process) or 'dask': --input and --output are then a folder or "
            "prefix of Parquet/CSV partitions, scored in parallel.",
        ),
    ] = "local",
    scheduler: SchedulerOption = None,
    workers: WorkersOption = 2,
    model: ModelOption = "champion",
    base_rate: BaseRateOption = None,
    config: ConfigOption = None,
) -> None:
    """Score a batch: every row is scored or written to the rejects with its reason."""
    settings = _settings(config, scoring_base_rate=base_rate)
    bind(batch_id=batch_id)
    if engine not in ENGINES:
        _fail(f"--engine {engine}: expected local or dask", 2)
    if engine == "dask":
        from backorder.dask_engine import predict_partitioned

        totals = _guard(
            lambda: predict_partitioned(
                input,
                output,
                settings,
                model_ref=model,
                scheduler=scheduler,
                workers=workers,
                batch_id=batch_id,
            )
        )
        out.print(
            f"read {totals['read']:,} rows in {len(totals['partitions'])} partition(s): scored "
            f"{totals['scored']:,} ({totals['flagged']:,} flagged), rejected "
            f"{totals['rejected']:,}; model v{totals['model_version']}"
        )
        out.print(f"predictions: {redact(output)} (_SUCCESS.json lists every partition)")
        return
    from backorder.contract import required_columns
    from backorder.io import open_input
    from backorder.predict import predict_file
    from backorder.registry import Registry

    source = with_table(input, input_table)
    target = with_table(output, output_table)
    rejects_target = with_table(rejects or output, rejects_table) if rejects_table else rejects
    # Whole-input problems fail fast, before the slow model load; the input is opened once.
    table = _guard(lambda: open_input(source, block_bytes=settings.read_block_bytes))
    _guard(lambda: table.require(required_columns(False)))
    loaded = _guard(lambda: Registry(settings).load_for_scoring(model))
    bind(model_version=loaded.version)
    log.info(
        f"scoring {redact(source)} with model v{loaded.version} ({loaded.scoring_engine} trees)"
    )
    with _reading_progress() as on_chunk:
        summary = _guard(
            lambda: predict_file(
                table,
                target,
                loaded,
                settings,
                rejects=rejects_target,
                on_chunk=on_chunk,
                batch_id=batch_id,
            )
        )
    out.print(summary.line())
    for warning, count in sorted(summary.warnings.items()):
        log.warning(f"{count:,} row(s) with {warning}")
    out.print(f"batch:       {summary.batch_id}")
    out.print(f"predictions: {summary.output}")
    out.print(f"rejects:     {summary.rejects}")


@app.command()
def drift(
    reference: Annotated[str, typer.Option("--reference", help="Data the model learnt from.")],
    current: Annotated[str, typer.Option("--current", help="The batch to compare with it.")],
    output: Annotated[Path, typer.Option("--output", help="Folder for the report and figures.")],
    model: Annotated[
        str | None,
        typer.Option("--model", help="Also compare this model's predicted probabilities."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Compare a batch with reference data, feature by feature; write an HTML drift report."""
    from backorder.data import check_inputs, load_rows
    from backorder.drift import DriftFiles, check_and_report
    from backorder.registry import Registry

    settings = _settings(config)
    block = settings.read_block_bytes
    _guard(lambda: check_inputs([reference, current], require_label=False, block_bytes=block))
    ref_rows, ref_read, ref_rejected = _guard(lambda: load_rows(reference, block))
    cur_rows, cur_read, cur_rejected = _guard(lambda: load_rows(current, block))
    for name, rows in ((reference, ref_rows), (current, cur_rows)):
        if rows.empty:
            _fail(f"{redact(name)}: no valid rows to compare", 2)
    scorer = _guard(lambda: Registry(settings).load(model)) if model is not None else None
    # Named without their passwords: drift.json and the report keep these names.
    shown = redact(reference), redact(current)
    details = {
        "reference": shown[0],
        "current": shown[1],
        "rejected": {"reference": ref_rejected, "current": cur_rejected},
        "read": {"reference": ref_read, "current": cur_read},
    }
    checked = _guard(
        lambda: check_and_report(
            ref_rows,
            cur_rows,
            DriftFiles(output, Path(shown[1]).name, shown, details),
            settings.drift_psi_threshold,
            scorer,
        )
    )
    result = checked.result
    top = result.features.head(5)
    out.print(
        f"compared {result.current_rows:,} rows with {result.reference_rows:,}; drifted (PSI >= "
        f"{result.threshold:g}): {', '.join(result.drifted) or 'none'}"
    )
    for row in top.itertuples():
        out.print(f"  {row.feature}: PSI {row.psi:.3f}")
    out.print(f"report:  {output / 'drift_report.html'}")
    out.print(f"figures: {output / 'drift.json'}, {output / 'drift.prom'}")


RootOption = Annotated[
    str | None,
    typer.Option(
        "--root", help="Landing folder or URL (s3://bucket/prefix); default HOME/landing."
    ),
]


@app.command()
def land(
    input: Annotated[str, typer.Option("--input", help="CSV/Parquet file to land.")],
    kind: Annotated[
        str, typer.Option("--kind", help="'unscored' (to be scored) or 'labelled' (history).")
    ] = "unscored",
    batch_id: Annotated[
        str | None,
        typer.Option("--batch-id", help="Default: the time now, UTC, made unique."),
    ] = None,
    root: RootOption = None,
    config: ConfigOption = None,
) -> None:
    """Drop a file into the landing layout under a batch id, for the pipelines to pick up."""
    from backorder.catalog import LABELLED, UNSCORED, Landing

    if kind not in (LABELLED, UNSCORED):
        _fail(f"--kind {kind}: expected {UNSCORED} or {LABELLED}", 2)
    settings = _settings(config, landing_root=root)
    uri = _guard(lambda: Landing(settings.resolved_landing_root).land(input, kind, batch_id))
    out.print(f"landed: {redact(uri)}")


@app.command()
def batches(
    root: RootOption = None,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the manifest (what was scored or trained, when, by which model) and what waits."""
    from backorder.catalog import (
        LABELLED,
        UNSCORED,
        Landing,
        manifest_frame,
        pending_scoring,
        pending_training,
    )

    settings = _settings(config, landing_root=root)
    where = settings.resolved_landing_root
    frame = _guard(lambda: manifest_frame(where))
    waiting = {
        "unscored": _guard(lambda: pending_scoring(where)),
        "labelled": _guard(lambda: pending_training(where)),
    }
    landing = Landing(where)
    strays = {kind: landing.strays(kind) for kind in (UNSCORED, LABELLED)}
    if as_json:
        payload = {
            "root": redact(where),
            "manifest": json.loads(frame.to_json(orient="records")),
            "waiting": waiting,
            "ignored": strays,
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    out.print(f"landing root: {redact(where)}")
    if frame.empty:
        out.print("manifest: empty")
    else:
        # Plain text, not a rich table: it must not truncate ids when piped or logged.
        out.print(frame.to_string(index=False, na_rep="–"))
    for kind, ids in waiting.items():
        out.print(f"waiting ({kind}): {', '.join(ids) or 'none'}")
    for kind, names in strays.items():
        if names:
            log.warning(
                f"{kind}/ holds files whose names are not batch ids "
                f"(YYYYMMDDTHHMMSSZ[_label]): {', '.join(names)}"
            )


@app.command("score-pending")
def score_pending(root: RootOption = None, config: ConfigOption = None) -> None:
    """Score every landed batch not scored yet (what the daily DAG does), oldest first.

    Each batch is scored under its lease: a batch another runner has is skipped, and says so.
    The last line, `scored N batch(es)`, counts the batches this run scored.
    """
    from backorder.pipelines import score_pending as run

    settings = _settings(config, landing_root=root)
    done = _guard(lambda: run(settings.resolved_landing_root, settings))
    out.print(f"scored {len(done)} batch(es)")


@app.command("train-pending")
def train_pending(root: RootOption = None, config: ConfigOption = None) -> None:
    """Retrain on all labelled batches if new ones landed (what the weekly DAG does)."""
    from backorder.pipelines import train_if_new

    settings = _settings(config, landing_root=root)
    decided = _guard(lambda: train_if_new(settings.resolved_landing_root, settings))
    if decided is None:
        out.print("no new labelled batches; nothing trained")
        return
    out.print(
        f"model v{decided['version']} "
        f"({'promoted to champion' if decided['promoted'] else 'kept as challenger'}): "
        f"{decided['reason']}"
    )
    out.print(f"report: {decided['report']}")


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    model: ModelOption = "champion",
    config: ConfigOption = None,
) -> None:
    """Serve the web page and the HTTP API (JSON logs on stderr; Ctrl-C stops)."""
    from backorder.web import serve as run_server

    settings = _settings(config)
    _guard(lambda: run_server(settings, host, port, model))


@app.command()
def contract() -> None:
    """Print the data contract (columns, types, allowed values) as Markdown."""
    from backorder.contract import contract_markdown

    sys.stdout.write(contract_markdown())


@models_app.command("list")
def models_list(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List registered versions with their aliases and holdout metrics."""
    from backorder.registry import Registry

    settings = _settings(config)
    rows = _guard(lambda: Registry(settings).versions())
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    if not rows:
        out.print("no model versions yet: run `backorder train --data FILE`")
        return
    grid = Table(
        "version",
        "aliases",
        "created (UTC)",
        "holdout AP",
        "holdout AUC",
        "validation AP",
        "threshold",
    )
    for row in rows:
        created = datetime.fromtimestamp(row["created"] / 1000, UTC).strftime("%Y-%m-%d %H:%M")
        grid.add_row(
            row["version"],
            ", ".join(row["aliases"]),
            created,
            _four_places(row["holdout_average_precision"]),
            _four_places(row["holdout_roc_auc"]),
            _four_places(row["validation_average_precision"]),
            _four_places(row["threshold"]),
        )
    out.print(grid)


@models_app.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="Version number to make champion.")],
    config: ConfigOption = None,
) -> None:
    """Make VERSION the champion (a manual override of the automatic promotion rule)."""
    from backorder.registry import Registry

    settings = _settings(config)
    done = _guard(lambda: Registry(settings).promote(version))
    if done.promoted:
        out.print(f"champion is now v{done.champion}")
    else:
        out.print(f"{done.reason}; nothing changed")


@models_app.command("rollback")
def models_rollback(config: ConfigOption = None) -> None:
    """Restore the previous champion."""
    from backorder.registry import Registry

    settings = _settings(config)
    current, previous = _guard(lambda: Registry(settings).rollback())
    out.print(f"champion rolled back from v{current} to v{previous}")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="Who or what the key is for, e.g. planning-team.")],
    role: Annotated[
        str, typer.Option("--role", help="viewer, planner, admin, or metrics (/metrics only).")
    ],
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            help="Register the token in this file (a secret) instead of making one; "
            "nothing is printed, and running it again changes nothing.",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Make an API key and print its token once, as the last line (only its hash is kept)."""
    from backorder.state import StateStore

    settings = _settings(config)
    if role not in ROLES:
        _fail(f"--role {role}: expected one of {', '.join(ROLES)}", 2)
    checked = cast(Role, role)
    given = _guard(lambda: _read_token(token_file)) if token_file is not None else None
    with _guard(lambda: StateStore.open(settings)) as store:
        if given is None:
            token = _guard(lambda: store.create_key(name, checked))
            out.print(f"key {name} ({role}) created; its token, shown only this once:")
            out.print(token)
            return
        had_it = any(key.name == name for key in _guard(store.keys))
        _guard(lambda: store.create_key(name, checked, given))
    what = "already held" if had_it else "registered with"
    out.print(f"key {name} ({role}) {what} the token in {token_file}")


def _read_token(path: Path) -> str:
    from backorder.errors import ApiKeyError, InputFileError
    from backorder.state import check_token

    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise InputFileError(f"{path}: cannot read the token ({reason})") from None
    try:
        check_token(token)
    except ApiKeyError as exc:
        raise InputFileError(f"{path}: {exc}") from None
    return token


@keys_app.command("list")
def keys_list(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the active API keys: name, role, when made and last used (never a token)."""
    from backorder.state import StateStore

    settings = _settings(config)
    with _guard(lambda: StateStore.open(settings)) as store:
        keys = _guard(store.keys)
    if as_json:
        rows = [
            {
                "name": key.name,
                "role": key.role,
                "created_at": key.created_at.isoformat(),
                "last_used_at": key.last_used_at.isoformat() if key.last_used_at else None,
            }
            for key in keys
        ]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    if not keys:
        out.print("no API keys yet: run `backorder keys create NAME --role viewer`")
        return
    grid = Table("name", "role", "created (UTC)", "last used (UTC)")
    for key in keys:
        used = key.last_used_at.strftime("%Y-%m-%d %H:%M") if key.last_used_at else "never"
        grid.add_row(key.name, key.role, key.created_at.strftime("%Y-%m-%d %H:%M"), used)
    out.print(grid)


@keys_app.command("revoke")
def keys_revoke(
    name: Annotated[str, typer.Argument(help="The key to revoke.")],
    config: ConfigOption = None,
) -> None:
    """Revoke a key: its token stops working and its sign-in sessions end."""
    from backorder.state import StateStore

    settings = _settings(config)
    with _guard(lambda: StateStore.open(settings)) as store:
        _guard(lambda: store.revoke_key(name))
    out.print(f"key {name} revoked; its sessions are ended")


if __name__ == "__main__":  # pragma: no cover
    app()
