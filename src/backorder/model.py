"""The model: gradient-boosted trees, calibrated, with a cost-based decision threshold.

``build_pipeline`` gives the single artifact every consumer uses: ``InventoryFeatures`` followed by
``BackorderClassifier``. Fitting it runs stratified cross-validation (early stopping on an inner
split of each training fold), fits a Platt calibration on the out-of-fold log-odds, picks the
threshold that minimises expected cost on the out-of-fold probabilities, then refits the trees
on all rows. Nothing is resampled, and every quantity is learnt from training folds only.

The artifact is saved as LightGBM's text model plus a JSON file, not a pickle: it can be loaded
without executing code and read by other tools (for example to compile the trees).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.pipeline import Pipeline

from backorder.config import Settings
from backorder.contract import FEATURE_COLUMNS
from backorder.errors import ModelNotFoundError
from backorder.features import InventoryFeatures

# Version 2 always stores the derived feature names and the training base rate; version 1
# files (which may lack both) are upgraded when loaded, see ``_upgrade_from_v1``.
ARTIFACT_FORMAT = "backorder-pipeline/2"
FORMAT_V1 = "backorder-pipeline/1"
BOOSTER_FILE = "booster.txt"
MODEL_FILE = "model.json"

log = logging.getLogger(__name__)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _logit(p: float) -> float:
    return float(np.log(p / (1.0 - p)))


def cost_minimising_threshold(
    y_true: np.ndarray, probability: np.ndarray, cost_missed: float, cost_false_alarm: float
) -> tuple[float, float]:
    """Threshold t (flag when probability >= t) with the lowest total cost, and that cost."""
    order = np.argsort(-probability, kind="stable")
    p_sorted = probability[order]
    y_sorted = y_true[order].astype(np.int64)
    true_pos = np.cumsum(y_sorted)
    false_pos = np.arange(1, len(y_sorted) + 1) - true_pos
    # Only cut between distinct scores: tied rows are flagged together.
    last_of_tie = np.r_[p_sorted[1:] != p_sorted[:-1], True]
    positives = int(y_sorted.sum())
    cost = cost_missed * (positives - true_pos) + cost_false_alarm * false_pos
    cost = np.where(last_of_tie, cost, np.inf)
    best = int(np.argmin(cost))
    flag_nothing = cost_missed * positives
    if cost[best] >= flag_nothing:
        return float(np.nextafter(p_sorted[0], np.inf)), float(flag_nothing)
    return float(p_sorted[best]), float(cost[best])


@dataclass(frozen=True)
class Calibration:
    """Platt scaling of raw log-odds and the cost-minimising threshold on its probabilities."""

    slope: float
    intercept: float
    threshold: float


def calibrate(
    raw: np.ndarray, y: np.ndarray, cost_missed: float, cost_false_alarm: float
) -> tuple[Calibration, np.ndarray]:
    """Fit Platt scaling on raw log-odds of rows the booster did not train on, then the
    threshold on the calibrated probabilities; return both and those probabilities.

    Platt scaling keeps the ranking (AUC, AP) and fixes the scale. Both engines use it: the
    local one on out-of-fold log-odds, the Dask one on a calibration slice.
    """
    platt = LogisticRegression(C=1e6, max_iter=1000)
    platt.fit(raw.reshape(-1, 1), y)
    slope, intercept = float(platt.coef_[0, 0]), float(platt.intercept_[0])
    probability = _sigmoid(slope * raw + intercept)
    threshold, _ = cost_minimising_threshold(y, probability, cost_missed, cost_false_alarm)
    return Calibration(slope, intercept, threshold), probability


class BackorderClassifier(ClassifierMixin, BaseEstimator):
    """LightGBM with early stopping, Platt calibration and a cost-minimising threshold.

    Parameters
    ----------
    booster_params:
        LightGBM training parameters (learning rate, leaves, sampling, regularisation).
    max_trees, early_stopping_rounds:
        Upper bound on boosting rounds; rounds without improvement before stopping.
    cv_folds:
        Stratified folds used for out-of-fold probabilities (calibration, threshold, report).
    early_stopping_fraction:
        Share of each training fold held back to decide when to stop boosting.
    cost_missed_backorder, cost_false_alarm:
        Business cost of a missed backorder and of a false alarm; only the ratio matters.
    random_seed:
        Seed for folds, splits and LightGBM.

    Fold progress is logged (INFO, logger ``backorder.model``). Scoring-time choices (a base
    rate, compiled trees) belong to ``Scorer``; a fitted classifier is not changed by scoring.
    """

    # scikit-learn reads an estimator's hyperparameters from __init__'s signature (get_params,
    # clone, set_params), one keyword each: grouping them would hide them from it.
    def __init__(  # noqa: PLR0913
        self,
        *,
        booster_params: dict[str, Any] | None = None,
        max_trees: int = 3000,
        early_stopping_rounds: int = 200,
        cv_folds: int = 5,
        early_stopping_fraction: float = 0.15,
        cost_missed_backorder: float = 10.0,
        cost_false_alarm: float = 1.0,
        random_seed: int = 42,
    ) -> None:
        self.booster_params = booster_params
        self.max_trees = max_trees
        self.early_stopping_rounds = early_stopping_rounds
        self.cv_folds = cv_folds
        self.early_stopping_fraction = early_stopping_fraction
        self.cost_missed_backorder = cost_missed_backorder
        self.cost_false_alarm = cost_false_alarm
        self.random_seed = random_seed

    # -- fitting -------------------------------------------------------------------------------
    def lightgbm_params(self) -> dict[str, Any]:
        """The parameters every booster of this classifier is trained with."""
        params = {
            "objective": "binary",
            "verbosity": -1,
            "seed": self.random_seed,
            "deterministic": True,
            "force_col_wise": True,
        }
        params.update(self.booster_params or {})
        return params

    def fit_early_stopped(
        self,
        X: pd.DataFrame,
        y: np.ndarray,
        rows: np.ndarray,
        seed: int,
    ) -> lgb.Booster:
        """A booster on ``rows``, stopped early on a stratified share of them."""
        fit_rows, stop_rows = train_test_split(
            rows, test_size=self.early_stopping_fraction, stratify=y[rows], random_state=seed
        )
        train_set = lgb.Dataset(X.iloc[fit_rows], y[fit_rows], free_raw_data=True)
        stop_set = lgb.Dataset(X.iloc[stop_rows], y[stop_rows], reference=train_set)
        return lgb.train(
            self.lightgbm_params(),
            train_set,
            num_boost_round=self.max_trees,
            valid_sets=[stop_set],
            callbacks=[lgb.early_stopping(self.early_stopping_rounds, verbose=False)],
        )

    def fit(self, X: pd.DataFrame, y: pd.Series | np.ndarray) -> BackorderClassifier:
        started = time.perf_counter()
        y_arr = np.asarray(y).astype(np.int64)
        positives = int(y_arr.sum())
        if positives < self.cv_folds or positives == len(y_arr):
            raise ValueError(
                f"training data needs at least {self.cv_folds} backorders and some non-backorders;"
                f" it has {positives} of {len(y_arr)} rows"
            )
        folds = StratifiedKFold(self.cv_folds, shuffle=True, random_state=self.random_seed)
        oof_log_odds = np.empty(len(y_arr), dtype="float64")
        best_iterations: list[int] = []
        for k, (train_rows, valid_rows) in enumerate(folds.split(np.zeros(len(y_arr)), y_arr)):
            booster = self.fit_early_stopped(X, y_arr, train_rows, self.random_seed + k)
            best_iterations.append(int(booster.best_iteration or booster.current_iteration()))
            oof_log_odds[valid_rows] = booster.predict(
                X.iloc[valid_rows], raw_score=True, num_iteration=best_iterations[-1]
            )
            log.info("fold %d/%d: %d trees", k + 1, self.cv_folds, best_iterations[-1])

        calibration, oof_probability = calibrate(
            oof_log_odds, y_arr, self.cost_missed_backorder, self.cost_false_alarm
        )
        n_trees = max(1, round(float(np.median(best_iterations))))
        log.info("final model on %s rows, %d trees", f"{len(y_arr):,}", n_trees)
        booster = lgb.train(self.lightgbm_params(), lgb.Dataset(X, y_arr), num_boost_round=n_trees)
        self._set_fitted(
            booster,
            feature_names=list(X.columns),
            calibration=calibration,
            training_base_rate=positives / len(y_arr),
            best_iterations=best_iterations,
            n_trees=n_trees,
        )
        self.oof_probability_ = oof_probability
        self.fit_seconds_ = time.perf_counter() - started
        return self

    def fit_calibration(
        self,
        booster: lgb.Booster,
        n_trees: int,
        X_calibration: pd.DataFrame,
        y_calibration: np.ndarray,
        training_base_rate: float,
    ) -> BackorderClassifier:
        """Fit for a booster trained elsewhere (on a cluster): calibration and threshold come
        from rows it never saw, ``X_calibration``, as ``fit`` uses out-of-fold rows."""
        raw = np.asarray(booster.predict(X_calibration, raw_score=True))
        calibration, probability = calibrate(
            raw, y_calibration, self.cost_missed_backorder, self.cost_false_alarm
        )
        self._set_fitted(
            booster,
            feature_names=list(X_calibration.columns),
            calibration=calibration,
            training_base_rate=training_base_rate,
            best_iterations=[n_trees],
            n_trees=n_trees,
        )
        self.oof_probability_ = probability
        return self

    # Every fitted attribute, by name, in the one place that sets them.
    def _set_fitted(  # noqa: PLR0913
        self,
        booster: lgb.Booster,
        *,
        feature_names: list[str],
        calibration: Calibration,
        training_base_rate: float,
        best_iterations: list[int],
        n_trees: int,
    ) -> BackorderClassifier:
        """The one place the fitted state is set: by ``fit``, ``fit_calibration`` and loading."""
        self.classes_ = np.array([0, 1])
        self.feature_names_in_ = np.asarray(feature_names, dtype=object)
        self.booster_ = booster
        self.calibration_slope_ = calibration.slope
        self.calibration_intercept_ = calibration.intercept
        self.decision_threshold_ = calibration.threshold
        self.training_base_rate_ = float(training_base_rate)
        self.best_iterations_ = list(best_iterations)
        self.n_trees_ = int(n_trees)
        return self

    # -- scoring (training calibration, LightGBM; ``Scorer`` adds the scoring-time choices) ---
    def calibrated_log_odds(self, raw: np.ndarray, base_rate_shift: float = 0.0) -> np.ndarray:
        intercept = self.calibration_intercept_ + base_rate_shift
        return self.calibration_slope_ * raw + intercept

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        p = _sigmoid(self.calibrated_log_odds(np.asarray(self.booster_.predict(X, raw_score=True))))
        return np.column_stack([1.0 - p, p])

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] >= self.decision_threshold_).astype(np.int64)


def path_tables(booster: lgb.Booster) -> tuple[np.ndarray, np.ndarray, float]:
    """Per tree and leaf, the feature contributions along the path to that leaf: the leaf
    offset of each tree, the (leaves x features) table, and the sum of the root values."""
    model = booster.dump_model()
    n_features = len(model["feature_names"])
    offsets: list[int] = []
    rows: list[np.ndarray] = []
    baseline, n_leaves = 0.0, 0
    for tree in model["tree_info"]:
        root = tree["tree_structure"]
        paths = np.zeros((tree["num_leaves"], n_features))
        offsets.append(n_leaves)
        n_leaves += tree["num_leaves"]
        if "leaf_value" in root:  # a single-leaf tree: a constant, no feature involved
            baseline += float(root["leaf_value"])
            rows.append(paths)
            continue
        baseline += float(root["internal_value"])
        stack = [(root, np.zeros(n_features))]
        while stack:
            node, credit = stack.pop()
            for side in ("left_child", "right_child"):
                child = node[side]
                value = child.get("internal_value", child.get("leaf_value"))
                gained = credit.copy()
                gained[node["split_feature"]] += float(value) - float(node["internal_value"])
                if "leaf_index" in child:
                    paths[child["leaf_index"]] = gained
                else:
                    stack.append((child, gained))
        rows.append(paths)
    return np.asarray(offsets, dtype=np.int64), np.concatenate(rows), baseline


def _classifier(pipeline: Pipeline) -> BackorderClassifier:
    step = pipeline[-1]
    assert isinstance(step, BackorderClassifier)
    return step


@dataclass(eq=False)
class Scorer:
    """A fitted pipeline with the verbs its callers need, and the scoring-time choices made
    when it was loaded: a known base rate of the data to be scored, compiled trees.

    The fitted estimators are only read, never changed, so one pipeline can back several
    scorers (say, with and without a base rate).
    """

    pipeline: Pipeline
    base_rate: float | None = None
    compiled: Any = None  # backorder.compiled.CompiledTrees, or None: LightGBM scores

    def __post_init__(self) -> None:
        self.classifier = _classifier(self.pipeline)
        self._features = self.pipeline[:-1]
        self.base_rate_shift = self._base_rate_shift(self.base_rate)

    def _base_rate_shift(self, base_rate: float | None) -> float:
        """Re-calibration for a known backorder rate in the data to be scored (prior shift).

        If only the share of backorders changes, not what a backorder looks like, Bayes' rule
        moves every log-odds by logit(new rate) - logit(training rate); ranking is unchanged.
        ``None`` keeps the training calibration.
        """
        if base_rate is None:
            return 0.0
        if not 0.0 < base_rate < 1.0:
            raise ValueError(f"base rate must be strictly between 0 and 1, got {base_rate}")
        return _logit(base_rate) - _logit(self.classifier.training_base_rate_)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        """Flag a row when its probability is at least this."""
        return float(self.classifier.decision_threshold_)

    @property
    def feature_names(self) -> list[str]:
        """The classifier's input columns, in order: those of ``features(rows)``."""
        return [str(n) for n in self.classifier.feature_names_in_]

    @property
    def scoring_engine(self) -> str:
        return "compiled" if self.compiled is not None else "lightgbm"

    def feature_importance(self) -> pd.Series:
        booster = self.classifier.booster_
        gain = booster.feature_importance(importance_type="gain")
        return pd.Series(gain, index=booster.feature_name()).sort_values(ascending=False)

    # -- scores --------------------------------------------------------------------------------
    def features(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Validated input rows -> the classifier's features."""
        return self._features.transform(rows)

    def raw_score(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        if self.compiled is not None:
            values = X.to_numpy(dtype=np.float64) if isinstance(X, pd.DataFrame) else X
            return np.asarray(self.compiled.predict_raw(values))
        return np.asarray(self.classifier.booster_.predict(X, raw_score=True))

    def probability_from_raw(self, raw: np.ndarray) -> np.ndarray:
        return _sigmoid(self.classifier.calibrated_log_odds(raw, self.base_rate_shift))

    def probability_of_features(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        """The calibrated probability of a backorder, one per row of features."""
        return self.probability_from_raw(self.raw_score(X))

    def probability(self, rows: pd.DataFrame) -> np.ndarray:
        """The calibrated probability of a backorder, one per validated input row."""
        return self.probability_of_features(self.features(rows))

    def contributions(self, X: pd.DataFrame, method: str = "path") -> pd.DataFrame:
        """Per-row, per-feature contributions to the calibrated log-odds.

        Columns are the features plus ``baseline``; each row sums to the row's log-odds.

        ``path`` (default): path attributions (Saabas). Along each tree's decision path, the
        change in node value at a split is credited to the split's feature: an exact
        decomposition of the score for one leaf lookup per tree (~0.5 ms per row).
        ``shap``: exact TreeSHAP (LightGBM ``pred_contrib``), which spreads credit over feature
        orderings; ~8 ms per row with ~700 depth-8 trees, too slow for the API's 10 ms budget.
        """
        matrix, baseline = self.contribution_matrix(X, method)
        out = pd.DataFrame(matrix, index=X.index, columns=self.classifier.booster_.feature_name())
        out["baseline"] = baseline
        return out

    def contribution_matrix(
        self, X: pd.DataFrame | np.ndarray, method: str = "path"
    ) -> tuple[np.ndarray, np.ndarray]:
        """``contributions`` as a (rows x features) array plus each row's baseline; the
        DataFrame-free form the API uses (pandas costs more than the trees for one row)."""
        clf = self.classifier
        shift = clf.calibration_intercept_ + self.base_rate_shift
        if method == "shap":
            shap = np.asarray(clf.booster_.predict(X, pred_contrib=True)) * clf.calibration_slope_
            return shap[:, :-1], shap[:, -1] + shift
        if method != "path":
            raise ValueError(f"unknown contribution method {method!r} (path or shap)")
        leaves = np.asarray(clf.booster_.predict(X, pred_leaf=True), dtype=np.int64)
        offsets, table, baseline = self._path_tables
        index = leaves.reshape(len(X), -1) + offsets
        raw = np.empty((len(X), table.shape[1]), dtype="float64")
        for start in range(0, len(X), 256):  # bounds the gathered block to ~256 x trees x features
            raw[start : start + 256] = table[index[start : start + 256]].sum(axis=1)
        baseline_row = clf.calibration_slope_ * baseline + shift
        return raw * clf.calibration_slope_, np.full(len(X), baseline_row)

    @cached_property
    def _path_tables(self) -> tuple[np.ndarray, np.ndarray, float]:
        # Built on first use (a second or so for ~700 trees), then kept with this scorer.
        return path_tables(self.classifier.booster_)


@dataclass(eq=False, kw_only=True)
class LoadedModel(Scorer):
    """A registered model as loaded to score: the fitted pipeline with its scoring-time choices
    (``Scorer``) and the registry facts a consumer reports alongside its scores."""

    version: str
    metadata: dict[str, Any]
    aliases: list[str]
    # A sample of the rows the model was trained on (feature columns), when asked for and stored.
    reference: pd.DataFrame | None = None


def booster_params_from(settings: Settings) -> dict[str, Any]:
    """LightGBM's parameter names for the configured booster settings."""
    gbm = settings.lightgbm
    return {
        "learning_rate": gbm.learning_rate,
        "num_leaves": gbm.num_leaves,
        "max_depth": gbm.max_depth,
        "min_child_samples": gbm.min_child_samples,
        "bagging_fraction": gbm.subsample,
        "bagging_freq": gbm.subsample_freq,
        "feature_fraction": gbm.colsample_bytree,
        "lambda_l2": gbm.reg_lambda,
        "min_sum_hessian_in_leaf": gbm.min_child_weight,
        "path_smooth": gbm.path_smooth,
        "min_gain_to_split": gbm.min_split_gain,
        "num_threads": gbm.n_jobs,
    }


def build_pipeline(settings: Settings) -> Pipeline:
    """An unfitted features + classifier Pipeline configured from settings."""
    gbm = settings.lightgbm
    derived = None if settings.derived_features is None else tuple(settings.derived_features)
    booster_params = booster_params_from(settings)
    return Pipeline(
        [
            ("features", InventoryFeatures(derived=derived)),
            (
                "classifier",
                BackorderClassifier(
                    booster_params=booster_params,
                    max_trees=gbm.max_trees,
                    early_stopping_rounds=gbm.early_stopping_rounds,
                    cv_folds=settings.cv_folds,
                    early_stopping_fraction=settings.early_stopping_fraction,
                    cost_missed_backorder=settings.cost_missed_backorder,
                    cost_false_alarm=settings.cost_false_alarm,
                    random_seed=settings.random_seed,
                ),
            ),
        ]
    )


# -- persistence -------------------------------------------------------------------------------
def pipeline_spec(pipeline: Pipeline, metadata: dict[str, Any]) -> dict[str, Any]:
    """The fitted pipeline's ``model.json`` (all but the trees, which go to ``booster.txt``)."""
    features = pipeline[0]
    clf = _classifier(pipeline)
    return {
        "format": ARTIFACT_FORMAT,
        # Explicit names, never None ("all"): the set of derived features grows between versions.
        "features": {
            "derived": [n for n in features.feature_names_out_ if n not in FEATURE_COLUMNS]
        },
        "classifier": {
            "params": clf.get_params(deep=False),
            "calibration_slope": clf.calibration_slope_,
            "calibration_intercept": clf.calibration_intercept_,
            "decision_threshold": clf.decision_threshold_,
            "training_base_rate": clf.training_base_rate_,
            "best_iterations": clf.best_iterations_,
            "n_trees": clf.n_trees_,
            "feature_names": list(clf.feature_names_in_),
        },
        "metadata": metadata,
    }


def _upgrade_from_v1(spec: dict[str, Any], where: Path) -> dict[str, Any]:
    """A ``backorder-pipeline/1`` spec as version 2: explicit derived features and base rate.

    Version 1 files may say ``derived: null``, meaning all derived features of their time (the
    ones among the classifier's features), and may lack the training base rate (then it is
    the metadata's training positives over training rows).
    """
    c = dict(spec["classifier"])
    derived = spec["features"]["derived"]
    if derived is None:
        derived = [n for n in c["feature_names"] if n not in FEATURE_COLUMNS]
    meta = spec.get("metadata", {})
    if c.get("training_base_rate") is None:
        if not meta.get("training_rows"):
            raise ModelNotFoundError(f"{where}: no training base rate; retrain this model")
        c["training_base_rate"] = meta["training_positives"] / meta["training_rows"]
    # A progress callback was once a parameter; it was never saved, but never let it in.
    c["params"] = {k: v for k, v in c["params"].items() if k != "progress"}
    return {**spec, "format": ARTIFACT_FORMAT, "features": {"derived": derived}, "classifier": c}


UPGRADES = {FORMAT_V1: _upgrade_from_v1}


def pipeline_from_spec(
    spec: dict[str, Any], booster_text: str, where: Path
) -> tuple[Pipeline, dict[str, Any]]:
    """Rebuild a fitted pipeline and its metadata from ``pipeline_spec``'s output and the trees;
    older formats are upgraded first. ``where`` names the spec in errors."""
    fmt = spec.get("format")
    if fmt in UPGRADES:
        spec = UPGRADES[fmt](spec, where)
    elif fmt != ARTIFACT_FORMAT:
        raise ModelNotFoundError(f"{where}: unsupported model format {fmt!r}")
    features = InventoryFeatures(derived=tuple(spec["features"]["derived"])).fit(
        pd.DataFrame(columns=list(FEATURE_COLUMNS))
    )
    c = spec["classifier"]
    clf = BackorderClassifier(**c["params"])._set_fitted(
        lgb.Booster(model_str=booster_text),
        feature_names=list(c["feature_names"]),
        calibration=Calibration(
            float(c["calibration_slope"]),
            float(c["calibration_intercept"]),
            float(c["decision_threshold"]),
        ),
        training_base_rate=float(c["training_base_rate"]),
        best_iterations=list(c["best_iterations"]),
        n_trees=int(c["n_trees"]),
    )
    return Pipeline([("features", features), ("classifier", clf)]), dict(spec["metadata"])


def save_pipeline(pipeline: Pipeline, directory: Path, metadata: dict[str, Any]) -> Path:
    """Write the fitted pipeline as ``booster.txt`` + ``model.json`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    booster = _classifier(pipeline).booster_
    (directory / BOOSTER_FILE).write_text(booster.model_to_string(), encoding="utf-8")
    spec = pipeline_spec(pipeline, metadata)
    (directory / MODEL_FILE).write_text(json.dumps(spec, indent=2, default=float), encoding="utf-8")
    return directory


def load_pipeline(directory: Path) -> tuple[Pipeline, dict[str, Any]]:
    """Rebuild a fitted pipeline and its metadata from ``save_pipeline``'s files."""
    spec_path = directory / MODEL_FILE
    if not spec_path.is_file():
        raise ModelNotFoundError(f"{directory}: no {MODEL_FILE}; not a backorder model")
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    booster_text = (directory / BOOSTER_FILE).read_text(encoding="utf-8")
    return pipeline_from_spec(spec, booster_text, spec_path)
