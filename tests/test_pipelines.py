"""The landing layout, the manifest, the drift policy and the pipeline steps, on local files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from backorder.catalog import (
    LABELLED,
    UNSCORED,
    Landing,
    batch_id_of,
    pending_scoring,
    pending_training,
)
from backorder.config import Settings
from backorder.errors import BackorderError, InputFileError
from backorder.logs import JsonFormatter
from backorder.pipelines import (
    DriftBlocked,
    check_drift,
    score_batch,
    score_pending,
    train_if_new,
)
from tests.conftest import SAMPLE, make_settings, run_cli


def test_batch_ids_are_iso_utc_and_sort_by_time(tmp_path: Path) -> None:
    assert batch_id_of("20261128T172342Z.csv.gz") == "20261128T172342Z"
    assert batch_id_of("20261128T172342Z_east-dc.parquet") == "20261128T172342Z_east-dc"
    # Day-first dates and free names are not batch ids: they would sort wrongly.
    assert batch_id_of("28-11-2026.csv") is None
    assert batch_id_of("latest.csv") is None
    landing = Landing(str(tmp_path))
    for batch in ("20261201T000000Z", "20261130T235959Z", "20261002T120000Z"):
        landing.land(SAMPLE / "new_batch.csv.gz", UNSCORED, batch)
    (tmp_path / UNSCORED / "01-12-2026.csv").write_text("x\n")
    assert list(landing.batches(UNSCORED)) == [
        "20261002T120000Z",
        "20261130T235959Z",
        "20261201T000000Z",
    ]
    assert landing.strays(UNSCORED) == ["01-12-2026.csv"]
    with pytest.raises(InputFileError, match="has landed already"):
        landing.land(SAMPLE / "new_batch.csv.gz", UNSCORED, "20261201T000000Z")
    with pytest.raises(InputFileError, match="not a batch id"):
        landing.land(SAMPLE / "new_batch.csv.gz", UNSCORED, "2026-12-01")


def test_score_pending_scores_each_batch_once_and_records_it(
    trained_settings: Settings, tmp_path: Path
) -> None:
    root = str(tmp_path / "landing")
    landing = Landing(root)
    landing.land(SAMPLE / "new_batch.csv.gz", UNSCORED, "20261102T000000Z")
    assert pending_scoring(root) == ["20261102T000000Z"]

    done = score_pending(root, trained_settings)
    assert [d["batch_id"] for d in done] == ["20261102T000000Z"]
    record = landing.records("scoring")["20261102T000000Z"]
    assert record["status"] == "scored"
    assert record["read"] == record["scored"] + record["rejected"]
    predictions = pd.read_parquet(tmp_path / "landing" / "predictions" / "20261102T000000Z.parquet")
    rejects = pd.read_parquet(tmp_path / "landing" / "rejects" / "20261102T000000Z.parquet")
    assert len(predictions) == record["scored"] and len(rejects) == record["rejected"]
    assert record["drift"]["checked"] is True
    assert (tmp_path / "landing" / "reports" / "20261102T000000Z" / "drift_report.html").is_file()
    metrics = (tmp_path / "landing" / "metrics" / "batch_prediction.prom").read_text()
    assert f"backorder_batch_rows_scored {record['scored']}" in metrics

    # Nothing pending now; scoring the batch again replaces its outputs, never adds to them.
    assert pending_scoring(root) == []
    assert score_pending(root, trained_settings) == []
    again = score_batch(root, "20261102T000000Z", trained_settings)
    assert again["scored"] == record["scored"]
    assert sorted(p.name for p in (tmp_path / "landing" / "predictions").iterdir()) == [
        "20261102T000000Z.parquet"
    ]


def _drifted_copy(tmp_path: Path) -> Path:
    frame = pd.read_csv(SAMPLE / "new_batch.csv.gz")
    frame["national_inv"] = frame["national_inv"] * 50 + 1000
    frame["lead_time"] = frame["lead_time"].fillna(8) + 30
    path = tmp_path / "drifted.csv"
    frame.to_csv(path, index=False)
    return path


def test_drift_policy_blocks_scoring_and_says_why(
    trained_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = str(tmp_path / "landing")
    landing = Landing(root)
    landing.land(_drifted_copy(tmp_path), UNSCORED, "20261103T000000Z")
    blocking = trained_settings.model_copy(update={"drift_policy": "block_scoring"})
    with pytest.raises(DriftBlocked, match="national_inv") as caught:
        check_drift(root, "20261103T000000Z", blocking)
    assert "drift_report.html" in str(caught.value)
    record = landing.records("scoring")["20261103T000000Z"]
    assert record["status"] == "blocked_by_drift"
    assert "national_inv" in record["drift"]["drifted"]
    assert not (tmp_path / "landing" / "predictions").exists()
    # Still pending: a blocked batch is not done, and the run as a whole fails.
    assert pending_scoring(root) == ["20261103T000000Z"]
    with pytest.raises(BackorderError, match="1 batch"):
        score_pending(root, blocking)

    # The default policy only warns: the batch is scored and the drift is on its record.
    with caplog.at_level(logging.INFO, logger="backorder.pipelines"):
        warned = score_pending(root, trained_settings)
    # Each step's log line names its batch and model version (JSON lines in production).
    logged = {r.getMessage(): json.loads(JsonFormatter().format(r)) for r in caplog.records}
    assert logged["drift checked"]["level"] == "warning"
    assert logged["drift checked"]["batch_id"] == "20261103T000000Z"
    assert logged["batch scored"]["batch_id"] == "20261103T000000Z"
    assert logged["batch scored"]["model_version"] == "1"
    assert logged["batch scored"]["scored"] == warned[0]["scored"]
    assert warned[0]["batch_id"] == "20261103T000000Z"
    record = landing.records("scoring")["20261103T000000Z"]
    assert record["status"] == "scored" and "national_inv" in record["drift"]["drifted"]
    prom = (tmp_path / "landing" / "metrics" / "drift.prom").read_text()
    assert 'backorder_drift_psi{batch="20261103T000000Z",feature="national_inv"}' in prom


def test_blocking_training_does_not_block_scoring(
    trained_settings: Settings, tmp_path: Path
) -> None:
    root = str(tmp_path / "landing")
    Landing(root).land(_drifted_copy(tmp_path), UNSCORED, "20261103T000000Z")
    policy = trained_settings.model_copy(update={"drift_policy": "block_training"})
    summary = check_drift(root, "20261103T000000Z", policy)
    assert summary["drifted"] and summary["blocked"] is False


def test_training_runs_only_on_new_labelled_batches(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "home")
    root = str(tmp_path / "landing")
    landing = Landing(root)
    assert train_if_new(root, settings) is None  # no data: a skip

    landing.land(SAMPLE / "labelled.csv.gz", LABELLED, "20261101T000000Z")
    assert pending_training(root) == ["20261101T000000Z"]
    first = train_if_new(root, settings)
    assert first is not None and first["promoted"] and first["champion"] == first["version"]
    record = landing.records("training")["20261101T000000Z"]
    assert record["batches"] == ["20261101T000000Z"] and record["status"] == "trained"
    assert (
        tmp_path / "landing" / "reports" / "training" / "20261101T000000Z" / "report.html"
    ).is_file()
    assert pending_training(root) == []
    assert train_if_new(root, settings) is None

    # A second labelled batch: retrain on both; promotion is decided on the same holdout.
    landing.land(SAMPLE / "holdout.csv.gz", LABELLED, "20261108T000000Z")
    second = train_if_new(root, settings)
    assert second is not None and second["batches"] == ["20261101T000000Z", "20261108T000000Z"]
    assert second["new_batches"] == ["20261108T000000Z"]
    assert second["champion"] == (second["version"] if second["promoted"] else first["version"])


def test_cli_land_batches_and_score_pending(trained_settings: Settings, tmp_path: Path) -> None:
    root = str(tmp_path / "landing")
    home = trained_settings.home
    landed = run_cli("land", "--input", str(SAMPLE / "new_batch.csv.gz"), "--root", root, home=home)
    assert landed.returncode == 0, landed.stderr
    scored = run_cli("score-pending", "--root", root, home=home)
    assert scored.returncode == 0, scored.stderr
    assert "scored 1 batch(es)" in scored.stdout
    listing = run_cli("batches", "--root", root, "--json", home=home)
    payload = json.loads(listing.stdout)
    assert payload["waiting"] == {"unscored": [], "labelled": []}
    [entry] = payload["manifest"]
    assert entry["status"] == "scored" and entry["read"] == entry["scored"] + entry["rejected"]
    bad = run_cli(
        "land",
        "--input",
        str(SAMPLE / "new_batch.csv.gz"),
        "--root",
        root,
        "--batch-id",
        "yesterday",
        home=home,
    )
    assert bad.returncode == 2 and "not a batch id" in bad.stderr
