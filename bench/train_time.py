"""Benchmark: wall-clock time of `backorder train` on both shared samples (the default data).

Prints the whole command's time (fresh registry, so it includes creating the MLflow database),
its phases as the command logs them, and as a baseline measured in the same run, one plain
LightGBM fit (default parameters, 100 trees) on the same rows, the floor any training pays.

    .venv/bin/python bench/train_time.py [--data PATH ...] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "backorders"
DEFAULT_DATA = (
    SHARED / "train_sample10pct_stratified.csv.gz",
    SHARED / "train_first1048575_sample20pct.csv.gz",
)


def time_train(data: list[str]) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "BACKORDER_HOME": home}
        started = time.perf_counter()
        args = [str(Path(sys.executable).with_name("backorder")), "train"]
        for path in data:
            args += ["--data", path]
        done = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
        return time.perf_counter() - started, done.stderr + done.stdout


def time_plain_lightgbm(data: list[str]) -> float:
    import lightgbm as lgb

    from backorder.data import load_labelled
    from backorder.features import InventoryFeatures

    loaded = load_labelled(data, block_bytes=8 << 20)
    features = InventoryFeatures().fit_transform(loaded.rows)
    started = time.perf_counter()
    lgb.train(
        {"objective": "binary", "verbosity": -1, "num_threads": 2},
        lgb.Dataset(features, loaded.y),
        num_boost_round=100,
    )
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", action="append", default=None)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    data = args.data or [str(p) for p in DEFAULT_DATA]
    if not all(Path(p).is_file() for p in data):
        print(f"skipped: {data} not found (../shared is not beside this checkout)")
        return 0
    walls, log = [], ""
    for _ in range(args.repeat):
        wall, log = time_train(data)
        walls.append(wall)
    floor = time_plain_lightgbm(data)
    print("phases of the last run:")
    for line in log.splitlines():
        if any(k in line for k in ("read ", "fitted in", "registered", "training on")):
            print("  " + line)
    print(
        f"backorder train, wall clock: median {statistics.median(walls):.1f} s "
        f"over {len(walls)} run(s) (min {min(walls):.1f}, max {max(walls):.1f})"
    )
    print(f"baseline, one plain LightGBM fit (100 trees, 2 threads): {floor:.1f} s")
    print(f"ratio train / baseline: {statistics.median(walls) / floor:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
