"""Cross-validated model comparison: models x feature sets x training data, on the same folds.

Protocol (training data only; the official test file is never touched):

* Load the inputs with the product's loader (the same validation and the same cross-input
  de-duplication as ``backorder train``).
* Stratified K-fold over all rows, stratified on label and source file, repeated with different
  seeds when ``--repeats`` > 1. Every configuration sees exactly the same folds.
* Metrics are computed on the held-out rows of the *first* input only (the 10 % stratified
  sample, with the true class balance): the 20 % sample is skewed toward the early part of the
  file, so it is used for training but not for scoring. The "first input only" rows train on the
  first input's training folds alone, to show what combining the samples is worth.
* Each fit holds back 15 % of its training rows for early stopping and a Platt calibration, as the
  product does; probabilities are calibrated to the training mix, so Brier reflects the shift to
  the first input's lower backorder rate.

Prints a Markdown table (mean over folds, with the standard deviation of AP) and, for every row,
how many folds it won on AP against the reference row (the product's default configuration).

    .venv/bin/python bench/quality.py --repeats 2       # full comparison, ~30 min on 2 cores
    .venv/bin/python bench/quality.py --folds 3 --models lightgbm --feature-sets raw,default
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import lightgbm as lgb
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score
from sklearn.model_selection import StratifiedKFold, train_test_split

from backorder.config import Settings, load_settings
from backorder.contract import LABEL
from backorder.data import load_labelled
from backorder.features import DERIVED_FEATURES, InventoryFeatures
from backorder.model import booster_params_from

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "backorders"
DEFAULT_DATA = [
    SHARED / "train_sample10pct_stratified.csv.gz",
    SHARED / "train_first1048575_sample20pct.csv.gz",
]
EARLY_STOPPING_FRACTION = 0.15
BUDGETS = (0.01, 0.02, 0.05)
MISSINGNESS = ("lead_time_unknown", "supplier_history_missing")
# The first eleven derived features (stock position, coverage, min_bank gap, two momentum
# ratios, forecast bias, supplier trend, missingness); "all" adds the later candidates.
LATER = {
    "sales_momentum_6_vs_9",
    "forecast_trend_3_vs_9",
    "past_due_share_of_forecast",
    "in_transit_share",
}
CORE = tuple(d.name for d in DERIVED_FEATURES if d.name not in LATER)


def feature_sets(settings: Settings) -> dict[str, tuple[str, ...] | None]:
    """Named derived-feature selections; ``None`` means every derived feature."""
    return {
        "raw": (),
        "missingness": MISSINGNESS,
        "core": CORE,
        "all": None,
    }


def default_feature_set(settings: Settings, names: list[str]) -> str:
    """The name among ``names`` whose selection is the product's default, else the first."""
    default = None if settings.derived_features is None else tuple(settings.derived_features)
    sets = feature_sets(settings)
    return next((n for n in names if sets.get(n) == default), names[0])


# -- models: each returns calibrated log-odds for the held-out rows and the number of trees ----
# -- models: each returns calibrated log-odds for the held-out rows and the number of trees ----
Fitted = tuple[np.ndarray, int]

# The challengers' parameters: the best of a short Optuna search each (`bench/tune.py --model
# xgboost --config raw.yaml --trials 12 --learning-rate 0.06`, and `--model catboost --trials
# 10 --learning-rate 0.1`, raw features), at a slower learning rate for the comparison.
# --xgboost-params / --catboost-params (JSON) override them. LightGBM takes the product's
# settings (--config).
XGBOOST_PARAMS: dict[str, Any] = {
    "learning_rate": 0.03,
    "max_depth": 10,
    "min_child_weight": 0.0275,
    "subsample": 0.714,
    "colsample_bytree": 0.825,
    "reg_lambda": 1.39,
    "gamma": 0.468,
}
CATBOOST_PARAMS: dict[str, Any] = {
    "learning_rate": 0.06,
    "depth": 8,
    "l2_leaf_reg": 1.83,
    "random_strength": 0.257,
    "bagging_temperature": 0.98,
}


def _platt(stop_scores: np.ndarray, y_stop: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    platt = LogisticRegression(C=1e6, max_iter=1000).fit(stop_scores.reshape(-1, 1), y_stop)
    a, b = float(platt.coef_[0, 0]), float(platt.intercept_[0])
    return lambda z: a * z + b


class FoldData(NamedTuple):
    """One fold's features and labels: rows to fit on, rows to stop early and calibrate on, and
    the rows to score."""

    x_fit: pd.DataFrame
    y_fit: np.ndarray
    x_stop: pd.DataFrame
    y_stop: np.ndarray
    x_eval: pd.DataFrame

    @classmethod
    def of(
        cls,
        x: pd.DataFrame,
        y: np.ndarray,
        fit_rows: np.ndarray,
        stop_rows: np.ndarray,
        scored: np.ndarray,
    ) -> FoldData:
        return cls(x.iloc[fit_rows], y[fit_rows], x.iloc[stop_rows], y[stop_rows], x.iloc[scored])


def fit_lightgbm(fold: FoldData, settings: Settings, seed: int) -> Fitted:
    x_fit, y_fit, x_stop, y_stop, x_eval = fold
    params = {"objective": "binary", "verbosity": -1, "seed": seed, "deterministic": True}
    params.update(booster_params_from(settings))
    train_set = lgb.Dataset(x_fit, y_fit)
    booster = lgb.train(
        params,
        train_set,
        num_boost_round=settings.lightgbm.max_trees,
        valid_sets=[lgb.Dataset(x_stop, y_stop, reference=train_set)],
        callbacks=[lgb.early_stopping(settings.lightgbm.early_stopping_rounds, verbose=False)],
    )
    n = int(booster.best_iteration)
    calibrate = _platt(booster.predict(x_stop, raw_score=True, num_iteration=n), y_stop)
    return calibrate(booster.predict(x_eval, raw_score=True, num_iteration=n)), n


def fit_xgboost(fold: FoldData, settings: Settings, seed: int) -> Fitted:
    x_fit, y_fit, x_stop, y_stop, x_eval = fold
    import xgboost as xgb

    gbm = settings.lightgbm
    model = xgb.XGBClassifier(
        n_estimators=gbm.max_trees,
        tree_method="hist",
        eval_metric="logloss",
        early_stopping_rounds=gbm.early_stopping_rounds,
        n_jobs=gbm.n_jobs,
        random_state=seed,
        **XGBOOST_PARAMS,
    )
    model.fit(x_fit, y_fit, eval_set=[(x_stop, y_stop)], verbose=False)
    n = int(model.best_iteration) + 1
    margin = dict(output_margin=True, iteration_range=(0, n))
    calibrate = _platt(model.predict(x_stop, **margin), y_stop)
    return calibrate(model.predict(x_eval, **margin)), n


def fit_catboost(fold: FoldData, settings: Settings, seed: int) -> Fitted:
    x_fit, y_fit, x_stop, y_stop, x_eval = fold
    from catboost import CatBoostClassifier

    gbm = settings.lightgbm
    model = CatBoostClassifier(
        iterations=gbm.max_trees,
        **CATBOOST_PARAMS,
        od_type="Iter",
        od_wait=gbm.early_stopping_rounds,
        thread_count=gbm.n_jobs,
        random_seed=seed,
        verbose=False,
        allow_writing_files=False,
    )
    model.fit(x_fit, y_fit, eval_set=(x_stop, y_stop), use_best_model=True)
    calibrate = _platt(model.predict(x_stop, prediction_type="RawFormulaVal"), y_stop)
    return calibrate(model.predict(x_eval, prediction_type="RawFormulaVal")), int(
        model.get_best_iteration() + 1
    )


MODELS: dict[str, Callable[..., Fitted]] = {
    "lightgbm": fit_lightgbm,
    "xgboost": fit_xgboost,
    "catboost": fit_catboost,
}


# -- the comparison -----------------------------------------------------------------------------
@dataclass
class Config:
    model: str  # a MODELS key, or "blend" of the other models' log-odds
    features: str
    data: str  # "all inputs" or "first input"

    @property
    def name(self) -> str:
        return f"{self.model} | {self.features} | {self.data}"


@dataclass
class FoldScores:
    metrics: list[dict[str, float]] = field(default_factory=list)


def fold_metrics(y: np.ndarray, log_odds: np.ndarray) -> dict[str, float]:
    p = 1.0 / (1.0 + np.exp(-log_odds))
    order = np.argsort(-p, kind="stable")
    out = {
        "roc_auc": float(roc_auc_score(y, p)),
        "average_precision": float(average_precision_score(y, p)),
        "brier": float(brier_score_loss(y, p)),
        "expected_over_actual": float(p.sum() / max(y.sum(), 1)),
    }
    for budget in BUDGETS:
        top = order[: int(np.ceil(budget * len(y)))]
        out[f"recall_top_{budget:.0%}"] = float(y[top].sum() / max(y.sum(), 1))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings(args.config)
    settings.lightgbm.n_jobs = args.threads
    data = load_labelled(args.data, settings.read_block_bytes)
    rows = data.rows.reset_index(drop=True)
    y = rows[LABEL].to_numpy(dtype=np.int64)
    first = (rows["source"] == str(args.data[0])).to_numpy()
    strata = y * 2 + first
    sets = feature_sets(settings)
    matrices = {
        name: InventoryFeatures(derived=sets[name]).fit(rows).transform(rows)
        for name in args.feature_sets
    }
    configs = [Config(m, f, "all inputs") for f in args.feature_sets for m in args.models]
    if "blend" in args.models_extra:
        configs += [Config("blend", f, "all inputs") for f in args.feature_sets]
    if args.first_input_baseline:
        configs.insert(0, Config("lightgbm", args.feature_sets[0], "first input"))
    print(
        f"{len(rows):,} rows ({int(y.sum()):,} backorders); scored on {int(first.sum()):,} rows "
        f"of {Path(args.data[0]).name}; {args.repeats}x{args.folds} folds; "
        f"{len(configs)} configurations",
        flush=True,
    )
    scores = {c.name: FoldScores() for c in configs}
    seconds = {c.name: 0.0 for c in configs}
    trees: dict[str, list[int]] = {c.name: [] for c in configs}
    for repeat in range(args.repeats):
        folds = StratifiedKFold(
            args.folds, shuffle=True, random_state=settings.random_seed + repeat
        )
        for k, (train_rows, held_out) in enumerate(folds.split(np.zeros(len(y)), strata)):
            seed = settings.random_seed + 100 * repeat + k
            scored = held_out[first[held_out]]
            log_odds: dict[tuple[str, str], np.ndarray] = {}
            for config in configs:
                if config.model == "blend":
                    members = [log_odds[(m, config.features)] for m in args.models]
                    z = np.mean(members, axis=0)
                else:
                    pool = (
                        train_rows[first[train_rows]]
                        if config.data == "first input"
                        else train_rows
                    )
                    fit_rows, stop_rows = train_test_split(
                        pool,
                        test_size=EARLY_STOPPING_FRACTION,
                        stratify=strata[pool],
                        random_state=seed,
                    )
                    x = matrices[config.features]
                    started = time.perf_counter()
                    z, n_trees = MODELS[config.model](
                        FoldData.of(x, y, fit_rows, stop_rows, scored), settings, seed
                    )
                    seconds[config.name] += time.perf_counter() - started
                    trees[config.name].append(n_trees)
                    if config.data == "all inputs":
                        log_odds[(config.model, config.features)] = z
                m = fold_metrics(y[scored], z)
                scores[config.name].metrics.append(m)
                print(
                    f"  repeat {repeat + 1} fold {k + 1}: {config.name}: AUC {m['roc_auc']:.4f} "
                    f"AP {m['average_precision']:.4f}",
                    flush=True,
                )
    n_folds = args.repeats * args.folds
    reference = Config(
        "lightgbm",
        default_feature_set(settings, args.feature_sets),
        "all inputs",
    ).name
    ref_ap = (
        [m["average_precision"] for m in scores[reference].metrics] if reference in scores else None
    )
    table = []
    for config in configs:
        frame = pd.DataFrame(scores[config.name].metrics)
        aps = frame["average_precision"].to_numpy()
        table.append(
            {
                "model": config.model,
                "features": config.features,
                "training data": config.data,
                **frame.mean().to_dict(),
                "ap_std": float(aps.std(ddof=1)) if len(aps) > 1 else 0.0,
                "fold_ap": aps.tolist(),
                "ap_wins_vs_reference": (
                    int((aps > np.asarray(ref_ap)).sum()) if ref_ap is not None else None
                ),
                "fit_seconds_per_fold": seconds[config.name] / n_folds
                if trees[config.name]
                else None,
                "trees_median": float(np.median(trees[config.name]))
                if trees[config.name]
                else None,
            }
        )
    return {"reference": reference, "folds": n_folds, "rows": table}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| model | features | training data | ROC AUC | AP (std) | recall top 1/2/5 % | Brier "
        "| expected/actual | AP wins vs ref | fit s/fold | trees |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        recalls = " / ".join(f"{r[f'recall_top_{b:.0%}']:.3f}" for b in BUDGETS)
        fit = "" if r["fit_seconds_per_fold"] is None else f"{r['fit_seconds_per_fold']:.1f}"
        trees = "" if r["trees_median"] is None else f"{r['trees_median']:.0f}"
        lines.append(
            f"| {r['model']} | {r['features']} | {r['training data']} | {r['roc_auc']:.4f} | "
            f"{r['average_precision']:.4f} ({r['ap_std']:.4f}) | {recalls} | {r['brier']:.5f} | "
            f"{r['expected_over_actual']:.2f} | {r['ap_wins_vs_reference']}/{result['folds']} | "
            f"{fit} | {trees} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=[str(p) for p in DEFAULT_DATA])
    parser.add_argument(
        "--config", type=Path, default=None, help="settings YAML (default: built-in)"
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="lightgbm,xgboost,catboost,blend")
    parser.add_argument("--feature-sets", default="raw,missingness,all")
    parser.add_argument(
        "--no-first-input-baseline", dest="first_input_baseline", action="store_false"
    )
    parser.add_argument("--xgboost-params", type=json.loads, default={}, help="JSON overrides")
    parser.add_argument("--catboost-params", type=json.loads, default={}, help="JSON overrides")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    args = parser.parse_args()
    XGBOOST_PARAMS.update(args.xgboost_params)
    CATBOOST_PARAMS.update(args.catboost_params)
    if not all(Path(p).is_file() for p in args.data):
        print(f"skipped: input not found ({', '.join(map(str, args.data))})")
        return 0
    requested = args.models.split(",")
    args.models = [m for m in requested if m in MODELS]
    args.models_extra = [m for m in requested if m not in MODELS]
    unknown = [m for m in args.models_extra if m != "blend"]
    args.feature_sets = args.feature_sets.split(",")
    if unknown or not args.models:
        parser.error(f"--models: choose from {', '.join([*MODELS, 'blend'])}")
    started = time.perf_counter()
    result = run(args)
    print()
    print(markdown(result))
    print(f"\nreference: {result['reference']}; total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
