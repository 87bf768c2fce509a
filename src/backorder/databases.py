"""Database tables as inputs and outputs: PostgreSQL (any SQLAlchemy URL) and MongoDB.

A table is named by ``URI#TABLE`` (the CLI's ``--input-table`` / ``--output-table`` build it).
Inputs stream in bounded chunks like files do. Outputs are idempotent per batch: re-scoring a
batch replaces its rows, never adds to them.

- SQL: one transaction per batch: delete the batch's rows, insert the new ones, commit. Readers
  see the old rows or the new ones, never a mix, and a failed (or killed) run leaves the old rows.
- MongoDB: multi-document transactions need a replica set, which a plain server does not have,
  so documents carry the id of the run that wrote them, and a commit marker written last says
  which run of each batch counts: ``TABLE_commits`` holds ``{_id: <batch id>, run_id}``. Readers
  read through ``committed_filter`` (or the same lookup in any language), so they never see a
  run that is still writing, failed or was killed; the documents of such runs, and of runs a
  later commit replaced, are deleted when the collection is next written. The code is plain
  pymongo so that a real MongoDB works unchanged.

The drivers (SQLAlchemy, pymongo) are imported where used: runs on files never load them.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from backorder.contract import (
    LABEL,
    REASON,
    ROW_NUMBER,
    RawChunk,
    contract_columns,
    require_columns,
)
from backorder.errors import BackorderError, InputFileError, OutputError, first_line
from backorder.uris import encoded_credentials, is_mongo, redact, redact_text, split_table

BATCH_ID = "batch_id"
RUN_ID = "run_id"
# A MongoDB run that has written nothing for this long is abandoned (killed, or cut off from the
# server): the next write to its collection deletes its documents. Runs write every few seconds.
ABANDONED_AFTER_SECONDS = 15 * 60


def sqlalchemy_url(uri: str) -> str:
    # Credentials encoded: a raw '@' or ':' in a password must not reach the host or port.
    scheme, _, rest = encoded_credentials(uri).partition("://")
    # psycopg 3 is the driver we ship; plain postgresql:// would ask SQLAlchemy for psycopg2.
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"
    return f"{scheme}://{rest}"


def _reason(exc: BaseException, uri: str) -> str:
    """A driver's reason, on one line, without the secrets of ``uri``."""
    return redact_text(first_line(exc), uri)


class DatabaseInput:
    """Rows of a SQL table or MongoDB collection, with ``InputTable``'s reading interface."""

    format = "table"
    size_bytes = 0

    def __init__(self, uri: str, block_rows: int = 50_000) -> None:
        self.uri = uri
        self.base, self.table = split_table(uri)
        self.block_rows = block_rows
        self._rows_read = 0
        self.raw_columns = self._open()
        self.columns = contract_columns(self.name, self.raw_columns, "has")

    @property
    def name(self) -> str:
        return f"{redact(self.base)}#{self.table}"

    def _why(self, exc: BaseException) -> str:
        return _reason(exc, self.base)

    def _open(self) -> list[str]:
        raise NotImplementedError

    def _batches(self) -> Iterator[list[dict[str, Any]] | list[tuple[Any, ...]]]:
        raise NotImplementedError

    def require(self, required: tuple[str, ...] | list[str]) -> None:
        require_columns(self.name, self.columns, required)

    @property
    def has_label(self) -> bool:
        return LABEL in self.columns

    def position(self) -> int:
        return self._rows_read

    def chunks(self) -> Iterator[RawChunk]:
        for batch in self._batches():
            frame = self._frame(batch)
            frame.index = pd.RangeIndex(self._rows_read + 1, self._rows_read + 1 + len(frame))
            self._rows_read += len(frame)
            yield RawChunk(frame)
        if self._rows_read == 0:
            raise InputFileError(f"{self.name}: table has no rows")

    def _frame(self, batch: Any) -> pd.DataFrame:
        raise NotImplementedError


class SqlInput(DatabaseInput):
    def _open(self) -> list[str]:
        import sqlalchemy as sa

        try:
            self._engine = sa.create_engine(sqlalchemy_url(self.base))
            with self._engine.connect() as connection:
                self._table = sa.Table(self.table, sa.MetaData(), autoload_with=connection)
        except sa.exc.NoSuchTableError:
            raise InputFileError(f"{self.name}: table not found") from None
        except (sa.exc.SQLAlchemyError, ImportError, ValueError) as exc:
            raise InputFileError(f"{self.name}: cannot be read ({self._why(exc)})") from None
        return [c.name for c in self._table.columns]

    def _batches(self) -> Iterator[list[tuple[Any, ...]]]:
        import sqlalchemy as sa

        try:
            with self._engine.connect() as connection:
                # A server-side cursor: memory holds one chunk, whatever the table's size.
                result = connection.execution_options(
                    stream_results=True, yield_per=self.block_rows
                ).execute(sa.select(self._table))
                for partition in result.partitions(self.block_rows):
                    yield [tuple(row) for row in partition]
        except sa.exc.SQLAlchemyError as exc:
            raise InputFileError(f"{self.name}: cannot be read ({self._why(exc)})") from None
        finally:
            self._engine.dispose()

    def _frame(self, batch: Any) -> pd.DataFrame:
        return pd.DataFrame.from_records(batch, columns=self.raw_columns).set_axis(
            self.columns, axis=1
        )


def _mongo_database(uri: str) -> tuple[Any, Any]:
    """A client and the database the URI names (``mongodb://host:port/DB``)."""
    import pymongo

    client: Any = pymongo.MongoClient(encoded_credentials(uri), serverSelectionTimeoutMS=10_000)
    return client, client.get_default_database()


@contextlib.contextmanager
def _mongo_errors(
    name: str, uri: str, failing: str, error: type[BackorderError] = InputFileError
) -> Iterator[None]:
    """pymongo's errors as one line naming the collection: a URI without a database, or
    ``failing`` ("cannot be read") with the server's reason."""
    import pymongo.errors

    try:
        yield
    except pymongo.errors.ConfigurationError as exc:
        raise InputFileError(
            f"{name}: name the database in the URI ({_reason(exc, uri)})"
        ) from None
    except pymongo.errors.PyMongoError as exc:
        raise error(f"{name}: {failing} ({_reason(exc, uri)})") from None


class MongoInput(DatabaseInput):
    def _open(self) -> list[str]:

        with _mongo_errors(self.name, self.base, "cannot be read"):
            self._client, database = _mongo_database(self.base)
            if self.table not in database.list_collection_names():
                raise InputFileError(f"{self.name}: collection not found")
            self._collection = database[self.table]
            first = self._collection.find_one({}, projection={"_id": False})
        if first is None:
            raise InputFileError(f"{self.name}: collection has no documents")
        return list(first)

    def _batches(self) -> Iterator[list[dict[str, Any]]]:
        import pymongo.errors

        try:
            cursor = self._collection.find(
                {}, projection={"_id": False}, batch_size=min(self.block_rows, 10_000)
            ).sort("_id", 1)
            batch: list[dict[str, Any]] = []
            for document in cursor:
                batch.append(document)
                if len(batch) >= self.block_rows:
                    yield batch
                    batch = []
            if batch:
                yield batch
        except pymongo.errors.PyMongoError as exc:
            raise InputFileError(f"{self.name}: cannot be read ({self._why(exc)})") from None
        finally:
            self._client.close()

    def _frame(self, batch: Any) -> pd.DataFrame:
        # Documents may differ in fields: every document gets the first one's columns.
        frame = pd.DataFrame.from_records(batch, columns=self.raw_columns)
        return frame.set_axis(self.columns, axis=1)


def open_database_input(uri: str, block_rows: int) -> DatabaseInput:
    return MongoInput(uri, block_rows) if is_mongo(uri) else SqlInput(uri, block_rows)


# -- outputs -----------------------------------------------------------------------------------
def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts of plain Python values, missing values as None."""
    out: list[dict[str, Any]] = (
        frame.astype(object).where(frame.notna(), None).to_dict("records")  # type: ignore[assignment]
    )
    for record in out:
        for key, value in record.items():
            if isinstance(value, float) and math.isnan(value):
                record[key] = None
    return out


def _rejects_record(frame: pd.DataFrame, fixed: list[str]) -> pd.DataFrame:
    """Rejects keep their fixed columns; the input's own fields go into one JSON column, since
    they differ from input to input and a table's columns cannot."""
    fields = [c for c in frame.columns if c not in fixed]
    payload = frame[fields].astype(object).where(frame[fields].notna(), None)
    out = frame[[c for c in fixed if c in frame.columns]].copy()
    out["record"] = pd.array(
        [json.dumps(r, default=str) for r in payload.to_dict("records")], dtype="string"
    )
    return out


class DatabaseOutput:
    """One batch's rows, written to a table so that the batch appears once or not at all."""

    def __init__(
        self, uri: str, template: pd.DataFrame, batch_id: str, rejects: bool = False
    ) -> None:
        self.uri = uri
        self.base, self.table = split_table(uri)
        self.batch_id = batch_id
        self.rows = 0
        self.rejects = rejects
        self.template = template

    @property
    def name(self) -> str:
        return f"{redact(self.base)}#{self.table}"

    def _why(self, exc: BaseException) -> str:
        return _reason(exc, self.base)

    def __str__(self) -> str:
        return self.name

    def write(self, frame: pd.DataFrame) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        """Remove this run's committed rows again (a sibling output failed)."""
        raise NotImplementedError

    def _shape(self, frame: pd.DataFrame) -> pd.DataFrame:
        if self.rejects:
            frame = _rejects_record(frame, [ROW_NUMBER, REASON])
        return frame


class SqlOutput(DatabaseOutput):
    def __init__(
        self, uri: str, template: pd.DataFrame, batch_id: str, rejects: bool = False
    ) -> None:
        import sqlalchemy as sa

        super().__init__(uri, template, batch_id, rejects)
        shaped = self._shape(template)
        types: dict[str, Any] = {
            "int64": sa.BigInteger(),
            "float64": sa.Float(precision=53),
            "bool": sa.Boolean(),
        }
        columns = [
            sa.Column(BATCH_ID, sa.String(40), primary_key=True),
            *[
                sa.Column(
                    str(name),
                    types.get(str(dtype), sa.Text()),
                    primary_key=name == "row_number",
                )
                for name, dtype in shaped.dtypes.items()
            ],
        ]
        self._table = sa.Table(self.table, sa.MetaData(), *columns)
        try:
            self._engine = sa.create_engine(sqlalchemy_url(self.base))
            self._create_table()
            self._connection: Any = self._engine.connect()
            self._transaction = self._connection.begin()
            self._check_columns()
            # Re-scoring replaces the batch: its old rows go in the same transaction.
            self._connection.execute(
                self._table.delete().where(self._table.c[BATCH_ID] == batch_id)
            )
        except sa.exc.SQLAlchemyError as exc:
            self.abort()
            raise OutputError(f"{self.name}: cannot be written ({self._why(exc)})") from None

    def _create_table(self) -> None:
        """Create the table on first use, in a transaction of its own: two runs starting on a
        new table at once both try, and PostgreSQL refuses the second (a unique violation in
        its catalog), which then finds the table there."""
        import sqlalchemy as sa

        try:
            with self._engine.begin() as connection:
                self._table.create(connection, checkfirst=True)
        except sa.exc.SQLAlchemyError:
            if not sa.inspect(self._engine).has_table(self.table):
                raise

    def _check_columns(self) -> None:
        import sqlalchemy as sa

        existing = {c["name"] for c in sa.inspect(self._connection).get_columns(self.table)}
        missing = [c.name for c in self._table.columns if c.name not in existing]
        if missing:
            raise InputFileError(
                f"{self.name}: existing table lacks column(s) {', '.join(missing)}; "
                "use a new table or add them"
            )

    def write(self, frame: pd.DataFrame) -> None:
        import sqlalchemy as sa

        if frame.empty:
            return
        records = _records(self._shape(frame))
        for record in records:
            record[BATCH_ID] = self.batch_id
        try:
            self._connection.execute(self._table.insert(), records)
        except sa.exc.SQLAlchemyError as exc:
            raise OutputError(f"{self.name}: cannot be written ({self._why(exc)})") from None
        self.rows += len(frame)

    def commit(self) -> None:
        import sqlalchemy as sa

        try:
            self._transaction.commit()
        except sa.exc.SQLAlchemyError as exc:
            raise OutputError(f"{self.name}: commit failed ({self._why(exc)})") from None
        finally:
            self._close()

    def abort(self) -> None:
        # The connection may be gone already, and its transaction with it: nothing to undo.
        with contextlib.suppress(Exception):
            if getattr(self, "_transaction", None) is not None and self._transaction.is_active:
                self._transaction.rollback()
        self._close()

    def discard(self) -> None:
        import sqlalchemy as sa

        with contextlib.suppress(sa.exc.SQLAlchemyError), self._engine.begin() as connection:
            connection.execute(self._table.delete().where(self._table.c[BATCH_ID] == self.batch_id))
        self._engine.dispose()

    def _close(self) -> None:
        connection = getattr(self, "_connection", None)
        if connection is not None:
            connection.close()
            self._connection = None
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.dispose()


# -- MongoDB: runs, commit markers and the read filter ---------------------------------------------
COMMIT, RUN = "commit", "run"
WRITING, COMMITTED = "writing", "committed"


def commits_collection(table: str) -> str:
    """The collection beside ``table`` that holds its commit markers and its runs."""
    return f"{table}_commits"


def _run_key(run_id: str) -> str:
    return f"run:{run_id}"


def committed_runs(database: Any, table: str) -> dict[str, str]:
    """Batch id -> id of the run whose documents are the batch, for the collection ``table``."""
    markers = database[commits_collection(table)].find({"kind": COMMIT}, {RUN_ID: True})
    return {str(m["_id"]): str(m[RUN_ID]) for m in markers}


def committed_filter(database: Any, table: str, batch_id: str | None = None) -> dict[str, Any]:
    """The filter that reads a MongoDB output as committed: of each batch (or of ``batch_id``
    only), the documents of the run its commit marker names; never those of a run that is still
    writing, failed or was killed. ``database[table].find(committed_filter(database, table))``.
    """
    runs = committed_runs(database, table)
    if batch_id is not None:
        runs = {batch_id: runs[batch_id]} if batch_id in runs else {}
    # Run ids are unique across batches; an empty $in matches nothing.
    return {RUN_ID: {"$in": sorted(runs.values())}}


class MongoOutput(DatabaseOutput):
    """A batch's documents in a collection, made visible at once by a commit marker.

    The run registers itself (``run:<run id>`` in ``TABLE_commits``, with the time it last
    wrote), inserts its documents, checks they are all there and then writes the batch's marker,
    ``{_id: <batch id>, run_id}``: one single-document write, the commit point. Opening an output
    first deletes the documents of runs that will never be read: runs abandoned for
    ``ABANDONED_AFTER_SECONDS`` and runs whose batch a later run committed.
    """

    def __init__(
        self, uri: str, template: pd.DataFrame, batch_id: str, rejects: bool = False
    ) -> None:
        super().__init__(uri, template, batch_id, rejects)
        self.run_id = uuid.uuid4().hex
        self._previous: dict[str, Any] | None = None  # the batch's marker before this commit
        with _mongo_errors(self.name, self.base, "cannot be written", OutputError):
            self._client, database = _mongo_database(self.base)
            try:
                self._collection = database[self.table]
                self._commits = database[commits_collection(self.table)]
                self._collection.create_index(
                    [(BATCH_ID, 1), (RUN_ID, 1), ("row_number", 1)], unique=True
                )
                self._collection.create_index([(RUN_ID, 1)])
                self._clean_up()
                self._commits.insert_one(
                    {
                        "_id": _run_key(self.run_id),
                        "kind": RUN,
                        BATCH_ID: batch_id,
                        "state": WRITING,
                        "started_at": _now_iso(),
                        "alive": time.time(),  # a number: compared with $lt by every server
                    }
                )
            except BaseException:
                self._client.close()
                raise

    def _clean_up(self) -> None:
        """Delete the documents of runs no reader will read: abandoned, or replaced."""
        # Runs before markers: a run writes its marker before it says it committed, so a run
        # seen as committed here has its marker in the list read next, unless it was replaced.
        runs = list(self._commits.find({"kind": RUN}, {"state": True, "alive": True}))
        committed = set(committed_runs(self._collection.database, self.table).values())
        abandoned = time.time() - ABANDONED_AFTER_SECONDS
        for run in runs:
            run_id = str(run["_id"]).removeprefix("run:")
            if run_id in committed:
                continue
            if run.get("state") == WRITING and float(run.get("alive", 0)) > abandoned:
                continue  # still writing, perhaps in another process
            self._collection.delete_many({RUN_ID: run_id})
            self._commits.delete_one({"_id": run["_id"]})

    def write(self, frame: pd.DataFrame) -> None:
        import pymongo.errors

        if frame.empty:
            return
        shaped = self._shape(frame)
        records = _records(shaped)
        for record in records:
            record[BATCH_ID] = self.batch_id
            record[RUN_ID] = self.run_id
            if self.rejects:
                record["record"] = json.loads(record["record"])
        try:
            self._collection.insert_many(records, ordered=False)
            self._commits.update_one(
                {"_id": _run_key(self.run_id)}, {"$set": {"alive": time.time()}}
            )
        except pymongo.errors.PyMongoError as exc:
            raise OutputError(f"{self.name}: cannot be written ({self._why(exc)})") from None
        self.rows += len(frame)

    def commit(self) -> None:
        import pymongo.errors

        try:
            stored = self._collection.count_documents({RUN_ID: self.run_id})
            if stored != self.rows:
                raise OutputError(
                    f"{self.name}: batch {self.batch_id}: {stored:,} of this run's "
                    f"{self.rows:,} documents are there (another run took it for abandoned); "
                    "nothing was committed"
                )
            self._previous = self._commits.find_one({"_id": self.batch_id})
            self._commits.replace_one(
                {"_id": self.batch_id},
                {
                    "_id": self.batch_id,
                    "kind": COMMIT,
                    RUN_ID: self.run_id,
                    "rows": self.rows,
                    "committed_at": _now_iso(),
                },
                upsert=True,
            )
        except pymongo.errors.PyMongoError as exc:
            self._client.close()
            raise OutputError(f"{self.name}: commit failed ({self._why(exc)})") from None
        # Committed: what follows only tidies up, so its failure must not fail the run.
        with contextlib.suppress(pymongo.errors.PyMongoError):
            self._commits.update_one(
                {"_id": _run_key(self.run_id)},
                {"$set": {"state": COMMITTED, "alive": time.time()}},
            )
            # Documents from before commit markers (no run registered) are the batch's old ones.
            known = [
                str(r["_id"]).removeprefix("run:")
                for r in self._commits.find({"kind": RUN, BATCH_ID: self.batch_id}, {"_id": True})
            ]
            self._collection.delete_many({BATCH_ID: self.batch_id, RUN_ID: {"$nin": known}})
        self._client.close()

    def abort(self) -> None:
        self._client.close()
        self._withdraw()

    def discard(self) -> None:
        self._withdraw()

    def _withdraw(self) -> None:
        """Take this run back, committed or not: the batch's marker returns to the run it named
        before (when it names this one), then this run's documents go. The server may be gone;
        then the next write to the collection deletes them."""
        with contextlib.suppress(Exception):
            client, database = _mongo_database(self.base)
            try:
                commits = database[commits_collection(self.table)]
                mine = {"_id": self.batch_id, RUN_ID: self.run_id}
                previous = self._previous
                if previous is not None and commits.find_one({"_id": _run_key(previous[RUN_ID])}):
                    commits.replace_one(mine, previous)
                else:
                    commits.delete_one(mine)
                database[self.table].delete_many({RUN_ID: self.run_id})
                commits.delete_one({"_id": _run_key(self.run_id)})
            finally:
                client.close()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def open_database_output(
    uri: str, template: pd.DataFrame, batch_id: str, rejects: bool = False
) -> DatabaseOutput:
    kind = MongoOutput if is_mongo(uri) else SqlOutput
    return kind(uri, template, batch_id, rejects)
