"""Evaluation: score labelled data with a registered model and write metrics and a report."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from backorder.config import Settings
from backorder.data import ChunkProgress, check_inputs, load_labelled
from backorder.io import write_json_atomic, write_table_atomic, write_text_atomic
from backorder.metrics import Costs, evaluate_predictions
from backorder.registry import CHAMPION, Registry
from backorder.report import evaluation_sections, render, table

log = logging.getLogger(__name__)


@dataclass
class EvaluationOutcome:
    metrics: dict[str, Any]
    metrics_file: Path
    report: Path
    rejects_file: Path


def run_evaluation(
    uris: Sequence[str | Path],
    output_dir: Path,
    settings: Settings,
    model_ref: str = CHAMPION,
    on_chunk: ChunkProgress | None = None,
) -> EvaluationOutcome:
    check_inputs(uris, require_label=True, block_bytes=settings.read_block_bytes)
    model = Registry(settings).load(model_ref, base_rate=settings.scoring_base_rate)
    log.info(f"evaluating model v{model.version}")
    data = load_labelled(uris, settings.read_block_bytes, on_chunk=on_chunk)
    rows = data.rows
    probability = model.probability(rows)
    ev = evaluate_predictions(
        rows,
        data.y,
        probability,
        model.threshold,
        Costs(settings.cost_missed_backorder, settings.cost_false_alarm, settings.alert_budgets),
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    # Always written, even empty, so that a re-run never leaves an earlier run's rejects behind.
    rejects_file = write_table_atomic(output_dir / "rejects.csv", data.rejects)
    metrics = {
        **ev.metrics,
        "model_version": model.version,
        "n_read": data.n_read,
        "n_rejected": len(data.rejects),
        "inputs": [asdict(s) for s in data.sources],
        "segments": ev.segments.to_dict(orient="records"),
        "reliability": ev.reliability.to_dict(orient="records"),
    }
    metrics_file = write_json_atomic(output_dir / "metrics.json", metrics)
    intro = [
        ("model version", model.version),
        ("trained at", model.metadata.get("trained_at")),
        ("rows read", f"{data.n_read:,}"),
        ("rows evaluated", f"{len(rows):,}"),
        ("rows rejected", f"{len(data.rejects):,}"),
    ]
    body = evaluation_sections(ev, rows, model)
    if data.warnings:
        body += table(pd.DataFrame(sorted(data.warnings.items()), columns=["warning", "rows"]))
    report = write_text_atomic(
        output_dir / "report.html",
        render(f"Evaluation: backorder model v{model.version}", intro, body),
    )
    return EvaluationOutcome(metrics, metrics_file, report, rejects_file)
