"""Training: validated labelled rows in, a registered (and maybe promoted) model out.

The steps: load and validate the inputs; set aside a promotion holdout chosen by a hash of each
row's features (so the same rows are held out in every run and no model ever trains on them);
fit the pipeline with cross-validation on the rest; evaluate on the out-of-fold predictions and
on the holdout; log everything to MLflow; register the model as challenger; promote it to
champion only if it beats the current champion on the same holdout rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from backorder import __version__
from backorder.config import Settings
from backorder.contract import FEATURE_COLUMNS, LABEL
from backorder.data import (
    ChunkProgress,
    LabelledData,
    check_inputs,
    feature_hash,
    load_labelled,
)
from backorder.io import redact, write_json_atomic, write_table_atomic, write_text_atomic
from backorder.metrics import Costs, Evaluation, evaluate_predictions, flat_metrics
from backorder.model import BackorderClassifier, Scorer, build_pipeline
from backorder.registry import Registry, RunRecord
from backorder.report import evaluation_sections, render, table

HASH_BUCKETS = 10_000

log = logging.getLogger(__name__)


def hash_slices(hashes: np.ndarray, *fractions: float) -> np.ndarray:
    """Which consecutive slice of feature-value hashes each row falls in: 0 for the first
    ``fractions[0]`` of hash buckets, 1 for the next ``fractions[1]``, ..., and
    ``len(fractions)`` for the rest. Stable across runs and engines."""
    edges = np.cumsum([round(f * HASH_BUCKETS) for f in fractions])
    return np.searchsorted(edges, hashes % HASH_BUCKETS, side="right")


def holdout_mask(rows: pd.DataFrame, fraction: float) -> np.ndarray:
    """Rows in the promotion holdout: a fixed share of feature-value hashes, stable across runs."""
    return hash_slices(feature_hash(rows), fraction) == 0


@dataclass
class PromotionDecision:
    promoted: bool
    reason: str
    champion_version: str | None
    challenger: dict[str, float | None]
    champion: dict[str, float | None] | None


def decide_promotion(
    challenger: dict[str, Any],
    champion: dict[str, Any] | None,
    settings: Settings,
    champion_version: str | None,
) -> PromotionDecision:
    """Promote when the challenger's AP beats the champion's by the margin without losing AUC."""
    keys = ("average_precision", "roc_auc")
    mine = {k: challenger.get(k) for k in keys}
    if champion_version is None:
        return PromotionDecision(
            True, "no champion yet: the first model becomes champion", None, mine, None
        )
    theirs = {k: (champion or {}).get(k) for k in keys}
    if None in mine.values() or None in theirs.values():
        return PromotionDecision(
            False,
            f"no holdout rows with backorders to compare on; kept champion v{champion_version}"
            " (backorder models promote VERSION overrides)",
            champion_version,
            mine,
            theirs,
        )
    ap_gain = float(mine["average_precision"]) - float(theirs["average_precision"])  # type: ignore[arg-type]
    auc_change = float(mine["roc_auc"]) - float(theirs["roc_auc"])  # type: ignore[arg-type]
    enough_ap = ap_gain >= settings.promotion_min_ap_gain
    kept_auc = auc_change >= -settings.promotion_max_auc_loss
    verdict = (
        f"average precision {ap_gain:+.4f} (needs >= +{settings.promotion_min_ap_gain:g}), "
        f"ROC AUC {auc_change:+.4f} (may lose <= {settings.promotion_max_auc_loss:g})"
    )
    if enough_ap and kept_auc:
        return PromotionDecision(
            True, f"beats champion v{champion_version}: {verdict}", champion_version, mine, theirs
        )
    return PromotionDecision(
        False, f"kept champion v{champion_version}: {verdict}", champion_version, mine, theirs
    )


@dataclass
class TrainingOutcome:
    version: str
    run_id: str
    promoted: bool
    decision: PromotionDecision
    output_dir: Path
    report: Path
    metrics_file: Path
    rejects_file: Path
    validation: dict[str, Any]
    holdout: dict[str, Any] | None
    data: LabelledData
    fit_seconds: float


def _evaluate(
    rows: pd.DataFrame, y: np.ndarray, p: np.ndarray, threshold: float, settings: Settings
) -> Evaluation:
    return evaluate_predictions(
        rows,
        y,
        p,
        threshold,
        Costs(settings.cost_missed_backorder, settings.cost_false_alarm, settings.alert_budgets),
    )


def run_training(
    uris: Sequence[str | Path],
    settings: Settings,
    output_dir: Path | None = None,
    on_chunk: ChunkProgress | None = None,
    apply_promotion: bool = True,
) -> TrainingOutcome:
    """Train, register as challenger, and compare with the champion on the same holdout rows.

    With ``apply_promotion`` (the default) a winner becomes champion at once; without it the
    decision is only reported, for a pipeline that promotes in a step of its own.
    """
    started = datetime.now(UTC)
    output_dir = output_dir or settings.home / "runs" / f"train-{started:%Y%m%dT%H%M%SZ}"
    check_inputs(uris, require_label=True, block_bytes=settings.read_block_bytes)
    log.info(f"reading {len(uris)} labelled input(s)")
    data = load_labelled(uris, settings.read_block_bytes, on_chunk=on_chunk)
    for s in data.sources:
        log.info(
            f"{s.uri}: read {s.read:,}, accepted {s.accepted:,}, rejected {s.rejected:,}"
            + (
                f", dropped {s.duplicates_dropped:,} repeated from earlier inputs"
                if s.duplicates_dropped
                else ""
            )
        )

    rows = data.rows.reset_index(drop=True)
    y = rows[LABEL].to_numpy(dtype=np.int64)
    in_holdout = holdout_mask(rows, settings.holdout_fraction)
    train_rows, holdout_rows = rows.loc[~in_holdout], rows.loc[in_holdout]
    y_train, y_holdout = y[~in_holdout], y[in_holdout]
    log.info(
        f"training on {len(train_rows):,} rows ({int(y_train.sum()):,} backorders); "
        f"promotion holdout {len(holdout_rows):,} rows ({int(y_holdout.sum()):,} backorders)"
    )

    fit_started = time.perf_counter()
    pipeline = build_pipeline(settings)
    pipeline.fit(train_rows, y_train)
    fit_seconds = time.perf_counter() - fit_started
    clf = Scorer(pipeline).classifier
    log.info(f"fitted in {fit_seconds:.1f} s; threshold {clf.decision_threshold_:.4f}")
    return register_trained(
        Fitted(pipeline, fit_seconds, train_rows, y_train, clf.oof_probability_),
        settings,
        TrainingRun(
            holdout=Holdout(holdout_rows, y_holdout),
            data=data,
            fingerprint=data.fingerprint(),
            uris=uris,
            started=started,
            output_dir=output_dir,
        ),
        apply_promotion=apply_promotion,
    )


@dataclass
class Fitted:
    """A fitted pipeline and the rows its validation probabilities belong to."""

    pipeline: Any
    fit_seconds: float
    validation_rows: pd.DataFrame  # also the report's rows and the drift reference's source
    validation_y: np.ndarray
    validation_probability: np.ndarray  # from models that did not train on those rows
    validation_title: str = "Validation (out-of-fold, training rows)"
    validation_note: str = "Each probability comes from a model that did not see the row."
    training_rows: int | None = None  # rows the final booster saw (default: validation rows)
    training_positives: int | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Holdout:
    """The promotion holdout: rows no model trains on, and their labels."""

    rows: pd.DataFrame
    y: np.ndarray


@dataclass
class TrainingRun:
    """What a training run records besides the fitted pipeline: its inputs, its holdout, when
    it started and where its files go."""

    holdout: Holdout
    data: LabelledData
    fingerprint: dict[str, Any]
    uris: Sequence[str | Path]
    started: datetime
    output_dir: Path


@dataclass
class Assessment:
    """How a fitted pipeline did: on its validation rows, on the holdout (None without rows of
    both classes there), the champion's holdout metrics, and the promotion decision."""

    validation: Evaluation
    holdout: Evaluation | None
    champion: dict[str, Any] | None
    decision: PromotionDecision


def register_trained(
    fitted: Fitted,
    settings: Settings,
    run: TrainingRun,
    apply_promotion: bool = True,
) -> TrainingOutcome:
    """Evaluate a fitted pipeline, compare it with the champion on the holdout, log it to
    MLflow, register it as challenger and write its report: whichever engine fitted it."""
    model = Scorer(fitted.pipeline)
    registry = Registry(settings)
    assessment = _assess(fitted, model, registry, run.holdout)
    output_dir = run.output_dir
    rejects_file = _write_rejects(run)
    metrics_file = _write_metrics(run, model, fitted, assessment)

    # The report names the version and says whether it was promoted: register and promote
    # first, then write and attach the report.
    run_id, version = _log_run(registry, fitted, model, run, assessment)
    registry.set_challenger(version)
    if assessment.decision.promoted and apply_promotion:
        final = promote_as_decided(registry, version, assessment.decision)
        if final is not assessment.decision:  # refused: every record says so, and why
            assessment.decision = final
            metrics_file = _write_metrics(run, model, fitted, assessment)
            registry.client.set_tag(run_id, "promotion", final.reason)
            registry.client.set_model_version_tag(registry.name, version, "promotion", final.reason)
    decision = assessment.decision
    report = output_dir / "report.html"
    html = _training_report(version, run, model, assessment, fitted)
    write_text_atomic(report, html)
    registry.client.log_artifact(run_id, str(report))
    registry.client.log_artifact(run_id, str(metrics_file))
    log.info(f"registered model version {version}; {decision.reason}")
    return TrainingOutcome(
        version=version,
        run_id=run_id,
        promoted=decision.promoted and apply_promotion,
        decision=decision,
        output_dir=output_dir,
        report=report,
        metrics_file=metrics_file,
        rejects_file=rejects_file,
        validation=assessment.validation.metrics,
        holdout=assessment.holdout.metrics if assessment.holdout else None,
        data=run.data,
        fit_seconds=fitted.fit_seconds,
    )


def _assess(fitted: Fitted, model: Scorer, registry: Registry, holdout: Holdout) -> Assessment:
    """Evaluate on the validation rows, compare with the champion on the holdout, decide."""
    settings = registry.settings
    validation = _evaluate(
        fitted.validation_rows,
        fitted.validation_y,
        fitted.validation_probability,
        model.threshold,
        settings,
    )
    champion_version = registry.champion_version()
    holdout_eval, champion_holdout = _compare_on_holdout(model, registry, champion_version, holdout)
    decision = decide_promotion(
        holdout_eval.metrics if holdout_eval else {}, champion_holdout, settings, champion_version
    )
    return Assessment(validation, holdout_eval, champion_holdout, decision)


def promote_as_decided(
    registry: Registry, version: str, decision: PromotionDecision
) -> PromotionDecision:
    """Promote ``version`` as ``decision`` says, only over the champion it was compared with.

    Returns ``decision`` when it was applied, else a decision not to promote that says why
    (another run or a planner changed the champion meanwhile): never an error, the version
    stays challenger and can be compared again or promoted by hand.
    """
    done = registry.promote(version, compared_with=decision.champion_version)
    if done.promoted or done.champion == version:
        return decision
    return replace(
        decision,
        promoted=False,
        reason=(
            f"not promoted: {done.reason} ({decision.reason}); train again to compare with "
            f"the new champion, or `backorder models promote {version}`"
        ),
    )


def _write_rejects(run: TrainingRun) -> Path:
    """The run's rejects.csv; return its path."""
    run.output_dir.mkdir(parents=True, exist_ok=True)
    # Always written, even empty, so that a re-run never leaves an earlier run's rejects behind.
    return write_table_atomic(run.output_dir / "rejects.csv", run.data.rejects)


def _write_metrics(run: TrainingRun, model: Scorer, fitted: Fitted, assessment: Assessment) -> Path:
    """The run's metrics.json, with the promotion decision as it stands; return its path."""
    data, output_dir = run.data, run.output_dir
    holdout_eval = assessment.holdout
    return write_json_atomic(
        output_dir / "metrics.json",
        {
            "validation": _with_tables(assessment.validation),
            "holdout": _with_tables(holdout_eval) if holdout_eval else None,
            "champion_on_holdout": assessment.champion,
            "promotion": asdict(assessment.decision),
            "data": {
                "sources": [asdict(s) for s in data.sources],
                "fingerprint": run.fingerprint,
                "warnings": dict(data.warnings),
            },
            "model": _model_facts(model.classifier, fitted.fit_seconds),
        },
    )


def _compare_on_holdout(
    model: Scorer,
    registry: Registry,
    champion_version: str | None,
    holdout: Holdout,
) -> tuple[Evaluation | None, dict[str, Any] | None]:
    """The challenger's evaluation on the promotion holdout and the champion's metrics there;
    None for either when there is nothing to compare on (no holdout rows of both classes)."""
    holdout_rows, y_holdout, settings = holdout.rows, holdout.y, registry.settings
    if not (len(holdout_rows) and 0 < y_holdout.sum() < len(y_holdout)):
        return None, None
    challenger = _evaluate(
        holdout_rows, y_holdout, model.probability(holdout_rows), model.threshold, settings
    )
    if champion_version is None:
        return challenger, None
    champion = registry.load(champion_version)
    champion_metrics = _evaluate(
        holdout_rows, y_holdout, champion.probability(holdout_rows), champion.threshold, settings
    ).metrics
    return challenger, champion_metrics


def _model_facts(clf: BackorderClassifier, fit_seconds: float) -> dict[str, Any]:
    return {
        "trees": clf.n_trees_,
        "cv_best_iterations": clf.best_iterations_,
        "calibration_slope": clf.calibration_slope_,
        "calibration_intercept": clf.calibration_intercept_,
        "training_base_rate": clf.training_base_rate_,
        "fit_seconds": fit_seconds,
    }


def _log_run(
    registry: Registry, fitted: Fitted, model: Scorer, run: TrainingRun, assessment: Assessment
) -> tuple[str, str]:
    """Log the run (params, metrics, tags, model, drift reference) to MLflow and register the
    model; return (run id, model version)."""
    settings, fingerprint, uris, started = registry.settings, run.fingerprint, run.uris, run.started
    validation, holdout, decision = assessment.validation, assessment.holdout, assessment.decision
    train_rows, fit_seconds = fitted.validation_rows, fitted.fit_seconds
    metadata = {
        "trained_at": started.isoformat(timespec="seconds"),
        "package_version": __version__,
        "training_rows": fitted.training_rows or len(train_rows),
        "training_positives": fitted.training_positives or int(fitted.validation_y.sum()),
        "data_fingerprint": fingerprint,
        "threshold": model.threshold,
        "feature_names": model.feature_names,
        "validation": _headline(validation.metrics),
        "holdout": _headline(holdout.metrics) if holdout else None,
        "cost_missed_backorder": settings.cost_missed_backorder,
        "cost_false_alarm": settings.cost_false_alarm,
        "watchlist_fraction": settings.watchlist_fraction,
    }
    params: dict[str, Any] = {
        **{f"lightgbm_{k}": v for k, v in settings.lightgbm.model_dump().items()},
        "cv_folds": settings.cv_folds,
        "early_stopping_fraction": settings.early_stopping_fraction,
        "holdout_fraction": settings.holdout_fraction,
        "cost_missed_backorder": settings.cost_missed_backorder,
        "cost_false_alarm": settings.cost_false_alarm,
        "random_seed": settings.random_seed,
        "trees": model.classifier.n_trees_,
        "inputs": ",".join(redact(str(u)) for u in uris),
        **fitted.params,
    }
    mlflow_metrics = {f"validation_{k}": v for k, v in flat_metrics(validation.metrics).items()}
    if holdout:
        mlflow_metrics |= {f"holdout_{k}": v for k, v in flat_metrics(holdout.metrics).items()}
    mlflow_metrics["fit_seconds"] = fit_seconds
    tags = {
        "data_rows": str(fingerprint["rows"]),
        "data_sha256": str(fingerprint["sha256"]),
        "promotion": decision.reason,
    }
    reference = train_rows[list(FEATURE_COLUMNS)].sample(
        n=min(len(train_rows), settings.drift_reference_rows), random_state=settings.random_seed
    )
    return registry.log_training_run(
        fitted.pipeline,
        RunRecord(metadata, params, mlflow_metrics, tags, artifacts=[], reference=reference),
    )


def _with_tables(ev: Evaluation) -> dict[str, Any]:
    """Metrics plus the report's segment and reliability tables, as plain records."""
    return {
        **ev.metrics,
        "segments": ev.segments.to_dict(orient="records"),
        "reliability": ev.reliability.to_dict(orient="records"),
    }


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "n_rows",
        "n_positive",
        "roc_auc",
        "average_precision",
        "brier",
        "recall",
        "precision",
        "expected_cost",
    )
    return {k: metrics.get(k) for k in keys}


def _training_report(
    version: str, run: TrainingRun, model: Scorer, assessment: Assessment, fitted: Fitted
) -> str:
    data, fingerprint, fit_seconds = run.data, run.fingerprint, fitted.fit_seconds
    validation, holdout, champion = assessment.validation, assessment.holdout, assessment.champion
    decision = assessment.decision
    train_rows, clf = fitted.validation_rows, model.classifier
    sources = pd.DataFrame([asdict(s) for s in data.sources])
    body = "<h2>Inputs</h2>" + table(sources)
    if data.warnings:
        body += table(pd.DataFrame(sorted(data.warnings.items()), columns=["warning", "rows"]))
    body += (
        f"<h2>{fitted.validation_title}</h2>"
        f'<p class="note">{fitted.validation_note}</p>'
        + evaluation_sections(validation, train_rows, model)
    )
    body += "<h2>Promotion</h2>" + f"<p>{decision.reason}</p>"
    if holdout is not None:
        rows = [{"model": f"challenger v{version}", **decision.challenger}]
        if champion is not None:
            rows.append(
                {
                    "model": f"champion v{decision.champion_version}",
                    "average_precision": champion["average_precision"],
                    "roc_auc": champion["roc_auc"],
                }
            )
        body += table(pd.DataFrame(rows))
        body += (
            f'<p class="note">On the promotion holdout: {holdout.metrics["n_rows"]:,} rows, '
            f"{holdout.metrics['n_positive']:,} backorders, never trained on.</p>"
        )
    intro = [
        ("model version", version),
        ("trained rows", f"{fitted.training_rows or len(train_rows):,}"),
        ("data fingerprint", f"{fingerprint['rows']:,} rows, sha256 {fingerprint['sha256'][:16]}…"),
        ("trees", clf.n_trees_),
        ("cross-validation best iterations", ", ".join(map(str, clf.best_iterations_))),
        (
            "calibration (Platt)",
            f"slope {clf.calibration_slope_:.3f}, intercept {clf.calibration_intercept_:.3f}",
        ),
        ("decision threshold", f"{clf.decision_threshold_:.4f}"),
        ("fit time", f"{fit_seconds:.1f} s"),
    ]
    return render(f"Training report: backorder model v{version}", intro, body)
