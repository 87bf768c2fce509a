"""The fitted pipeline: honest out-of-fold validation, calibration, threshold, reasons, format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from backorder.config import Settings
from backorder.contract import FEATURE_COLUMNS, LABEL
from backorder.data import load_labelled
from backorder.features import DERIVED_FEATURES, InventoryFeatures
from backorder.model import (
    Scorer,
    build_pipeline,
    cost_minimising_threshold,
    load_pipeline,
    save_pipeline,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample() -> tuple[pd.DataFrame, np.ndarray]:
    data = load_labelled([ROOT / "data" / "sample" / "labelled.csv.gz"], block_bytes=8 << 20)
    rows = data.rows.reset_index(drop=True)
    return rows, data.y


@pytest.fixture(scope="module")
def fitted(sample: tuple[pd.DataFrame, np.ndarray], tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import make_settings

    rows, y = sample
    settings = make_settings(tmp_path_factory.mktemp("m"))
    return build_pipeline(settings).fit(rows, y), settings


def test_out_of_fold_probabilities_are_honest(
    sample: tuple[pd.DataFrame, np.ndarray], settings: Settings
) -> None:
    """With labels shuffled there is nothing to learn: any out-of-fold AUC far from 0.5 would
    mean a row's own label leaked into its prediction."""
    rows, y = sample
    shuffled = np.random.default_rng(0).permutation(y)
    clf = Scorer(build_pipeline(settings).fit(rows, shuffled)).classifier
    assert abs(roc_auc_score(shuffled, clf.oof_probability_) - 0.5) < 0.06


def test_real_labels_are_learnt(fitted, sample) -> None:
    pipeline, _ = fitted
    _, y = sample
    clf = Scorer(pipeline).classifier
    assert roc_auc_score(y, clf.oof_probability_) > 0.85
    assert len(clf.best_iterations_) == 3


def test_calibration_matches_the_base_rate(fitted, sample) -> None:
    pipeline, _ = fitted
    _, y = sample
    oof = Scorer(pipeline).classifier.oof_probability_
    # Platt scaling fits the mean exactly on the rows it was fitted on (within optimiser tolerance).
    assert oof.sum() == pytest.approx(y.sum(), rel=0.02)


def test_threshold_minimises_cost_on_out_of_fold_predictions(fitted, sample) -> None:
    pipeline, settings = fitted
    _, y = sample
    clf = Scorer(pipeline).classifier
    p = clf.oof_probability_

    def cost(t: float) -> float:
        flagged = p >= t
        return (
            settings.cost_missed_backorder * (~flagged & (y == 1)).sum()
            + settings.cost_false_alarm * (flagged & (y == 0)).sum()
        )

    chosen = cost(clf.decision_threshold_)
    for t in np.r_[np.unique(p), 0.0, 1.01]:
        assert chosen <= cost(t) + 1e-9


def test_threshold_function_on_a_tiny_case() -> None:
    y = np.array([1, 1, 0, 0, 0])
    p = np.array([0.9, 0.2, 0.3, 0.1, 0.05])
    # Flag 0.9 only: one miss, cost 10. Flag down to 0.2: one false alarm (0.3), cost 1.
    t, cost = cost_minimising_threshold(y, p, cost_missed=10, cost_false_alarm=1)
    assert (t, cost) == (0.2, 1.0)
    # Dear false alarms: flag only the top row (no false alarm), miss the other: cost 1.
    t, cost = cost_minimising_threshold(y, p, cost_missed=1, cost_false_alarm=100)
    assert (t, cost) == (0.9, 1.0)
    # When every cut costs more than flagging nothing, the threshold is above every score.
    t, cost = cost_minimising_threshold(np.array([0, 1]), np.array([0.9, 0.1]), 1, 100)
    assert t > 0.9 and cost == 1.0


@pytest.mark.parametrize("method", ["path", "shap"])
def test_contributions_add_up_to_the_probability(fitted, sample, method: str) -> None:
    pipeline, _ = fitted
    rows, _ = sample
    head = rows.head(500)
    model = Scorer(pipeline)
    contributions = model.contributions(model.features(head), method)
    log_odds = contributions.to_numpy().sum(axis=1)
    np.testing.assert_allclose(
        1 / (1 + np.exp(-log_odds)), model.probability(head), rtol=1e-9, atol=1e-12
    )


def test_path_attributions_credit_only_features_on_the_path(fitted, sample) -> None:
    """A feature no tree splits on gets exactly zero; the busiest features get the most."""
    pipeline, _ = fitted
    rows, _ = sample
    model = Scorer(pipeline)
    features = model.features(rows.head(2000))
    path = model.contributions(features).drop(columns="baseline")
    used = model.classifier.booster_.feature_importance("split") > 0
    assert (path.loc[:, ~used].to_numpy() == 0).all()
    shap = model.contributions(features, "shap").drop(columns="baseline")
    # Both methods agree on which features matter overall, if not row by row.
    top_path = set(path.abs().mean().nlargest(5).index)
    top_shap = set(shap.abs().mean().nlargest(5).index)
    assert len(top_path & top_shap) >= 3


def test_saved_artifact_scores_identically(fitted, sample, tmp_path: Path) -> None:
    pipeline, _ = fitted
    rows, _ = sample
    save_pipeline(pipeline, tmp_path / "model", {"note": "test"})
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["booster.txt", "model.json"]
    loaded, metadata = load_pipeline(tmp_path / "model")
    assert metadata == {"note": "test"}
    np.testing.assert_array_equal(
        Scorer(loaded).probability(rows), Scorer(pipeline).probability(rows)
    )
    assert Scorer(loaded).threshold == Scorer(pipeline).threshold


def test_artifacts_of_earlier_versions_still_load(fitted, sample, tmp_path: Path) -> None:
    """Earlier versions wrote derived = null ("all" of their time) and no training base rate."""
    import json

    pipeline, _ = fitted
    rows, y = sample
    save_pipeline(pipeline, tmp_path / "old", {"training_rows": len(y), "training_positives": 9})
    spec_path = tmp_path / "old" / "model.json"
    spec = json.loads(spec_path.read_text())
    spec["format"] = "backorder-pipeline/1"
    spec["features"]["derived"] = None
    del spec["classifier"]["training_base_rate"]
    spec_path.write_text(json.dumps(spec))
    loaded, _ = load_pipeline(tmp_path / "old")
    np.testing.assert_allclose(Scorer(loaded).probability(rows), Scorer(pipeline).probability(rows))
    assert Scorer(loaded).classifier.training_base_rate_ == pytest.approx(9 / len(y))


def test_features_are_stateless_and_finite(sample) -> None:
    rows, _ = sample
    transformer = InventoryFeatures().fit(rows.head(10))
    out = transformer.transform(rows)
    assert list(out.columns) == [*FEATURE_COLUMNS, *(d.name for d in DERIVED_FEATURES)]
    assert not np.isinf(out.to_numpy()).any()
    np.testing.assert_array_equal(
        InventoryFeatures().fit(rows).transform(rows.head(50)), out.head(50)
    )


def test_derived_features_follow_inventory_logic() -> None:
    row = {c: 0.0 for c in FEATURE_COLUMNS} | {
        "national_inv": 20.0,
        "in_transit_qty": 10.0,
        "forecast_3_month": 30.0,
        "lead_time": 13.0,
        "sales_3_month": 15.0,
        "min_bank": 25.0,
        "perf_6_month_avg": 0.8,
        "perf_12_month_avg": 0.9,
        "sales_6_month": 40.0,
        "sales_9_month": 60.0,
        "forecast_9_month": 90.0,
        "pieces_past_due": 5.0,
        "local_bo_qty": 4.0,
    }
    out = InventoryFeatures().fit_transform(pd.DataFrame([row])).iloc[0]
    assert out["sales_momentum_6_vs_9"] == pytest.approx(np.log(61 / 61))  # 40/6 ~ 60/9 a month
    assert out["forecast_trend_3_vs_9"] == pytest.approx(0.0)  # 30 a quarter = 90 in 9 months
    assert out["past_due_share_of_forecast"] == pytest.approx(np.log(10 / 31))
    assert out["in_transit_share"] == pytest.approx(1 / 3)
    assert out["stock_position"] == 30.0
    assert out["forecast_coverage_months"] == pytest.approx(3.0)  # 30 units / 10 per month
    assert out["sales_coverage_months"] == pytest.approx(6.0)
    assert out["projected_stock_at_lead_time"] == pytest.approx(30 - 10 * 3.0)  # 13 weeks = 3 mo
    assert out["min_bank_gap"] == -5.0
    assert out["supplier_performance_trend"] == pytest.approx(-0.1)
    assert out["lead_time_unknown"] == 0.0
    no_demand = InventoryFeatures().fit_transform(pd.DataFrame([row | {"forecast_3_month": 0.0}]))
    assert np.isnan(no_demand["forecast_coverage_months"].iloc[0])


def test_every_feature_has_a_planner_label() -> None:
    from backorder.explain import PLANNER_LABELS

    names = InventoryFeatures().fit(pd.DataFrame(columns=list(FEATURE_COLUMNS)))
    assert set(names.get_feature_names_out()) <= set(PLANNER_LABELS)


def test_too_few_backorders_is_a_clear_error(sample, settings: Settings) -> None:
    rows, y = sample
    few = np.zeros_like(y)
    few[:2] = 1
    with pytest.raises(ValueError, match="needs at least 3 backorders"):
        build_pipeline(settings).fit(rows, few)


def test_label_column_is_not_a_feature(fitted) -> None:
    pipeline, _ = fitted
    assert LABEL not in Scorer(pipeline).feature_names


def test_reasons_rank_by_absolute_contribution_and_read_as_sentences() -> None:
    from backorder.explain import reason_columns

    contributions = pd.DataFrame(
        {
            "national_inv": [1.5, -0.1],
            "lead_time": [-2.0, 0.2],
            "deck_risk": [0.3, 0.05],
            "perf_6_month_avg": [0.0, -0.9],
            "baseline": [-5.0, -5.0],
        }
    )
    values = pd.DataFrame(
        {
            "national_inv": [0.0, 1200.0],
            "lead_time": [np.nan, 8.0],
            "deck_risk": [1.0, 0.0],
            "perf_6_month_avg": [0.5, 0.92],
        }
    )
    reasons = reason_columns(contributions, values, k=3)
    assert reasons.iloc[0].tolist() == [
        "lead time (weeks) = unknown lowers risk",
        "stock on hand = 0 raises risk",
        "deck risk flag = yes raises risk",
    ]
    assert reasons.iloc[1, 0] == "supplier on-time rate (6 months) = 92% lowers risk"


def test_base_rate_adjustment_moves_the_expected_count_not_the_ranking(fitted, sample) -> None:
    """Prior shift: for twice the training backorder rate every log-odds moves by the same
    amount, so the expected count rises and the ranking (AUC, AP) does not move."""
    pipeline, _ = fitted
    rows, y = sample
    trained = Scorer(pipeline)
    assert trained.classifier.training_base_rate_ == pytest.approx(y.mean())
    before = trained.probability(rows)
    shifted = Scorer(pipeline, base_rate=2 * y.mean())
    after = shifted.probability(rows)
    contributions = shifted.contributions(shifted.features(rows.head(20)))

    def logit(p: np.ndarray | float) -> np.ndarray:
        return np.log(np.asarray(p) / (1 - np.asarray(p)))

    shift = logit(2 * y.mean()) - logit(y.mean())  # odds of a backorder about double
    np.testing.assert_allclose(logit(after), logit(before) + shift, rtol=1e-9, atol=1e-9)
    assert 1.6 < after.sum() / before.sum() < 2.0  # high probabilities cannot double
    assert (np.diff(after[np.argsort(before, kind="stable")]) >= 0).all()  # same ranking
    log_odds = np.log(after[:20] / (1 - after[:20]))
    np.testing.assert_allclose(contributions.sum(axis=1), log_odds, rtol=1e-6)
    np.testing.assert_allclose(trained.probability(rows), before)  # the pipeline is unchanged
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        Scorer(pipeline, base_rate=1.5)
