"""The landing layout under one root (folder or S3 prefix): the pipelines' data catalog.

::

    ROOT/labelled/<batch id>.csv.gz      labelled history, dropped here as it arrives
    ROOT/unscored/<batch id>.parquet     batches waiting to be scored
    ROOT/predictions/<batch id>.parquet  one file per scored batch
    ROOT/rejects/<batch id>.parquet      the rows that could not be scored, with reasons
    ROOT/reports/<batch id>/...          drift reports; reports/training/<run id>/ for training
    ROOT/manifest/<job>/<batch id>.json  what was done to each batch, when, by which model
    ROOT/metrics/<job>.prom              the last run's figures, for Prometheus

A batch id is the batch's time in ISO-8601 basic format, UTC (``20261128T172342Z``), optionally
followed by ``_label``; ids sort by time as plain strings. Each manifest record is one JSON
object written whole (rename, or one S3 PUT), so concurrent runs on different batches never
overwrite each other's records, and a record exists only for work that completed.

The steps that read and write it are ``backorder.pipelines``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import fsspec.core
import pandas as pd

from backorder.errors import InputFileError
from backorder.io import TABLE_SUFFIXES, copy_atomic, table_suffix, write_json_atomic
from backorder.predict import new_batch_id
from backorder.uris import redact, redact_fields, redact_text

LABELLED, UNSCORED, PREDICTIONS, REJECTS, REPORTS, MANIFEST, METRICS = (
    "labelled",
    "unscored",
    "predictions",
    "rejects",
    "reports",
    "manifest",
    "metrics",
)
SCORING, TRAINING = "scoring", "training"
BATCH_ID = re.compile(r"^(?P<time>\d{8}T\d{6}Z)(?:_[A-Za-z0-9.-]+)?$")


def batch_id_of(name: str) -> str | None:
    """The batch id in a landed file's name, or None when the name is not one."""
    for suffix in TABLE_SUFFIXES:  # in lower case, as ``land`` writes them
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            return stem if BATCH_ID.match(stem) else None
    return None


def batch_time(batch_id: str) -> datetime:
    match = BATCH_ID.match(batch_id)
    if not match:
        raise InputFileError(f"'{batch_id}' is not a batch id (expected like 20261128T172342Z)")
    return datetime.strptime(match["time"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


@dataclass
class Landing:
    """The landing layout under ``root`` (a local folder or an fsspec URL)."""

    root: str

    def __post_init__(self) -> None:
        self.root = str(self.root).rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.root)

    def uri(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def shown(self, *parts: str) -> str:
        """``uri(*parts)`` as messages, logs and the manifest show it: without a password."""
        return redact(self.uri(*parts))

    def _listing(self, folder: str) -> list[str]:
        path = f"{self.base}/{folder}"
        try:
            return sorted(Path(p).name for p in self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []
        except Exception as exc:
            reason = redact_text(str(exc), self.root)
            raise InputFileError(f"{self.shown(folder)}: cannot be listed ({reason})") from None

    def batches(self, kind: str) -> dict[str, str]:
        """Batch id -> URI of each landed file of ``kind``, oldest first.

        Hidden and temporary files are ignored; so are names that are not batch ids, which a
        person should rename, so they are returned by ``strays``.
        """
        found: dict[str, str] = {}
        for name in self._listing(kind):
            batch = batch_id_of(name)
            if batch is not None and not name.startswith("."):
                if batch in found:
                    raise InputFileError(
                        f"{self.shown(kind)}: batch {batch} landed twice ({name} and "
                        f"{Path(found[batch]).name}); remove one"
                    )
                found[batch] = self.uri(kind, name)
        return dict(sorted(found.items()))

    def strays(self, kind: str) -> list[str]:
        return [n for n in self._listing(kind) if not n.startswith(".") and batch_id_of(n) is None]

    def land(self, source: str | Path, kind: str, batch_id: str | None = None) -> str:
        """Copy a file into ``kind``/ under a batch id (default: now); return its URI."""
        batch_id = batch_id or new_batch_id()
        batch_time(batch_id)
        name = Path(str(source)).name.lower()
        suffix = table_suffix(name)
        if suffix is None:
            raise InputFileError(f"{redact(str(source))}: land CSV, CSV.gz or Parquet files")
        existing = self.batches(kind).get(batch_id)
        if existing is not None:
            raise InputFileError(f"{redact(existing)}: batch {batch_id} has landed already")
        target = self.uri(kind, batch_id + suffix)
        copy_atomic(source, target)
        return target

    # -- the manifest --------------------------------------------------------------------------
    def record(self, job: str, batch_id: str, record: dict[str, Any]) -> str:
        uri = self.uri(MANIFEST, job, f"{batch_id}.json")
        # The manifest is for people and dashboards: URIs in it keep no password.
        write_json_atomic(uri, redact_fields({"batch_id": batch_id, "job": job, **record}))
        return uri

    def records(self, job: str) -> dict[str, dict[str, Any]]:
        out = {}
        for name in self._listing(f"{MANIFEST}/{job}"):
            if name.endswith(".json") and not name.startswith("."):
                with self.fs.open(f"{self.base}/{MANIFEST}/{job}/{name}", "rb") as handle:
                    out[name[: -len(".json")]] = json.loads(handle.read())
        return dict(sorted(out.items()))


# -- what waits, and where -------------------------------------------------------------------------
def pending_scoring(root: str) -> list[str]:
    """Unscored batches that have no completed scoring record, oldest first."""
    landing = Landing(root)
    done = {b for b, r in landing.records(SCORING).items() if r.get("status") == "scored"}
    return [b for b in landing.batches(UNSCORED) if b not in done]


def batch_uri(root: str, batch_id: str, kind: str = UNSCORED) -> str:
    """Where a landed batch is, or a one-line error when it has not landed."""
    landing = Landing(root)
    uri = landing.batches(kind).get(batch_id)
    if uri is None:
        raise InputFileError(f"{landing.shown(kind)}: no batch {batch_id}")
    return uri


def pending_training(root: str) -> list[str]:
    """Labelled batches that no completed training run has used yet, oldest first."""
    landing = Landing(root)
    used: set[str] = set()
    for record in landing.records(TRAINING).values():
        if record.get("status") == "trained":
            used.update(record.get("batches", []))
    return [b for b in landing.batches(LABELLED) if b not in used]


# -- the manifest, for people ----------------------------------------------------------------------
def manifest_frame(root: str) -> pd.DataFrame:
    """Every manifest record, newest first, as a table for people."""
    landing = Landing(root)
    rows = []
    for job in (SCORING, TRAINING):
        for batch, record in landing.records(job).items():
            rows.append(
                {
                    "job": job,
                    "batch_id": batch,
                    "status": record.get("status"),
                    "at": record.get("at"),
                    "model_version": record.get("model_version") or record.get("version"),
                    "read": record.get("read"),
                    "scored": record.get("scored"),
                    "rejected": record.get("rejected"),
                    "promoted": record.get("promoted"),
                }
            )
    frame = pd.DataFrame(rows)
    if not rows:
        return frame
    for column in ("read", "scored", "rejected"):
        frame[column] = frame[column].astype("Int64")
    frame["promoted"] = frame["promoted"].astype("boolean")
    return frame.sort_values("batch_id", ascending=False, ignore_index=True)
