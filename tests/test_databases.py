"""Inputs and outputs on real servers: S3 (SeaweedFS), PostgreSQL and MongoDB (nx-27017).

Every server is started on loopback by the fixtures in tests/support/servers.py and stopped after.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pytest
import sqlalchemy as sa

from backorder.catalog import UNSCORED, Landing
from backorder.config import Settings
from backorder.databases import committed_filter, sqlalchemy_url
from backorder.errors import InputFileError, OutputError
from backorder.pipelines import score_pending
from backorder.predict import predict_file
from backorder.registry import Registry
from tests.conftest import SAMPLE, make_settings, run_cli
from tests.support.servers import MongoServer, PostgresServer, SeaweedS3
from tests.test_cli import one_line_error


def _name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def _counts(stdout: str) -> dict[str, int]:
    match = re.search(r"read ([\d,]+) rows: scored ([\d,]+) .*rejected ([\d,]+)", stdout)
    assert match, stdout
    read, scored, rejected = (int(g.replace(",", "")) for g in match.groups())
    assert read == scored + rejected
    return {"read": read, "scored": scored, "rejected": rejected}


def _sql_count(url: str, table: str, batch: str) -> int:
    engine = sa.create_engine(sqlalchemy_url(url))
    with engine.connect() as connection:
        count = connection.execute(
            sa.text(f'SELECT count(*) FROM "{table}" WHERE batch_id = :b'), {"b": batch}
        ).scalar_one()
    engine.dispose()
    return int(count)


def test_predict_moves_a_batch_from_s3_into_postgresql(
    s3_env: SeaweedS3, postgres_server: PostgresServer, trained_settings: Settings
) -> None:
    bucket = s3_env.make_bucket(_name("inbox"))
    source = f"s3://{bucket}/2026/11/new_batch.csv.gz"
    fsspec.filesystem("s3").put_file(str(SAMPLE / "new_batch.csv.gz"), source.removeprefix("s3://"))
    args = [
        "predict",
        "--input",
        source,
        "--output",
        postgres_server.plain_url,
        "--output-table",
        "predictions",
        "--batch-id",
        "20261102T000000Z",
    ]
    first = run_cli(*args, home=trained_settings.home)
    assert first.returncode == 0, first.stderr
    counts = _counts(first.stdout)
    assert counts["rejected"] == 1  # the sample's footer line
    url = postgres_server.plain_url
    assert _sql_count(url, "predictions", "20261102T000000Z") == counts["scored"]
    assert _sql_count(url, "predictions_rejects", "20261102T000000Z") == counts["rejected"]
    assert "***" not in first.stdout and "postgres@" in first.stdout

    # Re-scoring the batch replaces its rows; another batch adds its own.
    again = run_cli(*args, home=trained_settings.home)
    assert again.returncode == 0, again.stderr
    assert _sql_count(url, "predictions", "20261102T000000Z") == counts["scored"]
    other = run_cli(*args[:-1], "20261103T000000Z", home=trained_settings.home)
    assert other.returncode == 0, other.stderr
    assert _sql_count(url, "predictions", "20261103T000000Z") == counts["scored"]
    engine = sa.create_engine(sqlalchemy_url(url))
    frame = pd.read_sql_table("predictions", engine)
    engine.dispose()
    assert len(frame) == 2 * counts["scored"]
    assert frame.duplicated(["batch_id", "row_number"]).sum() == 0
    assert frame["backorder_probability"].between(0, 1).all()


def test_predict_moves_a_collection_from_mongodb_to_s3_parquet(
    s3_env: SeaweedS3, mongo_server: MongoServer, trained_settings: Settings
) -> None:
    batch = pd.read_csv(SAMPLE / "new_batch.csv.gz", dtype=str, keep_default_na=False).head(1500)
    documents = batch.to_dict("records")
    documents[7]["national_inv"] = "lots"  # a bad row is quarantined, not lost
    collection = _name("inventory_")
    client = mongo_server.client()
    client.get_default_database()[collection].insert_many(documents)
    client.close()
    bucket = s3_env.make_bucket(_name("scored"))
    output = f"s3://{bucket}/predictions/batch.parquet"
    result = run_cli(
        "predict",
        "--input",
        mongo_server.url,
        "--input-table",
        collection,
        "--output",
        output,
        home=trained_settings.home,
    )
    assert result.returncode == 0, result.stderr
    counts = _counts(result.stdout)
    assert counts == {"read": 1500, "scored": 1499, "rejected": 1}
    fs = fsspec.filesystem("s3")
    with fs.open(output.removeprefix("s3://"), "rb") as handle:
        scored = pd.read_parquet(handle)
    with fs.open(f"{bucket}/predictions/batch.rejects.parquet", "rb") as handle:
        rejects = pd.read_parquet(handle)
    assert len(scored) == 1499 and len(rejects) == 1
    assert "national_inv: not a number: 'lots'" in rejects["reason"].iloc[0]
    assert set(scored["sku"]) == set(batch["sku"]) - {documents[7]["sku"]}


def test_postgresql_table_to_mongodb_and_training_from_a_table(
    postgres_server: PostgresServer, mongo_server: MongoServer, tmp_path: Path
) -> None:
    engine = sa.create_engine(postgres_server.url)
    pd.read_csv(SAMPLE / "labelled.csv.gz").to_sql("history", engine, index=False)
    pd.read_csv(SAMPLE / "new_batch.csv.gz").head(800).to_sql("snapshot", engine, index=False)
    engine.dispose()
    home = tmp_path / "home"
    trained = run_cli(
        "train",
        "--data",
        postgres_server.plain_url,
        "--data-table",
        "history",
        "--output",
        str(tmp_path / "training"),
        home=home,
    )
    assert trained.returncode == 0, trained.stderr
    assert "model v1 (champion)" in trained.stdout
    collection = _name("predictions_")
    args = [
        "predict",
        "--input",
        postgres_server.plain_url,
        "--input-table",
        "snapshot",
        "--output",
        mongo_server.url,
        "--output-table",
        collection,
        "--batch-id",
        "20261104T000000Z",
    ]
    for _ in range(2):  # the second run replaces the first run's documents
        result = run_cli(*args, home=home)
        assert result.returncode == 0, result.stderr
    counts = _counts(result.stdout)
    client = mongo_server.client()
    database = client.get_default_database()
    # Read as documented: the batch's committed run only.
    committed = committed_filter(database, collection, "20261104T000000Z")
    documents = database[collection]
    assert documents.count_documents(committed) == counts["scored"] == 800
    # (Not distinct(): the test server's ignores an $in filter.)
    assert len({d["run_id"] for d in documents.find(committed, {"run_id": True})}) == 1
    client.close()


def test_missing_tables_and_unreachable_servers_are_one_line_errors(
    postgres_server: PostgresServer, mongo_server: MongoServer, trained_settings: Settings
) -> None:
    for source, table, expected in (
        (postgres_server.plain_url, "no_such_table", "table not found"),
        (mongo_server.url, "no_such_collection", "collection not found"),
        ("postgresql://nobody@127.0.0.1:1/x", "t", "cannot be read"),
    ):
        result = run_cli(
            "predict",
            "--input",
            source,
            "--input-table",
            table,
            "--output",
            "unused.parquet",
            home=trained_settings.home,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], result.stderr
        assert "Traceback" not in result.stderr


def test_an_unreachable_output_database_exits_4(trained_settings: Settings) -> None:
    result = run_cli(
        "predict",
        "--input",
        str(SAMPLE / "new_batch.csv.gz"),
        "--output",
        "postgresql://nobody@127.0.0.1:1/x",
        "--output-table",
        "predictions",
        home=trained_settings.home,
    )
    assert result.returncode == 4, result.stderr
    assert "#predictions: cannot be written" in one_line_error(result.stderr)


def test_training_keeps_mlflow_artifacts_in_s3(s3_env: SeaweedS3, tmp_path: Path) -> None:
    bucket = s3_env.make_bucket(_name("mlflow"))
    settings = make_settings(tmp_path / "home", artifact_location=f"s3://{bucket}/artifacts")
    from backorder.train import run_training

    outcome = run_training([SAMPLE / "labelled.csv.gz"], settings, tmp_path / "training")
    stored = fsspec.filesystem("s3").find(f"{bucket}/artifacts")
    assert any(p.endswith("model/booster.txt") for p in stored)
    assert any(p.endswith("model/reference.parquet") for p in stored)
    assert not (tmp_path / "home" / "mlartifacts").exists()
    loaded = Registry(settings).load("champion")
    assert loaded.version == outcome.version


def test_landing_layout_on_s3(s3_env: SeaweedS3, trained_settings: Settings) -> None:
    bucket = s3_env.make_bucket(_name("landing"))
    root = f"s3://{bucket}/backorder"
    landing = Landing(root)
    landing.land(SAMPLE / "new_batch.csv.gz", UNSCORED, "20261105T000000Z")
    done = score_pending(root, trained_settings)
    assert [d["batch_id"] for d in done] == ["20261105T000000Z"]
    record = landing.records("scoring")["20261105T000000Z"]
    assert record["read"] == record["scored"] + record["rejected"]
    fs = fsspec.filesystem("s3")
    with fs.open(f"{bucket}/backorder/predictions/20261105T000000Z.parquet", "rb") as handle:
        assert len(pd.read_parquet(handle)) == record["scored"]
    assert fs.exists(f"{bucket}/backorder/reports/20261105T000000Z/drift_report.html")


def test_s3_stopping_mid_batch_fails_cleanly_and_a_retry_succeeds(
    s3_env: SeaweedS3, trained_settings: Settings, tmp_path: Path
) -> None:
    bucket = s3_env.make_bucket(_name("fault"))
    output = f"s3://{bucket}/predictions/20261106T000000Z.parquet"
    rejects = f"s3://{bucket}/rejects/20261106T000000Z.parquet"
    settings = trained_settings.model_copy(update={"read_block_bytes": 64 << 10})
    model = Registry(settings).load("champion")
    chunks = {"n": 0}

    def stop_after_first_chunk(_table: Any) -> None:
        chunks["n"] += 1
        if chunks["n"] == 1:
            s3_env.stop()

    with pytest.raises(OutputError) as caught:
        predict_file(
            SAMPLE / "new_batch.csv.gz",
            output,
            model,
            settings,
            rejects=rejects,
            on_chunk=stop_after_first_chunk,
            batch_id="20261106T000000Z",
        )
    assert chunks["n"] > 1  # it really stopped in the middle of the batch
    message = str(caught.value)
    assert "\n" not in message and "cannot be written" in message and bucket in message
    assert not list(tmp_path.glob("*.tmp"))

    s3_env.restart()
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert not fs.exists(output.removeprefix("s3://"))  # nothing partial was left
    assert not fs.exists(rejects.removeprefix("s3://"))
    summary = predict_file(
        SAMPLE / "new_batch.csv.gz",
        output,
        model,
        settings,
        rejects=rejects,
        batch_id="20261106T000000Z",
    )
    assert summary.read == summary.scored + summary.rejected
    assert sorted(fs.find(bucket)) == sorted(
        [output.removeprefix("s3://"), rejects.removeprefix("s3://")]
    )
    with fs.open(output.removeprefix("s3://"), "rb") as handle:
        scored = pd.read_parquet(handle)
    assert len(scored) == summary.scored and scored["row_number"].is_unique


def test_unreachable_s3_input_is_a_one_line_error(
    s3_env: SeaweedS3, trained_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    with pytest.raises(InputFileError, match=r"^s3://nowhere/batch.csv: cannot be opened"):
        from backorder.io import open_input

        open_input("s3://nowhere/batch.csv")
