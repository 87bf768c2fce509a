"""Optuna search for hyper-parameters (LightGBM, XGBoost or CatBoost), on training data only.

The search scores each trial by mean average precision over a 3-fold stratified split of all
inputs (scored on the first input's held-out rows, as in ``bench/quality.py``), with a faster
learning rate than the product's so that a trial takes seconds. Its folds use a different seed
from ``bench/quality.py``'s, which then confirms the winner on fresh folds: a setting that only
wins on the folds it was tuned on is not adopted.

Progress is printed per trial; the best parameters are printed as YAML for ``--config``.

    .venv/bin/python bench/tune.py --trials 40                  # LightGBM, ~20 min on 2 cores
    .venv/bin/python bench/tune.py --model catboost --trials 15
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import quality
from quality import DEFAULT_DATA, EARLY_STOPPING_FRACTION, MODELS, FoldData, fold_metrics
from sklearn.model_selection import StratifiedKFold, train_test_split

from backorder.config import LightGBMSettings, load_settings
from backorder.contract import LABEL
from backorder.data import load_labelled
from backorder.features import InventoryFeatures

TUNING_SEED = 7  # bench/quality.py folds use the product's seed (42) and up


def xgboost_space(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "max_depth": trial.suggest_int("max_depth", 4, 10),
        "min_child_weight": trial.suggest_float("min_child_weight", 0.01, 20.0, log=True),
        "subsample": trial.suggest_float("subsample", 0.4, 1.0),
        "colsample_bytree": trial.suggest_float("colsample_bytree", 0.3, 1.0),
        "reg_lambda": trial.suggest_float("reg_lambda", 1e-3, 50.0, log=True),
        "gamma": trial.suggest_float("gamma", 0.0, 1.0),
    }


def catboost_space(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "depth": trial.suggest_int("depth", 4, 10),
        "l2_leaf_reg": trial.suggest_float("l2_leaf_reg", 0.1, 50.0, log=True),
        "random_strength": trial.suggest_float("random_strength", 0.1, 10.0, log=True),
        "bagging_temperature": trial.suggest_float("bagging_temperature", 0.0, 2.0),
    }


def lightgbm_space(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "num_leaves": trial.suggest_int("num_leaves", 15, 255, log=True),
        # Depth stays bounded: exact per-row reasons cost grows with depth squared.
        "max_depth": trial.suggest_int("max_depth", 5, 10),
        "min_child_samples": trial.suggest_int("min_child_samples", 5, 300, log=True),
        "min_child_weight": trial.suggest_float("min_child_weight", 1e-3, 10.0, log=True),
        "subsample": trial.suggest_float("subsample", 0.4, 1.0),
        "colsample_bytree": trial.suggest_float("colsample_bytree", 0.3, 1.0),
        "reg_lambda": trial.suggest_float("reg_lambda", 1e-3, 50.0, log=True),
        "path_smooth": trial.suggest_float("path_smooth", 0.0, 50.0),
        "min_split_gain": trial.suggest_float("min_split_gain", 0.0, 0.05),
    }


SPACES = {"lightgbm": lightgbm_space, "xgboost": xgboost_space, "catboost": catboost_space}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=[str(p) for p in DEFAULT_DATA])
    parser.add_argument("--model", choices=sorted(MODELS), default="lightgbm")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--config", type=Path, default=None, help="settings YAML (features)")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write all trials as JSON")
    return parser.parse_args()


def _report(study: optuna.Study, args: argparse.Namespace) -> None:
    """Print the best trial's parameters; with --json, write every trial."""
    best = study.best_trial
    print(f"\nbest trial {best.number}: AP {best.value:.4f} AUC {best.user_attrs['roc_auc']:.4f}")
    print(f"{args.model}:")
    for key, value in best.params.items():
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    if args.json:
        trials = [
            {"number": t.number, "value": t.value, "params": t.params, "state": t.state.name}
            for t in study.trials
        ]
        args.json.write_text(json.dumps(trials, indent=2), encoding="utf-8")


def main() -> int:
    args = _arguments()
    if not all(Path(p).is_file() for p in args.data):
        print(f"skipped: input not found ({', '.join(map(str, args.data))})")
        return 0

    settings = load_settings(args.config)
    data = load_labelled(args.data, settings.read_block_bytes)
    rows = data.rows.reset_index(drop=True)
    y = rows[LABEL].to_numpy(dtype=np.int64)
    first = (rows["source"] == str(args.data[0])).to_numpy()
    strata = y * 2 + first
    derived = None if settings.derived_features is None else tuple(settings.derived_features)
    x = InventoryFeatures(derived=derived).fit(rows).transform(rows)
    splits = list(
        StratifiedKFold(args.folds, shuffle=True, random_state=TUNING_SEED).split(x, strata)
    )
    print(f"{len(rows):,} rows; {args.folds} folds; {args.trials} trials", flush=True)

    space = SPACES[args.model]
    fit = MODELS[args.model]

    def objective(trial: optuna.Trial) -> float:
        params = space(trial)
        trial_settings = settings.model_copy(
            update={
                "lightgbm": LightGBMSettings(
                    **(params if args.model == "lightgbm" else {}),
                    learning_rate=args.learning_rate,
                    n_jobs=args.threads,
                )
            }
        )
        # The challengers read their parameters from quality.py's module-level dictionaries.
        if args.model == "xgboost":
            quality.XGBOOST_PARAMS.update(params, learning_rate=args.learning_rate)
        if args.model == "catboost":
            quality.CATBOOST_PARAMS.update(params, learning_rate=args.learning_rate)
        scores, started = [], time.perf_counter()
        for k, (train_rows, held_out) in enumerate(splits):
            scored = held_out[first[held_out]]
            fit_rows, stop_rows = train_test_split(
                train_rows,
                test_size=EARLY_STOPPING_FRACTION,
                stratify=strata[train_rows],
                random_state=TUNING_SEED + k,
            )
            z, _ = fit(
                FoldData.of(x, y, fit_rows, stop_rows, scored), trial_settings, TUNING_SEED + k
            )
            scores.append(fold_metrics(y[scored], z))
            trial.report(float(np.mean([s["average_precision"] for s in scores])), k)
            if trial.should_prune():
                raise optuna.TrialPruned()
        auc = float(np.mean([s["roc_auc"] for s in scores]))
        trial.set_user_attr("roc_auc", auc)
        ap = float(np.mean([s["average_precision"] for s in scores]))
        print(
            f"trial {trial.number}: AP {ap:.4f} AUC {auc:.4f} "
            f"({time.perf_counter() - started:.0f} s) {params}",
            flush=True,
        )
        return ap

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=TUNING_SEED),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=8),
    )
    # Start from the current settings so the search can only report an improvement on them.
    current = {
        "lightgbm": settings.lightgbm.model_dump(),
        "xgboost": quality.XGBOOST_PARAMS,
        "catboost": quality.CATBOOST_PARAMS,
    }[args.model]
    study.enqueue_trial({k: current[k] for k in space(optuna.trial.FixedTrial(current))})
    study.optimize(objective, n_trials=args.trials)
    _report(study, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
