"""Uploads on the page (``POST /upload``): received within limits, scored in a worker process.

An upload takes one of ``upload_concurrency`` upload workers before its body is read (none
idle: 429 with Retry-After), must arrive and be scored within ``upload_timeout_seconds``, and is
refused early when it is too large: a gzip stream is inflated into the temporary folder counting
bytes and lines, and stops at ``upload_max_bytes`` or ``upload_max_rows`` (a small gzip file can
inflate to gigabytes); a Parquet file's footer gives its row count and uncompressed size before
any data is read. Formats are recognised by content, as ``backorder.io`` does; archives and
other compressions are refused with 415. The answer is a zip streamed from the temporary folder,
which is removed once it is sent.

The uploader's file name is only shown (messages, the download's name), never used as a path.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import shutil
import tempfile
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile  # what the form holds (FastAPI's is a subclass)
from starlette.requests import ClientDisconnect

from backorder.config import Settings
from backorder.errors import BackorderError, ModelNotFoundError
from backorder.io import GZIP_MAGIC, PARQUET_MAGIC
from backorder.predict import predict_file
from backorder.web.workers import (
    JobRefused,
    JobTimedOut,
    Worker,
    WorkerFailed,
    WorkerPool,
    Workers,
    WorkerState,
)

RAW_NAME = "upload.raw"  # the bytes as received
ARCHIVE_NAME = "scored.zip"
BLOCK_BYTES = 1 << 20
MAX_NAME_CHARS = 255
RETRY_AFTER_SECONDS = 5
INPUT_STATUSES = frozenset({413, 415, 422})  # refusals that count as rejected input
# Recognised by their first bytes, and refused: what they are, for the message.
UNSUPPORTED: dict[bytes, str] = {
    b"PK\x03\x04": "a ZIP archive or Excel workbook (export it as CSV)",
    b"\xd0\xcf\x11\xe0": "an Excel 97-2003 workbook (export it as CSV)",
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ\x00": "xz-compressed",
    b"\x28\xb5\x2f\xfd": "zstd-compressed",
    b"7z\xbc\xaf\x27\x1c": "a 7-Zip archive",
    b"Rar!\x1a\x07": "a RAR archive",
}
SUPPORTED = "CSV, gzip-compressed CSV or Parquet"


@dataclass
class ScoredUpload:
    """What scoring an upload gave: the row counts and the summary line."""

    read: int
    scored: int
    rejected: int
    summary: str


@dataclass
class Scored:
    """A scored upload: the zip to send and the temporary folder to remove after sending."""

    archive: Path
    folder: Path
    name: str
    counts: ScoredUpload


@dataclass
class Refusal:
    """An upload the server does not score: the status, a one-line reason, extra headers."""

    status: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def bad_input(self) -> bool:
        return self.status in INPUT_STATUSES


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


# -- the file name -------------------------------------------------------------------------------
def upload_name(filename: str | None) -> str:
    """The uploaded file's own name, for messages and the download: its last path component
    (browsers may send a whole path); ValueError with the reason if it is not usable."""
    given = (filename or "").strip()
    if not given:
        raise ValueError("choose a file to upload")
    name = given.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if any(unicodedata.category(c) == "Cc" for c in given):
        raise ValueError("the file name has control characters; rename the file")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"the file name is longer than {MAX_NAME_CHARS} characters")
    if name in {"", ".", ".."}:
        raise ValueError(f"'{given}' is not a file name; upload a file such as batch.csv")
    return name


def download_disposition(name: str) -> str:
    """Content-Disposition for the scored zip of ``name`` (RFC 6266): an ASCII ``filename`` for
    every client, and ``filename*`` in UTF-8 when the name has other characters."""
    stem = name.split(".", maxsplit=1)[0] or "batch"  # new_batch.csv.gz -> new_batch
    plain = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")
    plain = re.sub(r"[^A-Za-z0-9_ ()+,=@-]", "_", plain).strip(" _") or "batch"
    header = f'attachment; filename="{plain}-scored.zip"'
    if plain != stem:
        header += f"; filename*=UTF-8''{quote(f'{stem}-scored.zip', safe='')}"
    return header


# -- the server's side ---------------------------------------------------------------------------
async def receive_and_score(
    request: Request, workers: Workers | None, settings: Settings, version: str
) -> Scored | Refusal:
    """Take an upload worker (or refuse: busy), receive the file and score it in the worker,
    all within ``upload_timeout_seconds``."""
    if workers is None:
        return Refusal(503, "the server is starting; try again in a few seconds")
    worker = workers.uploads.try_acquire()
    if worker is None:
        return Refusal(
            429,
            f"{settings.upload_concurrency} upload(s) are being scored already "
            f"(upload_concurrency = {settings.upload_concurrency}); try again in a few seconds",
            {"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    slot = _Slot(workers.uploads, worker, Path(tempfile.mkdtemp(prefix="backorder-upload-")))
    outcome: Scored | Refusal | None = None
    try:
        limit = settings.upload_timeout_seconds
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        received = await _receive(request, slot.folder / RAW_NAME, limit)
        if isinstance(received, Refusal):
            outcome = received
        else:
            remaining = max(deadline - loop.time(), 0.0)
            outcome = await _score(slot, received, version, settings, remaining)
        return outcome
    finally:
        slot.pool.release(slot.worker)
        if not isinstance(outcome, Scored):
            shutil.rmtree(slot.folder, ignore_errors=True)


@dataclass
class _Slot:
    """An upload's worker, taken from its pool, and its temporary folder."""

    pool: WorkerPool
    worker: Worker
    folder: Path


async def _receive(request: Request, target: Path, limit: float) -> str | Refusal:
    """Read the form within ``limit`` seconds and save its file to ``target``; the file's
    name, or why not."""
    try:
        form = await asyncio.wait_for(request.form(max_files=1, max_fields=50), limit)
    except TimeoutError:
        return Refusal(
            408, f"the upload did not arrive within {limit:g} s (upload_timeout_seconds)"
        )
    except HTTPException as exc:  # malformed multipart, as Starlette words it
        return Refusal(400, f"not a valid file upload: {exc.detail}")
    except ClientDisconnect:
        return Refusal(400, "the upload was interrupted")
    try:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            return Refusal(422, "choose a file to upload (form field 'file')")
        try:
            name = upload_name(file.filename)
        except ValueError as exc:
            return Refusal(422, str(exc))
        await run_in_threadpool(_save, file.file, target)
        return name
    finally:
        await form.close()


async def _score(
    slot: _Slot, name: str, version: str, settings: Settings, timeout: float
) -> Scored | Refusal:
    try:
        counts: ScoredUpload = await slot.pool.run(
            slot.worker,
            score_upload,
            str(slot.folder),
            name,
            version,
            version=version,
            timeout=timeout,
        )
    except JobTimedOut:
        return Refusal(
            504,
            f"{name}: not scored within the time limit of {settings.upload_timeout_seconds:g} s "
            "(upload_timeout_seconds); split it into smaller files",
        )
    except JobRefused as exc:
        return Refusal(exc.status, exc.message)
    except WorkerFailed:
        return Refusal(503, "scoring failed on the server (it is logged); try again")
    return Scored(slot.folder / ARCHIVE_NAME, slot.folder, name, counts)


def _save(source: IO[bytes], target: Path) -> None:
    source.seek(0)
    with target.open("wb") as out:
        shutil.copyfileobj(source, out, BLOCK_BYTES)


# -- the worker's side ---------------------------------------------------------------------------
def score_upload(state: WorkerState, folder: str, name: str, version: str) -> ScoredUpload:
    """The job: check the upload against the limits, score it with model ``version`` and pack
    predictions, rejects and the summary into ``ARCHIVE_NAME`` in ``folder``."""
    where = Path(folder)
    settings = state.settings
    source = prepare_upload(where / RAW_NAME, name, settings)
    try:
        model = state.model(version)
    except ModelNotFoundError:
        raise JobRefused(503, f"model version {version} is no longer in the registry") from None
    predictions, rejects = where / "predictions.csv", where / "rejects.csv"
    try:
        summary = predict_file(source, predictions, model, settings, rejects=rejects)
    except BackorderError as exc:
        raise JobRefused(422, str(exc).replace(str(source), name)) from None
    partial = where / f"{ARCHIVE_NAME}.part"
    # Level 1: scored CSV shrinks ~5x at it, and the time limit is spent on scoring, not zlib.
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.write(predictions, "predictions.csv")
        archive.write(rejects, "rejects.csv")
        archive.writestr("summary.txt", summary.line() + "\n")
    partial.replace(where / ARCHIVE_NAME)
    for done in (source, predictions, rejects):
        done.unlink(missing_ok=True)
    return ScoredUpload(summary.read, summary.scored, summary.rejected, summary.line())


def prepare_upload(raw: Path, name: str, settings: Settings) -> Path:
    """The file to score: a Parquet file whose footer is within the limits, or CSV text within
    them (inflated from gzip, or as sent). ``JobRefused`` 413 names the limit, 415 the format."""
    with raw.open("rb") as handle:
        head = handle.read(8)
    for magic, what in UNSUPPORTED.items():
        if head.startswith(magic):
            raise JobRefused(415, f"{name}: is {what}; upload {SUPPORTED}")
    if head.startswith(PARQUET_MAGIC):
        check_parquet(raw, name, settings)
        return raw.rename(raw.with_name("upload.parquet"))
    text = raw.with_name("upload.csv")
    if head.startswith(GZIP_MAGIC):
        try:
            with gzip.open(raw, "rb") as inflated:
                copy_within_limits(inflated, text, name, settings)
        except (OSError, EOFError, zlib.error):  # BadGzipFile is an OSError
            raise JobRefused(422, f"{name}: gzip data is corrupt or truncated") from None
        raw.unlink()
    else:
        with raw.open("rb") as plain:
            copy_within_limits(plain, text, name, settings)
        raw.unlink()
    return text


def copy_within_limits(source: _Readable, target: Path, name: str, settings: Settings) -> None:
    """Copy ``source`` to ``target`` block by block, stopping as soon as it passes
    ``upload_max_bytes`` or holds more than ``upload_max_rows`` lines after the header."""
    max_bytes, max_rows = settings.upload_max_bytes, settings.upload_max_rows
    size = lines = 0
    last = b""
    with target.open("wb") as out:
        while block := source.read(BLOCK_BYTES):
            if size == 0 and block.startswith(PARQUET_MAGIC):
                raise JobRefused(415, f"{name}: is compressed Parquet; upload the Parquet file")
            size += len(block)
            if size > max_bytes:
                raise JobRefused(413, too_large_bytes(name, max_bytes))
            lines += block.count(b"\n")
            if lines - 1 > max_rows:  # the first line is the header
                raise JobRefused(413, too_many_rows(name, max_rows))
            out.write(block)
            last = block
    if last and not last.endswith(b"\n") and lines > max_rows:  # an unterminated last row
        raise JobRefused(413, too_many_rows(name, max_rows))


def check_parquet(path: Path, name: str, settings: Settings) -> None:
    """Refuse a Parquet file whose footer promises more rows or uncompressed bytes than the
    limits, before any of its data is read."""
    try:
        metadata = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise JobRefused(422, f"{name}: not a readable Parquet file ({first})") from None
    if metadata.num_rows > settings.upload_max_rows:
        raise JobRefused(413, too_many_rows(name, settings.upload_max_rows, metadata.num_rows))
    size = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    if size > settings.upload_max_bytes:
        raise JobRefused(413, too_large_bytes(name, settings.upload_max_bytes, size))


def too_large_bytes(name: str, limit: int, size: int | None = None) -> str:
    found = f" ({size:,} bytes)" if size is not None else ""
    return (
        f"{name}: larger than {limit:,} bytes uncompressed{found}, the upload limit "
        f"(upload_max_bytes = {limit}); split it into smaller files"
    )


def too_many_rows(name: str, limit: int, rows: int | None = None) -> str:
    found = f" ({rows:,})" if rows is not None else ""
    return (
        f"{name}: more than {limit:,} rows{found}, the upload limit "
        f"(upload_max_rows = {limit}); split it into smaller files"
    )
