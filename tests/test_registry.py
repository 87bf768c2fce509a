"""Champion/challenger promotion on the same holdout rows, manual promotion and rollback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from backorder.config import Settings
from backorder.registry import Registry
from backorder.train import decide_promotion, holdout_mask, run_training
from tests.conftest import SAMPLE, make_settings, run_cli


def test_promotion_rule(settings: Settings) -> None:
    champion = {"average_precision": 0.30, "roc_auc": 0.940}
    first = decide_promotion({"average_precision": 0.1, "roc_auc": 0.5}, None, settings, None)
    assert first.promoted and "first model" in first.reason
    nothing_to_compare = decide_promotion({}, None, settings, "1")
    assert not nothing_to_compare.promoted and "kept champion v1" in nothing_to_compare.reason
    better = decide_promotion(
        {"average_precision": 0.31, "roc_auc": 0.941}, champion, settings, "1"
    )
    assert better.promoted
    too_small = decide_promotion(
        {"average_precision": 0.302, "roc_auc": 0.95}, champion, settings, "1"
    )
    assert not too_small.promoted and "kept champion v1" in too_small.reason
    loses_auc = decide_promotion(
        {"average_precision": 0.40, "roc_auc": 0.939}, champion, settings, "1"
    )
    assert not loses_auc.promoted


def test_holdout_is_the_same_rows_in_every_run() -> None:
    rows = (
        pd.read_csv(SAMPLE / "labelled.csv.gz")
        .replace({"Yes": 1.0, "No": 0.0})
        .astype({"sku": str})
    )
    first = holdout_mask(rows, 0.1)
    again = holdout_mask(rows.sample(frac=1.0, random_state=3), 0.1)
    assert 0.08 < first.mean() < 0.12
    reordered = pd.Series(again, index=rows.sample(frac=1.0, random_state=3).index)
    assert (reordered.sort_index().to_numpy() == first).all()


def test_a_worse_challenger_is_registered_but_not_promoted(
    trained_settings: Settings, tmp_path: Path
) -> None:
    registry = Registry(trained_settings)
    assert registry.champion_version() == "1"
    weak = make_settings(
        trained_settings.home,
        lightgbm={
            "num_leaves": 2,
            "max_trees": 3,
            "learning_rate": 0.01,
            "early_stopping_rounds": 1,
        },
    )
    outcome = run_training([SAMPLE / "labelled.csv.gz"], weak, tmp_path / "weak")
    assert outcome.version == "2" and not outcome.promoted
    assert registry.champion_version() == "1"
    assert registry.resolve("challenger") == "2"
    doc = json.loads(outcome.metrics_file.read_text())
    # Both models were scored on exactly the same holdout rows.
    assert doc["holdout"]["n_rows"] == doc["champion_on_holdout"]["n_rows"]
    assert doc["holdout"]["average_precision"] < doc["champion_on_holdout"]["average_precision"]

    # A planner can still override, then undo.
    promoted = run_cli("models", "promote", "2", home=trained_settings.home)
    assert promoted.returncode == 0 and "champion is now v2" in promoted.stdout
    assert registry.champion_version() == "2"
    listed = run_cli("models", "list", "--json", home=trained_settings.home)
    versions = {v["version"]: v for v in json.loads(listed.stdout)}
    assert versions["2"]["aliases"] == ["challenger", "champion"]
    assert versions["1"]["holdout_average_precision"] > versions["2"]["holdout_average_precision"]
    rolled = run_cli("models", "rollback", home=trained_settings.home)
    assert rolled.returncode == 0 and "from v2 to v1" in rolled.stdout
    assert registry.champion_version() == "1"
    again = run_cli("models", "rollback", home=trained_settings.home)
    assert again.returncode == 3 and "no earlier champion" in again.stderr


def test_each_model_scores_with_its_own_pipeline(trained_settings: Settings) -> None:
    registry = Registry(trained_settings)
    model = registry.load("champion")
    assert model.version == "1" and "champion" in model.aliases
    assert model.metadata["data_fingerprint"]["rows"] == 30_000
    assert np.isfinite(model.metadata["threshold"])
    run = registry.client.get_run(model.metadata["run_id"])
    assert run.data.params["cv_folds"] == "3"
    assert "validation_average_precision" in run.data.metrics
    assert run.data.tags["data_sha256"] == model.metadata["data_fingerprint"]["sha256"]
    artifacts = {a.path for a in registry.client.list_artifacts(run.info.run_id)}
    assert {"report.html", "metrics.json"} <= artifacts
    # The version is the MLflow model the run logged (MLflow 3 keeps models beside runs).
    [logged] = run.outputs.model_outputs
    mv = registry.client.get_model_version(registry.name, model.version)
    assert mv.source == f"models:/{logged.model_id}" and mv.run_id == run.info.run_id
