"""Benchmark: `backorder predict` throughput and peak memory as the input grows.

Builds CSV inputs of 200 k and 1 M rows by repeating the real rows of the bundled sample
(up-sampled: the same rows many times, said here so nobody mistakes them for new data), trains
a model on the bundled sample in a temporary registry, then scores each input in a subprocess
and reads its peak resident memory from the kernel. In the same run, the floor: reading the same
CSV with pyarrow and writing it back as Parquet.

    .venv/bin/python bench/predict_scale.py [--rows 200000 1000000]
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


def build_input(path: Path, rows: int) -> None:
    with gzip.open(SAMPLE / "new_batch.csv.gz", "rt", encoding="utf-8") as handle:
        lines = [line for line in handle.read().splitlines() if not line.startswith("(")]
    header, body = lines[0], lines[1:]
    with path.open("w", encoding="utf-8") as out:
        out.write(header + "\n")
        written = 0
        while written < rows:
            chunk = body[: rows - written]
            out.write("\n".join(chunk) + "\n")
            written += len(chunk)


def run_measured(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one command, measured by a fresh wrapper process so
    that no earlier child's high-water mark is counted."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "subprocess.run(sys.argv[1:], check=True, capture_output=True)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *args], env=env, check=True, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    return wall, int(done.stdout.strip()) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[200_000, 1_000_000])
    args = parser.parse_args()
    exe = str(Path(sys.executable).with_name("backorder"))
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        env = {**os.environ, "BACKORDER_HOME": str(home / "home")}
        subprocess.run(
            [
                exe,
                "train",
                "--data",
                str(SAMPLE / "labelled.csv.gz"),
                "--output",
                str(home / "train"),
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        print(
            "| rows (up-sampled) | read CSV + write Parquet (pyarrow) | backorder predict | "
            "rows/s | ratio | peak RSS of predict |"
        )
        print("|---|---|---|---|---|---|")
        for rows in sorted(args.rows):
            source = home / f"batch_{rows}.csv"
            build_input(source, rows)
            started = time.perf_counter()
            pq.write_table(pacsv.read_csv(source), home / "floor.parquet")
            floor = time.perf_counter() - started
            wall, peak = run_measured(
                [exe, "predict", "--input", str(source), "--output", str(home / "p.parquet")], env
            )
            print(
                f"| {rows:,} | {floor:.1f} s | {wall:.1f} s | {rows / wall:,.0f} | "
                f"{wall / floor:.0f}x | {peak:,.0f} MiB |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
