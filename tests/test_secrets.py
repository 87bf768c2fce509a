"""Secrets never printed: a password in a URI reaches no output, log, report or manifest.

Every command that takes a URI runs with a password holding ``@``, ``:`` and ``%`` (raw, as
people paste it, and URL-encoded, as the URL needs it) against a store that refuses it: a closed
port, a real PostgreSQL that knows no such role, a real MongoDB wire server that refuses the
credentials, an S3 URL with bad keys against real SeaweedFS. Then stdout, stderr and every file
the command wrote are searched for the password, its encoded form and each piece of it.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple
from urllib.parse import quote, quote_plus

import pandas as pd
import pytest
import sqlalchemy as sa

from backorder.catalog import UNSCORED, Landing
from backorder.logs import JsonFormatter, RedactSecrets, json_log_config, step_logger
from backorder.uris import encoded_credentials, redact, redact_fields, redact_text
from tests.conftest import SAMPLE, run_cli
from tests.support.servers import MongoServer, PostgresServer, SeaweedS3, free_port

PASSWORD = "p@ss:w%rd-SECRET123"
ENCODED = quote(PASSWORD, safe="")  # p%40ss%3Aw%25rd-SECRET123
FORMS = {"raw": PASSWORD, "encoded": ENCODED}


def _pieces(secret: str) -> set[str]:
    return {piece for piece in re.split(r"[@:]", secret) if len(piece) > 3}


# Every form in which the password could leak: whole, URL-encoded both ways, and each piece of
# it between '@' and ':' longer than 3 characters (what a parser splitting it wrongly prints).
FORBIDDEN = sorted(
    {PASSWORD, ENCODED, quote_plus(PASSWORD), quote(PASSWORD), *_pieces(PASSWORD)},
    key=len,
    reverse=True,
)


def leaks(text: str) -> list[str]:
    return [secret for secret in FORBIDDEN if secret in text]


def written_files(*folders: Path) -> Iterator[Path]:
    for folder in folders:
        if folder.exists():
            yield from (path for path in folder.rglob("*") if path.is_file())


def assert_no_secret(result: subprocess.CompletedProcess[str], *folders: Path) -> None:
    """Neither the command's output nor any file under ``folders`` holds the password."""
    for stream, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        assert not leaks(text), f"{stream} holds the password {leaks(text)}:\n{text}"
    for path in written_files(*folders):
        data = path.read_bytes()
        found = [s for s in FORBIDDEN if s.encode() in data]
        assert not found, f"{path} holds the password {found}"


# -- redact() and friends: fast, in-process ---------------------------------------------------
@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        # The last '@' of the authority separates the credentials from the host.
        (
            f"postgresql://app:{PASSWORD}@db.example:5432/sales",
            "postgresql://app:***@db.example:5432/sales",
        ),
        (
            f"postgresql://app:{ENCODED}@db.example:5432/sales",
            "postgresql://app:***@db.example:5432/sales",
        ),
        (
            f"postgresql+psycopg://app:{PASSWORD}@db/sales#predictions",
            "postgresql+psycopg://app:***@db/sales#predictions",
        ),
        (f"mysql://app:{PASSWORD}@db/sales", "mysql://app:***@db/sales"),
        (
            f"mongodb://app:{PASSWORD}@h1:27017,h2:27017/sales?authSource=admin#orders",
            "mongodb://app:***@h1:27017,h2:27017/sales?authSource=admin#orders",
        ),
        (
            f"mongodb+srv://app:{ENCODED}@cluster0.example.net/sales",
            "mongodb+srv://app:***@cluster0.example.net/sales",
        ),
        (f"s3://AKIDEXAMPLE:{PASSWORD}@bucket/landing", "s3://AKIDEXAMPLE:***@bucket/landing"),
        # An AWS secret key may hold a raw '/': the password still ends at the last '@'.
        (
            "s3://AKIDEXAMPLE:wJalr/K7MDENG+bPxRfiCY@bucket/x.csv",
            "s3://AKIDEXAMPLE:***@bucket/x.csv",
        ),
        (
            f"https://planner:{PASSWORD}@files.example/batch.csv",
            "https://planner:***@files.example/batch.csv",
        ),
        # Secrets in the query, whatever the scheme.
        (
            f"postgresql://db/sales?user=app&password={ENCODED}&sslmode=require",
            "postgresql://db/sales?user=app&password=***&sslmode=require",
        ),
        (
            "https://h.example/x.csv?X-Amz-Signature=abcd1234&X-Amz-Credential=AKID%2F2026&v=1",
            "https://h.example/x.csv?X-Amz-Signature=***&X-Amz-Credential=***&v=1",
        ),
        (
            "http://h/metrics?access_key=AK&secret_key=SK&api-key=K&token=T",
            "http://h/metrics?access_key=***&secret_key=***&api-key=***&token=***",
        ),
        # Nothing to hide: unchanged.
        ("postgresql://app@db.example:5432/sales", "postgresql://app@db.example:5432/sales"),
        ("sqlite:////srv/backorder/mlflow.db", "sqlite:////srv/backorder/mlflow.db"),
        ("sqlite:///relative/a:b@c.db", "sqlite:///relative/a:b@c.db"),
        (
            "s3://bucket/landing/unscored/20261128T172342Z.parquet",
            "s3://bucket/landing/unscored/20261128T172342Z.parquet",
        ),
        ("s3://bucket/daily/report@2026.csv", "s3://bucket/daily/report@2026.csv"),
        ("http://pushgateway:9091", "http://pushgateway:9091"),
        (
            "mongodb://h1:27017,h2:27017/sales?authSource=admin",
            "mongodb://h1:27017,h2:27017/sales?authSource=admin",
        ),
        ("/data/u:p@x.csv", "/data/u:p@x.csv"),
        ("data/sample/new_batch.csv.gz", "data/sample/new_batch.csv.gz"),
    ],
)
def test_redact_hides_the_password_and_keeps_the_rest(uri: str, shown: str) -> None:
    assert redact(uri) == shown
    assert not leaks(redact(uri))
    assert redact(redact(uri)) == redact(uri)


def test_encoded_credentials_lets_parsers_split_a_raw_password_at_the_last_at() -> None:
    raw = f"postgresql://app:{PASSWORD}@db.example:5432/sales"
    url = sa.engine.make_url(encoded_credentials(raw))
    assert (url.username, url.password, url.host, url.port) == ("app", PASSWORD, "db.example", 5432)
    # A URL that was right already is left as it was.
    for right in (f"postgresql://app:{ENCODED}@db/sales", "sqlite:////x/y.db", "mongodb://h:1/db"):
        assert encoded_credentials(right) == right


def test_redact_text_finds_uris_in_messages() -> None:
    message = (
        f"postgresql://app:{PASSWORD}@db/sales#t: cannot be read; retry "
        f"'s3://AK:{ENCODED}@bucket/x.csv', or http://u:{PASSWORD}@h:9091)"
    )
    cleaned = redact_text(message)
    assert not leaks(cleaned), cleaned
    assert "postgresql://app:***@db/sales#t: cannot be read" in cleaned
    assert "'s3://AK:***@bucket/x.csv'" in cleaned
    # A URI followed by punctuation, redacted already: left as it is ("db:" is not its path).
    hidden = "state store postgresql://app:***@db:5432/sales: connection failed (see s3://b/x)."
    assert redact_text(hidden) == hidden
    # Known secrets are masked even where a library printed them without their URI.
    bare = f"Invalid bucket name \"AK:{PASSWORD}@bucket\"; port 'w%rd-SECRET123@db:5'"
    assert not leaks(redact_text(bare, f"s3://AK:{PASSWORD}@bucket/x"))
    assert redact_fields(
        {"input": f"s3://AK:{PASSWORD}@b/x", "n": 3, "l": [f"http://u:{ENCODED}@h"]}
    ) == {
        "input": "s3://AK:***@b/x",
        "n": 3,
        "l": ["http://u:***@h"],
    }


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.getLogger("backorder.test").makeRecord(
        "backorder.test", logging.ERROR, __file__, 1, message, args, None, extra=extra
    )
    return record


def test_the_logging_filter_redacts_messages_arguments_extras_and_tracebacks() -> None:
    uri = f"postgresql://app:{PASSWORD}@db/sales"
    record = _record("cannot read %s", uri, input=uri, nested={"current": [uri]})
    try:
        raise RuntimeError(f"connect to {uri} failed")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    assert RedactSecrets().filter(record)
    line = JsonFormatter().format(record)
    assert not leaks(line), line
    doc = json.loads(line)
    assert doc["message"] == "cannot read postgresql://app:***@db/sales"
    assert doc["input"] == "postgresql://app:***@db/sales"
    assert doc["nested"] == {"current": ["postgresql://app:***@db/sales"]}
    assert "connect to postgresql://app:***@db/sales failed" in doc["exception"]


def test_json_logging_and_step_loggers_carry_the_filter() -> None:
    stream = io.StringIO()
    config = json_log_config()
    handler = logging.StreamHandler(stream)
    for name in config["handlers"]["stderr"].get("filters", []):
        handler.addFilter(config["filters"][name]["()"]())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("backorder.test_secrets")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.warning(f"pushing to http://u:{PASSWORD}@gateway:9091")
        step_logger("backorder.test_secrets").info("landed", extra={"root": f"s3://k:{ENCODED}@b"})
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().count("\n") == 2
    assert not leaks(stream.getvalue()), stream.getvalue()


def test_a_manifest_record_holds_no_password(tmp_path: Path) -> None:
    landing = Landing(str(tmp_path / "landing"))
    written = landing.record(
        "scoring", "20261128T172342Z", {"input": f"s3://AK:{PASSWORD}@bucket/landing/x.parquet"}
    )
    assert not leaks(Path(written).read_text())


# -- every command that takes a URI, against stores that refuse --------------------------------
class Case(NamedTuple):
    """One run of the real command line. In ``command`` and ``env``: {pw} is the password in
    the case's form; {closed} a port nothing listens on; {pg} and {mongo} the real servers'
    ports; {table} a PostgreSQL table of the sample batch; {out} the case's output folder."""

    name: str
    form: str  # "raw" or "encoded"
    command: str
    env: Mapping[str, str] = MappingProxyType({})
    succeeds: bool = False

    @property
    def id(self) -> str:
        return f"{self.name} [{self.form}]"


URIS = {
    "pg_closed": "postgresql://backorder:{pw}@127.0.0.1:{closed}/backorder",
    "pg_unknown_role": "postgresql://nobody:{pw}@127.0.0.1:{pg}/backorder",  # refused
    "pg_trusted": "postgresql://postgres:{pw}@127.0.0.1:{pg}/backorder",  # trust: any password
    "s3_root": "s3://AKIDBAD:{pw}@landing-bucket/landing",
    "s3_file": "s3://AKIDBAD:{pw}@inbox/new_batch.csv.gz",
    "new": str(SAMPLE / "new_batch.csv.gz"),
    "labelled": str(SAMPLE / "labelled.csv.gz"),
}
TRACKING = {"BACKORDER_TRACKING_URI": "http://mlflow:{pw}@127.0.0.1:{closed}"}
STATE = {"BACKORDER_STATE_URL": "{pg_closed}"}
TO_FILE = "--output {out}/p.parquet"
CASES = [
    Case(
        "predict --input postgresql",
        "raw",
        f"predict --input {{pg_closed}} --input-table t {TO_FILE}",
    ),
    Case(
        "predict --input postgresql",
        "encoded",
        f"predict --input {{pg_closed}} --input-table t {TO_FILE}",
    ),
    Case(
        "predict --input postgresql, unknown role",
        "raw",
        f"predict --input {{pg_unknown_role}}#t {TO_FILE}",
    ),
    Case(
        "predict --input mongodb",
        "encoded",
        f"predict --input mongodb://planner:{{pw}}@127.0.0.1:{{mongo}}/backorder#t {TO_FILE}",
    ),
    Case("predict --input s3", "raw", f"predict --input {{s3_file}} {TO_FILE}"),
    Case(
        "predict --input http",
        "encoded",
        f"predict --input http://planner:{{pw}}@127.0.0.1:{{closed}}/new.csv {TO_FILE}",
    ),
    Case(
        "predict --engine dask",
        "raw",
        "predict --engine dask --input s3://AKIDBAD:{pw}@inbox/parts --output {out}/parts",
    ),
    Case("train --data without a table", "raw", "train --data {pg_closed} --output {out}"),
    Case("train --data without a table", "encoded", "train --data {pg_closed} --output {out}"),
    Case("train --data", "raw", "train --data {pg_closed} --data-table t --output {out}"),
    Case("evaluate --data", "raw", "evaluate --data {pg_closed}#t --output {out}"),
    Case(
        "drift --reference", "raw", "drift --reference {pg_closed}#t --current {new} --output {out}"
    ),
    Case(
        "drift --current",
        "encoded",
        "--log-format json drift --reference {labelled} --current {pg_closed}#t --output {out}",
    ),
    # Succeeds: drift.json and the HTML report name the batch, without its password.
    Case(
        "drift --current, read",
        "raw",
        "drift --reference {labelled} --current {pg_trusted}#{table} --output {out}",
        succeeds=True,
    ),
    Case("land --root", "raw", "land --input {new} --root {s3_root}"),
    Case("land --root", "encoded", "land --input {new} --root {s3_root}"),
    Case("land --input", "raw", "land --input {s3_file} --root {out}/landing"),
    Case("batches", "raw", "batches --root {s3_root}"),
    Case("batches --json", "encoded", "--log-format json batches --root {s3_root} --json"),
    Case("score-pending", "raw", "score-pending --root {s3_root}"),
    Case("train-pending", "raw", "train-pending --root {s3_root}"),
    # A registry it cannot reach lists no versions: not this test's subject.
    Case("models list", "raw", "models list", TRACKING, succeeds=True),
    Case("models promote", "raw", "models promote 1", TRACKING),
    Case("models promote", "encoded", "models promote 1", TRACKING),
    Case("models rollback", "raw", "models rollback", TRACKING),
    Case("serve", "raw", "serve --port {port}", TRACKING),
    Case("serve", "encoded", "--log-format json serve --port {port}", TRACKING),
    Case("keys create", "raw", "keys create planning --role planner", STATE),
    Case("keys list", "encoded", "keys list", STATE),
    Case(
        "keys list, unknown role", "raw", "keys list", {"BACKORDER_STATE_URL": "{pg_unknown_role}"}
    ),
    Case("keys revoke", "raw", "keys revoke planning", STATE),
]
# With a model: predict from PostgreSQL into PostgreSQL (succeeds), and score-pending whose
# Pushgateway refuses the metrics.
MODEL_CASES = [
    Case(
        "predict postgresql to postgresql",
        "raw",
        "--log-format json predict --input {pg_trusted}#{table} "
        "--output {pg_trusted}#{table}_scored",
        succeeds=True,
    ),
    Case(
        "score-pending, pushgateway",
        "raw",
        "score-pending --root {out}/landing",
        {"BACKORDER_PUSHGATEWAY_URL": "http://ops:{pw}@127.0.0.1:{closed}"},
    ),
]


@dataclass
class Ran:
    case: Case
    result: subprocess.CompletedProcess[str]
    folders: tuple[Path, ...]


def _run_cases(
    cases: list[Case], places: dict[str, str], base: Path, prepare: Callable[[Path, Path], None]
) -> dict[str, Ran]:
    """Run every case, three at a time (each is mostly a Python start-up), in folders of its
    own: HOME and an output folder, both searched afterwards."""

    def one(number: int, case: Case) -> Ran:
        home, out = base / f"case{number}" / "home", base / f"case{number}" / "out"
        prepare(home, out)
        fill = {**places, "pw": FORMS[case.form], "out": str(out), "port": str(free_port())}
        fill |= {name: uri.format(**fill) for name, uri in URIS.items()}
        env = {name: value.format(**fill) for name, value in case.env.items()}
        # MLflow's REST client retries for minutes by default; one refusal is enough here.
        env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        result = run_cli(*case.command.format(**fill).split(), home=home, env=env)
        return Ran(case, result, (home, out))

    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {case.id: pool.submit(one, n, case) for n, case in enumerate(cases)}
        return {name: future.result() for name, future in futures.items()}


def _table_of_sample(postgres_server: PostgresServer) -> str:
    table = f"batch_{uuid.uuid4().hex[:8]}"
    rows = pd.read_csv(SAMPLE / "new_batch.csv.gz", nrows=2_000, dtype=str)
    engine = sa.create_engine(postgres_server.url)
    rows.to_sql(table, engine, index=False)
    engine.dispose()
    return table


@pytest.fixture(scope="module")
def places(
    postgres_server: PostgresServer, mongo_server: MongoServer, s3_server: SeaweedS3
) -> dict[str, str]:
    return {
        "closed": str(free_port()),  # bound, then released: nothing listens there
        "pg": str(postgres_server.port),
        "mongo": str(mongo_server.port),
        "table": _table_of_sample(postgres_server),
    }


@pytest.fixture(scope="module")
def ran(
    places: dict[str, str], s3_server: SeaweedS3, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Ran]:
    """Every case of CASES, run once for the module."""
    s3 = {
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,  # real SeaweedFS, with wrong keys here too
        "AWS_ACCESS_KEY_ID": "AKIDBAD",
        "AWS_SECRET_ACCESS_KEY": "not-the-key",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    cases = [case._replace(env={**s3, **case.env}) for case in CASES]
    return _run_cases(cases, places, tmp_path_factory.mktemp("secrets"), lambda *_: None)


@pytest.fixture(scope="module")
def ran_with_model(
    places: dict[str, str], trained_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Ran]:
    def prepare(home: Path, out: Path) -> None:
        shutil.copytree(trained_home, home)
        Landing(str(out / "landing")).land(
            SAMPLE / "new_batch.csv.gz", UNSCORED, "20261128T172342Z"
        )

    return _run_cases(MODEL_CASES, places, tmp_path_factory.mktemp("secrets-model"), prepare)


def _check(ran: Ran) -> None:
    result = ran.result
    if ran.case.succeeds:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0, result.stdout
    assert_no_secret(result, *ran.folders)


@pytest.mark.parametrize("case", [case.id for case in CASES])
def test_no_command_prints_the_password(case: str, ran: dict[str, Ran]) -> None:
    _check(ran[case])


@pytest.mark.parametrize("case", [case.id for case in MODEL_CASES])
def test_no_scoring_run_prints_the_password(case: str, ran_with_model: dict[str, Ran]) -> None:
    _check(ran_with_model[case])


def test_drift_files_name_a_database_batch_without_its_password(
    ran: dict[str, Ran], places: dict[str, str]
) -> None:
    done = ran["drift --current, read [raw]"]
    out = done.folders[1]
    summary = json.loads((out / "drift.json").read_text())
    where = f"postgresql://postgres:***@127.0.0.1:{places['pg']}/backorder#{places['table']}"
    assert summary["current"] == where
    assert where in (out / "drift_report.html").read_text()


def test_messages_name_the_store_with_its_password_masked(ran: dict[str, Ran]) -> None:
    """Not an empty message: the store is named, only its password is not."""
    for case in (
        "predict --input postgresql [raw]",
        "models promote [encoded]",
        "keys list [encoded]",
    ):
        assert "***@127.0.0.1:" in ran[case].result.stderr, ran[case].result.stderr


def test_predicting_into_a_database_names_it_with_the_password_masked(
    ran_with_model: dict[str, Ran],
) -> None:
    stdout = ran_with_model["predict postgresql to postgresql [raw]"].result.stdout
    assert "predictions: postgresql://postgres:***@127.0.0.1:" in stdout, stdout
