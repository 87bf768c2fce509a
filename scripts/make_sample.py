"""Rebuild the bundled demo data from ../shared (run once; the output is committed).

Takes real rows, byte for byte, from the raw-layout Kaggle sample (file B in
../shared/data/backorders/README.txt), in a stratified random draw:
- labelled.csv.gz:   30,000 rows, history to train on;
- holdout.csv.gz:    10,000 other rows, labelled, to evaluate on;
- new_batch.csv.gz:  10,000 other rows with the label column removed, plus the
  "(10000 rows)" footer line that the original export ends with, to score.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np

SOURCE = (
    Path(__file__).resolve().parents[1]
    / "../shared/data/backorders/train_first1048575_sample20pct.csv.gz"
)
TARGET = Path(__file__).resolve().parents[1] / "data" / "sample"
SIZES = {"labelled": 30_000, "holdout": 10_000, "new_batch": 10_000}
SEED = 20261128


def main() -> int:
    with gzip.open(SOURCE.resolve(), "rt", encoding="utf-8", newline="") as handle:
        lines = handle.read().splitlines()
    header, body = lines[0], lines[1:]
    label = np.array([line.rsplit(",", 1)[1] == "Yes" for line in body])
    rng = np.random.default_rng(SEED)
    picked: dict[str, list[int]] = {name: [] for name in SIZES}
    total = sum(SIZES.values())
    for cls in (True, False):
        idx = rng.permutation(np.flatnonzero(label == cls))
        take = idx[: round(total * (label == cls).mean())]
        start = 0
        for name, size in SIZES.items():
            n = round(len(take) * size / total)
            picked[name].extend(take[start : start + n].tolist())
            start += n
    TARGET.mkdir(parents=True, exist_ok=True)
    for name, chosen in picked.items():
        rows = sorted(chosen, key=lambda i: rng.random())
        if name == "new_batch":
            out = [header.rsplit(",", 1)[0]] + [body[i].rsplit(",", 1)[0] for i in rows]
            out.append(f"({len(rows)} rows)")
        else:
            out = [header] + [body[i] for i in rows]
        # mtime=0 keeps the gzip bytes identical across rebuilds.
        with (
            open(TARGET / f"{name}.csv.gz", "wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz,
        ):
            gz.write(("\n".join(out) + "\n").encode("utf-8"))
        positives = sum(label[i] for i in rows)
        print(f"{name}: {len(rows)} rows, {positives} backorders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
