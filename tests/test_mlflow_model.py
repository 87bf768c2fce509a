"""The registered version is an MLflow Model: pyfunc and Spark score it as the product does."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.types import DataType

import backorder
from backorder.config import Settings
from backorder.contract import FEATURE_COLUMNS, LABEL, NUMERIC_COLUMNS, SKU, validate_chunk
from backorder.data import load_rows
from backorder.errors import ModelNotFoundError
from backorder.mlflow_model import PIPELINE_ARTIFACT, as_model_input, pipeline_folder
from backorder.model import BOOSTER_FILE, MODEL_FILE, save_pipeline
from backorder.predict import score_rows
from backorder.registry import REFERENCE_FILE, Registry, RunRecord
from tests.conftest import SAMPLE

CHAMPION_URI = "models:/backorder@champion"


@pytest.fixture(scope="module")
def sample_rows() -> pd.DataFrame:
    """A few hundred validated rows of the bundled new batch, with their SKUs."""
    rows, _, _ = load_rows(SAMPLE / "new_batch.csv.gz", 8 << 20)
    return rows.head(300)


def _product_scores(settings: Settings, rows: pd.DataFrame) -> pd.DataFrame:
    model = Registry(settings).load("champion")
    return score_rows(model, rows, settings).reset_index(drop=True)


def test_the_champion_is_an_mlflow_model_with_the_contract_signature(
    trained_settings: Settings,
) -> None:
    registry = Registry(trained_settings)
    mv = registry.client.get_model_version(trained_settings.model_name, "1")
    info = mlflow.models.get_model_info(CHAMPION_URI)
    assert mv.source == f"models:/{info.model_id}" and info.run_id == mv.run_id
    inputs = {c.name: c for c in info.signature.inputs.inputs}
    assert list(inputs) == [SKU, *FEATURE_COLUMNS]
    assert not inputs[SKU].required and all(inputs[c].required for c in FEATURE_COLUMNS)
    assert inputs["national_inv"].type == inputs["lead_time"].type == DataType.double
    assert inputs["potential_issue"].type == DataType.string  # "Yes"/"No", as in the files
    outputs = info.signature.outputs.input_names()
    assert outputs[:4] == [SKU, "backorder_probability", "will_backorder", "risk_band"]
    assert outputs[-1] == "model_version"
    assert info.saved_input_example_info is not None
    # Built from code: MLflow runs the product's module; nothing is pickled.
    assert info.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    # The run that trained it still carries its report and metrics.
    artifacts = {a.path for a in registry.client.list_artifacts(mv.run_id)}
    assert {"report.html", "metrics.json"} <= artifacts


def test_pyfunc_scores_exactly_as_the_product(
    trained_settings: Settings, sample_rows: pd.DataFrame
) -> None:
    expected = _product_scores(trained_settings, sample_rows)
    pyfunc = mlflow.pyfunc.load_model(CHAMPION_URI)
    got = pyfunc.predict(as_model_input(sample_rows))
    assert len(got) == len(sample_rows)
    np.testing.assert_allclose(
        got["backorder_probability"], expected["backorder_probability"], rtol=0, atol=1e-9
    )
    for column in ("will_backorder", "risk_band", "reason_1", "model_version", SKU):
        assert got[column].tolist() == expected[column].tolist(), column
    assert set(got["model_version"]) == {"1"}
    assert expected["backorder_probability"].std() > 0  # a real spread, not one constant


def test_pyfunc_scores_rows_as_read_from_a_batch_file(trained_settings: Settings) -> None:
    """A frame read from a batch file with the contract's types (numbers as float, sku as
    text; flags stay "Yes"/"No") scores as ``backorder predict`` scores the same rows.
    MLflow refuses int64 for a double column, so integer-looking quantities are read as float."""
    Registry(trained_settings)  # points MLflow at the trained registry
    types = {SKU: str, **dict.fromkeys(NUMERIC_COLUMNS, "float64")}
    raw = pd.read_csv(SAMPLE / "holdout.csv.gz", nrows=200, dtype=types)
    raw = raw.drop(columns=[LABEL])
    got = mlflow.pyfunc.load_model(CHAMPION_URI).predict(raw)
    numbered = raw.set_axis(raw.index + 1)  # 1-based row numbers, as the contract counts them
    checked = validate_chunk(numbered, require_label=False)
    assert checked.rejects.empty
    expected = _product_scores(trained_settings, checked.rows)
    np.testing.assert_allclose(
        got["backorder_probability"], expected["backorder_probability"], rtol=0, atol=1e-9
    )


def test_pyfunc_scoring_settings_can_be_overridden_at_load(
    trained_settings: Settings, sample_rows: pd.DataFrame
) -> None:
    Registry(trained_settings)  # points MLflow at the trained registry
    rows = as_model_input(sample_rows.head(50))
    every = mlflow.pyfunc.load_model(CHAMPION_URI, model_config={"reasons_for": "all"})
    assert every.predict(rows)["reason_1"].notna().all()
    none = mlflow.pyfunc.load_model(CHAMPION_URI, model_config={"reasons_for": "none"})
    assert none.predict(rows)["reason_1"].isna().all()


def test_pyfunc_rejects_rows_the_contract_rejects_in_one_line(
    trained_settings: Settings, sample_rows: pd.DataFrame
) -> None:
    Registry(trained_settings)  # points MLflow at the trained registry
    rows = as_model_input(sample_rows.head(5))
    rows.loc[2, "perf_6_month_avg"] = 7.0
    with pytest.raises(MlflowException) as caught:
        mlflow.pyfunc.load_model(CHAMPION_URI).predict(rows)
    message = caught.value.message
    assert message.startswith("row 3: perf_6_month_avg") and "\n" not in message


def test_versions_registered_before_mlflow_models_still_load(
    trained_settings: Settings, sample_rows: pd.DataFrame
) -> None:
    """Earlier versions kept save_pipeline's files at the artifact root, without an MLmodel."""
    registry = Registry(trained_settings)
    champion = registry.load("champion", with_reference=True)
    assert champion.reference is not None
    with tempfile.TemporaryDirectory() as tmp:
        old = save_pipeline(champion.pipeline, Path(tmp) / "model", champion.metadata)
        champion.reference.to_parquet(old / REFERENCE_FILE, index=False)
        with mlflow.start_run(experiment_id=registry.experiment_id()) as run:
            mlflow.log_artifacts(str(old), artifact_path="model")
    legacy = registry.client.create_model_version(
        trained_settings.model_name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    )
    loaded = registry.load(str(legacy.version), with_reference=True)
    assert loaded.reference is not None and len(loaded.reference) == len(champion.reference)
    old_scores = score_rows(loaded, sample_rows, trained_settings)
    new_scores = score_rows(champion, sample_rows, trained_settings)
    np.testing.assert_allclose(
        old_scores["backorder_probability"], new_scores["backorder_probability"], atol=1e-12
    )


def test_the_model_format_is_checked_not_guessed(
    tmp_path: Path, trained_settings: Settings
) -> None:
    with pytest.raises(ModelNotFoundError, match="neither an MLflow model"):
        pipeline_folder(tmp_path)
    downloaded = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri="models:/backorder/1",
            dst_path=str(tmp_path / "v1"),
            tracking_uri=Registry(trained_settings).tracking_uri,
        )
    )
    files = pipeline_folder(downloaded)
    assert files.parent == downloaded / "artifacts"
    assert {p.name for p in files.iterdir()} == {MODEL_FILE, BOOSTER_FILE, REFERENCE_FILE}
    # An MLflow model of something else is refused by name, not mistaken for ours.
    other = tmp_path / "other"
    shutil.copytree(downloaded, other)
    meta = Model.load(str(other))
    del meta.flavors["python_function"]["artifacts"][PIPELINE_ARTIFACT]
    meta.save(str(other / "MLmodel"))
    with pytest.raises(ModelNotFoundError, match="not a backorder model"):
        pipeline_folder(other)


def test_a_model_that_fails_to_log_leaves_no_version_behind(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*_args: object) -> Path:
        raise OSError("No space left on device")

    monkeypatch.setattr("backorder.registry.save_pipeline", disk_full)
    registry = Registry(settings)
    with pytest.raises(OSError, match="No space left"):
        registry.log_training_run(None, RunRecord({}))  # type: ignore[arg-type]
    assert registry.versions() == []
    [model] = mlflow.search_logged_models(
        experiment_ids=[registry.experiment_id()], output_format="list"
    )
    assert model.status == LoggedModelStatus.FAILED


def _spark_unavailable() -> str | None:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "pyspark is not installed (pip install -e '.[dev]')"
    if shutil.which("java") is None:
        return "no Java runtime for Spark (apt-get install openjdk-17-jre-headless)"
    return None


@pytest.mark.skipif(_spark_unavailable() is not None, reason=str(_spark_unavailable()))
def test_spark_udf_scores_exactly_as_the_product(
    trained_settings: Settings, sample_rows: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyspark.sql import SparkSession

    expected = _product_scores(trained_settings, sample_rows)
    # Spark's Python workers run this interpreter and import this checkout's package.
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    monkeypatch.setenv("PYSPARK_DRIVER_PYTHON", sys.executable)
    package_root = str(Path(backorder.__file__).parents[1])
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    )
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("backorder-test")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    try:
        frame = as_model_input(sample_rows)
        frame.insert(0, "position", np.arange(len(frame)))
        table = spark.createDataFrame(frame)
        udf = mlflow.pyfunc.spark_udf(spark, CHAMPION_URI, env_manager="local")
        columns = [c for c in frame.columns if c != "position"]
        scored = (
            table.withColumn("scores", udf(*columns))
            .select("position", "scores.*")
            .toPandas()
            .sort_values("position")
            .reset_index(drop=True)
        )
    finally:
        spark.stop()
    assert len(scored) == len(sample_rows)
    np.testing.assert_allclose(
        scored["backorder_probability"], expected["backorder_probability"], rtol=0, atol=1e-9
    )
    assert scored["risk_band"].tolist() == expected["risk_band"].tolist()
    assert set(scored["model_version"]) == {"1"}
