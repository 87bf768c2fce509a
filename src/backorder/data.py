"""From input files to validated rows: streaming for scoring, in memory for training."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from backorder.contract import (
    FEATURE_COLUMNS,
    LABEL,
    REASON,
    ROW_NUMBER,
    ValidatedChunk,
    broken_rows_frame,
    required_columns,
    validate_chunk,
)
from backorder.io import Source, open_input, redact

# Called with the input (an InputTable or a database table) after each chunk, for progress.
ChunkProgress = Callable[[Source], None]


@dataclass
class Chunk:
    """Validated rows and every rejected row (contract violations and broken lines)."""

    rows: pd.DataFrame
    rejects: pd.DataFrame
    n_read: int
    warnings: Counter[str]


def validated_chunks(
    table: Source, require_label: bool, on_chunk: ChunkProgress | None = None
) -> Iterator[Chunk]:
    """Validate ``table`` chunk by chunk; each chunk's rows + rejects equal the rows read."""
    table.require(required_columns(require_label))
    for raw in table.chunks():
        checked: ValidatedChunk = validate_chunk(raw.frame, require_label=require_label)
        rejects = checked.rejects
        if raw.broken:
            broken = broken_rows_frame(raw.broken, list(raw.frame.columns))
            rejects = pd.concat([rejects, broken], ignore_index=True).sort_values(
                "row_number", kind="stable", ignore_index=True
            )
        if on_chunk is not None:
            on_chunk(table)
        yield Chunk(checked.rows, rejects, raw.n_rows, checked.warnings)


def check_inputs(uris: Sequence[str | Path], require_label: bool, block_bytes: int) -> None:
    """Fail fast on whole-file problems (missing, unreadable, wrong shape) before any work."""
    for uri in uris:
        open_input(uri, block_bytes=block_bytes).require(required_columns(require_label))


@dataclass
class SourceSummary:
    uri: str
    read: int
    accepted: int
    rejected: int
    duplicates_dropped: int = 0


@dataclass
class LabelledData:
    """Validated labelled rows from one or more inputs, ready to train or evaluate on."""

    rows: pd.DataFrame
    rejects: pd.DataFrame
    sources: list[SourceSummary]
    warnings: Counter[str] = field(default_factory=Counter)

    @property
    def y(self) -> np.ndarray:
        return self.rows[LABEL].to_numpy(dtype=np.int64)

    @property
    def n_read(self) -> int:
        return sum(s.read for s in self.sources)

    def fingerprint(self) -> dict[str, object]:
        """Rows and a content hash of the validated features and labels, for lineage."""
        hashed = pd.util.hash_pandas_object(
            self.rows[[*FEATURE_COLUMNS, LABEL]], index=False
        ).to_numpy()
        return {
            "rows": len(self.rows),
            "positives": int(self.y.sum()),
            "sha256": hashlib.sha256(hashed.tobytes()).hexdigest(),
        }


def feature_hash(rows: pd.DataFrame) -> np.ndarray:
    """A stable 64-bit hash of each row's feature values (sku and label excluded)."""
    return pd.util.hash_pandas_object(rows[list(FEATURE_COLUMNS)], index=False).to_numpy()


def load_labelled(
    uris: Sequence[str | Path],
    block_bytes: int,
    on_chunk: ChunkProgress | None = None,
) -> LabelledData:
    """Read, validate and combine labelled inputs.

    A row of a later input that repeats an earlier input's row on every feature value is dropped
    (sku and label aside): the shared samples overlap, a duplicated row would count twice, and
    one copy with each label would teach nothing. Repeats within one input are distinct SKUs
    that look alike and are kept.
    """
    frames: list[pd.DataFrame] = []
    rejects: list[pd.DataFrame] = []
    sources: list[SourceSummary] = []
    warnings: Counter[str] = Counter()
    seen: set[int] = set()
    for uri in uris:
        name = redact(str(uri))  # names end up in reports and MLflow: no passwords
        table = open_input(uri, block_bytes=block_bytes)
        parts, n_read, n_rejected = [], 0, 0
        for chunk in validated_chunks(table, require_label=True, on_chunk=on_chunk):
            parts.append(chunk.rows)
            if len(chunk.rejects):
                rejects.append(chunk.rejects.assign(source=name))
            n_read += chunk.n_read
            n_rejected += len(chunk.rejects)
            warnings.update(chunk.warnings)
        rows = pd.concat(parts) if parts else pd.DataFrame(columns=[*FEATURE_COLUMNS, LABEL])
        keys = feature_hash(rows)
        repeated = (
            np.isin(keys, np.fromiter(seen, dtype=np.uint64)) if seen else np.zeros(len(rows), bool)
        )
        seen.update(keys.tolist())
        rows = rows.loc[~repeated].assign(source=name)
        frames.append(rows)
        sources.append(SourceSummary(name, n_read, len(rows), n_rejected, int(repeated.sum())))
    combined = pd.concat(frames, ignore_index=False)
    if "sku" in combined.columns:
        combined["sku"] = combined["sku"].astype("string")
    all_rejects = (
        pd.concat(rejects, ignore_index=True)
        if rejects
        else pd.DataFrame(
            {
                ROW_NUMBER: pd.Series(dtype="int64"),
                REASON: pd.Series(dtype="string"),
                "source": pd.Series(dtype="string"),
            }
        )
    )
    return LabelledData(combined, all_rejects, sources, warnings)


def load_rows(uri: str | Path, block_bytes: int) -> tuple[pd.DataFrame, int, int]:
    """All valid rows of one input (label optional), with the counts read and rejected."""
    table = open_input(uri, block_bytes=block_bytes)
    parts, n_read, n_rejected = [], 0, 0
    for chunk in validated_chunks(table, require_label=False):
        parts.append(chunk.rows)
        n_read += chunk.n_read
        n_rejected += len(chunk.rejects)
    rows = pd.concat(parts) if parts else pd.DataFrame(columns=list(FEATURE_COLUMNS))
    return rows, n_read, n_rejected
