"""The data contract: which columns an inventory snapshot has, what each may hold, and how a
chunk of raw rows becomes typed, validated rows plus rejected rows with reasons.

Parsing (text to numbers and flags) is vectorised pandas; the domain rules (ranges, finiteness,
required values) are a pandera schema, validated lazily so that every violation is reported.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors

from backorder.errors import InputFileError

SKU = "sku"
LABEL = "went_on_backorder"
ROW_NUMBER = "row_number"
REASON = "reason"
ORIGINAL_LINE = "original_line"

PERF_SENTINEL = -99.0


@dataclass(frozen=True)
class ColumnSpec:
    """One column of the contract. ``minimum``/``maximum`` are inclusive; None means unbounded."""

    name: str
    kind: str  # "id", "number", "flag" or "label"
    meaning: str
    unit: str = ""
    minimum: float | None = None
    maximum: float | None = None
    may_be_empty: bool = False
    note: str = ""


_QTY = "units"
COLUMNS: tuple[ColumnSpec, ...] = (
    ColumnSpec(
        SKU,
        "id",
        "Stock-keeping unit identifier",
        may_be_empty=True,
        note="Optional; carried through to predictions.",
    ),
    ColumnSpec(
        "national_inv",
        "number",
        "Stock on hand across the network",
        _QTY,
        note="Negative means units already owed to customers.",
    ),
    ColumnSpec(
        "lead_time",
        "number",
        "Supplier lead time",
        "weeks",
        minimum=0,
        may_be_empty=True,
        note="Empty means unknown; such rows are scored.",
    ),
    ColumnSpec("in_transit_qty", "number", "Units ordered and on their way", _QTY),
    ColumnSpec("forecast_3_month", "number", "Forecast demand, next 3 months", _QTY),
    ColumnSpec("forecast_6_month", "number", "Forecast demand, next 6 months", _QTY),
    ColumnSpec("forecast_9_month", "number", "Forecast demand, next 9 months", _QTY),
    ColumnSpec("sales_1_month", "number", "Units sold, last month", _QTY),
    ColumnSpec("sales_3_month", "number", "Units sold, last 3 months", _QTY),
    ColumnSpec("sales_6_month", "number", "Units sold, last 6 months", _QTY),
    ColumnSpec("sales_9_month", "number", "Units sold, last 9 months", _QTY),
    ColumnSpec("min_bank", "number", "Minimum recommended stock", _QTY),
    ColumnSpec("pieces_past_due", "number", "Units overdue from the supplier", _QTY),
    ColumnSpec(
        "perf_6_month_avg",
        "number",
        "Supplier on-time performance, last 6 months",
        "share",
        minimum=0,
        maximum=1,
        may_be_empty=True,
        note="-99 (or empty) means no history; scored.",
    ),
    ColumnSpec(
        "perf_12_month_avg",
        "number",
        "Supplier on-time performance, last 12 months",
        "share",
        minimum=0,
        maximum=1,
        may_be_empty=True,
        note="-99 (or empty) means no history; scored.",
    ),
    ColumnSpec("local_bo_qty", "number", "Units already on backorder locally", _QTY),
    ColumnSpec("potential_issue", "flag", "Supplier issue identified"),
    ColumnSpec("deck_risk", "flag", "Part risk flag: deck"),
    ColumnSpec("oe_constraint", "flag", "Part risk flag: original-equipment constraint"),
    ColumnSpec("ppap_risk", "flag", "Part risk flag: production part approval"),
    ColumnSpec("stop_auto_buy", "flag", "Automatic re-ordering stopped"),
    ColumnSpec("rev_stop", "flag", "Part risk flag: revision stop"),
    ColumnSpec(
        LABEL,
        "label",
        "Went on backorder (the outcome to predict)",
        note="Required to train or evaluate; ignored when scoring.",
    ),
)

SPECS = {c.name: c for c in COLUMNS}
NUMERIC_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.kind == "number")
FLAG_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.kind == "flag")
FEATURE_COLUMNS: tuple[str, ...] = NUMERIC_COLUMNS + FLAG_COLUMNS
PERF_COLUMNS: tuple[str, ...] = ("perf_6_month_avg", "perf_12_month_avg")


def required_columns(require_label: bool) -> list[str]:
    """Columns a file must have: the 21 features, plus the label to train or evaluate."""
    return list(FEATURE_COLUMNS) + ([LABEL] if require_label else [])


# -- naming the columns of an input ----------------------------------------------------------------
def _canonical(name: str) -> str:
    return name.replace("\ufeff", "").strip().strip('"').strip().lower()


def contract_columns(name: str, raw_columns: list[str], subject: str, hint: str = "") -> list[str]:
    """An input's column names with the contract's columns in canonical form (case, spaces,
    BOM and quotes dropped), others as given; fails fast, naming the input, when a contract
    column appears twice or none of them does. ``subject`` and ``hint`` word the second error
    for the kind of input ("the header has" ... "; is it a CSV ...?")."""
    canonical = [_canonical(c) for c in raw_columns]
    seen: set[str] = set()
    for column in canonical:
        if column in SPECS and column in seen:
            raise InputFileError(f"{name}: column '{column}' appears more than once")
        seen.add(column)
    if not any(column in FEATURE_COLUMNS for column in canonical):
        raise InputFileError(
            f"{name}: {subject} none of the expected columns (national_inv, lead_time, ...){hint}"
        )
    return [can if can in SPECS else raw for raw, can in zip(raw_columns, canonical, strict=True)]


def require_columns(
    name: str, columns: list[str], required: tuple[str, ...] | list[str], hint_if_many: str = ""
) -> None:
    """Fail fast, naming the input, when required contract columns are absent."""
    missing = [c for c in required if c not in columns]
    if missing:
        raise InputFileError(
            f"{name}: missing required column(s) {', '.join(missing)}"
            + (hint_if_many if len(missing) > 3 else "")
        )


# Quantities expected to be >= 0. A negative one is scored as given but counted as a warning:
# rejecting it would lose rows the model can still score.
NON_NEGATIVE_QUANTITIES: tuple[str, ...] = tuple(
    c.name for c in COLUMNS if c.kind == "number" and c.unit == _QTY and c.name != "national_inv"
)

TRUE_TOKENS = frozenset({"yes", "y", "true", "t", "1", "1.0"})
FALSE_TOKENS = frozenset({"no", "n", "false", "f", "0", "0.0"})
NULL_TOKENS = frozenset({"", "na", "nan", "null", "none", "n/a"})
FOOTER_PATTERN = re.compile(r"^\(\s*\d+\s+rows?\s*\)$")
FOOTER_REASON = "row-count footer such as '(N rows)', not a data row"


def _finite(series: pd.Series) -> pd.Series:
    return pd.Series(~np.isinf(series.to_numpy(dtype="float64")), index=series.index)


def _perf_in_range(series: pd.Series) -> pd.Series:
    return series.between(0.0, 1.0)


def _schema(require_label: bool) -> pa.DataFrameSchema:
    """Domain rules on parsed values. Empty cells that the contract allows are NaN here."""
    columns: dict[str, pa.Column] = {}
    for name in NUMERIC_COLUMNS:
        spec = SPECS[name]
        checks = [pa.Check(_finite, name="finite", error="infinite value")]
        if name in PERF_COLUMNS:
            checks.append(
                pa.Check(
                    _perf_in_range,
                    name="share",
                    error="outside [0, 1] and not the -99 'no history' sentinel",
                )
            )
        elif spec.minimum is not None:
            checks.append(pa.Check.ge(spec.minimum, error=f"below the minimum {spec.minimum:g}"))
        columns[name] = pa.Column("float64", checks=checks, nullable=spec.may_be_empty)
    for name in FLAG_COLUMNS:
        columns[name] = pa.Column("float64", nullable=False)
    if require_label:
        columns[LABEL] = pa.Column("float64", nullable=False)
    return pa.DataFrameSchema(columns, strict=False, coerce=False)


_SCHEMAS = {True: _schema(True), False: _schema(False)}


@dataclass
class BrokenRow:
    """A line that could not be split into the header's fields."""

    row_number: int
    reason: str
    text: str


@dataclass
class RawChunk:
    """Rows as read: contract columns renamed to their canonical names, values as in the file.

    The index is the 1-based data row number (row 1 is the line after the header).
    """

    frame: pd.DataFrame
    broken: list[BrokenRow] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return len(self.frame) + len(self.broken)


@dataclass
class ValidatedChunk:
    """Typed rows that passed the contract, and rejected rows with their reasons.

    ``rows`` has the 21 features as float64 (flags 0/1, perf sentinel as NaN), ``sku`` as string
    when present and the label as 0/1 when present; its index is the 1-based data row number.
    """

    rows: pd.DataFrame
    rejects: pd.DataFrame
    warnings: Counter[str] = field(default_factory=Counter)


def _as_text(series: pd.Series) -> pd.Series:
    return series.astype("string").str.strip()


def _parse_numeric(series: pd.Series) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Return (values, empty mask, unparseable mask) for one raw column."""
    if pd.api.types.is_bool_dtype(series.dtype):
        values = series.astype("float64")
        empty = pd.Series(False, index=series.index)
        return values, empty, empty
    if pd.api.types.is_numeric_dtype(series.dtype):
        values = series.astype("float64")
        empty = values.isna()
        return values, empty, pd.Series(False, index=series.index)
    text = _as_text(series)
    empty = text.isna() | text.str.lower().isin(NULL_TOKENS)
    values = pd.to_numeric(text.where(~empty), errors="coerce").astype("float64")
    unparseable = values.isna() & ~empty
    return values, empty.astype(bool), unparseable.astype(bool)


def _parse_flag(series: pd.Series) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Return (0/1 values, empty mask, unknown-token mask) for one Yes/No column."""
    if pd.api.types.is_bool_dtype(series.dtype) or pd.api.types.is_numeric_dtype(series.dtype):
        series = series.astype("string")
    token = _as_text(series).str.lower()
    empty = (token.isna() | token.isin(NULL_TOKENS)).astype(bool)
    values = pd.Series(np.nan, index=series.index, dtype="float64")
    values[token.isin(TRUE_TOKENS).fillna(False).astype(bool)] = 1.0
    values[token.isin(FALSE_TOKENS).fillna(False).astype(bool)] = 0.0
    unknown = values.isna() & ~empty
    return values, empty, unknown.astype(bool)


def _fmt(value: object) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


# Row number -> why the row is rejected, in the order the checks found it.
Reasons = dict[int, list[str]]


def validate_chunk(raw: pd.DataFrame, require_label: bool) -> ValidatedChunk:
    """Parse and validate raw rows against the contract.

    ``raw`` holds one input chunk with contract column names (other columns are ignored) and the
    1-based data row numbers as its index. Every row ends up in exactly one of the outputs.
    """
    typed, unparseable = _parse(raw, require_label)
    footer = _footer_rows(raw, typed)
    reasons: Reasons = {}
    _reject_unparseable(raw, unparseable, footer, reasons)
    _reject_rule_violations(typed, require_label, unparseable, footer, reasons)
    _reject_footers_and_empty_lines(typed, footer, reasons)
    rows = _accepted_rows(raw, typed, raw.index.isin(list(reasons)), require_label)
    return ValidatedChunk(
        rows=rows, rejects=reject_frame(raw, reasons), warnings=_negative_quantities(rows)
    )


def _parse(raw: pd.DataFrame, require_label: bool) -> tuple[pd.DataFrame, dict[str, pd.Series]]:
    """Typed values (NaN where empty or unparseable) and, per column, the unparseable cells."""
    typed = pd.DataFrame(index=raw.index)
    unparseable: dict[str, pd.Series] = {}
    for name in NUMERIC_COLUMNS:
        values, _, bad = _parse_numeric(raw[name])
        if name in PERF_COLUMNS:
            values = values.mask(values == PERF_SENTINEL)
        typed[name] = values
        unparseable[name] = bad
    for name in FLAG_COLUMNS:
        values, _, bad = _parse_flag(raw[name])
        typed[name] = values
        unparseable[name] = bad
    if LABEL in raw.columns:
        values, _, bad = _parse_flag(raw[LABEL])
        typed[LABEL] = values
        if require_label:
            unparseable[LABEL] = bad
    return typed, unparseable


def _footer_rows(raw: pd.DataFrame, typed: pd.DataFrame) -> pd.Series:
    """Rows that are a "(N rows)" footer some exports append."""
    # A footer has no stock figure, so only rows without one are searched for "(N rows)".
    footer = pd.Series(False, index=raw.index)
    candidates = typed["national_inv"].isna().to_numpy()
    if candidates.any():
        for column in raw.columns:
            if not pd.api.types.is_numeric_dtype(raw[column].dtype):
                text = _as_text(raw[column][candidates])
                found = text.str.fullmatch(FOOTER_PATTERN.pattern).fillna(False).astype(bool)
                footer[found.index[found.to_numpy()]] = True
    return footer


def _reject_unparseable(
    raw: pd.DataFrame, unparseable: dict[str, pd.Series], footer: pd.Series, reasons: Reasons
) -> None:
    """A reason, quoting the cell, for every cell that is not a number or a known flag."""
    row_ids = raw.index.to_numpy()
    for name, bad in unparseable.items():
        if name in NUMERIC_COLUMNS:
            template = "not a number: '{value}'"
        elif name == LABEL:
            template = "unknown label '{value}' (expected Yes/No or 1/0)"
        else:
            template = "unknown flag value '{value}' (expected Yes or No)"
        hit = np.flatnonzero((bad & ~footer).to_numpy(dtype=bool))
        for row, value in zip(row_ids[hit], raw[name].to_numpy()[hit], strict=True):
            reasons.setdefault(int(row), []).append(
                f"{name}: " + template.format(value=_fmt(value))
            )


def _reject_rule_violations(
    typed: pd.DataFrame,
    require_label: bool,
    unparseable: dict[str, pd.Series],
    footer: pd.Series,
    reasons: Reasons,
) -> None:
    """A reason for every domain rule a parsed value breaks (range, finiteness, required)."""
    row_ids = typed.index.to_numpy()
    # An unparseable cell is NaN here too: it has its reason already, not also "missing value".
    skipped = {
        (col, int(row)) for col, bad in unparseable.items() for row in row_ids[bad.to_numpy()]
    }
    try:
        _SCHEMAS[require_label].validate(typed, lazy=True)
    except SchemaErrors as exc:
        cases = exc.failure_cases
        whole_column = cases[cases["index"].isna()]
        if len(whole_column):  # a check that failed to run is a bug, never a row problem
            first = whole_column.iloc[0]
            raise RuntimeError(
                f"contract check {first['check']} on {first['column']} failed: "
                f"{first['failure_case']}"
            ) from None
        for raw_row, column, check, value in zip(
            cases["index"], cases["column"], cases["check"], cases["failure_case"], strict=True
        ):
            row = int(raw_row)
            if (column, row) in skipped or footer.loc[row]:
                continue
            message = "missing value" if check == "not_nullable" else f"{check} (got {_fmt(value)})"
            reasons.setdefault(row, []).append(f"{column}: {message}")


def _reject_footers_and_empty_lines(
    typed: pd.DataFrame, footer: pd.Series, reasons: Reasons
) -> None:
    """Footers and empty lines get one reason of their own instead of a reason per column."""
    index = typed.index
    for row in index[footer.to_numpy()]:
        reasons[int(row)] = [FOOTER_REASON]
    blank = typed[list(FEATURE_COLUMNS)].isna().all(axis=1).to_numpy()
    for row in index[blank & ~footer.to_numpy()]:
        reasons[int(row)] = ["empty line: no values in any column"]


def _accepted_rows(
    raw: pd.DataFrame, typed: pd.DataFrame, rejected: np.ndarray, require_label: bool
) -> pd.DataFrame:
    """The typed rows not rejected, with ``sku`` as text first and the label only if required."""
    rows = typed.loc[~rejected]
    if LABEL in raw.columns and not require_label:
        rows = rows.drop(columns=[LABEL])
    if SKU in raw.columns:
        sku = raw.loc[~rejected, SKU]
        if pd.api.types.is_float_dtype(sku.dtype):  # integer ids read from Parquet with nulls
            sku = sku.astype("Int64")
        rows.insert(0, SKU, sku.astype("string"))
    return rows


def _negative_quantities(rows: pd.DataFrame) -> Counter[str]:
    """Warnings for quantities below zero, which are scored as given."""
    warnings: Counter[str] = Counter()
    for name in NON_NEGATIVE_QUANTITIES:
        count = int((rows[name] < 0).sum())
        if count:
            warnings[f"{name} negative (scored as given)"] += count
    return warnings


def reject_frame(raw: pd.DataFrame, reasons: dict[int, list[str]]) -> pd.DataFrame:
    """Rejected rows: row number, all reasons, and the original fields as text."""
    rows = sorted(reasons)
    original = raw.loc[rows].astype("string") if rows else raw.iloc[:0].astype("string")
    frame = pd.DataFrame(
        {
            ROW_NUMBER: pd.array(rows, dtype="int64"),
            REASON: pd.array(["; ".join(reasons[r]) for r in rows], dtype="string"),
        }
    )
    for column in raw.columns:
        frame[column] = original[column].to_numpy()
        frame[column] = frame[column].astype("string")
    frame[ORIGINAL_LINE] = pd.array([None] * len(rows), dtype="string")
    return frame


def broken_rows_frame(broken: list[BrokenRow], columns: list[str]) -> pd.DataFrame:
    """Rejects-file rows for lines that could not be split into fields."""
    frame = pd.DataFrame(
        {
            ROW_NUMBER: pd.array([b.row_number for b in broken], dtype="int64"),
            REASON: pd.array([b.reason for b in broken], dtype="string"),
        }
    )
    for column in columns:
        frame[column] = pd.array([None] * len(broken), dtype="string")
    frame[ORIGINAL_LINE] = pd.array([b.text for b in broken], dtype="string")
    return frame


def contract_markdown() -> str:
    """The contract as a Markdown table, for the docs site's hook and ``backorder contract``."""
    lines = [
        "| column | type | meaning | unit | allowed values | empty allowed | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in COLUMNS:
        if c.kind == "flag":
            allowed = "Yes / No (also Y/N, True/False, 1/0; any case)"
        elif c.kind == "label":
            allowed = "Yes / No or 1 / 0"
        elif c.kind == "id":
            allowed = "any text"
        elif c.minimum is not None and c.maximum is not None:
            allowed = f"finite number in [{c.minimum:g}, {c.maximum:g}]"
        elif c.minimum is not None:
            allowed = f"finite number >= {c.minimum:g}"
        else:
            allowed = "finite number" + (
                " (expected >= 0)" if c.name in NON_NEGATIVE_QUANTITIES else ""
            )
        empty = "yes" if c.may_be_empty else "no"
        kind = "text" if c.kind == "id" else ("Yes/No" if c.kind in ("flag", "label") else "number")
        lines.append(
            f"| `{c.name}` | {kind} | {c.meaning} | {c.unit} | {allowed} | {empty} | {c.note} |"
        )
    return "\n".join(lines) + "\n"
