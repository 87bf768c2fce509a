"""The scheduled pipelines' steps (validate, drift, score, train, record, publish) over the
landing layout of ``backorder.catalog``.

Every step is a plain function of URIs and ids that returns a small JSON-able dict: the Airflow
DAGs call them, and anything else (cron, a notebook, a test) can too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pandas as pd
from prometheus_client import CollectorRegistry, Gauge, generate_latest, push_to_gateway

from backorder.catalog import (
    LABELLED,
    METRICS,
    PREDICTIONS,
    REJECTS,
    REPORTS,
    SCORING,
    TRAINING,
    UNSCORED,
    BatchTaken,
    Landing,
    Lease,
    batch_uri,
    pending_scoring,
    pending_training,
)
from backorder.config import Settings
from backorder.data import check_inputs, load_rows
from backorder.errors import BackorderError, InputFileError, OutputError
from backorder.io import write_text_atomic
from backorder.logs import batch_logged, log_context, step_logger
from backorder.predict import new_batch_id, predict_file
from backorder.uris import redact, redact_text

if TYPE_CHECKING:
    from backorder.drift import DriftCheck
    from backorder.model import LoadedModel

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
    log.info("batch is valid", extra={"input": redact(uri), "kind": kind})
    return uri


# The kinds of batch each drift policy stops when something drifted.
DRIFT_BLOCKS: dict[str, set[str]] = {
    "warn": set(),
    "block_training": {LABELLED},
    "block_scoring": {UNSCORED},
    "block_both": {LABELLED, UNSCORED},
}


@batch_logged
def check_drift(
    root: str, batch_id: str, settings: Settings, kind: str = UNSCORED, model: str = "champion"
) -> dict[str, Any]:
    """Compare a batch with the model's training reference; write the report; apply the policy.

    Returns the drift summary (drifted features, report URI). Raises ``DriftBlocked`` when the
    policy blocks this kind of batch and something drifted, after writing the report.
    """
    from backorder.drift import DriftFiles, check_and_report

    landing = Landing(root)
    uri = batch_uri(root, batch_id, kind)
    found = _model_with_reference(settings, model)
    if isinstance(found, str):
        return {"batch_id": batch_id, "checked": False, "why": found, "drifted": []}
    loaded, reference = found
    rows, _, _ = load_rows(uri, settings.read_block_bytes)
    shown = redact(uri)  # what reports, logs and the manifest name: without a password
    if rows.empty:
        raise InputFileError(f"{shown}: no valid rows to compare")
    checked = check_and_report(
        reference,
        rows,
        DriftFiles(
            landing.uri(REPORTS, batch_id),
            batch_id,
            (f"training reference of model v{loaded.version}", shown),
            {"model_version": loaded.version, "current": shown},
        ),
        settings.drift_psi_threshold,
        loaded,
    )
    # Scored and labelled batches push to groups of their own: one must not replace the other.
    job = "drift" if kind == UNSCORED else "drift_labelled"
    publish_metrics(landing, job, checked.metrics, settings)
    outcome = _drift_outcome(batch_id, checked, kind, settings)
    _log_drift(loaded.version, outcome)
    if outcome["blocked"]:
        _block_batch(landing, kind, batch_id, shown, outcome)
        raise DriftBlocked(
            f"{shown}: drifted from model v{loaded.version}'s training data "
            f"({', '.join(outcome['drifted'])}); policy {settings.drift_policy}; "
            f"see {outcome['report']}"
        )
    return outcome


def _model_with_reference(settings: Settings, model: str) -> tuple[LoadedModel, pd.DataFrame] | str:
    """The model to compare with and its training reference, or why there is none."""
    from backorder.registry import Registry

    registry = Registry(settings)
    if registry.champion_version() is None and model == "champion":
        return "no champion yet"
    loaded = registry.load(model, with_reference=True)
    if loaded.reference is None:
        return f"model v{loaded.version} stores no training reference"
    return loaded, loaded.reference


def _drift_outcome(
    batch_id: str, checked: DriftCheck, kind: str, settings: Settings
) -> dict[str, Any]:
    result = checked.result
    return {
        "batch_id": batch_id,
        "checked": True,
        "drifted": result.drifted,
        "max_psi": float(result.features["psi"].max()),
        "report": redact(str(checked.report)),
        "blocked": bool(result.drifted) and kind in DRIFT_BLOCKS[settings.drift_policy],
    }


def _log_drift(model_version: str, outcome: dict[str, Any]) -> None:
    log.log(
        logging.WARNING if outcome["drifted"] else logging.INFO,
        "drift checked",
        extra={
            "model_version": model_version,
            "drifted": outcome["drifted"],
            "max_psi": outcome["max_psi"],
            "report": outcome["report"],
        },
    )


def _block_batch(
    landing: Landing, kind: str, batch_id: str, uri: str, outcome: dict[str, Any]
) -> None:
    """Record the batch as blocked, so its job does not run on it and it stays pending."""
    job = SCORING if kind == UNSCORED else TRAINING
    landing.record(
        job,
        batch_id,
        {"status": "blocked_by_drift", "at": _now(), "drift": outcome, "input": uri},
    )


@batch_logged
def score_batch(
    root: str, batch_id: str, settings: Settings, model: str = "champion"
) -> dict[str, Any]:
    """Score one landed batch into predictions/ and rejects/; re-running replaces, never adds."""
    from backorder.registry import Registry

    landing = Landing(root)
    uri = batch_uri(root, batch_id)
    loaded = Registry(settings).load_for_scoring(model)
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
        "input": redact(uri),
        "predictions": summary.output,
        "rejects": summary.rejects,
        "model_version": loaded.version,
        "seconds": round(time.perf_counter() - started, 3),
        **summary.counts(),
    }


@contextmanager
def scoring_lease(root: str, batch_id: str) -> Iterator[Lease]:
    """Hold the batch's scoring lease for the block: one runner at a time scores a batch and
    writes its record, so its predictions and manifest come from one run and one model.

    Raises ``BatchTaken`` when another runner holds the lease, or has scored the batch since
    it was found pending. Call the lease's ``confirm()`` before writing the record.
    """
    landing = Landing(root)
    lease = landing.take_lease(SCORING, batch_id)
    try:
        record = landing.record_of(SCORING, batch_id)
        if record is not None and record.get("status") == "scored":
            raise BatchTaken(f"{batch_id}: scored already, at {record.get('at')}")
        yield lease
    finally:
        lease.release()


@batch_logged
def score_and_record(
    root: str, batch_id: str, settings: Settings, drift: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Score one batch and write its record, holding its lease (see ``scoring_lease``); the
    DAG's ``score`` task, after its own validate and drift tasks."""
    with scoring_lease(root, batch_id) as lease:
        scored = score_batch(root, batch_id, settings)
        lease.confirm()
        record_scoring(root, scored, settings, drift)
    return scored


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


def gauges(*figures: tuple[str, str, float]) -> CollectorRegistry:
    """(name, help, value) triples as a registry of unlabelled gauges, one each."""
    registry = CollectorRegistry()
    for name, help_text, value in figures:
        Gauge(name, help_text, registry=registry).set(value)
    return registry


def _batch_metrics(scored: dict[str, Any]) -> CollectorRegistry:
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
            round(time.time(), 3),
        ),
        ("backorder_batch_duration_seconds", "Time to score the last batch.", scored["seconds"]),
    )


def publish_metrics(
    landing: Landing, job: str, metrics: CollectorRegistry, settings: Settings
) -> None:
    """Keep the job's last figures under metrics/ and push them to a Pushgateway if set."""
    # Not write_to_textfile: it writes local paths only, and the landing may be an S3 prefix.
    write_text_atomic(landing.uri(METRICS, f"{job}.prom"), generate_latest(metrics).decode())
    if settings.pushgateway_url:
        try:
            push_to_gateway(
                settings.pushgateway_url.rstrip("/"),
                job=f"backorder_{job}",
                registry=metrics,
                timeout=10,
            )
        except OSError as exc:
            where, reason = (
                settings.pushgateway_url,
                redact_text(str(exc), settings.pushgateway_url),
            )
            raise OutputError(f"{redact(where)}: metrics push failed ({reason})") from None


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
        # The champion the decision was made against: promote_or_keep promotes only over it.
        "compared_with": outcome.decision.champion_version,
        "batches": list(labelled),
        "new_batches": new_batches,
        "report": redact(f"{reports}/report.html"),
        "validation_average_precision": outcome.validation.get("average_precision"),
        "holdout_average_precision": holdout.get("average_precision"),
        "holdout_roc_auc": holdout.get("roc_auc"),
    }


def promote_or_keep(settings: Settings, trained: dict[str, Any]) -> dict[str, Any]:
    """Apply the training run's decision: make the challenger champion, or keep the champion.

    The challenger is promoted only over the champion it was compared with; if another run or
    a planner changed the champion meanwhile, it is kept as challenger and the reason says so.
    """
    from backorder.registry import Registry
    from backorder.train import PromotionDecision, promote_as_decided

    registry = Registry(settings)
    reason, promoted = trained["reason"], False
    if trained["should_promote"]:
        decision = PromotionDecision(True, reason, trained["compared_with"], {}, None)
        final = promote_as_decided(registry, trained["version"], decision)
        reason, promoted = final.reason, final.promoted
    champion = registry.champion_version()
    log.info(
        "champion promoted" if promoted else "champion kept",
        extra={"model_version": trained["version"], "champion": champion, "reason": reason},
    )
    return trained | {"promoted": promoted, "reason": reason, "champion": champion}


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
    metrics = gauges(
        (
            "backorder_training_last_success_timestamp_seconds",
            "When training last finished.",
            round(time.time(), 3),
        ),
        (
            "backorder_training_promoted",
            "Whether the last training run's model was promoted.",
            int(decided["promoted"]),
        ),
    )
    publish_metrics(landing, "training", metrics, settings)
    return uri


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- whole runs, without a scheduler ---------------------------------------------------------------
def score_pending(root: str, settings: Settings) -> list[dict[str, Any]]:
    """What the daily DAG does, in one process: every pending batch, oldest first; returns
    what this run scored.

    Each batch is validated, checked for drift, scored and recorded under its lease, so a
    batch that another runner (the DAG, another `score-pending`) has is skipped, and the log
    says so. A batch that fails (bad file, drift block) is logged and the others still run;
    the function raises at the end if any failed, so a scheduler sees the failure.
    """
    done, failed = [], []
    for batch in pending_scoring(root):
        with log_context(batch_id=batch):
            try:
                with scoring_lease(root, batch) as lease:
                    validate_batch(root, batch, settings)
                    drift = check_drift(root, batch, settings)
                    scored = score_batch(root, batch, settings)
                    lease.confirm()
                    record_scoring(root, scored, settings, drift)
            except BatchTaken as exc:
                log.info(f"skipped batch {exc}")
                continue
            except BackorderError as exc:
                log.info(f"batch {batch}: {exc}")
                failed.append(batch)
                continue
            log.info(
                f"batch {batch}: scored {scored['scored']:,}, rejected {scored['rejected']:,}, "
                f"flagged {scored['flagged']:,} -> {scored['predictions']}"
            )
        done.append(scored)
    if failed:
        raise BackorderError(f"{len(failed)} batch(es) failed: {', '.join(failed)}")
    return done


def train_if_new(root: str, settings: Settings) -> dict[str, Any] | None:
    """What the weekly DAG does, in one process; None when no new labelled batch arrived."""
    new = pending_training(root)
    if not new:
        log.info("no new labelled batches: nothing to train on")
        return None
    for batch in new:
        validate_batch(root, batch, settings, kind=LABELLED)
    drift = [check_drift(root, b, settings, kind=LABELLED) for b in new]
    trained = train_on_landing(root, settings, new)
    decided = promote_or_keep(settings, trained)
    record_training(root, decided, settings, drift)
    log.info(f"model v{decided['version']}: {decided['reason']}")
    return decided
