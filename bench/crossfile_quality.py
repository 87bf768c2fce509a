"""Out-of-sample check: train on the 10 % sample, evaluate on the 20 % sample's other rows.

The 20 % sample (file B in ../shared/data/backorders/README.txt) overlaps the 10 % sample
(file A); rows of B that repeat a row of A on every feature value are removed first, so
no evaluated row was trained on. What remains has 1.1 % backorders, near the official test
file's rate. Default settings throughout.

    .venv/bin/python bench/crossfile_quality.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from backorder.config import load_settings
from backorder.data import load_labelled
from backorder.evaluate import run_evaluation
from backorder.train import run_training

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "backorders"
FILE_A = SHARED / "train_sample10pct_stratified.csv.gz"
FILE_B = SHARED / "train_first1048575_sample20pct.csv.gz"


def main() -> int:
    if not (FILE_A.is_file() and FILE_B.is_file()):
        print("skipped: ../shared/data/backorders is not beside this checkout")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        settings = load_settings(None, home=home)
        combined = load_labelled([FILE_A, FILE_B], settings.read_block_bytes)
        unseen = combined.rows.index[combined.rows["source"] == str(FILE_B)]
        raw = pd.read_csv(FILE_B, dtype=str, keep_default_na=False)
        raw.index = pd.RangeIndex(1, len(raw) + 1)
        raw.loc[sorted(set(unseen))].to_csv(home / "b_unseen.csv", index=False)
        started = time.perf_counter()
        trained = run_training([FILE_A], settings, home / "train")
        seconds = time.perf_counter() - started
        m = run_evaluation([home / "b_unseen.csv"], home / "eval", settings).metrics
    v = trained.validation
    print(f"trained on {FILE_A.name} in {seconds:.1f} s")
    print("| data | rows | backorder rate | ROC AUC | average precision | recall top 1/2/5 % |")
    print("|---|---|---|---|---|---|")
    for name, x in (("out-of-fold validation (file A)", v), ("file B minus file A rows", m)):
        recalls = " / ".join(f"{x[f'recall_at_top_{b}pct']:.2f}" for b in (1, 2, 5))
        print(
            f"| {name} | {x['n_rows']:,} | {x['positive_rate']:.2%} | {x['roc_auc']:.4f} | "
            f"{x['average_precision']:.4f} | {recalls} |"
        )
    print(
        f"expected vs actual backorders on file B rows: {m['expected_backorders']:,.0f} vs "
        f"{m['actual_backorders']:,}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
