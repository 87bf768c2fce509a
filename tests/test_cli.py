"""The `backorder` command as a user runs it: real subprocesses, real files, real registry."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import SAMPLE, run_cli


def one_line_error(stderr: str) -> str:
    """The error line; timestamped progress lines ("18:07:25 compiling ...") may precede it."""
    lines = [
        line
        for line in stderr.strip().splitlines()
        if line.strip() and not re.match(r"\d\d:\d\d:\d\d ", line)
    ]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_train_evaluate_predict_end_to_end(tmp_path: Path) -> None:
    home = tmp_path / "home"
    trained = run_cli(
        "train",
        "--data",
        str(SAMPLE / "labelled.csv.gz"),
        "--output",
        str(tmp_path / "train"),
        home=home,
    )
    assert trained.returncode == 0, trained.stderr
    assert "model v1 (champion)" in trained.stdout
    assert "fold 3/3" in trained.stderr  # progress of the long step
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert metrics["promotion"]["promoted"] is True
    assert metrics["validation"]["roc_auc"] > 0.85
    segments = {s["segment"] for s in metrics["validation"]["segments"]}
    assert {"lead_time missing", "stock on hand <= 0", "deck_risk = Yes"} <= segments
    assert sum(b["rows"] for b in metrics["holdout"]["reliability"]) == metrics["holdout"]["n_rows"]

    evaluated = run_cli(
        "evaluate",
        "--data",
        str(SAMPLE / "holdout.csv.gz"),
        "--output",
        str(tmp_path / "eval"),
        home=home,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in (
        "roc_auc",
        "average_precision",
        "brier",
        "log_loss",
        "n_rows",
        "n_positive",
        "threshold",
        "precision",
        "recall",
        "f1",
        "recall_at_top_1pct",
        "recall_at_top_2pct",
        "recall_at_top_5pct",
        "expected_cost",
        "baselines",
    ):
        assert key in m, key
    assert m["n_rows"] == 10_000 and m["model_version"] == "1"
    assert m["roc_auc"] > 0.85
    assert m["expected_cost"] < m["baselines"]["never_backorder"]["expected_cost"]
    report = (tmp_path / "eval" / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 6
    assert not re.search(r"(src|href)=\"https?://", report)  # self-contained
    for section in ("Reliability", "Cost vs threshold", "Segments", "lead_time missing"):
        assert section in report

    out = tmp_path / "scored" / "predictions.parquet"
    predicted = run_cli(
        "predict", "--input", str(SAMPLE / "new_batch.csv.gz"), "--output", str(out), home=home
    )
    assert predicted.returncode == 0, predicted.stderr
    assert "read 10,001 rows: scored 10,000" in predicted.stdout
    assert "rejected 1" in predicted.stdout
    scored = pd.read_parquet(out)
    rejects = pd.read_parquet(out.with_name("predictions.rejects.parquet"))
    assert len(scored) + len(rejects) == 10_001
    assert list(scored.columns) == [
        "row_number",
        "sku",
        "backorder_probability",
        "will_backorder",
        "risk_band",
        "reason_1",
        "reason_2",
        "reason_3",
        "model_version",
    ]
    assert scored["backorder_probability"].between(0, 1).all()
    assert set(scored["risk_band"]) <= {"low", "medium", "high"}
    assert (scored["model_version"] == "1").all()
    assert scored["reason_1"].str.contains("risk").all()
    assert rejects["reason"].tolist() == ["row-count footer such as '(N rows)', not a data row"]
    assert rejects["row_number"].tolist() == [10_001]
    with gzip.open(SAMPLE / "new_batch.csv.gz", "rt") as handle:
        skus = [line.split(",")[0] for line in handle.read().splitlines()[1:]]
    assert scored["sku"].tolist() == skus[:10_000]

    again = run_cli(
        "predict", "--input", str(SAMPLE / "new_batch.csv.gz"), "--output", str(out), home=home
    )
    assert again.returncode == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out), scored)  # re-running is safe
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "predictions.parquet",
        "predictions.rejects.parquet",
    ]

    csv_out = tmp_path / "scored.csv"
    as_csv = run_cli(
        "predict",
        "--input",
        str(SAMPLE / "new_batch.csv.gz"),
        "--output",
        str(csv_out),
        "--rejects",
        str(tmp_path / "bad.csv"),
        home=home,
    )
    assert as_csv.returncode == 0, as_csv.stderr
    assert len(pd.read_csv(csv_out)) == 10_000 and len(pd.read_csv(tmp_path / "bad.csv")) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "file not found"),
        (b"", "file is empty"),
        (b"a;b;c\n1;2;3\n", "fields are separated by ';', expected commas"),
        (b"\x00\x01\x02" * 100, "binary file"),
        (b"sku,national_inv\n1,2\n", "missing required column(s)"),
    ],
)
def test_whole_file_problems_exit_2_with_one_line(
    tmp_path: Path, trained_home: Path, content: bytes | None, message: str
) -> None:
    bad = tmp_path / "batch.csv"
    if content is not None:
        bad.write_bytes(content)
    out = tmp_path / "out" / "p.parquet"
    result = run_cli("predict", "--input", str(bad), "--output", str(out), home=trained_home)
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert str(bad) in line and message in line
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_failure_mid_stream_leaves_no_partial_output(tmp_path: Path, trained_home: Path) -> None:
    with gzip.open(SAMPLE / "labelled.csv.gz", "rb") as handle:
        body = handle.read()
    cut = gzip.compress(body)
    bad = tmp_path / "cut.csv.gz"
    bad.write_bytes(cut[: int(len(cut) * 0.6)])
    out = tmp_path / "out" / "p.csv"
    result = run_cli(
        "predict",
        "--input",
        str(bad),
        "--output",
        str(out),
        home=trained_home,
        env={"BACKORDER_READ_BLOCK_BYTES": "65536"},
    )
    assert result.returncode == 2
    assert "cannot be read" in one_line_error(result.stderr)
    assert list(out.parent.iterdir()) == []  # no output, no rejects, no temp file


def test_train_rejects_bad_rows_but_trains_on_the_rest(tmp_path: Path) -> None:
    with gzip.open(SAMPLE / "labelled.csv.gz", "rt") as handle:
        lines = handle.read().splitlines()
    lines[5] = lines[5].replace(",No,", ",Maybe,", 1)
    lines.append("(30000 rows)")
    data = tmp_path / "history.csv"
    data.write_text("\n".join(lines) + "\n")
    result = run_cli(
        "train", "--data", str(data), "--output", str(tmp_path / "run"), home=tmp_path / "home"
    )
    assert result.returncode == 0, result.stderr
    assert "read 30,001, accepted 29,999, rejected 2" in result.stderr
    rejects = pd.read_csv(tmp_path / "run" / "rejects.csv")
    assert rejects["row_number"].tolist() == [5, 30_001]


def test_predict_without_a_model_says_how_to_get_one(tmp_path: Path) -> None:
    result = run_cli(
        "predict",
        "--input",
        str(SAMPLE / "new_batch.csv.gz"),
        "--output",
        str(tmp_path / "p.parquet"),
        home=tmp_path / "empty-home",
    )
    assert result.returncode == 3
    assert "backorder train --data" in one_line_error(result.stderr)
    served = run_cli("serve", "--port", "0", home=tmp_path / "empty-home")
    assert served.returncode == 3
    assert "backorder train --data" in one_line_error(served.stderr)


def test_bad_settings_are_one_line_errors(tmp_path: Path) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text("cost_false_alarm: -1\n")
    result = run_cli(
        "train",
        "--data",
        str(SAMPLE / "labelled.csv.gz"),
        "--config",
        str(config),
        home=tmp_path / "home",
    )
    assert result.returncode == 2
    assert "cost_false_alarm" in one_line_error(result.stderr)


def test_contract_command_prints_the_table() -> None:
    result = run_cli("contract", home=Path("/nonexistent"))
    assert result.returncode == 0
    assert "| `lead_time` | number |" in result.stdout


def test_unwritable_output_is_one_line(tmp_path: Path, trained_home: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "p.parquet").mkdir()  # a folder where the output file should go
    result = run_cli(
        "predict",
        "--input",
        str(SAMPLE / "new_batch.csv.gz"),
        "--output",
        str(locked / "p.parquet"),
        home=trained_home,
    )
    assert result.returncode == 1
    assert "p.parquet" in one_line_error(result.stderr)
    assert sorted(p.name for p in locked.iterdir()) == ["p.parquet"]  # no temp files left


def test_predict_base_rate_recalibrates_and_bad_rate_is_one_line(
    tmp_path: Path, trained_home: Path
) -> None:
    def mean_probability(*extra: str) -> float:
        out = tmp_path / f"p{len(extra)}.parquet"
        result = run_cli(
            "predict",
            "--input",
            str(SAMPLE / "new_batch.csv.gz"),
            "--output",
            str(out),
            *extra,
            home=trained_home,
        )
        assert result.returncode == 0, result.stderr
        return float(pd.read_parquet(out)["backorder_probability"].mean())

    assert mean_probability("--base-rate", "0.05") > 3 * mean_probability()
    bad = run_cli(
        "predict",
        "--input",
        str(SAMPLE / "new_batch.csv.gz"),
        "--output",
        str(tmp_path / "x.parquet"),
        "--base-rate",
        "1.5",
        home=trained_home,
    )
    assert bad.returncode == 2
    assert "scoring_base_rate" in one_line_error(bad.stderr)


def test_json_logs_carry_batch_id_and_model_version(tmp_path: Path, trained_home: Path) -> None:
    batch = "20261128T000000Z"
    scored = run_cli(
        "--log-format",
        "json",
        "predict",
        "--input",
        str(SAMPLE / "new_batch.csv.gz"),
        "--output",
        str(tmp_path / "p.parquet"),
        "--batch-id",
        batch,
        home=trained_home,
    )
    assert scored.returncode == 0, scored.stderr
    lines = [json.loads(line) for line in scored.stderr.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    scoring = next(line for line in lines if line["message"].startswith("scoring "))
    assert scoring["batch_id"] == batch and scoring["model_version"] == "1"

    failed = run_cli(
        "predict",
        "--input",
        str(tmp_path / "missing.csv"),
        "--output",
        str(tmp_path / "q.parquet"),
        home=trained_home,
        env={"BACKORDER_LOG_FORMAT": "json"},
    )
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    error = json.loads(failed.stderr.strip().splitlines()[-1])
    assert error["level"] == "error" and error["exit_code"] == 2
    assert "missing.csv" in error["message"]
