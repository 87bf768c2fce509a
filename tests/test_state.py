"""The state store (API keys, sign-in sessions) on SQLite and on a real PostgreSQL, and the
`backorder keys` commands through the real entry point."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from backorder.errors import ApiKeyError, KeyExistsError, StateStoreError, UnknownKeyError
from backorder.state import (
    VERSION_TABLE,
    ActiveKey,
    StateStore,
    metadata,
    new_token,
    sessions,
    token_hash,
)
from tests.conftest import run_cli
from tests.support.servers import HOST, PostgresServer, free_port
from tests.test_cli import one_line_error

BACKENDS = ["sqlite", "postgresql"]


def _fresh_postgres_database(server: PostgresServer) -> str:
    name = f"state_{uuid.uuid4().hex[:10]}"
    dsn = f"host={HOST} port={server.port} user={server.user} dbname=postgres"
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://{server.user}@{HOST}:{server.port}/{name}"


@pytest.fixture(params=BACKENDS)
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a new SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return _fresh_postgres_database(request.getfixturevalue("postgres_server"))


@pytest.fixture
def store(state_url: str) -> Iterator[StateStore]:
    opened = StateStore(state_url)
    opened.migrate()
    yield opened
    opened.dispose()


@pytest.fixture
def raw(state_url: str) -> Iterator[sa.Engine]:
    """The same database, read and written behind the store's back."""
    engine = sa.create_engine(state_url)
    yield engine
    engine.dispose()


# StateStore.keys() is a list of ApiKey, not a dict's keys (ruff's SIM118 guesses from the name).
def _names(store: StateStore) -> list[str]:
    return [key.name for key in store.keys()]  # noqa: SIM118


def _last_used(store: StateStore) -> dict[str, datetime | None]:
    return {key.name: key.last_used_at for key in store.keys()}  # noqa: SIM118


def _revisions(engine: sa.Engine) -> list[str]:
    with engine.connect() as connection:
        return list(
            connection.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars()
        )


def test_migrating_twice_is_a_no_op_and_the_schema_matches_the_tables_queried(
    store: StateStore, raw: sa.Engine
) -> None:
    store.create_key("planning", "planner")
    store.migrate()
    assert _revisions(raw) == ["0001"]
    assert _names(store) == ["planning"]
    with raw.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        # What the revisions made is what backorder.state's queries expect.
        assert compare_metadata(context, metadata) == []
        assert "alembic_version" not in sa.inspect(connection).get_table_names()


def test_keys_are_created_listed_revoked_and_their_names_reused(store: StateStore) -> None:
    before = datetime.now(UTC)
    first = store.create_key("planning", "planner")
    store.create_key("grafana", "viewer")
    assert first.startswith("bo_") and len(first) > 40
    listed = store.keys()
    assert [(key.name, key.role) for key in listed] == [
        ("grafana", "viewer"),
        ("planning", "planner"),
    ]
    assert all(key.created_at.tzinfo == UTC and key.created_at >= before for key in listed)
    assert all(key.last_used_at is None for key in listed)
    assert store.active_keys()[token_hash(first)] == ActiveKey("planning", "planner")

    with pytest.raises(KeyExistsError, match="planning"):
        store.create_key("planning", "admin")
    store.revoke_key("planning")
    assert _names(store) == ["grafana"]
    assert token_hash(first) not in store.active_keys()
    with pytest.raises(UnknownKeyError, match="planning"):
        store.revoke_key("planning")

    second = store.create_key("planning", "admin")  # the name is free again
    assert second != first
    assert store.active_keys()[token_hash(second)] == ActiveKey("planning", "admin")
    assert token_hash(first) not in store.active_keys()


def test_only_hashes_of_tokens_are_stored(store: StateStore, raw: sa.Engine) -> None:
    token = store.create_key("planning", "planner")
    session_token, csrf_token = store.create_session("planning", "planner", hours=1)
    with raw.connect() as connection:
        tables = sa.inspect(connection).get_table_names()
        stored = repr(
            [connection.execute(sa.text(f'SELECT * FROM "{name}"')).all() for name in tables]
        )
    assert token not in stored and session_token not in stored
    assert token_hash(token) in stored and token_hash(session_token) in stored
    assert csrf_token in stored  # not a credential alone; the page needs it back


def test_a_given_token_is_registered_once_and_never_after_its_revocation(
    store: StateStore,
) -> None:
    token = new_token()
    assert store.create_key("prometheus", "metrics", token) == token
    assert store.create_key("prometheus", "metrics", token) == token  # provisioning again
    assert len(store.keys()) == 1
    with pytest.raises(KeyExistsError, match="role metrics"):
        store.create_key("prometheus", "admin", token)
    with pytest.raises(ApiKeyError, match="in use"):
        store.create_key("someone-else", "viewer", token)
    with pytest.raises(KeyExistsError):
        store.create_key("prometheus", "metrics", new_token())
    store.revoke_key("prometheus")
    with pytest.raises(ApiKeyError, match="revoked"):
        store.create_key("prometheus", "metrics", token)
    assert store.active_keys() == {}


def test_sessions_end_on_sign_out_revocation_and_expiry(store: StateStore, raw: sa.Engine) -> None:
    store.create_key("planning", "planner")
    store.create_key("ops", "admin")
    signed_in, csrf_token = store.create_session("planning", "planner", hours=12)
    active = store.active_sessions()[token_hash(signed_in)]
    assert (active.key_name, active.role, active.csrf_token) == ("planning", "planner", csrf_token)
    assert active.expires_at.tzinfo == UTC
    assert timedelta(hours=11.9) < active.expires_at - datetime.now(UTC) <= timedelta(hours=12)

    store.end_session(signed_in)
    store.end_session(signed_in)  # signing out twice is harmless
    assert store.active_sessions() == {}

    first, _ = store.create_session("planning", "planner", hours=12)
    second, _ = store.create_session("planning", "planner", hours=12)
    other, _ = store.create_session("ops", "admin", hours=12)
    store.revoke_key("planning")
    assert set(store.active_sessions()) == {token_hash(other)}
    with pytest.raises(UnknownKeyError):
        store.create_session("planning", "planner", hours=12)

    # The clock moves past the session's end: it is no longer active, and the next sign-in
    # clears it out of the table.
    with raw.begin() as connection:
        connection.execute(
            sessions.update().values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert store.active_sessions() == {}
    fresh, _ = store.create_session("ops", "admin", hours=1)
    assert set(store.active_sessions()) == {token_hash(fresh)}
    with raw.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(sessions)).scalar() == 1
    assert {first, second}.isdisjoint(store.active_sessions())


def test_record_use_stamps_last_used_and_never_moves_it_back(store: StateStore) -> None:
    store.create_key("planning", "planner")
    store.create_key("grafana", "viewer")
    store.record_use({})  # nothing to write
    later = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    earlier = later - timedelta(minutes=5)
    store.record_use({"planning": later, "grafana": earlier, "revoked-or-unknown": later})
    assert _last_used(store) == {"planning": later, "grafana": earlier}
    store.record_use({"planning": earlier})  # a slower server reports an older use
    assert _last_used(store)["planning"] == later


def test_processes_starting_together_migrate_once(state_url: str, raw: sa.Engine) -> None:
    # Separate processes, as the server and a `backorder keys` one-off are: each waits for the
    # other's migration (a lock in the database), then finds the schema at head.
    migrate = f"from backorder.state import StateStore; StateStore({state_url!r}).migrate()"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", migrate],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outcomes = [(*run.communicate(timeout=120), run.returncode) for run in runs]
    assert [code for _, _, code in outcomes] == [0, 0, 0], outcomes
    assert _revisions(raw) == ["0001"]


def test_a_schema_from_a_newer_version_is_refused(store: StateStore, raw: sa.Engine) -> None:
    with raw.begin() as connection:
        connection.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    with pytest.raises(StateStoreError, match="newer version of backorder"):
        store.migrate()


@pytest.mark.parametrize(
    ("name", "role", "token", "message"),
    [
        ("", "viewer", None, "key name"),
        ("has space", "viewer", None, "key name"),
        ("x" * 65, "viewer", None, "key name"),
        ("planning", "superuser", None, "role 'superuser'"),
        ("planning", "viewer", "short", "at least 32"),
        ("planning", "viewer", "a" * 31 + " b", "without spaces"),
    ],
)
def test_bad_names_roles_and_tokens_are_refused(
    tmp_path: Path, name: str, role: str, token: str | None, message: str
) -> None:
    with StateStore(f"sqlite:///{tmp_path / 'state.db'}") as store:
        store.migrate()
        with pytest.raises(ApiKeyError, match=message):
            store.create_key(name, role, token)  # type: ignore[arg-type]
        assert store.keys() == []


def test_an_unreachable_store_is_one_error_that_hides_the_password() -> None:
    url = f"postgresql://planner:s3cret-pw@{HOST}:{free_port()}/state"
    store = StateStore(url)  # no I/O yet
    with pytest.raises(StateStoreError) as caught:
        store.active_keys()
    message = str(caught.value)
    assert "s3cret-pw" not in message and "planner:***@" in message
    assert len(message.splitlines()) == 1


# --- the command line ------------------------------------------------------------------


def test_keys_create_list_revoke_on_the_command_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    created = run_cli("keys", "create", "planning-team", "--role", "planner", home=home)
    assert created.returncode == 0, created.stderr
    lines = created.stdout.strip().splitlines()
    token = lines[-1]
    assert len(lines) == 2 and "only this once" in lines[0]
    assert token.startswith("bo_") and token not in created.stderr
    assert (home / "state.db").is_file()

    listed = run_cli("keys", "list", home=home)
    assert listed.returncode == 0, listed.stderr
    assert "planning-team" in listed.stdout and "planner" in listed.stdout
    assert token not in listed.stdout and token_hash(token) not in listed.stdout
    as_json = run_cli("keys", "list", "--json", home=home)
    assert as_json.returncode == 0, as_json.stderr
    (row,) = json.loads(as_json.stdout)
    assert row["name"] == "planning-team" and row["role"] == "planner"
    assert row["last_used_at"] is None and row["created_at"].endswith("+00:00")
    assert token not in as_json.stdout

    revoked = run_cli("keys", "revoke", "planning-team", home=home)
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(run_cli("keys", "list", "--json", home=home).stdout) == []


def test_keys_errors_are_one_line_with_a_non_zero_exit(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run_cli("keys", "create", "ops", "--role", "admin", home=home).returncode == 0
    short = tmp_path / "short-token"
    short.write_text("not-long-enough\n")
    spaced = tmp_path / "spaced-token"
    spaced.write_text(f"{new_token()} {new_token()}\n")
    unreachable = {"BACKORDER_STATE_URL": f"postgresql://u:pw-1234@{HOST}:{free_port()}/db"}
    cases = [
        (["keys", "create", "x", "--role", "root"], {}, 2, "--role root"),
        (["keys", "create", "ops", "--role", "admin"], {}, 2, "key ops"),
        (["keys", "revoke", "nobody"], {}, 3, "key nobody"),
        (["keys", "create", "p", "--role", "metrics", "--token-file", str(short)], {}, 2, "32"),
        (["keys", "create", "p", "--role", "metrics", "--token-file", "nope"], {}, 2, "nope"),
        (
            ["keys", "create", "p", "--role", "metrics", "--token-file", str(spaced)],
            {},
            2,
            "spaces",
        ),
        (["keys", "list"], unreachable, 4, "u:***@"),
    ]
    for args, env, code, needle in cases:
        result = run_cli(*args, home=home, env=env)
        assert result.returncode == code, (args, result.stderr)
        assert needle in one_line_error(result.stderr), args
        assert "pw-1234" not in result.stderr and result.stdout == ""


def test_keys_create_from_a_token_file_is_idempotent_on_postgresql(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    # The compose stack's provisioning: a secret file, a plain postgresql:// URL, run each start.
    database = _fresh_postgres_database(postgres_server)
    env = {"BACKORDER_STATE_URL": database.replace("postgresql+psycopg://", "postgresql://")}
    token = new_token()
    secret = tmp_path / "prometheus-token"
    secret.write_text(f"  {token}\n")
    args = ["keys", "create", "prometheus", "--role", "metrics", "--token-file", str(secret)]
    for _ in range(2):
        result = run_cli(*args, home=tmp_path / "home", env=env)
        assert result.returncode == 0, result.stderr
        assert token not in result.stdout + result.stderr
    assert "already held" in result.stdout
    with StateStore(database) as store:
        assert store.active_keys() == {token_hash(token): ActiveKey("prometheus", "metrics")}
    assert not (tmp_path / "home" / "state.db").exists()
