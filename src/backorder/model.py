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
import time
from collections.abc import Callable
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

ARTIFACT_FORMAT = "backorder-pipeline/1"
BOOSTER_FILE = "booster.txt"
MODEL_FILE = "model.json"

Progress = Callable[[str], None]


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
    """

    def __init__(
        self,
        booster_params: dict[str, Any] | None = None,
        max_trees: int = 3000,
        early_stopping_rounds: int = 200,
        cv_folds: int = 5,
        early_stopping_fraction: float = 0.15,
        cost_missed_backorder: float = 10.0,
        cost_false_alarm: float = 1.0,
        random_seed: int = 42,
        progress: Progress | None = None,
    ) -> None:
        self.booster_params = booster_params
        self.max_trees = max_trees
        self.early_stopping_rounds = early_stopping_rounds
        self.cv_folds = cv_folds
        self.early_stopping_fraction = early_stopping_fraction
        self.cost_missed_backorder = cost_missed_backorder
        self.cost_false_alarm = cost_false_alarm
        self.random_seed = random_seed
        self.progress = progress

    # -- fitting -------------------------------------------------------------------------------
    def _lgb_params(self) -> dict[str, Any]:
        params = {
            "objective": "binary",
            "verbosity": -1,
            "seed": self.random_seed,
            "deterministic": True,
            "force_col_wise": True,
        }
        params.update(self.booster_params or {})
        return params

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def _fit_booster(
        self,
        X: pd.DataFrame,
        y: np.ndarray,
        rows: np.ndarray,
        seed: int,
    ) -> lgb.Booster:
        fit_rows, stop_rows = train_test_split(
            rows, test_size=self.early_stopping_fraction, stratify=y[rows], random_state=seed
        )
        train_set = lgb.Dataset(X.iloc[fit_rows], y[fit_rows], free_raw_data=True)
        stop_set = lgb.Dataset(X.iloc[stop_rows], y[stop_rows], reference=train_set)
        return lgb.train(
            self._lgb_params(),
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
        self.classes_ = np.array([0, 1])
        self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        folds = StratifiedKFold(self.cv_folds, shuffle=True, random_state=self.random_seed)
        oof_log_odds = np.empty(len(y_arr), dtype="float64")
        best_iterations: list[int] = []
        for k, (train_rows, valid_rows) in enumerate(folds.split(np.zeros(len(y_arr)), y_arr)):
            booster = self._fit_booster(X, y_arr, train_rows, self.random_seed + k)
            best_iterations.append(int(booster.best_iteration or booster.current_iteration()))
            oof_log_odds[valid_rows] = booster.predict(
                X.iloc[valid_rows], raw_score=True, num_iteration=best_iterations[-1]
            )
            self._say(f"fold {k + 1}/{self.cv_folds}: {best_iterations[-1]} trees")

        # Platt scaling on out-of-fold log-odds keeps the ranking (AUC, AP) and fixes the scale.
        platt = LogisticRegression(C=1e6, max_iter=1000)
        platt.fit(oof_log_odds.reshape(-1, 1), y_arr)
        self.calibration_slope_ = float(platt.coef_[0, 0])
        self.calibration_intercept_ = float(platt.intercept_[0])
        self.training_base_rate_ = positives / len(y_arr)
        self.base_rate_shift_ = 0.0
        self.oof_probability_ = _sigmoid(
            self.calibration_slope_ * oof_log_odds + self.calibration_intercept_
        )
        self.decision_threshold_, _ = cost_minimising_threshold(
            y_arr, self.oof_probability_, self.cost_missed_backorder, self.cost_false_alarm
        )
        self.best_iterations_ = best_iterations
        self.n_trees_ = max(1, round(float(np.median(best_iterations))))
        self._say(f"final model on {len(y_arr):,} rows, {self.n_trees_} trees")
        self.booster_ = lgb.train(
            self._lgb_params(), lgb.Dataset(X, y_arr), num_boost_round=self.n_trees_
        )
        self.fit_seconds_ = time.perf_counter() - started
        return self

    # -- scoring -------------------------------------------------------------------------------
    def adjust_to_base_rate(self, base_rate: float | None) -> None:
        """Re-calibrate for a known backorder rate in the data to be scored (prior shift).

        If only the share of backorders changes, not what a backorder looks like, Bayes' rule
        moves every log-odds by logit(new rate) - logit(training rate); ranking is unchanged.
        ``None`` restores the training calibration.
        """
        if base_rate is None:
            self.base_rate_shift_ = 0.0
            return
        if not 0.0 < base_rate < 1.0:
            raise ValueError(f"base rate must be strictly between 0 and 1, got {base_rate}")
        self.base_rate_shift_ = _logit(base_rate) - _logit(self.training_base_rate_)

    def use_compiled(self, compiled: Any) -> None:
        """Score with compiled trees (``backorder.compiled.CompiledTrees``), or None: LightGBM."""
        self._compiled = compiled

    @property
    def scoring_engine(self) -> str:
        return "compiled" if getattr(self, "_compiled", None) is not None else "lightgbm"

    def raw_score(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        compiled = getattr(self, "_compiled", None)
        if compiled is not None:
            values = X.to_numpy(dtype=np.float64) if isinstance(X, pd.DataFrame) else X
            return np.asarray(compiled.predict_raw(values))
        return np.asarray(self.booster_.predict(X, raw_score=True))

    def calibrated_log_odds(self, raw: np.ndarray) -> np.ndarray:
        intercept = self.calibration_intercept_ + self.base_rate_shift_
        return self.calibration_slope_ * raw + intercept

    def log_odds(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        return self.calibrated_log_odds(self.raw_score(X))

    def probability(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        """The calibrated probability of a backorder, one per row."""
        return _sigmoid(self.log_odds(X))

    def probability_from_raw(self, raw: np.ndarray) -> np.ndarray:
        return _sigmoid(self.calibrated_log_odds(raw))

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        p = self.probability(X)
        return np.column_stack([1.0 - p, p])

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] >= self.decision_threshold_).astype(np.int64)

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
        out = pd.DataFrame(matrix, index=X.index, columns=self.booster_.feature_name())
        out["baseline"] = baseline
        return out

    def contribution_matrix(
        self, X: pd.DataFrame | np.ndarray, method: str = "path"
    ) -> tuple[np.ndarray, np.ndarray]:
        """``contributions`` as a (rows x features) array plus each row's baseline; the
        DataFrame-free form the API uses (pandas costs more than the trees for one row)."""
        shift = self.calibration_intercept_ + self.base_rate_shift_
        if method == "shap":
            shap = np.asarray(self.booster_.predict(X, pred_contrib=True)) * self.calibration_slope_
            return shap[:, :-1], shap[:, -1] + shift
        if method != "path":
            raise ValueError(f"unknown contribution method {method!r} (path or shap)")
        leaves = np.asarray(self.booster_.predict(X, pred_leaf=True), dtype=np.int64)
        offsets, table, baseline = self._path_tables()
        index = leaves.reshape(len(X), -1) + offsets
        raw = np.empty((len(X), table.shape[1]), dtype="float64")
        for start in range(0, len(X), 256):  # bounds the gathered block to ~256 x trees x features
            raw[start : start + 256] = table[index[start : start + 256]].sum(axis=1)
        baseline_row = self.calibration_slope_ * baseline + shift
        return raw * self.calibration_slope_, np.full(len(X), baseline_row)

    def _path_tables(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Per tree and leaf, the feature contributions along the path to that leaf (cached)."""
        cached = getattr(self, "_path_cache", None)
        if cached is not None and cached[0] is self.booster_:
            return cached[1]
        model = self.booster_.dump_model()
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
        tables = (np.asarray(offsets, dtype=np.int64), np.concatenate(rows), baseline)
        self._path_cache = (self.booster_, tables)
        return tables

    def feature_importance(self) -> pd.Series:
        gain = self.booster_.feature_importance(importance_type="gain")
        return pd.Series(gain, index=self.booster_.feature_name()).sort_values(ascending=False)


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


def build_pipeline(settings: Settings, progress: Progress | None = None) -> Pipeline:
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
                    progress=progress,
                ),
            ),
        ]
    )


def classifier_of(pipeline: Pipeline) -> BackorderClassifier:
    step = pipeline.steps[-1][1]
    assert isinstance(step, BackorderClassifier)
    return step


def backorder_probability(pipeline: Pipeline, rows: pd.DataFrame) -> np.ndarray:
    return np.asarray(pipeline.predict_proba(rows)[:, 1])


# -- persistence -------------------------------------------------------------------------------
def save_pipeline(pipeline: Pipeline, directory: Path, metadata: dict[str, Any]) -> Path:
    """Write the fitted pipeline as ``booster.txt`` + ``model.json`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    features: InventoryFeatures = pipeline.steps[0][1]
    clf = classifier_of(pipeline)
    (directory / BOOSTER_FILE).write_text(clf.booster_.model_to_string(), encoding="utf-8")
    spec = {
        "format": ARTIFACT_FORMAT,
        # Explicit names, never None ("all"): the set of derived features grows between versions.
        "features": {
            "derived": [n for n in features.feature_names_out_ if n not in FEATURE_COLUMNS]
        },
        "classifier": {
            "params": {k: v for k, v in clf.get_params(deep=False).items() if k != "progress"},
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
    (directory / MODEL_FILE).write_text(json.dumps(spec, indent=2, default=float), encoding="utf-8")
    return directory


def load_pipeline(directory: Path) -> tuple[Pipeline, dict[str, Any]]:
    """Rebuild a fitted pipeline and its metadata from ``save_pipeline``'s files."""
    spec_path = directory / MODEL_FILE
    if not spec_path.is_file():
        raise ModelNotFoundError(f"{directory}: no {MODEL_FILE}; not a backorder model")
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    if spec.get("format") != ARTIFACT_FORMAT:
        raise ModelNotFoundError(f"{spec_path}: unsupported model format {spec.get('format')!r}")
    derived = spec["features"]["derived"]
    if derived is None:  # saved as "all" by an earlier version: all it had, per its features
        derived = [n for n in spec["classifier"]["feature_names"] if n not in FEATURE_COLUMNS]
    features = InventoryFeatures(derived=tuple(derived)).fit(
        pd.DataFrame(columns=list(FEATURE_COLUMNS))
    )
    c = spec["classifier"]
    clf = BackorderClassifier(**c["params"])
    clf.booster_ = lgb.Booster(model_str=(directory / BOOSTER_FILE).read_text(encoding="utf-8"))
    clf.classes_ = np.array([0, 1])
    clf.feature_names_in_ = np.asarray(c["feature_names"], dtype=object)
    clf.calibration_slope_ = float(c["calibration_slope"])
    clf.calibration_intercept_ = float(c["calibration_intercept"])
    clf.decision_threshold_ = float(c["decision_threshold"])
    # Models saved before the base rate was stored: the training counts give it.
    meta = spec.get("metadata", {})
    rate = c.get("training_base_rate")
    if rate is None and meta.get("training_rows"):
        rate = meta["training_positives"] / meta["training_rows"]
    if rate is None:
        raise ModelNotFoundError(f"{spec_path}: no training base rate; retrain this model")
    clf.training_base_rate_ = float(rate)
    clf.base_rate_shift_ = 0.0
    clf.best_iterations_ = list(c["best_iterations"])
    clf.n_trees_ = int(c["n_trees"])
    return Pipeline([("features", features), ("classifier", clf)]), dict(spec["metadata"])
