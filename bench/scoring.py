"""Benchmark: batch scoring throughput (rows/s) and peak memory, 1 M to 10 M rows.

Inputs are UP-SAMPLED: rows drawn with replacement from the two real shared samples
(../shared/data/backorders, 378,501 usable rows), written once as Parquet and as CSV. Repeated
rows, not new data; fine for speed, meaningless for accuracy.

Compared in one run, each job in a fresh process whose peak RSS is read from the kernel:
- floor: read the input with pyarrow and write it back as Parquet, nothing else;
- seed-style scikit-learn pipeline: one-hot flags + RobustScaler + RandomForest (100 trees),
  as the system this product replaces scored (trained here on the real samples);
- LightGBM's predict, and compiled trees (lleaves), on the model's features only;
- `backorder predict` end to end (read, validate, features, score, reasons, write);
- the same on Dask (`--engine dask`) with 1 and 2 workers, over 250 k-row partitions.

The model is the product's default (trained on both shared samples) unless --home names a
registry. Figures go to stdout, JSON and a plot of seconds against rows.

    .venv/bin/python bench/scoring.py [--sizes 1000000 2000000 10000000] [--formats parquet csv]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "backorders"
SAMPLES = [
    SHARED / "train_sample10pct_stratified.csv.gz",
    SHARED / "train_first1048575_sample20pct.csv.gz",
]
FLAGS = ["potential_issue", "deck_risk", "oe_constraint", "ppap_risk", "stop_auto_buy", "rev_stop"]
PARTITION_ROWS = 250_000
COLORS = {
    "floor": "tab:gray",
    "seed_rf": "tab:pink",
    "lightgbm": "tab:brown",
    "compiled": "tab:orange",
    "backorder": "tab:blue",
    "dask1": "tab:green",
    "dask2": "tab:red",
}
CHUNK = 250_000


def real_rows() -> pd.DataFrame:
    from backorder.contract import FEATURE_COLUMNS, LABEL

    frames = []
    for path in SAMPLES:
        frame = pd.read_csv(path, low_memory=False)
        frame = frame[frame["national_inv"].notna()]
        for column in ("perf_6_month_avg", "perf_12_month_avg"):
            frame[column] = frame[column].fillna(-99.0)  # the 10 % sample wrote -99 as empty
        label = frame[LABEL].astype(str).isin(["1", "Yes"]).astype("int8")
        frames.append(frame[list(FEATURE_COLUMNS)].assign(**{LABEL: label}))
    return pd.concat(frames, ignore_index=True)


def build_inputs(folder: Path, sizes: list[int], formats: list[str]) -> dict[str, Path]:
    """Up-sampled inputs (label dropped), built once and reused by later runs."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {
        f"{n}.{fmt}": folder / f"rows_{n}.{fmt}"
        for n in sizes
        for fmt in formats
        if not (folder / f"rows_{n}.{fmt}").exists()
    }
    if wanted:
        base = real_rows().drop(columns=["went_on_backorder"])
        rng = np.random.default_rng(0)
        for n in sizes:
            frame = base.iloc[rng.integers(0, len(base), n)].reset_index(drop=True)
            frame.insert(0, "sku", np.arange(n, dtype="int64") + 3_000_000)
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if "parquet" in formats:
                pq.write_table(table, folder / f"rows_{n}.parquet", row_group_size=CHUNK)
            if "csv" in formats:
                pacsv.write_csv(table, folder / f"rows_{n}.csv")
            parts = folder / f"parts_{n}"
            parts.mkdir(exist_ok=True)
            for i, start in enumerate(range(0, n, PARTITION_ROWS)):
                pq.write_table(table.slice(start, PARTITION_ROWS), parts / f"part-{i:04d}.parquet")
    return {f"{n}.{fmt}": folder / f"rows_{n}.{fmt}" for n in sizes for fmt in formats}


# -- jobs (each runs in its own process) ---------------------------------------------------------
def _batches(path: Path) -> Any:
    if path.suffix == ".parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=CHUNK)
    else:
        yield from pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=16 << 20))


def job_floor(path: Path, out: Path, **_: Any) -> int:
    rows, writer = 0, None
    for batch in _batches(path):
        table = pa.Table.from_batches([batch])
        writer = writer or pq.ParquetWriter(out, table.schema, compression="zstd")
        writer.write_table(table)
        rows += batch.num_rows
    assert writer is not None
    writer.close()
    return rows


def _features(batch: pa.RecordBatch, names: list[str]) -> np.ndarray:
    frame = batch.to_pandas()
    for flag in FLAGS:
        frame[flag] = (frame[flag] == "Yes").astype("float64")
    for column in ("perf_6_month_avg", "perf_12_month_avg"):
        frame[column] = frame[column].where(frame[column] != -99.0)
    return frame[names].to_numpy(dtype="float64")


def _score_batches(path: Path, out: Path, score: Any) -> tuple[int, float]:
    """Score the input batch by batch into a Parquet of probabilities; time only this loop
    (the model is loaded, and compiled, before the clock starts)."""
    rows, writer = 0, None
    started = time.perf_counter()
    for batch in _batches(path):
        table = pa.table({"backorder_probability": score(batch)})
        writer = writer or pq.ParquetWriter(out, table.schema, compression="zstd")
        writer.write_table(table)
        rows += batch.num_rows
    assert writer is not None
    writer.close()
    return rows, time.perf_counter() - started


def job_model(path: Path, out: Path, home: Path, engine: str, **_: Any) -> tuple[int, float]:
    from backorder.config import load_settings
    from backorder.registry import Registry

    settings = load_settings(None, home=home)
    model = Registry(settings).load("champion", compiled=engine == "compiled")
    assert model.scoring_engine == engine, model.scoring_engine
    names = model.feature_names
    return _score_batches(
        path, out, lambda batch: model.probability_of_features(_features(batch, names))
    )


def job_seed_rf(path: Path, out: Path, rf_model: Path, **_: Any) -> tuple[int, float]:
    import joblib

    pipeline = joblib.load(rf_model)
    return _score_batches(
        path,
        out,
        lambda batch: pipeline.predict_proba(batch.to_pandas()[pipeline.feature_names_in_])[:, 1],
    )


def job_backorder(path: Path, out: Path, home: Path, **_: Any) -> int:
    from backorder.config import load_settings
    from backorder.predict import predict_file
    from backorder.registry import Registry

    settings = load_settings(None, home=home)
    model = Registry(settings).load("champion", compiled=True)
    summary = predict_file(path, out, model, settings)
    assert summary.read == summary.scored + summary.rejected
    return summary.read


def job_dask(path: Path, out: Path, home: Path, workers: int, **_: Any) -> int:
    from backorder.config import load_settings
    from backorder.dask_engine import predict_partitioned

    settings = load_settings(None, home=home)
    parts = path.parent / f"parts_{path.stem.split('_')[1]}"
    totals = predict_partitioned(str(parts), str(out), settings, workers=workers)
    return int(totals["read"])


def job_train(path: Path, out: Path, home: Path, **_: Any) -> int:
    from backorder.config import load_settings
    from backorder.train import run_training

    settings = load_settings(None, home=home)
    outcome = run_training([path], settings, out)
    return outcome.data.n_read


def job_train_dask(path: Path, out: Path, home: Path, workers: int, **_: Any) -> int:
    from backorder.config import load_settings
    from backorder.dask_engine import train_partitioned

    settings = load_settings(None, home=home)
    parts = path.with_suffix("")  # the same rows as 250 k-row partitions
    outcome = train_partitioned(str(parts), settings, output_dir=out, workers=workers)
    return outcome.data.n_read


JOBS = {
    "floor": job_floor,
    "model": job_model,
    "seed_rf": job_seed_rf,
    "backorder": job_backorder,
    "dask": job_dask,
    "train": job_train,
    "train_dask": job_train_dask,
}


def run_job(name: str, **kwargs: Any) -> dict[str, float]:
    """Run one job in a fresh process; return its wall seconds, rows and peak RSS (MiB)."""
    payload = json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()})
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", name, payload],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall_seconds": wall, **result}


def child(name: str, payload: str) -> None:
    # Progress (INFO logs) on stderr: the parent shows it when a job fails.
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    kwargs = json.loads(payload)
    for key in ("path", "out", "home", "rf_model"):
        if key in kwargs:
            kwargs[key] = Path(kwargs[key])
    started = time.perf_counter()
    rows: Any = JOBS[name](**kwargs)
    seconds = time.perf_counter() - started
    if isinstance(rows, tuple):  # (rows, seconds of the timed part): set-up excluded
        rows, seconds = rows
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
    status = Path("/proc/self/status").read_text()
    peak = int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1]) / 1024
    # Workers of a LocalCluster are children: their largest peak is reported separately.
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        json.dumps({"rows": rows, "seconds": seconds, "rss_mib": peak, "child_rss_mib": children})
    )


# -- set-up --------------------------------------------------------------------------------------
def ensure_model(home: Path) -> None:
    if (home / "mlflow.db").exists():
        return
    print(f"training the default model on both shared samples into {home} ...", flush=True)
    subprocess.run(
        [
            str(Path(sys.executable).with_name("backorder")),
            "train",
            *[arg for p in SAMPLES for arg in ("--data", str(p))],
            "--output",
            str(home / "training"),
        ],
        env={**os.environ, "BACKORDER_HOME": str(home)},
        check=True,
    )


def ensure_seed_rf(path: Path) -> None:
    """The replaced system's pipeline: one-hot flags, RobustScaler numbers, RandomForest."""
    if path.exists():
        return
    import joblib
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import OneHotEncoder, RobustScaler

    rows = real_rows()
    numbers = [c for c in rows.columns if c not in (*FLAGS, "went_on_backorder")]
    pipeline = Pipeline(
        [
            (
                "prep",
                ColumnTransformer(
                    [
                        ("flags", OneHotEncoder(handle_unknown="ignore"), FLAGS),
                        (
                            "numbers",
                            make_pipeline(SimpleImputer(strategy="median"), RobustScaler()),
                            numbers,
                        ),
                    ]
                ),
            ),
            (
                "rf",
                RandomForestClassifier(
                    n_estimators=100, min_samples_leaf=5, n_jobs=2, random_state=0
                ),
            ),
        ]
    )
    pipeline.fit(rows.drop(columns=["went_on_backorder"]), rows["went_on_backorder"])
    joblib.dump(pipeline, path)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 2_000_000, 10_000_000])
    parser.add_argument("--formats", nargs="+", default=["parquet", "csv"])
    parser.add_argument(
        "--jobs",
        nargs="*",
        default=["floor", "seed_rf", "lightgbm", "compiled", "backorder", "dask1", "dask2"],
    )
    parser.add_argument(
        "--train-rows",
        type=int,
        default=0,
        help="also time training on this many up-sampled labelled rows (default 0: skipped)",
    )
    parser.add_argument(
        "--train-engines",
        nargs="+",
        default=["dask"],
        choices=["dask", "local"],
        help="dask: `train --engine dask`, 2 workers (default); local: `backorder train`, whose "
        "5-fold CV never stops early on up-sampled rows (copies fall on both sides of a fold)",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench-scoring")
    parser.add_argument("--home", type=Path, default=None, help="registry with a champion")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    home = args.home or work / "home"
    results: list[dict[str, Any]] = []
    if args.sizes and args.jobs:
        results += bench_scoring(args, work, home)
    if args.train_rows:
        results += bench_training(args.train_rows, args.train_engines, work)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    summarise(results, work)
    return 0


def bench_scoring(args: argparse.Namespace, work: Path, home: Path) -> list[dict[str, Any]]:
    ensure_model(home)
    rf_model = work / "seed_rf.joblib"
    ensure_seed_rf(rf_model)
    inputs = build_inputs(work / "data", args.sizes, args.formats)
    # Compile once up front so no timed job pays for it.
    run_job(
        "backorder",
        path=inputs[f"{args.sizes[0]}.{args.formats[0]}"],
        out=work / "warm.parquet",
        home=home,
    )
    results: list[dict[str, Any]] = []
    for n in args.sizes:
        for fmt in args.formats:
            path, out = inputs[f"{n}.{fmt}"], work / "out.parquet"
            for job in args.jobs:
                if job.startswith("dask") and fmt != "parquet":
                    continue  # partitions are Parquet
                kwargs: dict[str, Any] = {"path": path, "out": out, "home": home}
                if job in ("lightgbm", "compiled"):
                    name, kwargs["engine"] = "model", job
                elif job.startswith("dask"):
                    name, kwargs["workers"] = "dask", int(job[-1])
                    kwargs["out"] = work / "dask-out"
                elif job == "seed_rf":
                    name, kwargs["rf_model"] = "seed_rf", rf_model
                else:
                    name = job
                measured = run_job(name, **kwargs)
                record = {"rows": n, "format": fmt, "job": job, **measured}
                results.append(record)
                print(
                    f"{n:>10,} {fmt:<7} {job:<10} {measured['seconds']:8.2f} s "
                    f"{n / measured['seconds']:>11,.0f} rows/s  peak {measured['rss_mib']:7.0f} MiB"
                    + (
                        f" (workers {measured['child_rss_mib']:.0f} MiB)"
                        if job.startswith("dask")
                        else ""
                    ),
                    flush=True,
                )
    return results


def bench_training(n: int, engines: list[str], work: Path) -> list[dict[str, Any]]:
    """Train on ``n`` up-sampled labelled rows, each engine from a fresh registry."""
    import shutil

    train_input = work / "data" / f"labelled_{n}.parquet"
    parts = train_input.with_suffix("")
    if not train_input.exists():
        base = real_rows()
        rows = base.iloc[np.random.default_rng(1).integers(0, len(base), n)]
        rows.to_parquet(train_input, index=False)
    if not parts.exists():
        rows = pd.read_parquet(train_input)
        parts.mkdir()
        for i, start in enumerate(range(0, n, PARTITION_ROWS)):
            part = rows.iloc[start : start + PARTITION_ROWS]
            part.to_parquet(parts / f"part-{i:03d}.parquet", index=False)
    results = []
    for engine in engines:
        train_home = work / f"train-home-{engine}"
        shutil.rmtree(train_home, ignore_errors=True)
        job = "train_dask" if engine == "dask" else "train"
        measured = run_job(
            job, path=train_input, out=work / f"train-run-{engine}", home=train_home, workers=2
        )
        results.append({"rows": n, "format": "parquet", "job": job, **measured})
        print(
            f"training ({engine}) on {n:,} up-sampled rows: {measured['seconds']:.1f} s, "
            f"peak {measured['rss_mib']:.0f} MiB (largest worker {measured['child_rss_mib']:.0f}"
            " MiB)",
            flush=True,
        )
    return results


def summarise(results: list[dict[str, Any]], work: Path) -> None:
    frame = pd.DataFrame(results)
    scoring = frame[~frame["job"].str.startswith("train")]
    if scoring.empty:
        return
    floor = scoring[scoring["job"] == "floor"].set_index(["rows", "format"])["seconds"]
    print("\nrows, format, job: seconds, rows/s, x floor, peak MiB")
    for row in scoring.itertuples():
        ratio = row.seconds / floor.get((row.rows, row.format), np.nan)
        print(
            f"{row.rows:>10,} {row.format:<7} {row.job:<10} {row.seconds:8.2f} "
            f"{row.rows / row.seconds:>11,.0f} {ratio:6.1f}x {row.rss_mib:7.0f}"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, fmt in zip(axes, ["parquet", "csv"], strict=True):
        part = scoring[scoring["format"] == fmt]
        for job, group in part.groupby("job"):
            color = COLORS.get(str(job))
            ax.plot(group["rows"] / 1e6, group["seconds"], marker="o", label=job, color=color)
        ax.set_title(f"{fmt} input")
        ax.set_xlabel("rows (millions, up-sampled)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("seconds (log scale)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(work / "scoring.png", dpi=110)
    print(f"\nplot: {work / 'scoring.png'}; figures: {work / 'results.json'}")


if __name__ == "__main__":
    raise SystemExit(main())
