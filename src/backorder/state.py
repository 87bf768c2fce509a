"""The product's own state store: API keys and page sign-in sessions now, the planner's records
(worklists, actions, notes, outcomes) later; and named locks (``StateStore.lock``) that hold
across processes and machines, which keep promotions in the registry one at a time.

One SQLAlchemy database: SQLite at HOME/state.db by default, any SQLAlchemy URL (PostgreSQL in
the compose stack) by the ``state_url`` setting. Its schema is kept by Alembic revisions shipped
in the package (``state_migrations/``), applied when the store is opened. Tokens are never
stored, only their SHA-256: they are 256-bit random strings, so a fast hash loses nothing.
All timestamps are timezone-aware UTC, in the database as in Python.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Dialect, make_url

from backorder.config import ROLES, Role, Settings
from backorder.errors import (
    ApiKeyError,
    KeyExistsError,
    StateStoreError,
    UnknownKeyError,
    first_line,
)
from backorder.uris import encoded_credentials, redact

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("state_migrations")
# Not Alembic's default `alembic_version`: MLflow and Airflow migrate with Alembic too, and a
# state_url pointed at one of their databases must neither read nor move their revision.
VERSION_TABLE = "backorder_state_version"
# PostgreSQL advisory lock taken while migrating ("backorde" in ASCII): two processes starting
# together (the server and a `backorder keys` one-off) migrate one after the other.
MIGRATION_LOCK = 0x6261636B6F726465
TOKEN_PREFIX = "bo_"
MIN_TOKEN_CHARS = 32
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# Printable ASCII without spaces: a token travels in an Authorization header.
TOKEN_TEXT = re.compile(r"[!-~]+")
_IMMEDIATE = "backorder_immediate"
# Alembic's `context` and `op` are module globals: one migration at a time in a process.
_MIGRATING = threading.Lock()
# How often a process waiting for a named lock (`StateStore.lock`) tries again.
LOCK_POLL_SECONDS = 0.05
# Named locks of in-memory SQLite stores, which no other process can see.
_MEMORY_LOCKS: dict[str, threading.Lock] = {}


def new_token() -> str:
    """A new API key token: 256 random bits, URL-safe, with a prefix secret scanners know."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """SHA-256 hex digest of a token, the only form in which tokens are stored."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def lock_key(name: str) -> int:
    """The PostgreSQL advisory-lock key (a signed 64-bit integer) of a named lock."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def redacted(url: str) -> str:
    """A state store URL fit for a message: its password hidden (``backorder.uris.redact``,
    which also splits a raw '@' in a password where SQLAlchemy's parser would not)."""
    return redact(url)


@dataclass(frozen=True)
class ApiKey:
    """An active key as `backorder keys list` shows it; never its token or the token's hash."""

    name: str
    role: Role
    created_at: datetime
    last_used_at: datetime | None


@dataclass(frozen=True)
class ActiveKey:
    """What the server needs to know of a presented token (it caches them by token hash)."""

    name: str
    role: Role


@dataclass(frozen=True)
class Session:
    """A page sign-in, made with a key and ended by sign-out, expiry or the key's revocation."""

    key_name: str
    role: Role
    csrf_token: str
    expires_at: datetime


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes in and out. SQLite keeps no offset, so UTC is stored without one
    (and its text form compares in time order); PostgreSQL keeps ``timestamptz``."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("the state store takes timezone-aware datetimes only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# The tables as the queries see them; the schema itself is made by the revisions in
# state_migrations/versions (tests/test_state.py checks that the two agree).
metadata = sa.MetaData()
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("last_used_at", UTCDateTime, nullable=True),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    sa.UniqueConstraint("token_hash", name="uq_api_keys_token_hash"),
)
sa.Index(
    "uq_api_keys_active_name",
    api_keys.c.name,
    unique=True,
    sqlite_where=sa.text("revoked_at IS NULL"),
    postgresql_where=sa.text("revoked_at IS NULL"),
)
sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column(
        "key_id",
        sa.Integer,
        sa.ForeignKey("api_keys.id", name="fk_sessions_key_id_api_keys"),
        nullable=False,
    ),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("csrf_token", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("token_hash", name="uq_sessions_token_hash"),
)
sa.Index("ix_sessions_key_id", sessions.c.key_id)

_ACTIVE = api_keys.c.revoked_at.is_(None)


def _now() -> datetime:
    return datetime.now(UTC)


def _engine_url(url: str) -> URL:
    # Credentials encoded: a raw '@' in a password must not reach the host or port.
    parsed = make_url(encoded_credentials(url))
    # psycopg 3 is the driver we ship; plain postgresql:// would ask SQLAlchemy for psycopg2.
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _check_key(name: str, role: str) -> None:
    if not KEY_NAME.fullmatch(name):
        raise ApiKeyError(
            f"key name {name!r}: 1 to 64 letters, digits and . _ @ -, starting with a letter "
            "or digit"
        )
    if role not in ROLES:
        raise ApiKeyError(f"role {role!r}: expected one of {', '.join(ROLES)}")


def check_token(token: str) -> None:
    """Refuse a token given from outside (a secret file) that is too short or holds spaces."""
    if len(token) < MIN_TOKEN_CHARS:
        raise ApiKeyError(f"a token needs at least {MIN_TOKEN_CHARS} characters")
    if not TOKEN_TEXT.fullmatch(token):
        raise ApiKeyError("a token is printable ASCII without spaces")


def _sqlite_transactions(engine: sa.Engine) -> None:
    """Take transactions over from pysqlite, which sends no BEGIN before DDL and only a
    deferred one before DML (SQLAlchemy's documented recipe): migrations are atomic, and a
    writer takes the write lock up front (BEGIN IMMEDIATE), so a busy database makes it wait
    up to the driver's timeout instead of failing when it upgrades a read lock."""

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA foreign_keys = ON")

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(_IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class StateStore:
    """The state store at one SQLAlchemy URL. Open it with `StateStore.open(settings)`; every
    method is one short transaction, and every database failure a `StateStoreError`."""

    def __init__(self, url: str) -> None:
        """An engine for `url`; nothing is connected until a method needs it."""
        self.url = redacted(url)  # for messages and logs: never the password
        try:
            target = _engine_url(url)
            psycopg = target.get_driver_name() == "psycopg"
            self._engine = sa.create_engine(
                target,
                # The server keeps polling: a connection the database dropped is replaced.
                pool_pre_ping=True,
                # An unreachable server fails the command in seconds, not minutes.
                connect_args={"connect_timeout": 5} if psycopg else {},
            )
        except (sa_exc.ArgumentError, ImportError, ValueError) as exc:  # ValueError: a bad port
            raise StateStoreError(f"state store {self.url}: {first_line(exc)}") from None
        if self._engine.dialect.name == "sqlite":
            _sqlite_transactions(self._engine)

    @classmethod
    def open(cls, settings: Settings) -> StateStore:
        """The store of `settings`, its folder made (SQLite) and its schema migrated to head."""
        store = cls(settings.resolved_state_url)
        try:
            store.prepare()
        except BaseException:
            store.dispose()
            raise
        return store

    def __enter__(self) -> StateStore:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.dispose()

    def prepare(self) -> None:
        """Make the SQLite folder and migrate the schema to head (what `open` does)."""
        self._make_folder()
        self.migrate()

    def _make_folder(self) -> None:
        url = self._engine.url
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return
        folder = Path(cast(str, url.database)).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateStoreError(
                f"state store {self.url}: cannot make {folder}: {exc.strerror or exc}"
            ) from None

    @contextmanager
    def _begin(self, *, immediate: bool = False) -> Iterator[Connection]:
        """One transaction; `immediate`: it will write (SQLite then locks at BEGIN)."""
        try:
            with self._engine.connect() as connection:
                if immediate:
                    connection.execution_options(**{_IMMEDIATE: True})
                with connection.begin():
                    yield connection
        except sa_exc.SQLAlchemyError as exc:
            reason = getattr(exc, "orig", None) or exc
            raise StateStoreError(f"state store {self.url}: {first_line(reason)}") from None

    def migrate(self) -> None:
        """Bring the schema to the newest revision (Alembic's upgrade to head); a no-op when it
        is there. Safe to run from several processes (and threads) at once: on PostgreSQL they
        queue on an advisory lock, on SQLite on the write lock."""
        # Imported here: Alembic is needed once per process, not by every import of this module.
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext
        from alembic.util import CommandError

        config = Config(stdout=io.StringIO())  # upgrade prints nothing; keep it that way
        config.set_main_option("script_location", str(MIGRATIONS))
        config.set_main_option("path_separator", "os")
        config.attributes["version_table"] = VERSION_TABLE
        config.attributes["target_metadata"] = metadata

        def revision(connection: Connection) -> str | None:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()

        try:
            with _MIGRATING, self._begin(immediate=True) as connection:
                if connection.dialect.name == "postgresql":
                    # Held until this transaction ends; the next process then finds head.
                    connection.execute(
                        sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK}
                    )
                before = revision(connection)
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
                after = revision(connection)
        except CommandError as exc:
            # Typically a revision this version does not know: a newer backorder migrated it.
            raise StateStoreError(
                f"state store {self.url}: cannot migrate ({first_line(exc)}); "
                "is it from a newer version of backorder?"
            ) from None
        if after != before:
            log.info(f"state store {self.url}: schema migrated from {before or 'empty'} to {after}")

    # --- named locks ---------------------------------------------------------------------

    @contextmanager
    def lock(self, name: str, timeout_seconds: float = 120.0) -> Iterator[None]:
        """Hold the lock `name` while the block runs, against every process, on any machine,
        that uses this store: a PostgreSQL advisory lock (the database releases it if its
        holder dies), or a file lock (flock) beside a SQLite database file. Waits up to
        `timeout_seconds` for it, then raises `StateStoreError`."""
        deadline = time.monotonic() + timeout_seconds
        url = self._engine.url
        if url.get_backend_name() == "postgresql":
            held = self._advisory_lock(name, deadline)
        elif url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            held = self._file_lock(Path(cast(str, url.database)), name, deadline)
        elif url.get_backend_name() == "sqlite":  # no other process sees an in-memory store
            held = self._process_lock(name, deadline)
        else:
            raise StateStoreError(
                f"state store {self.url}: named locks need PostgreSQL or a SQLite file"
            )
        with held:
            yield

    def _wait_or_give_up(self, name: str, deadline: float) -> None:
        if time.monotonic() >= deadline:
            raise StateStoreError(
                f"state store {self.url}: lock {name!r} is still held by another process; "
                "gave up waiting for it"
            )
        time.sleep(LOCK_POLL_SECONDS)

    def _failed(self, exc: sa_exc.SQLAlchemyError) -> StateStoreError:
        reason = getattr(exc, "orig", None) or exc
        return StateStoreError(f"state store {self.url}: {first_line(reason)}")

    @contextmanager
    def _advisory_lock(self, name: str, deadline: float) -> Iterator[None]:
        key = {"key": lock_key(name)}
        try:
            # A session-level lock, on a connection of its own: it outlives transactions and
            # ends when released or when the connection closes.
            connection = self._engine.connect()
        except sa_exc.SQLAlchemyError as exc:
            raise self._failed(exc) from None
        try:
            try:
                while True:
                    got = connection.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), key)
                    taken = bool(got.scalar())
                    connection.commit()  # no transaction stays open while waiting or holding
                    if taken:
                        break
                    self._wait_or_give_up(name, deadline)
            except sa_exc.SQLAlchemyError as exc:
                raise self._failed(exc) from None
            try:
                yield
            finally:
                try:
                    connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), key)
                    connection.commit()
                except sa_exc.SQLAlchemyError:
                    connection.invalidate()  # closing the session releases it: never pool it
        finally:
            connection.close()

    @contextmanager
    def _file_lock(self, database: Path, name: str, deadline: float) -> Iterator[None]:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
        path = database.with_name(f"{database.name}.{slug}.lock")
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateStoreError(
                f"state store {self.url}: cannot open the lock file {path}: {exc.strerror or exc}"
            ) from None
        try:  # closing the descriptor, or the process ending, releases the lock
            while True:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    self._wait_or_give_up(name, deadline)
            yield
        finally:
            os.close(descriptor)

    @contextmanager
    def _process_lock(self, name: str, deadline: float) -> Iterator[None]:
        lock = _MEMORY_LOCKS.setdefault(name, threading.Lock())
        while not lock.acquire(blocking=False):
            self._wait_or_give_up(name, deadline)
        try:
            yield
        finally:
            lock.release()

    # --- API keys ------------------------------------------------------------------------

    def create_key(self, name: str, role: Role, token: str | None = None) -> str:
        """Register a key and return its token (a new one when `token` is None). Registering a
        given token again under the same name and role changes nothing (provisioning from a
        secret file is idempotent); any other clash with an active key is an error."""
        _check_key(name, role)
        if token is not None:
            check_token(token)
        chosen = token if token is not None else new_token()
        digest = token_hash(chosen)
        with self._begin(immediate=True) as connection:
            if self._already_registered(connection, name, role, digest):
                return chosen
            try:
                connection.execute(
                    api_keys.insert().values(
                        name=name, role=role, token_hash=digest, created_at=_now()
                    )
                )
            except sa_exc.IntegrityError:  # a concurrent create won the race
                raise KeyExistsError(
                    f"key {name}: a key with this name or token was just created"
                ) from None
        return chosen

    @staticmethod
    def _already_registered(connection: Connection, name: str, role: str, digest: str) -> bool:
        """True when the key is there as asked; raises when the name or token is taken."""
        holder = connection.execute(
            sa.select(api_keys.c.name, api_keys.c.role, api_keys.c.revoked_at).where(
                api_keys.c.token_hash == digest
            )
        ).first()
        if holder is not None and holder.revoked_at is None and holder.name == name:
            if holder.role == role:
                return True
            raise KeyExistsError(
                f"key {name} exists with role {holder.role}; revoke it to give it role {role}"
            )
        if holder is not None:
            # Never accept a revoked token again, nor one token for two keys.
            state = "was revoked" if holder.revoked_at is not None else "is in use"
            raise ApiKeyError(f"this token {state} (key {holder.name}): make a new one")
        taken = connection.execute(
            sa.select(api_keys.c.id).where(api_keys.c.name == name, _ACTIVE)
        ).first()
        if taken is not None:
            raise KeyExistsError(
                f"key {name}: an active key has this name; revoke it first or choose another"
            )
        return False

    def keys(self) -> list[ApiKey]:
        """The active keys, by name."""
        query = (
            sa.select(
                api_keys.c.name, api_keys.c.role, api_keys.c.created_at, api_keys.c.last_used_at
            )
            .where(_ACTIVE)
            .order_by(api_keys.c.name)
        )
        with self._begin() as connection:
            rows = connection.execute(query).all()
        return [
            ApiKey(row.name, cast(Role, row.role), row.created_at, row.last_used_at) for row in rows
        ]

    def revoke_key(self, name: str) -> None:
        """Revoke the active key `name` (its row stays, for audit) and end its sessions."""
        with self._begin(immediate=True) as connection:
            key_id = self._active_key_id(connection, name)
            connection.execute(
                api_keys.update().where(api_keys.c.id == key_id).values(revoked_at=_now())
            )
            connection.execute(sessions.delete().where(sessions.c.key_id == key_id))

    @staticmethod
    def _active_key_id(connection: Connection, name: str) -> int:
        key_id = connection.execute(
            sa.select(api_keys.c.id).where(api_keys.c.name == name, _ACTIVE)
        ).scalar_one_or_none()
        if key_id is None:
            raise UnknownKeyError(f"key {name}: no active key has this name")
        return int(key_id)

    def active_keys(self) -> dict[str, ActiveKey]:
        """Token hash -> key, for every active key (one SELECT: the server polls this)."""
        query = sa.select(api_keys.c.token_hash, api_keys.c.name, api_keys.c.role).where(_ACTIVE)
        with self._begin() as connection:
            rows = connection.execute(query).all()
        return {row.token_hash: ActiveKey(row.name, cast(Role, row.role)) for row in rows}

    def record_use(self, used: Mapping[str, datetime]) -> None:
        """Set the last use of each named key (aware datetimes), in one batched UPDATE; a
        time older than the one stored is ignored (several servers may report)."""
        if not used:
            return
        at = sa.bindparam("used_at", type_=UTCDateTime())
        stamp = (
            api_keys.update()
            .where(
                api_keys.c.name == sa.bindparam("key_name"),
                _ACTIVE,
                sa.or_(api_keys.c.last_used_at.is_(None), api_keys.c.last_used_at < at),
            )
            .values(last_used_at=at)
        )
        rows = [{"key_name": name, "used_at": when} for name, when in used.items()]
        with self._begin(immediate=True) as connection:
            connection.execute(stamp, rows)

    # --- sign-in sessions ----------------------------------------------------------------

    def create_session(self, key_name: str, role: Role, hours: float) -> tuple[str, str]:
        """Start a sign-in session for the active key `key_name`, lasting `hours`; returns the
        session token (only its hash is stored) and the session's CSRF token."""
        if hours <= 0:
            raise ValueError("a session lasts a positive number of hours")
        token, csrf_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = _now()
        with self._begin(immediate=True) as connection:
            key_id = self._active_key_id(connection, key_name)
            # Expired sessions go as new ones come: the table holds the live ones only.
            connection.execute(sessions.delete().where(sessions.c.expires_at <= now))
            connection.execute(
                sessions.insert().values(
                    token_hash=token_hash(token),
                    key_id=key_id,
                    role=role,
                    csrf_token=csrf_token,
                    created_at=now,
                    expires_at=now + timedelta(hours=hours),
                )
            )
        return token, csrf_token

    def active_sessions(self) -> dict[str, Session]:
        """Session-token hash -> session, for unexpired sessions of active keys (one SELECT)."""
        query = (
            sa.select(
                sessions.c.token_hash,
                api_keys.c.name,
                sessions.c.role,
                sessions.c.csrf_token,
                sessions.c.expires_at,
            )
            .join(api_keys, api_keys.c.id == sessions.c.key_id)
            .where(sessions.c.expires_at > _now(), _ACTIVE)
        )
        with self._begin() as connection:
            rows = connection.execute(query).all()
        return {
            row.token_hash: Session(row.name, cast(Role, row.role), row.csrf_token, row.expires_at)
            for row in rows
        }

    def end_session(self, token: str) -> None:
        """End the session of `token` (sign-out); an unknown or ended one is left as it is."""
        with self._begin(immediate=True) as connection:
            connection.execute(sessions.delete().where(sessions.c.token_hash == token_hash(token)))

    def dispose(self) -> None:
        """Close the engine's pooled connections."""
        self._engine.dispose()
