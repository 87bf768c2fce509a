"""Batch scoring: every input row is either scored or quarantined with a reason, never lost.

``score_rows`` is the one scoring function: batch files, the web app and evaluation call it, so
a model is always scored with its own fitted pipeline and worded the same way everywhere.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from backorder.config import Settings
from backorder.contract import ORIGINAL_LINE, REASON, ROW_NUMBER, SKU
from backorder.data import ChunkProgress, validated_chunks
from backorder.errors import InputFileError
from backorder.explain import Reason, reason_columns, reason_names, top_reasons
from backorder.io import InputTable, TableWriter, table_format
from backorder.model import classifier_of
from backorder.registry import LoadedModel

RISK_BANDS = ("low", "medium", "high")


def prediction_columns(reasons: int) -> list[str]:
    return [
        ROW_NUMBER,
        SKU,
        "backorder_probability",
        "will_backorder",
        "risk_band",
        *reason_names(reasons),
        "model_version",
    ]


def _template(reasons: int) -> pd.DataFrame:
    dtypes = {ROW_NUMBER: "int64", "backorder_probability": "float64", "will_backorder": "bool"}
    return pd.DataFrame(
        {c: pd.Series(dtype=dtypes.get(c, "string")) for c in prediction_columns(reasons)}
    )


def risk_band(probability: np.ndarray, threshold: float, watchlist_fraction: float) -> np.ndarray:
    """'high' when flagged, 'medium' from ``watchlist_fraction`` of the threshold, else 'low'."""
    return np.where(
        probability >= threshold,
        "high",
        np.where(probability >= watchlist_fraction * threshold, "medium", "low"),
    )


def score_rows(model: LoadedModel, rows: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """Probabilities, decisions, risk bands and reasons for validated rows.

    ``settings.reasons_for`` says which rows get reasons; the others carry empty reason columns.
    """
    features = model.pipeline.steps[0][1].transform(rows)
    clf = classifier_of(model.pipeline)
    probability = 1.0 / (1.0 + np.exp(-clf.log_odds(features)))
    threshold = clf.decision_threshold_
    band = risk_band(probability, threshold, settings.watchlist_fraction)
    out = pd.DataFrame(index=rows.index)
    out[ROW_NUMBER] = rows.index.to_numpy(dtype="int64")
    out[SKU] = rows[SKU].astype("string") if SKU in rows.columns else pd.NA
    out[SKU] = out[SKU].astype("string")
    out["backorder_probability"] = probability
    out["will_backorder"] = probability >= threshold
    out["risk_band"] = pd.array(band, dtype="string")
    explained = {
        "all": np.ones(len(rows), bool),
        "watchlist": band != "low",
        "none": np.zeros(len(rows), bool),
    }[settings.reasons_for]
    names = reason_names(settings.reasons_per_row)
    reasons = pd.DataFrame(
        {n: pd.array([None] * len(rows), dtype="string") for n in names}, index=rows.index
    )
    if explained.any():
        subset = features.loc[explained]
        reasons.loc[explained, names] = reason_columns(
            clf.contributions(subset, settings.reason_method), subset, settings.reasons_per_row
        ).to_numpy()
    out = pd.concat([out, reasons], axis=1)
    out["model_version"] = pd.array([model.version] * len(out), dtype="string")
    return out


@dataclass
class ExplainedScores:
    """Scores with structured reasons for every row (the API's form)."""

    probability: np.ndarray
    will_backorder: np.ndarray
    risk_band: np.ndarray
    reasons: list[list[Reason]]
    threshold: float


def score_with_reasons(
    model: LoadedModel, rows: pd.DataFrame, settings: Settings
) -> ExplainedScores:
    """Like ``score_rows`` with reasons for every row, as (feature, contribution, text)."""
    clf = classifier_of(model.pipeline)
    names = [str(n) for n in clf.feature_names_in_]
    values = (
        model.pipeline.steps[0][1].transform(rows).to_numpy(dtype="float64")
    )  # in `names` order
    matrix, baseline = clf.contribution_matrix(values, settings.reason_method)
    # Contributions add up to the log-odds, so one pass over the trees gives both.
    probability = 1.0 / (1.0 + np.exp(-(matrix.sum(axis=1) + baseline)))
    threshold = clf.decision_threshold_
    return ExplainedScores(
        probability=probability,
        will_backorder=probability >= threshold,
        risk_band=risk_band(probability, threshold, settings.watchlist_fraction),
        reasons=top_reasons(names, matrix, values, settings.reasons_per_row),
        threshold=threshold,
    )


def default_rejects_path(output: str | Path) -> Path:
    """``x.parquet`` -> ``x.rejects.parquet``, ``x.csv.gz`` -> ``x.rejects.csv.gz``."""
    out = Path(output)
    fmt = table_format(out)
    stem = out.name[: -len(".csv.gz")] if fmt == "csv.gz" else out.stem
    suffix = ".csv.gz" if fmt == "csv.gz" else out.suffix
    return out.with_name(f"{stem}.rejects{suffix}")


@dataclass
class PredictionSummary:
    input: str
    output: Path
    rejects: Path
    model_version: str
    read: int = 0
    scored: int = 0
    rejected: int = 0
    flagged: int = 0
    warnings: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        return (
            f"read {self.read:,} rows: scored {self.scored:,} ({self.flagged:,} flagged), "
            f"rejected {self.rejected:,}; model v{self.model_version}"
        )


def predict_file(
    input_uri: str | Path,
    output: str | Path,
    model: LoadedModel,
    settings: Settings,
    rejects: str | Path | None = None,
    on_chunk: ChunkProgress | None = None,
) -> PredictionSummary:
    """Score a file chunk by chunk; outputs appear atomically only if the whole run succeeds."""
    output = Path(output)
    rejects_path = Path(rejects) if rejects else default_rejects_path(output)
    table_format(output)
    table_format(rejects_path)
    table = InputTable(input_uri, block_bytes=settings.read_block_bytes)
    same = {Path(str(input_uri)).resolve()} & {output.resolve(), rejects_path.resolve()}
    if same:
        raise InputFileError(f"{output}: output would overwrite the input {input_uri}")
    summary = PredictionSummary(str(input_uri), output, rejects_path, model.version)
    reject_template = pd.DataFrame(
        {
            ROW_NUMBER: pd.Series(dtype="int64"),
            REASON: pd.Series(dtype="string"),
            **{c: pd.Series(dtype="string") for c in table.columns},
            ORIGINAL_LINE: pd.Series(dtype="string"),
        }
    )
    predictions = TableWriter(output, _template(settings.reasons_per_row))
    quarantine = TableWriter(rejects_path, reject_template)
    try:
        for chunk in validated_chunks(table, require_label=False, on_chunk=on_chunk):
            summary.read += chunk.n_read
            summary.warnings.update(chunk.warnings)
            if len(chunk.rows):
                scored = score_rows(model, chunk.rows, settings)
                predictions.write(scored)
                summary.scored += len(scored)
                summary.flagged += int(scored["will_backorder"].sum())
            if len(chunk.rejects):
                quarantine.write(chunk.rejects[list(reject_template.columns)])
                summary.rejected += len(chunk.rejects)
        if summary.read != summary.scored + summary.rejected:
            raise RuntimeError(
                f"row counts do not reconcile: read {summary.read}, scored {summary.scored}, "
                f"rejected {summary.rejected}"
            )
        predictions.commit()
        quarantine.commit()
    except BaseException:
        # abort() after a commit only removes a leftover temporary file.
        predictions.abort()
        quarantine.abort()
        raise
    return summary
