"""Real Airflow DAG runs (`airflow dags test`, in-process, temporary AIRFLOW_HOME and SQLite).

The first run is `scripts/airflow_demo.sh`, the same script `make airflow-demo` runs; later runs
reuse its Airflow home to show that re-runs are safe and that one bad batch fails its own task
without stopping the others.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import FAST, ROOT, SAMPLE

AIRFLOW = Path(sys.executable).with_name("airflow")
pytestmark = pytest.mark.skipif(not AIRFLOW.exists(), reason="apache-airflow is not installed")


def _env(out: Path, airflow_home: Path) -> dict[str, str]:
    config = out.parent / "fast.json"
    config.write_text(json.dumps(FAST))  # JSON is YAML: a small, quick model
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKORDER_", "AIRFLOW"))}
    return env | {
        "PATH": f"{AIRFLOW.parent}:{env.get('PATH', '')}",
        "BACKORDER_CONFIG": str(config),
        "BACKORDER_DEMO_AIRFLOW_HOME": str(airflow_home),
        # What the demo script exports, for the runs made here directly:
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "BACKORDER_HOME": str(out / "home"),
        "BACKORDER_LANDING_ROOT": str(out / "landing"),
    }


def _dag_test(dag_id: str, env: dict[str, str]) -> tuple[str, str]:
    result = subprocess.run(
        [str(AIRFLOW), "dags", "test", dag_id],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    log = result.stdout + result.stderr
    states = re.findall(rf"DagRun Finished: dag_id={dag_id},.*?state=(\w+)", log)
    return (states[-1] if states else "none"), log


def _records(out: Path, job: str) -> dict[str, dict[str, object]]:
    folder = out / "landing" / "manifest" / job
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def test_both_dags_run_end_to_end_and_reruns_are_safe(tmp_path: Path) -> None:
    out, airflow_home = tmp_path / "demo", tmp_path / "airflow"
    airflow_home.mkdir()
    env = _env(out, airflow_home)
    demo = subprocess.run(
        ["bash", str(ROOT / "scripts" / "airflow_demo.sh"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
        check=False,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "backorder_training: state=success" in demo.stdout
    assert "backorder_batch_prediction: state=success" in demo.stdout

    [training] = _records(out, "training").values()
    assert training["promoted"] is True and training["batches"] == ["20261101T000000Z"]
    scoring = _records(out, "scoring")["20261102T000000Z"]
    assert scoring["status"] == "scored" and scoring["model_version"] == "1"
    assert scoring["read"] == scoring["scored"] + scoring["rejected"]
    predictions = out / "landing" / "predictions" / "20261102T000000Z.parquet"
    assert len(pd.read_parquet(predictions)) == scoring["scored"]
    written = predictions.stat().st_mtime_ns
    # The task logs name the batch and the model version on each step's line.
    task_log = (out / "backorder_batch_prediction.log").read_text()
    assert "batch scored batch_id=20261102T000000Z model_version=1 " in task_log

    # Re-runs with nothing new: both succeed (skips), nothing is trained or rewritten.
    for dag_id in ("backorder_training", "backorder_batch_prediction"):
        state, log = _dag_test(dag_id, env)
        assert state == "success", log[-3000:]
        assert "Skipping task" in log
    assert len(_records(out, "training")) == 1
    assert predictions.stat().st_mtime_ns == written
    assert sorted(p.name for p in predictions.parent.iterdir()) == [predictions.name]

    # A good batch and a broken one: the broken one fails its own task (and the run), with the
    # reason in the log; the good one is scored and recorded all the same.
    unscored = out / "landing" / "unscored"
    (unscored / "20261103T000000Z.csv.gz").write_bytes((SAMPLE / "new_batch.csv.gz").read_bytes())
    (unscored / "20261104T000000Z.csv").write_text("sku,national_inv\n1,5\n")
    state, log = _dag_test("backorder_batch_prediction", env)
    assert state == "failed"
    assert "20261104T000000Z.csv: missing required column(s) lead_time" in log
    records = _records(out, "scoring")
    assert records["20261103T000000Z"]["status"] == "scored"
    assert "20261104T000000Z" not in records
    assert predictions.stat().st_mtime_ns == written  # the earlier batch was not redone
