"""Batch scoring: every input row is either scored or quarantined with a reason, never lost.

``decide`` is the one scoring core: probability, decision and risk band. ``score_rows`` shapes
it as the prediction table (batch files, locally or on Dask), ``score_with_reasons`` as the web
app's structured reasons, so a model is scored and worded the same way everywhere.
"""

from __future__ import annotations

import secrets
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from backorder.config import Settings
from backorder.contract import ORIGINAL_LINE, REASON, ROW_NUMBER, SKU
from backorder.data import ChunkProgress, validated_chunks
from backorder.errors import InputFileError
from backorder.explain import Reason, reason_columns, reason_names, top_reasons
from backorder.io import (
    BackgroundSink,
    Source,
    is_database,
    is_remote,
    open_input,
    open_output,
    prefetch,
    redact,
    split_table,
    table_format,
    table_suffix,
)
from backorder.model import LoadedModel, Scorer

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


@dataclass
class Decisions:
    """A model's verdict on some rows: probability, flag and risk band, one per row."""

    probability: np.ndarray
    will_backorder: np.ndarray
    risk_band: np.ndarray
    threshold: float


def decide(model: Scorer, features: pd.DataFrame | np.ndarray, settings: Settings) -> Decisions:
    """Probability (compiled trees when loaded so), decision and risk band for rows of features."""
    probability = model.probability_of_features(features)
    threshold = model.threshold
    return Decisions(
        probability=probability,
        will_backorder=probability >= threshold,
        risk_band=risk_band(probability, threshold, settings.watchlist_fraction),
        threshold=threshold,
    )


def score_rows(model: LoadedModel, rows: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """Probabilities, decisions, risk bands and reasons for validated rows.

    ``settings.reasons_for`` says which rows get reasons; the others carry empty reason columns.
    """
    features = model.features(rows)
    decided = decide(model, features, settings)
    band = decided.risk_band
    out = pd.DataFrame(index=rows.index)
    out[ROW_NUMBER] = rows.index.to_numpy(dtype="int64")
    out[SKU] = rows[SKU].astype("string") if SKU in rows.columns else pd.NA
    out[SKU] = out[SKU].astype("string")
    out["backorder_probability"] = decided.probability
    out["will_backorder"] = decided.will_backorder
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
            model.contributions(subset, settings.reason_method), subset, settings.reasons_per_row
        ).to_numpy()
    out = pd.concat([out, reasons], axis=1)
    out["model_version"] = pd.array([model.version] * len(out), dtype="string")
    return out


@dataclass
class ExplainedScores(Decisions):
    """Scores with structured reasons for every row (the API's form)."""

    reasons: list[list[Reason]] = field(default_factory=list)


def score_with_reasons(
    model: LoadedModel, rows: pd.DataFrame, settings: Settings
) -> ExplainedScores:
    """Like ``score_rows`` with reasons for every row, as (feature, contribution, text)."""
    names = model.feature_names
    values = model.features(rows).to_numpy(dtype="float64")  # in `names` order
    matrix, _ = model.contribution_matrix(values, settings.reason_method)
    # The contributions add up to the log-odds too, but the probability comes from the same
    # scorer as batch scoring (compiled trees when available), so both report the same number.
    decided = decide(model, values, settings)
    return ExplainedScores(
        **vars(decided), reasons=top_reasons(names, matrix, values, settings.reasons_per_row)
    )


def default_rejects_path(output: str | Path) -> str:
    """``x.parquet`` -> ``x.rejects.parquet``, ``x.csv.gz`` -> ``x.rejects.csv.gz``;
    a table ``URI#predictions`` -> ``URI#predictions_rejects``."""
    text = str(output)
    if is_database(text):
        base, table = split_table(text)
        return f"{base}#{table}_rejects"
    table_format(text)  # fails, naming the output, unless it is a table file
    head, _, name = text.rpartition("/")
    suffix = table_suffix(name) or ""
    stem = name[: len(name) - len(suffix)]
    return f"{head}/{stem}.rejects{suffix}" if head else f"{stem}.rejects{suffix}"


def new_batch_id(now: datetime | None = None) -> str:
    """A new batch id: the time in ISO-8601 basic format, UTC, then its microseconds and a
    random tag (``20261128T172342Z_048213-9f3ac1``). Ids sort by time as plain strings, and two
    runs in the same second (or microsecond) never share one: a shared id would make one run's
    output replace the other's."""
    moment = now or datetime.now(UTC)
    return f"{moment:%Y%m%dT%H%M%SZ}_{moment:%f}-{secrets.token_hex(3)}"


@dataclass
class PredictionSummary:
    input: str
    output: str
    rejects: str
    model_version: str
    batch_id: str
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

    def counts(self) -> dict[str, int]:
        return {
            "read": self.read,
            "scored": self.scored,
            "rejected": self.rejected,
            "flagged": self.flagged,
        }


def _check_output(uri: str) -> None:
    if is_database(uri):
        split_table(uri)
    else:
        table_format(uri)


def predict_file(  # noqa: PLR0913 -- one run's input, outputs, model and options; the options keyword-only
    source: str | Path | Source,
    output: str | Path,
    model: LoadedModel,
    settings: Settings,
    *,
    rejects: str | Path | None = None,
    on_chunk: ChunkProgress | None = None,
    batch_id: str | None = None,
) -> PredictionSummary:
    """Score an input chunk by chunk into predictions and rejects (files, objects or tables).

    Outputs appear only if the whole run succeeds: files are renamed into place, objects are
    uploaded whole, a table's batch is replaced in one transaction. ``source`` is a path, URL
    or ``URI#TABLE``, or an input ``open_input`` opened already (the CLI checks it before the
    slow model load, and it is not opened twice).
    """
    output_uri = str(output)
    rejects_uri = str(rejects) if rejects else default_rejects_path(output_uri)
    _check_output(output_uri)
    _check_output(rejects_uri)
    batch_id = batch_id or new_batch_id()
    table = (
        open_input(source, block_bytes=settings.read_block_bytes)
        if isinstance(source, str | Path)
        else source
    )
    local = [u for u in (output_uri, rejects_uri) if not is_remote(u) and not is_database(u)]
    input_is_local = not is_remote(table.uri) and not is_database(table.uri)
    if input_is_local and Path(table.uri).resolve() in {Path(u).resolve() for u in local}:
        raise InputFileError(f"{output_uri}: output would overwrite the input {table.uri}")
    summary = PredictionSummary(
        redact(table.uri),
        redact(output_uri),
        redact(rejects_uri),
        model.version,
        batch_id,
    )
    reject_template = pd.DataFrame(
        {
            ROW_NUMBER: pd.Series(dtype="int64"),
            REASON: pd.Series(dtype="string"),
            **{c: pd.Series(dtype="string") for c in table.columns},
            ORIGINAL_LINE: pd.Series(dtype="string"),
        }
    )
    predictions = BackgroundSink(
        open_output(output_uri, _template(settings.reasons_per_row), batch_id)
    )
    try:
        quarantine = open_output(rejects_uri, reject_template, batch_id, rejects=True)
    except BaseException:
        predictions.abort()
        raise
    try:
        # Reading and validating the next chunk, and writing the last, overlap scoring this one.
        chunks = prefetch(validated_chunks(table, require_label=False, on_chunk=on_chunk))
        for chunk in chunks:
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
        # Rejects first: a consumer that sees the predictions can rely on the rejects being there.
        quarantine.commit()
        try:
            predictions.commit()
        except BaseException:
            quarantine.discard()  # all or nothing: no rejects without their predictions
            raise
    except BaseException:
        # abort() after a commit only removes a leftover temporary file.
        predictions.abort()
        quarantine.abort()
        raise
    return summary
