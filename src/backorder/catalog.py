"""The landing layout under one root (folder or S3 prefix): the pipelines' data catalog.

::

    ROOT/labelled/<batch id>.csv.gz      labelled history, dropped here as it arrives
    ROOT/unscored/<batch id>.parquet     batches waiting to be scored
    ROOT/predictions/<batch id>.parquet  one file per scored batch
    ROOT/rejects/<batch id>.parquet      the rows that could not be scored, with reasons
    ROOT/reports/<batch id>/...          drift reports; reports/training/<run id>/ for training
    ROOT/manifest/<job>/<batch id>.json  what was done to each batch, when, by which model
    ROOT/metrics/<job>.prom              the last run's figures, for Prometheus
    ROOT/leases/<job>/<batch id>/<n>.json  who is working on a batch now (see ``Lease``)

A batch id is the batch's time in ISO-8601 basic format, UTC (``20261128T172342Z``), optionally
followed by ``_label``; new ids carry microseconds and a random tag as their label, so two in
the same second differ. Ids sort by time as plain strings. A landed file is created
exclusively: of two lands of one id, one wins and the other is told. Each manifest record is
one JSON object written whole (rename, or one S3 PUT), so concurrent runs on different batches
never overwrite each other's records, and a record exists only for work that completed.

The steps that read and write it are ``backorder.pipelines``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import fsspec.core
import pandas as pd

from backorder.errors import BackorderError, InputFileError
from backorder.io import (
    TABLE_SUFFIXES,
    copy_atomic,
    remove_file,
    table_suffix,
    write_json_atomic,
)
from backorder.predict import new_batch_id
from backorder.uris import redact, redact_fields, redact_text

log = logging.getLogger(__name__)

LABELLED, UNSCORED, PREDICTIONS, REJECTS, REPORTS, MANIFEST, METRICS, LEASES = (
    "labelled",
    "unscored",
    "predictions",
    "rejects",
    "reports",
    "manifest",
    "metrics",
    "leases",
)
SCORING, TRAINING = "scoring", "training"
# Matched with fullmatch: `$` would also accept the id followed by a newline.
BATCH_ID = re.compile(r"(?P<time>\d{8}T\d{6}Z)(?:_[A-Za-z0-9.-]+)?")
# How long a lease holds when its holder cannot be seen to have died (another machine): far
# longer than scoring a batch takes, short enough that a lost runner delays a batch by a run.
LEASE_SECONDS = 3600.0


class BatchTaken(BackorderError):
    """Another runner has the batch: it holds the batch's lease now, or has done the work."""


def batch_id_of(name: str) -> str | None:
    """The batch id in a landed file's name, or None when the name is not one."""
    for suffix in TABLE_SUFFIXES:  # in lower case, as ``land`` writes them
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            return stem if _valid_time(BATCH_ID.fullmatch(stem)) else None
    return None


def _valid_time(match: re.Match[str] | None) -> datetime | None:
    if match is None:
        return None
    try:
        return datetime.strptime(match["time"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:  # a month 13, a day 32
        return None


def batch_time(batch_id: str) -> datetime:
    moment = _valid_time(BATCH_ID.fullmatch(batch_id))
    if moment is None:
        raise InputFileError(f"{batch_id!r} is not a batch id (expected like 20261128T172342Z)")
    return moment


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
        # Other processes write here too: never answer from a cached listing (s3fs keeps them).
        self.fs.invalidate_cache(path)
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
        """Copy a file into ``kind``/ under a batch id (default: now); return its URI.

        The file is created exclusively (a hard link locally, a conditional PUT on S3): of two
        lands of one id, one wins and the other fails with "has landed already".
        """
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
        try:
            copy_atomic(source, target, exclusive=True)
        except FileExistsError:
            raise InputFileError(f"{redact(target)}: batch {batch_id} has landed already") from None
        # The same id landed at the same moment under another suffix (.csv and .parquet): the
        # batch would be ambiguous, so this land gives way. At worst both do; neither is lost
        # without its lander being told.
        twins = [n for n in self._listing(kind) if batch_id_of(n) == batch_id]
        if len(twins) > 1:
            remove_file(target)
            other = next(n for n in twins if n != batch_id + suffix)
            raise InputFileError(f"{self.shown(kind, other)}: batch {batch_id} has landed already")
        return target

    def _read_record(self, uri: str) -> dict[str, Any] | None:
        """A JSON record on the landing root (a manifest record, a lease), read now, or None
        when there is none."""
        try:
            raw = self.fs.cat_file(fsspec.core.url_to_fs(uri)[1])
        except FileNotFoundError:
            return None
        record: dict[str, Any] = json.loads(raw)
        return record

    # -- the manifest --------------------------------------------------------------------------
    def record(self, job: str, batch_id: str, record: dict[str, Any]) -> str:
        uri = self.uri(MANIFEST, job, f"{batch_id}.json")
        # The manifest is for people and dashboards: URIs in it keep no password.
        write_json_atomic(uri, redact_fields({"batch_id": batch_id, "job": job, **record}))
        return uri

    def record_of(self, job: str, batch_id: str) -> dict[str, Any] | None:
        """The batch's manifest record for ``job``, read now, or None when it has none."""
        return self._read_record(self.uri(MANIFEST, job, f"{batch_id}.json"))

    def records(self, job: str) -> dict[str, dict[str, Any]]:
        out = {}
        for name in self._listing(f"{MANIFEST}/{job}"):
            if name.endswith(".json") and not name.startswith("."):
                with self.fs.open(f"{self.base}/{MANIFEST}/{job}/{name}", "rb") as handle:
                    out[name[: -len(".json")]] = json.loads(handle.read())
        return dict(sorted(out.items()))

    # -- leases ----------------------------------------------------------------------------------
    def take_lease(self, job: str, batch_id: str, seconds: float = LEASE_SECONDS) -> Lease:
        """Take the batch's lease for ``job``, or raise ``BatchTaken`` naming its holder.

        A lease is taken over when it was released, has expired, or its holder ran on this
        machine and has died (a kill -9 frees the batch at once). See ``Lease``.
        """
        batch_time(batch_id)  # the id becomes a path
        for _ in range(3):
            newest, generations = -1, self._lease_generations(job, batch_id)
            if not generations:
                break
            newest = generations[-1]
            holder = self._lease_record(job, batch_id, newest)
            if holder is None:
                continue  # released or taken over as we read: look again
            if _holding(holder):
                raise BatchTaken(_held_by(holder))
            break
        else:
            raise BatchTaken(f"{batch_id}: its {job} lease is changing hands")
        lease = Lease(self, job, batch_id, newest + 1, uuid.uuid4().hex)
        try:
            write_json_atomic(lease.uri, lease.record(HELD, seconds), exclusive=True)
        except FileExistsError:
            raise BatchTaken(f"{batch_id}: another runner took it just now") from None
        if self._lease_generations(job, batch_id)[-1:] != [lease.generation]:
            # Our listing was old: a later generation exists, and its holder has the batch.
            remove_file(lease.uri)
            raise BatchTaken(f"{batch_id}: another runner took it just now")
        for old in generations:  # history now: only the newest counts
            remove_file(self._lease_uri(job, batch_id, old))
        return lease

    def _lease_uri(self, job: str, batch_id: str, generation: int) -> str:
        return self.uri(LEASES, job, batch_id, f"{generation:06d}.json")

    def _lease_generations(self, job: str, batch_id: str) -> list[int]:
        names = self._listing(f"{LEASES}/{job}/{batch_id}")
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def _lease_record(self, job: str, batch_id: str, generation: int) -> dict[str, Any] | None:
        return self._read_record(self._lease_uri(job, batch_id, generation))


HELD, RELEASED = "held", "released"


@dataclass
class Lease:
    """One runner's claim on one batch for one job, kept on the landing root itself, which
    every runner of the batch (the command line, the DAG's workers) shares by definition.

    Leases are numbered files, ``leases/<job>/<batch id>/<n>.json``; the newest says who has
    the batch. Taking or releasing one creates the next number exclusively (a hard link
    locally, a conditional PUT on S3), so of two runners only one can, and numbers only grow.
    """

    landing: Landing
    job: str
    batch_id: str
    generation: int
    owner: str

    @property
    def uri(self) -> str:
        return self.landing._lease_uri(self.job, self.batch_id, self.generation)

    def record(self, state: str, seconds: float = 0.0) -> dict[str, Any]:
        now = time.time()
        return {
            "job": self.job,
            "batch_id": self.batch_id,
            "state": state,
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process": _process_key(os.getpid()),
            "since": _iso(now),
            "expires": now + seconds,
            "expires_at": _iso(now + seconds),
        }

    def held(self) -> bool:
        """Whether this lease is still the newest, unreleased (it may have been taken over
        after expiring): checked before the work is recorded."""
        generations = self.landing._lease_generations(self.job, self.batch_id)
        if not generations or generations[-1] != self.generation:
            return False
        record = self.landing._lease_record(self.job, self.batch_id, self.generation)
        return record is not None and record["owner"] == self.owner and record["state"] == HELD

    def confirm(self) -> None:
        """Raise ``BatchTaken`` unless this lease still holds its batch: called before the
        work is recorded, so a runner whose lease expired and was taken over records nothing."""
        if not self.held():
            raise BatchTaken(
                f"{self.batch_id}: the lease expired and another runner took the batch over; "
                "this run's work is not recorded"
            )

    def release(self) -> None:
        """Free the batch: the next generation says released (unless another runner took the
        lease over meanwhile), and this one goes. Best effort: a lease the store would not let
        go of frees itself when this process ends (on this machine) or expires."""
        following = Lease(self.landing, self.job, self.batch_id, self.generation + 1, self.owner)
        try:
            with contextlib.suppress(FileExistsError):
                write_json_atomic(following.uri, following.record(RELEASED), exclusive=True)
            remove_file(self.uri)
        except (BackorderError, OSError) as exc:
            log.warning(f"{redact(self.uri)}: the lease could not be released ({exc})")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def _process_key(pid: int) -> str | None:
    """Boot, pid namespace, pid and start time of a running process: on Linux these tell it
    from every other process, past or present, of every container on the machine. None when
    there is no such process (or a zombie), or no /proc to ask."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    state, started = fields[0], fields[19]  # fields 3 and 22 of proc(5)
    return None if state in ("Z", "X") else f"{boot}/{namespace}/{pid}/{started}"


def _holding(record: dict[str, Any]) -> bool:
    """Whether a lease record still holds its batch: held, unexpired, and its process not seen
    to have died (a process elsewhere cannot be seen, so only the expiry frees it)."""
    if record.get("state") != HELD or float(record.get("expires", 0)) <= time.time():
        return False
    key, mine = record.get("process"), _process_key(os.getpid())
    if not key or mine is None or key.rsplit("/", 2)[0] != mine.rsplit("/", 2)[0]:
        return True
    return _process_key(int(record["pid"])) == key


def _held_by(record: dict[str, Any]) -> str:
    doing = "being scored" if record.get("job") == SCORING else f"leased for {record.get('job')}"
    return (
        f"{record.get('batch_id')}: {doing} by {record.get('host')} (pid {record.get('pid')}) "
        f"since {record.get('since')}; its lease lasts until {record.get('expires_at')}"
    )


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
