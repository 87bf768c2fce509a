"""The API's request and response models, generated from the data contract.

A record is checked by pydantic against the same ``ColumnSpec`` rules the batch path checks with
pandera (required values, minimums, the supplier-performance share or its -99 sentinel, finite
numbers, Yes/No flags), because one pandera pass costs ~10 ms, the whole latency budget of a
single-SKU request. ``tests/test_api.py`` checks that both paths accept and reject the same rows
and produce the same typed values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    create_model,
    field_validator,
)

from backorder.contract import (
    COLUMNS,
    FEATURE_COLUMNS,
    FLAG_COLUMNS,
    PERF_COLUMNS,
    PERF_SENTINEL,
    SKU,
    ColumnSpec,
)

MAX_RECORDS = 1000
Flag = Literal["Yes", "No"]


def _describe(spec: ColumnSpec) -> str:
    unit = f" ({spec.unit})" if spec.unit else ""
    note = f" {spec.note}" if spec.note else ""
    return f"{spec.meaning}{unit}.{note}"


def _field(spec: ColumnSpec) -> tuple[Any, Any]:
    if spec.kind == "flag":
        return Flag, Field(description=_describe(spec))
    # The performance shares' range has a sentinel, so a validator checks them instead.
    minimum = None if spec.name in PERF_COLUMNS else spec.minimum
    if spec.may_be_empty:
        return float | None, Field(None, description=_describe(spec), ge=minimum)
    return float, Field(..., description=_describe(spec), ge=minimum)


def _perf_share(value: float | None) -> float | None:
    if value is None or value == PERF_SENTINEL or 0.0 <= value <= 1.0:
        return value
    raise ValueError("outside [0, 1] and not the -99 'no history' sentinel")


def _sku_text(value: Any) -> Any:
    """A numeric SKU as text: pandas' ``to_json`` writes Kaggle-style SKUs (3285000) as numbers,
    and the batch path reads them as text. Booleans, fractions and the rest stay refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value


_SKU_SCHEMA = {
    "anyOf": [{"type": "string", "maxLength": 100}, {"type": "integer"}, {"type": "null"}],
    "default": None,
    "description": "SKU identifier (optional); a whole number is read as its digits.",
    "title": "Sku",
}
_fields: dict[str, Any] = {
    SKU: (
        Annotated[str | None, BeforeValidator(_sku_text), WithJsonSchema(_SKU_SCHEMA)],
        Field(None, max_length=100),
    )
}
_fields.update({spec.name: _field(spec) for spec in COLUMNS if spec.name in FEATURE_COLUMNS})

SkuRecord: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "SkuRecord",
    __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
    __validators__={
        "perf_share": field_validator(*PERF_COLUMNS)(_perf_share),
    },
    **_fields,
)


_FLAGS = frozenset(FLAG_COLUMNS)
_SENTINEL = dict.fromkeys(PERF_COLUMNS, PERF_SENTINEL)


def records_frame(records: Sequence[BaseModel]) -> pd.DataFrame:
    """Validated records as the typed rows the batch path produces (index 1..n, flags 0/1,
    the -99 performance sentinel as missing). Built with numpy: pandas' per-column parsing costs
    ~4 ms for one record, half the API's latency budget."""
    values = np.empty((len(records), len(FEATURE_COLUMNS)), dtype="float64")
    skus = []
    for i, record in enumerate(records):
        fields = vars(record)
        skus.append(fields.get(SKU))
        for j, name in enumerate(FEATURE_COLUMNS):
            value = fields[name]
            if name in _FLAGS:
                values[i, j] = 1.0 if value == "Yes" else 0.0
            else:
                values[i, j] = np.nan if value is None or value == _SENTINEL.get(name) else value
    typed = pd.DataFrame(
        values, index=pd.RangeIndex(1, len(records) + 1), columns=list(FEATURE_COLUMNS)
    )
    typed[SKU] = pd.array(skus, dtype="string")
    return typed


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    records: list[SkuRecord] = Field(  # type: ignore[valid-type]
        ..., min_length=1, max_length=MAX_RECORDS, description="1 to 1000 SKU snapshots."
    )


class ReasonOut(BaseModel):
    feature: str
    contribution: float = Field(description="Share of the calibrated log-odds (+ raises risk).")
    text: str


class PredictionOut(BaseModel):
    sku: str | None
    backorder_probability: float
    will_backorder: bool
    risk_band: Literal["low", "medium", "high"]
    reasons: list[ReasonOut]


class PredictResponse(BaseModel):
    model_version: str
    threshold: float
    predictions: list[PredictionOut]


class FieldProblem(BaseModel):
    loc: list[str | int] = Field(description='Where: e.g. ["body", "records", 3, "lead_time"].')
    msg: str
    type: str


class InvalidRequest(BaseModel):
    """422: what is wrong with the request, field by field."""

    detail: list[FieldProblem]


class Problem(BaseModel):
    """An error with a one-line reason (413, 429, 503, ...)."""

    detail: str


class ModelInfo(BaseModel):
    name: str
    version: str
    aliases: list[str]
    trained_at: str | None
    threshold: float
    training_base_rate: float
    scoring_base_rate: float | None
    features: list[str]
    scoring_engine: str = Field(
        description="'compiled' (lleaves) or 'lightgbm' (fallback); same probabilities"
    )
    validation: dict[str, Any] | None
    holdout: dict[str, Any] | None
