"""The I/O seam: every input and output of the product goes through this module.

Inputs are paths or fsspec URLs (``s3://bucket/key``: endpoint and credentials come from the
standard AWS variables, ``AWS_ENDPOINT_URL`` included) of CSV (optionally gzip-compressed) or
Parquet files, read in bounded chunks, or database tables named ``URI#TABLE`` (see
``backorder.databases``). Outputs are written atomically: a local file goes to a temporary file
beside the target and is renamed into place only when complete; a remote object is written to a
local temporary file and uploaded as one object only when complete (an S3 upload appears whole
or not at all). An interrupted run never leaves a partial output behind. Some writes are also
exclusive (``exclusive=True``): they fail with ``FileExistsError`` when the target exists,
atomically (a hard link locally, a conditional PUT, ``If-None-Match: *``, on S3).

What a URI names (remote or local, table file or database table) is ``backorder.uris``;
callers import it from here, like everything else the seam offers (``__all__``).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import queue
import shutil
import tempfile
import threading
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol, overload

import fsspec
import fsspec.core
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from backorder.contract import (
    FOOTER_PATTERN,
    FOOTER_REASON,
    LABEL,
    BrokenRow,
    RawChunk,
    contract_columns,
    require_columns,
)
from backorder.databases import open_database_input, open_database_output
from backorder.errors import InputFileError, OutputError, first_line
from backorder.uris import (
    TABLE_SUFFIXES,
    is_database,
    is_remote,
    redact,
    redact_text,
    split_table,
    table_format,
    table_suffix,
    with_table,
)

__all__ = [
    "TABLE_SUFFIXES",
    "BackgroundSink",
    "InputTable",
    "Sink",
    "Source",
    "TableWriter",
    "copy_atomic",
    "is_database",
    "is_remote",
    "open_input",
    "open_output",
    "prefetch",
    "redact",
    "split_table",
    "table_format",
    "table_suffix",
    "with_table",
    "write_json_atomic",
    "write_table_atomic",
    "write_text_atomic",
]

GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"
ZIP_MAGIC = b"PK\x03\x04"
SNIFF_BYTES = 64 * 1024
OTHER_DELIMITERS = {";": "';'", "\t": "tab", "|": "'|'"}


class InputTable:
    """One input file, opened and sniffed; iterate ``chunks()`` to read it in bounded memory."""

    def __init__(self, uri: str | Path, block_bytes: int = 8 << 20) -> None:
        self.uri = str(uri)
        self.name = redact(self.uri)  # what messages call it: never with its password
        self.block_bytes = block_bytes
        self._raw_handle: Any = None
        self._header_only = False
        self._fs, self._path = fsspec.core.url_to_fs(self.uri)
        try:
            info = self._fs.info(self._path)
        except FileNotFoundError:
            raise InputFileError(f"{self.name}: file not found") from None
        except OSError as exc:
            raise InputFileError(
                f"{self.name}: cannot be opened ({self._why(exc.strerror or exc)})"
            ) from None
        except Exception as exc:
            raise InputFileError(
                f"{self.name}: cannot be opened ({self._why(first_line(exc))})"
            ) from None
        if info.get("type") == "directory":
            raise InputFileError(f"{self.name}: is a directory, expected a CSV or Parquet file")
        self.size_bytes: int = int(info.get("size") or 0)
        if self.size_bytes == 0:
            raise InputFileError(f"{self.name}: file is empty")
        head = self._read_head()
        self.compressed = head.startswith(GZIP_MAGIC)
        if self.compressed:
            head = self._gunzip_prefix(head)
        if head.startswith(PARQUET_MAGIC) and not self.compressed:
            self.format = "parquet"
            self._open_parquet()
        elif head.startswith(ZIP_MAGIC):
            raise InputFileError(
                f"{self.name}: is a ZIP or Excel workbook, not CSV or Parquet; export it as CSV"
            )
        else:
            self.format = "csv"
            self._sniff_csv(head)
        self._check_columns()
        if self._header_only:
            raise InputFileError(f"{self.name}: has a header but no data rows")

    def _why(self, reason: object) -> str:
        """A library's reason, without the secrets of this input's URI (S3 names a bad bucket,
        credentials and all)."""
        return redact_text(str(reason), self.uri)

    # -- opening -------------------------------------------------------------------------------
    def _read_head(self) -> bytes:
        try:
            with self._fs.open(self._path, "rb") as handle:
                return bytes(handle.read(SNIFF_BYTES))
        except OSError as exc:
            raise InputFileError(
                f"{self.name}: cannot be read ({self._why(exc.strerror or exc)})"
            ) from None

    def _gunzip_prefix(self, head: bytes) -> bytes:
        # Decompress only what the sniffed bytes hold; the stream may continue past them.
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            text = decompressor.decompress(head, SNIFF_BYTES)
        except zlib.error:
            raise InputFileError(f"{self.name}: gzip data is corrupt") from None
        if len(head) == self.size_bytes and not decompressor.eof and len(text) < SNIFF_BYTES:
            raise InputFileError(f"{self.name}: cannot be read (gzip data is truncated)")
        return text

    def _open_parquet(self) -> None:
        try:
            with self._fs.open(self._path, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                self.raw_columns = list(parquet.schema_arrow.names)
                self.total_rows: int | None = parquet.metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise InputFileError(
                f"{self.name}: not a readable Parquet file ({self._why(first_line(exc))})"
            ) from None
        if self.total_rows == 0:
            raise InputFileError(f"{self.name}: Parquet file has no rows")

    def _sniff_csv(self, head: bytes) -> None:
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise InputFileError(f"{self.name}: is UTF-16 text; save it as UTF-8 CSV")
        if b"\x00" in head:
            raise InputFileError(f"{self.name}: is a binary file, not CSV or Parquet")
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as exc:
            # The sniffed block may end inside a multi-byte character; only earlier errors count.
            if exc.start < len(head) - 4:
                raise InputFileError(
                    f"{self.name}: is not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV"
                ) from None
            text = head[: exc.start].decode("utf-8")
        text = text.lstrip("\ufeff")
        header_line = text.splitlines()[0] if text.strip() else ""
        if not header_line.strip():
            raise InputFileError(f"{self.name}: first line is empty; expected a header row")
        header = next(csv.reader([header_line]))
        if len(header) == 1:
            for delimiter, name in OTHER_DELIMITERS.items():
                if delimiter in header_line:
                    raise InputFileError(
                        f"{self.name}: fields are separated by {name}, expected commas"
                    )
        self.raw_columns = header
        body = text[len(header_line) :].strip("\r\n")
        self.total_rows = None
        self._header_only = not body and not self.compressed and self.size_bytes <= SNIFF_BYTES

    def _check_columns(self) -> None:
        self.columns = contract_columns(
            self.name,
            self.raw_columns,
            "the header has",
            "; is it a CSV or Parquet file of inventory snapshots?",
        )

    def require(self, required: tuple[str, ...] | list[str]) -> None:
        """Fail fast, naming the file, when required contract columns are absent."""
        require_columns(self.name, self.columns, required, " (is it the right file?)")

    @property
    def has_label(self) -> bool:
        return LABEL in self.columns

    # -- reading -------------------------------------------------------------------------------
    def chunks(self) -> Iterator[RawChunk]:
        """Yield the file in chunks; broken lines are returned with their row numbers."""
        if self.format == "parquet":
            yield from self._parquet_chunks()
        else:
            yield from self._csv_chunks()

    def position(self) -> int:
        """Bytes of the (possibly compressed) file consumed so far, for progress display."""
        handle = self._raw_handle
        return int(handle.tell()) if handle is not None and not handle.closed else self.size_bytes

    @staticmethod
    def _broken(line: int, text: str, fields: int, expected: int) -> BrokenRow:
        # Line 1 is the header, so data row N is line N + 1.
        if FOOTER_PATTERN.match(text.strip().strip(",").strip()):
            return BrokenRow(line - 1, FOOTER_REASON, text)
        return BrokenRow(line - 1, f"has {fields} field(s), expected {expected}", text)

    def _parquet_chunks(self) -> Iterator[RawChunk]:
        batch_rows = max(10_000, self.block_bytes // 100)
        rows_seen = 0
        try:
            with self._fs.open(self._path, "rb") as handle:
                # pre_buffer keeps every row group it has read cached until the file closes:
                # RSS grew ~1.4 MiB a chunk with it on, and stays flat with it off.
                parquet = pq.ParquetFile(handle, pre_buffer=False)
                for batch in parquet.iter_batches(batch_size=batch_rows):
                    frame = batch.to_pandas()
                    frame.columns = self.columns
                    frame.index = pd.RangeIndex(rows_seen + 1, rows_seen + 1 + len(frame))
                    rows_seen += len(frame)
                    yield RawChunk(frame)
        except (pa.ArrowException, OSError) as exc:
            raise InputFileError(
                f"{self.name}: Parquet data is corrupt ({self._why(first_line(exc))})"
            ) from None

    def _csv_chunks(self) -> Iterator[RawChunk]:
        expected = len(self.raw_columns)
        pending: list[tuple[int, str, int]] = []

        def on_invalid(row: Any) -> str:
            pending.append((int(row.number), str(row.text), int(row.actual_columns)))
            return "skip"

        self._raw_handle = self._fs.open(self._path, "rb")
        stream: Any = self._raw_handle
        if self.compressed:
            stream = gzip.GzipFile(fileobj=self._raw_handle)
        reader_options = pacsv.ReadOptions(
            block_size=self.block_bytes, use_threads=False, encoding="utf8"
        )
        parse_options = pacsv.ParseOptions(
            invalid_row_handler=on_invalid, ignore_empty_lines=False, newlines_in_values=False
        )
        convert_options = pacsv.ConvertOptions(
            column_types={c: pa.string() for c in self.raw_columns},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
        # The reader parses ahead, so a broken line may be reported before the batch holding its
        # neighbours. Broken lines carry their own line numbers; valid rows take the gaps.
        broken_numbers: set[int] = set()
        next_row = 1
        try:
            reader = pacsv.open_csv(
                stream,
                read_options=reader_options,
                parse_options=parse_options,
                convert_options=convert_options,
            )
            for batch in reader:
                broken = [
                    self._broken(line, text, fields, expected) for line, text, fields in pending
                ]
                pending.clear()
                broken_numbers.update(b.row_number for b in broken)
                ahead = sum(1 for n in broken_numbers if n >= next_row)
                candidates = np.arange(next_row, next_row + batch.num_rows + ahead, dtype="int64")
                if ahead:
                    candidates = candidates[~np.isin(candidates, list(broken_numbers))]
                numbers = candidates[: batch.num_rows]
                if len(numbers):
                    next_row = int(numbers[-1]) + 1
                frame = batch.to_pandas()
                frame.columns = self.columns
                frame.index = pd.Index(numbers)
                yield RawChunk(frame, broken)
            if not pending and next_row == 1:
                raise InputFileError(f"{self.name}: has a header but no data rows")
            if pending:
                yield RawChunk(
                    pd.DataFrame(columns=self.columns, dtype="string"),
                    [self._broken(line, text, fields, expected) for line, text, fields in pending],
                )
        except pa.ArrowInvalid as exc:
            raise InputFileError(
                f"{self.name}: cannot be parsed as CSV ({self._why(first_line(exc))})"
            ) from None
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise InputFileError(
                f"{self.name}: cannot be read ({self._why(first_line(exc))})"
            ) from None
        finally:
            self._raw_handle.close()


# -- writing -----------------------------------------------------------------------------------
def _temp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")


def _local_temp(name: str) -> Path:
    handle, path = tempfile.mkstemp(prefix="backorder-", suffix=f"-{name}")
    os.close(handle)
    return Path(path)


def _precondition_failed(exc: BaseException) -> bool:
    """True when a store refused a conditional write because the object exists (s3fs raises
    FileExistsError only when the answer names the condition; SeaweedFS's does not)."""
    if isinstance(exc, FileExistsError):
        return True
    response = getattr(exc.__cause__, "response", None) or getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    # 409: a concurrent conditional write to the same key was under way (AWS); it wins.
    return status in (409, 412) or response.get("Error", {}).get("Code") == "PreconditionFailed"


def _upload(local: Path, uri: str, exclusive: bool = False) -> None:
    """Put a finished local file at ``uri`` as one object, or fail with a one-line error;
    ``exclusive``: only if no object is there (else ``FileExistsError``)."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        fs.put_file(str(local), path, mode="create" if exclusive else "overwrite")
    except Exception as exc:
        if exclusive and _precondition_failed(exc):
            raise FileExistsError(redact(uri)) from None
        reason = redact_text(first_line(exc), uri)
        raise OutputError(f"{redact(uri)}: cannot be written ({reason})") from None


class TableWriter:
    """Writes a table chunk by chunk to a temporary file; ``commit`` moves it into place."""

    def __init__(self, uri: str | Path, template: pd.DataFrame) -> None:
        self.uri = str(uri)
        self.remote = is_remote(uri)
        self.format = table_format(uri)
        if self.remote:
            self.target: Path | None = None
            self.temp = _local_temp(Path(self.uri).name)
        else:
            self.target = Path(uri)
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.temp = _temp_path(self.target)
        self.rows = 0
        self._schema = pa.Schema.from_pandas(template, preserve_index=False)
        self._parquet: pq.ParquetWriter | None = None
        self._text: IO[str] | None = None
        if self.format == "parquet":
            self._parquet = pq.ParquetWriter(self.temp, self._schema, compression="zstd")
        else:
            # Kept open across write() calls; closed by commit() or abort().
            if self.format == "csv.gz":
                self._text = gzip.open(self.temp, "wt", encoding="utf-8", newline="")  # noqa: SIM115
            else:
                self._text = open(self.temp, "w", encoding="utf-8", newline="")  # noqa: SIM115
            template.iloc[:0].to_csv(self._text, index=False)

    def __str__(self) -> str:
        return redact(self.uri)

    def write(self, frame: pd.DataFrame) -> None:
        if frame.empty:
            return
        if self._parquet is not None:
            table = pa.Table.from_pandas(frame, schema=self._schema, preserve_index=False)
            self._parquet.write_table(table)
        else:
            assert self._text is not None
            frame.to_csv(self._text, index=False, header=False, lineterminator="\n")
        self.rows += len(frame)

    def _close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None
        if self._text is not None:
            self._text.close()
            self._text = None

    def commit(self) -> None:
        self._close()
        try:
            if self.target is None:
                _upload(self.temp, self.uri)
            else:
                os.replace(self.temp, self.target)
        finally:
            self.temp.unlink(missing_ok=True)

    def abort(self) -> None:
        self._close()
        self.temp.unlink(missing_ok=True)

    def discard(self) -> None:
        """Remove a committed output again (its sibling output failed)."""
        if self.target is not None:
            self.target.unlink(missing_ok=True)
            return
        with contextlib.suppress(Exception):  # the store may be the reason the sibling failed
            fs, path = fsspec.core.url_to_fs(self.uri)
            fs.rm_file(path)


def write_table_atomic(path: str | Path, frame: pd.DataFrame) -> Path:
    """Write a whole local table (Parquet or CSV, by extension) atomically."""
    writer = TableWriter(path, frame.iloc[:0])
    try:
        writer.write(frame)
    except BaseException:
        writer.abort()
        raise
    writer.commit()
    assert writer.target is not None
    return writer.target


@contextlib.contextmanager
def _staged(target: str | Path, exclusive: bool = False) -> Iterator[Path]:
    """A temporary local file to fill; when the block succeeds it becomes ``target`` whole
    (renamed beside a local target, or uploaded as one object), else it is removed.
    ``exclusive``: only if ``target`` does not exist yet, else ``FileExistsError``."""
    remote = is_remote(target)
    if remote:
        temp = _local_temp(Path(str(target)).name)
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        temp = _temp_path(Path(target))
    try:
        yield temp
        if remote:
            _upload(temp, str(target), exclusive)
        elif exclusive:
            os.link(temp, target)  # unlike a rename, fails when the target exists
        else:
            os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def remove_file(uri: str | Path) -> None:
    """Remove a file (path or URL) if it is there."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def copy_atomic(source: str | Path, target: str | Path, *, exclusive: bool = False) -> None:
    """Copy a file (path or URL) to ``target`` (path or URL) whole or not at all, streaming;
    ``exclusive``: only if ``target`` does not exist yet, else ``FileExistsError``."""
    with _staged(target, exclusive) as temp:
        if is_remote(source):
            try:
                fs, path = fsspec.core.url_to_fs(str(source))
                fs.get_file(path, str(temp))
            except Exception as exc:
                reason = redact_text(first_line(exc), str(source))
                raise InputFileError(f"{redact(str(source))}: cannot be read ({reason})") from None
        else:
            shutil.copyfile(source, temp)


@overload
def write_text_atomic(path: Path, text: str, *, exclusive: bool = False) -> Path: ...
@overload
def write_text_atomic(path: str | Path, text: str, *, exclusive: bool = False) -> str | Path: ...
def write_text_atomic(path: str | Path, text: str, *, exclusive: bool = False) -> str | Path:
    """Write a whole text file (local path or fsspec URL) atomically; ``exclusive``: only if
    it does not exist yet, else ``FileExistsError``."""
    with _staged(path, exclusive) as temp:
        temp.write_text(text, encoding="utf-8")
    return str(path) if is_remote(path) else Path(path)


@overload
def write_json_atomic(path: Path, payload: Any, *, exclusive: bool = False) -> Path: ...
@overload
def write_json_atomic(path: str | Path, payload: Any, *, exclusive: bool = False) -> str | Path: ...
def write_json_atomic(path: str | Path, payload: Any, *, exclusive: bool = False) -> str | Path:
    return write_text_atomic(
        path,
        json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n",
        exclusive=exclusive,
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# -- choosing a source or sink -----------------------------------------------------------------
class Source(Protocol):
    """What readers need of an input, whether a file or a database table."""

    uri: str
    columns: list[str]
    size_bytes: int

    @property
    def has_label(self) -> bool: ...

    def require(self, required: tuple[str, ...] | list[str]) -> None: ...

    def chunks(self) -> Iterator[RawChunk]: ...

    def position(self) -> int: ...


class Sink(Protocol):
    """What writers offer: rows in chunks, then all of them at once (commit) or none (abort)."""

    rows: int

    def write(self, frame: pd.DataFrame) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...

    def discard(self) -> None: ...


def open_input(uri: str | Path, block_bytes: int = 8 << 20) -> Source:
    """An input file (``InputTable``) or database table (``URI#TABLE``), opened and checked."""
    if is_database(str(uri)):
        return open_database_input(str(uri), block_rows=max(10_000, block_bytes // 200))
    return InputTable(uri, block_bytes=block_bytes)


def open_output(
    uri: str | Path, template: pd.DataFrame, batch_id: str, rejects: bool = False
) -> Sink:
    """A writer with ``write``/``commit``/``abort`` for a file, object or database table."""
    if is_database(str(uri)):
        return open_database_output(str(uri), template, batch_id, rejects)
    return TableWriter(uri, template)


# -- overlapping I/O with compute --------------------------------------------------------------
_DONE = object()


def _offer(slots: queue.Queue[Any], entry: Any, stop: threading.Event) -> None:
    """Put ``entry`` into ``slots`` as soon as there is room, unless the consumer stops first."""
    while not stop.is_set():
        try:
            slots.put(entry, timeout=0.1)
            break
        except queue.Full:
            continue


def _produce(items: Iterator[Any], slots: queue.Queue[Any], stop: threading.Event) -> None:
    """``prefetch``'s producer: every item, then ``_DONE`` (with the exception, if one ended it)."""
    try:
        for item in items:
            _offer(slots, (item, None), stop)
            if stop.is_set():
                return
        slots.put((_DONE, None))
    except BaseException as exc:
        slots.put((_DONE, exc))


def prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Produce ``items`` on a background thread, up to ``depth`` ahead of the consumer.

    Reading and parsing the next chunk (pyarrow releases the GIL) then overlaps scoring the
    current one. An exception in the producer is raised in the consumer, in order; a consumer
    that stops early stops the producer too.
    """
    slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    worker = threading.Thread(
        target=_produce, args=(items, slots, stop), name="backorder-prefetch", daemon=True
    )
    worker.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                slots.get_nowait()
            worker.join(timeout=0.05)


class BackgroundSink:
    """A ``Sink`` whose writes run on a background thread, so encoding and compressing one
    chunk overlaps scoring the next; ``commit`` waits for every write, then commits."""

    def __init__(self, sink: Sink, depth: int = 2) -> None:
        self.sink = sink
        self._slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="backorder-writer", daemon=True)
        self._thread.start()

    @property
    def rows(self) -> int:
        return self.sink.rows

    def _drain(self) -> None:
        while True:
            frame = self._slots.get()
            if frame is _DONE:
                return
            if self._error is None:
                try:
                    self.sink.write(frame)
                except BaseException as exc:
                    self._error = exc

    def write(self, frame: pd.DataFrame) -> None:
        if self._error is not None:
            raise self._error
        self._slots.put(frame)

    def _finish(self) -> None:
        if self._thread.is_alive():
            self._slots.put(_DONE)
            self._thread.join()

    def commit(self) -> None:
        self._finish()
        if self._error is not None:
            raise self._error
        self.sink.commit()

    def abort(self) -> None:
        self._finish()
        self.sink.abort()

    def discard(self) -> None:
        self.sink.discard()
