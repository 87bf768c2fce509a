"""The scheduled pipelines' steps (validate, drift, score, train, record, publish) over the
landing layout of ``backorder.catalog``.

Every step is a plain function of URIs and ids that returns a small JSON-able dict: the Airflow
DAGs call them, and anything else (cron, a notebook, a test) can too.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from datetime import UTC, datetime
from typing import Any

from backorder.catalog import (
    LABELLED,
    METRICS,
    PREDICTIONS,
    REJECTS,
    REPORTS,
    SCORING,
    TRAINING,
    UNSCORED,
    Landing,
    batch_uri,
    pending_scoring,
    pending_training,
)
from backorder.config import Settings
from backorder.data import check_inputs, load_rows
from backorder.errors import BackorderError, InputFileError, OutputError
from backorder.io import write_json_atomic, write_text_atomic
from backorder.logs import batch_logged, log_context, step_logger
from backorder.predict import new_batch_id, predict_file

log = step_logger("backorder.pipelines")


class DriftBlocked(BackorderError):
    """The drift policy refused a batch; the drift report says why."""

    exit_code = 5


# -- scoring -------------------------------------------------------------------------------------
@batch_logged
def validate_batch(root: str, batch_id: str, settings: Settings, kind: str = UNSCORED) -> str:
    """Fail fast on whole-file problems; return the batch's URI. The first step of a batch:
    the later steps (drift, scoring) only look the batch up."""
    uri = batch_uri(root, batch_id, kind)
    check_inputs([uri], require_label=kind == LABELLED, block_bytes=settings.read_block_bytes)
    log.info("batch is valid", extra={"input": uri, "kind": kind})
    return uri


@batch_logged
def check_drift(
    root: str, batch_id: str, settings: Settings, kind: str = UNSCORED, model: str = "champion"
) -> dict[str, Any]:
    """Compare a batch with the model's training reference; write the report; apply the policy.

    Returns the drift summary (drifted features, report URI). Raises ``DriftBlocked`` when the
    policy blocks this kind of batch and something drifted, after writing the report.
    """
    from backorder.drift import compare, drift_report, prometheus_text
    from backorder.model import backorder_probability
    from backorder.registry import Registry

    landing = Landing(root)
    uri = batch_uri(root, batch_id, kind)
    registry = Registry(settings)
    if registry.champion_version() is None and model == "champion":
        return {"batch_id": batch_id, "checked": False, "why": "no champion yet", "drifted": []}
    loaded = registry.load(model, with_reference=True)
    if loaded.reference is None:
        return {
            "batch_id": batch_id,
            "checked": False,
            "why": f"model v{loaded.version} stores no training reference",
            "drifted": [],
        }
    rows, _, _ = load_rows(uri, settings.read_block_bytes)
    if rows.empty:
        raise InputFileError(f"{uri}: no valid rows to compare")
    result = compare(
        loaded.reference,
        rows,
        settings.drift_psi_threshold,
        backorder_probability(loaded.pipeline, loaded.reference),
        backorder_probability(loaded.pipeline, rows),
    )
    folder = landing.uri(REPORTS, batch_id)
    report = write_text_atomic(
        f"{folder}/drift_report.html",
        drift_report(
            result,
            loaded.reference,
            rows,
            f"training reference of model v{loaded.version}",
            uri,
        ),
    )
    summary = result.summary() | {"model_version": loaded.version, "current": uri}
    write_json_atomic(f"{folder}/drift.json", summary)
    text = prometheus_text(result, batch_id)
    write_text_atomic(f"{folder}/drift.prom", text)
    # Scored and labelled batches push to groups of their own: one must not replace the other.
    publish_metrics(landing, "drift" if kind == UNSCORED else "drift_labelled", text, settings)
    blocks = {
        "warn": set(),
        "block_training": {LABELLED},
        "block_scoring": {UNSCORED},
        "block_both": {LABELLED, UNSCORED},
    }[settings.drift_policy]
    outcome = {
        "batch_id": batch_id,
        "checked": True,
        "drifted": result.drifted,
        "max_psi": float(result.features["psi"].max()),
        "report": str(report),
        "blocked": bool(result.drifted) and kind in blocks,
    }
    log.log(
        logging.WARNING if result.drifted else logging.INFO,
        "drift checked",
        extra={
            "model_version": loaded.version,
            "drifted": result.drifted,
            "max_psi": outcome["max_psi"],
            "report": str(report),
        },
    )
    if outcome["blocked"]:
        job = SCORING if kind == UNSCORED else TRAINING
        landing.record(
            job,
            batch_id,
            {"status": "blocked_by_drift", "at": _now(), "drift": outcome, "input": uri},
        )
        raise DriftBlocked(
            f"{uri}: drifted from model v{loaded.version}'s training data "
            f"({', '.join(result.drifted)}); policy {settings.drift_policy}; see {report}"
        )
    return outcome


@batch_logged
def score_batch(
    root: str, batch_id: str, settings: Settings, model: str = "champion"
) -> dict[str, Any]:
    """Score one landed batch into predictions/ and rejects/; re-running replaces, never adds."""
    from backorder.registry import Registry

    landing = Landing(root)
    uri = batch_uri(root, batch_id)
    loaded = Registry(settings).load(
        model, settings.scoring_base_rate, compiled=settings.compiled_trees
    )
    started = time.perf_counter()
    summary = predict_file(
        uri,
        landing.uri(PREDICTIONS, f"{batch_id}.parquet"),
        loaded,
        settings,
        rejects=landing.uri(REJECTS, f"{batch_id}.parquet"),
        batch_id=batch_id,
    )
    log.info("batch scored", extra={"model_version": loaded.version, **summary.counts()})
    return {
        "batch_id": batch_id,
        "input": uri,
        "predictions": summary.output,
        "rejects": summary.rejects,
        "model_version": loaded.version,
        "seconds": round(time.perf_counter() - started, 3),
        **summary.counts(),
    }


def record_scoring(
    root: str, scored: dict[str, Any], settings: Settings, drift: dict[str, Any] | None = None
) -> str:
    """Write the batch's manifest record (the commit point) and the job's metrics."""
    landing = Landing(root)
    uri = landing.record(
        SCORING,
        scored["batch_id"],
        {"status": "scored", "at": _now(), **scored, "drift": drift},
    )
    publish_metrics(landing, "batch_prediction", _batch_metrics(scored), settings)
    log.info(
        "batch recorded",
        extra={"batch_id": scored["batch_id"], "model_version": scored["model_version"]},
    )
    return uri


def gauges(*figures: tuple[str, str, float | str]) -> str:
    """(name, help, value) triples as Prometheus text, one gauge each."""
    lines = []
    for name, help_text, value in figures:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
    return "\n".join(lines) + "\n"


def _batch_metrics(scored: dict[str, Any]) -> str:
    return gauges(
        ("backorder_batch_rows_read", "Rows read from the last scored batch.", scored["read"]),
        ("backorder_batch_rows_scored", "Rows scored in the last scored batch.", scored["scored"]),
        (
            "backorder_batch_rows_rejected",
            "Rows quarantined with a reason in the last scored batch.",
            scored["rejected"],
        ),
        (
            "backorder_batch_rows_flagged",
            "Rows at or over the decision threshold in the last scored batch.",
            scored["flagged"],
        ),
        (
            "backorder_batch_last_success_timestamp_seconds",
            "When a batch was last scored.",
            f"{time.time():.3f}",
        ),
        ("backorder_batch_duration_seconds", "Time to score the last batch.", scored["seconds"]),
    )


def publish_metrics(landing: Landing, job: str, text: str, settings: Settings) -> None:
    """Keep the job's last figures under metrics/ and push them to a Pushgateway if set."""
    write_text_atomic(landing.uri(METRICS, f"{job}.prom"), text)
    if settings.pushgateway_url:
        request = urllib.request.Request(
            f"{settings.pushgateway_url.rstrip('/')}/metrics/job/backorder_{job}",
            data=text.encode(),
            method="PUT",
            headers={"Content-Type": "text/plain; version=0.0.4"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10):
                pass
        except OSError as exc:
            raise OutputError(f"{settings.pushgateway_url}: metrics push failed ({exc})") from None


# -- training ------------------------------------------------------------------------------------
def train_on_landing(root: str, settings: Settings, new_batches: list[str]) -> dict[str, Any]:
    """Train on every labelled batch (history plus the new ones) and register a challenger.

    The challenger is compared with the champion on the same holdout rows; the decision is
    returned, not applied: ``promote_or_keep`` applies it.
    """
    from backorder.train import run_training

    landing = Landing(root)
    labelled = landing.batches(LABELLED)
    run = f"{new_batches[-1] if new_batches else new_batch_id()}"
    local_reports = settings.home / "runs" / f"pipeline-train-{run}"
    outcome = run_training(list(labelled.values()), settings, local_reports, apply_promotion=False)
    reports = landing.uri(REPORTS, TRAINING, run)
    for name in ("report.html", "metrics.json", "rejects.csv"):
        path = local_reports / name
        write_text_atomic(f"{reports}/{name}", path.read_text(encoding="utf-8"))
    holdout = outcome.holdout or {}
    log.info(
        "challenger registered",
        extra={"model_version": outcome.version, "run": run, "reason": outcome.decision.reason},
    )
    return {
        "run": run,
        "version": outcome.version,
        "should_promote": outcome.decision.promoted,
        "reason": outcome.decision.reason,
        "batches": list(labelled),
        "new_batches": new_batches,
        "report": f"{reports}/report.html",
        "validation_average_precision": outcome.validation.get("average_precision"),
        "holdout_average_precision": holdout.get("average_precision"),
        "holdout_roc_auc": holdout.get("roc_auc"),
    }


def promote_or_keep(settings: Settings, trained: dict[str, Any]) -> dict[str, Any]:
    """Apply the training run's decision: make the challenger champion, or keep the champion."""
    from backorder.registry import Registry

    registry = Registry(settings)
    if trained["should_promote"]:
        registry.promote(trained["version"])
    log.info(
        "champion promoted" if trained["should_promote"] else "champion kept",
        extra={"model_version": trained["version"], "champion": registry.champion_version()},
    )
    return trained | {
        "promoted": bool(trained["should_promote"]),
        "champion": registry.champion_version(),
    }


def record_training(
    root: str,
    decided: dict[str, Any],
    settings: Settings,
    drift: list[dict[str, Any]] | None = None,
) -> str:
    landing = Landing(root)
    uri = landing.record(
        TRAINING, decided["run"], {"status": "trained", "at": _now(), **decided, "drift": drift}
    )
    text = gauges(
        (
            "backorder_training_last_success_timestamp_seconds",
            "When training last finished.",
            f"{time.time():.3f}",
        ),
        (
            "backorder_training_promoted",
            "Whether the last training run's model was promoted.",
            int(decided["promoted"]),
        ),
    )
    publish_metrics(landing, "training", text, settings)
    return uri


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- whole runs, without a scheduler ---------------------------------------------------------------
def score_pending(root: str, settings: Settings, say: Any = print) -> list[dict[str, Any]]:
    """What the daily DAG does, in one process: every pending batch, oldest first.

    A batch that fails (bad file, drift block) is reported and the others still run; the
    function raises at the end if any failed, so a scheduler sees the failure.
    """
    done, failed = [], []
    for batch in pending_scoring(root):
        with log_context(batch_id=batch):
            try:
                validate_batch(root, batch, settings)
                drift = check_drift(root, batch, settings)
                scored = score_batch(root, batch, settings)
                record_scoring(root, scored, settings, drift)
            except BackorderError as exc:
                say(f"batch {batch}: {exc}")
                failed.append(batch)
                continue
            say(
                f"batch {batch}: scored {scored['scored']:,}, rejected {scored['rejected']:,}, "
                f"flagged {scored['flagged']:,} -> {scored['predictions']}"
            )
        done.append(scored)
    if failed:
        raise BackorderError(f"{len(failed)} batch(es) failed: {', '.join(failed)}")
    return done


def train_if_new(root: str, settings: Settings, say: Any = print) -> dict[str, Any] | None:
    """What the weekly DAG does, in one process; None when no new labelled batch arrived."""
    new = pending_training(root)
    if not new:
        say("no new labelled batches: nothing to train on")
        return None
    for batch in new:
        validate_batch(root, batch, settings, kind=LABELLED)
    drift = [check_drift(root, b, settings, kind=LABELLED) for b in new]
    trained = train_on_landing(root, settings, new)
    decided = promote_or_keep(settings, trained)
    record_training(root, decided, settings, drift)
    say(f"model v{decided['version']}: {decided['reason']}")
    return decided
