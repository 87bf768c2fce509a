"""Beyond one process: score a partitioned dataset on a Dask cluster.

A partitioned dataset is a folder or object-store prefix of Parquet (or CSV) files. Each file is
one task: a worker loads the model once (compiled trees from the shared cache when available),
runs the same ``predict_file`` as ``backorder predict`` and writes ``<output>/<name>.parquet``
and ``<name>.rejects.parquet`` atomically. The driver reconciles the counts of every partition
and, only when all succeeded, writes ``<output>/_SUCCESS.json`` with the totals: readers wait
for that marker. A re-run removes the marker first, then overwrites each partition's files,
never duplicating them. Two inputs that would share an output name (``a.csv`` and
``a.parquet``) are refused before anything is scored.

Without ``--scheduler`` a ``LocalCluster`` of processes is started on 127.0.0.1 (dashboard off)
and stopped afterwards. With an address, the existing cluster's workers must reach the same
registry (``tracking_uri``) and storage (S3 or a shared file system) as the driver.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
import fsspec.core

from backorder.config import Settings
from backorder.errors import BackorderError, InputFileError, first_line
from backorder.io import is_remote, remove_file, table_suffix, write_json_atomic
from backorder.uris import redact, redact_text

log = logging.getLogger(__name__)

_models: dict[tuple[str, str, bool], Any] = {}  # per worker process: loaded once, reused


def partitions(uri: str) -> list[str]:
    """The data files directly under a folder or prefix, sorted by name."""
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        names = sorted(str(p) for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        raise InputFileError(f"{redact(uri)}: folder not found") from None
    except Exception as exc:
        reason = redact_text(first_line(exc), uri)
        raise InputFileError(f"{redact(uri)}: cannot be listed ({reason})") from None
    protocol = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
    found = [
        protocol + name
        for name in names
        if table_suffix(name) is not None
        and not Path(name).name.startswith((".", "_"))
        and ".rejects." not in Path(name).name
    ]
    if not found:
        raise InputFileError(f"{redact(uri)}: no Parquet or CSV files to score")
    return found


def _output_name(partition: str) -> str:
    name = Path(partition).name
    suffix = table_suffix(name) or ""
    return name[: len(name) - len(suffix)] + ".parquet"


def _check_output_names(input_uri: str, files: list[str]) -> None:
    """Refuse inputs whose outputs would overwrite each other (``a.csv`` and ``a.parquet``)."""
    taken: dict[str, str] = {}
    for file in files:
        output = _output_name(file)
        if output in taken:
            raise InputFileError(
                f"{input_uri}: {Path(taken[output]).name} and {Path(file).name} would both be "
                f"scored into {output}; keep one of them"
            )
        taken[output] = file


def _success_marker(output_uri: str) -> str:
    return f"{output_uri.rstrip('/')}/_SUCCESS.json"


def _remove_success_marker(output_uri: str) -> None:
    """Before partitions are replaced: a marker left in place would vouch for a mix of old and
    new partitions if the run stopped half-way."""
    remove_file(_success_marker(output_uri))


def score_partition(
    partition: str, output: str, settings_json: str, model_ref: str, batch_id: str
) -> dict[str, Any]:
    """One task: score one file with the model (loaded once per worker process)."""
    from backorder.predict import predict_file
    from backorder.registry import Registry

    settings = Settings.model_validate_json(settings_json)
    key = (settings.resolved_tracking_uri, model_ref, settings.compiled_trees)
    model = _models.get(key)
    if model is None:
        model = Registry(settings).load_for_scoring(model_ref)
        _models[key] = model
    started = time.perf_counter()
    summary = predict_file(
        partition,
        f"{output.rstrip('/')}/{_output_name(partition)}",
        model,
        settings,
        batch_id=batch_id,
    )
    return {
        "partition": redact(partition),
        "output": summary.output,
        "rejects": summary.rejects,
        "model_version": summary.model_version,
        "seconds": round(time.perf_counter() - started, 3),
        **summary.counts(),
    }


@contextmanager
def dask_client(scheduler: str | None, workers: int) -> Iterator[Any]:
    """A client of the cluster at ``scheduler``, or of a LocalCluster on 127.0.0.1 (one
    single-threaded worker process per core asked for, dashboard off) stopped afterwards."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise BackorderError(
            "--engine dask needs Dask: pip install 'backorder[dask]' (dask[distributed])"
        ) from None
    if scheduler:
        with Client(scheduler, timeout="30s") as client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def predict_partitioned(  # noqa: PLR0913 -- one run's input, outputs, model and options; the options keyword-only
    input_uri: str,
    output_uri: str,
    settings: Settings,
    *,
    model_ref: str = "champion",
    scheduler: str | None = None,
    workers: int = 2,
    batch_id: str | None = None,
) -> dict[str, Any]:
    """Score every partition in parallel on Dask; return the reconciled totals."""
    from backorder.predict import new_batch_id
    from backorder.registry import Registry

    files = partitions(input_uri)
    _check_output_names(input_uri, files)
    batch_id = batch_id or new_batch_id()
    # Resolve the version once, so every worker scores with the same model even if a new
    # champion is promoted mid-run; compile (and cache) it here once rather than per worker.
    registry = Registry(settings)
    version = registry.resolve(model_ref)
    loaded = registry.load_for_scoring(version)
    log.info(f"scoring {len(files)} partition(s) with model v{loaded.version} on Dask")
    settings_json = settings.model_dump_json()
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    _remove_success_marker(output_uri)
    with dask_client(scheduler, workers) as client:
        from dask.distributed import as_completed

        futures = [
            client.submit(
                score_partition,
                path,
                output_uri,
                settings_json,
                version,
                batch_id,
                key=f"score-{batch_id}-{i}",
                pure=False,
            )
            for i, path in enumerate(files)
        ]
        for future in as_completed(futures):
            try:
                result = future.result()
            except BackorderError as exc:
                failures.append(str(exc))
                continue
            results.append(result)
            log.info(
                f"{result['partition']}: scored {result['scored']:,}, "
                f"rejected {result['rejected']:,} in {result['seconds']:.1f} s"
            )
    if failures:
        raise BackorderError(
            f"{len(failures)} of {len(files)} partition(s) failed; first: {failures[0]}"
        )
    totals = {k: sum(r[k] for r in results) for k in ("read", "scored", "rejected", "flagged")}
    if totals["read"] != totals["scored"] + totals["rejected"]:
        raise RuntimeError(f"row counts do not reconcile: {totals}")
    summary = {
        "batch_id": batch_id,
        "input": redact(input_uri),
        "output": redact(output_uri),
        "model_version": version,
        "partitions": sorted(results, key=lambda r: r["partition"]),
        **totals,
    }
    # The marker comes last: its presence means every partition above is complete.
    write_json_atomic(_success_marker(output_uri), summary)
    return summary


# -- training -----------------------------------------------------------------------------------
TRAIN, CALIBRATION, HOLDOUT = "train", "calibration", "holdout"


def prepare_partition(partition: str, settings_json: str, sample_rows: int) -> dict[str, Any]:
    """One task: validate a labelled file and split its rows by the hash of their features.

    The promotion holdout is the same hash slice ``backorder train`` holds out; the next slice
    calibrates. Both go to the driver; the training rows stay on the worker as features.
    """
    import hashlib

    from backorder.contract import LABEL
    from backorder.data import feature_hash, load_labelled
    from backorder.model import build_pipeline
    from backorder.train import hash_slices

    settings = Settings.model_validate_json(settings_json)
    data = load_labelled([partition], settings.read_block_bytes)
    rows = data.rows.reset_index(drop=True)
    hashes = feature_hash(rows)
    # Slice 0 is the promotion holdout, 1 the calibration slice, 2 the rows to train on.
    slices = hash_slices(hashes, settings.holdout_fraction, settings.dask_calibration_fraction)
    holdout_rows, calibration_rows, train_rows = (rows[slices == i] for i in range(3))
    # The same feature step, configured from the same settings, as the registered pipeline.
    features = build_pipeline(settings).named_steps["features"].fit(train_rows)
    train_features = features.transform(train_rows)
    train_features[LABEL] = train_rows[LABEL].astype("int64").to_numpy()
    return {
        "partition": partition,
        "source": data.sources[0],
        "rejects": data.rejects,
        "warnings": dict(data.warnings),
        # The lineage hash of this partition's rows (a digest: the rows' hashes stay here).
        "digest": hashlib.sha256(hashes.tobytes()).hexdigest(),
        "train_rows": len(train_rows),
        "train_positives": int(train_features[LABEL].sum()),
        TRAIN: train_features.reset_index(drop=True),
        "sample": train_rows.sample(n=min(len(train_rows), sample_rows), random_state=0),
        CALIBRATION: calibration_rows,
        HOLDOUT: holdout_rows,
    }


def train_partitioned(  # noqa: PLR0913 -- one run's input, outputs, model and options; the options keyword-only
    input_uri: str,
    settings: Settings,
    *,
    output_dir: Path | None = None,
    scheduler: str | None = None,
    workers: int = 2,
    apply_promotion: bool = True,
) -> Any:
    """Train on a partitioned labelled dataset with ``lightgbm.dask``; register like ``train``.

    - Each partition is validated on a worker and split by feature hash: promotion holdout,
      calibration slice, training rows. Only the two slices and a sample come to the driver.
    - The number of trees is chosen by early stopping on the sample (``dask_sample_rows``).
    - ``DaskLGBMClassifier`` fits that many trees on every training row, across the workers.
    - Platt calibration and the cost-minimising threshold are fitted on the calibration
      slice, which the booster never saw; the holdout then decides promotion, as in ``train``.
    """
    from datetime import UTC, datetime

    import numpy as np

    from backorder.contract import FEATURE_COLUMNS, LABEL
    from backorder.model import build_pipeline
    from backorder.train import Fitted, Holdout, TrainingRun, register_trained

    started = datetime.now(UTC)
    output_dir = output_dir or settings.home / "runs" / f"train-{started:%Y%m%dT%H%M%SZ}"
    files = partitions(input_uri)
    log.info(f"training on {len(files)} partition(s) with lightgbm.dask")
    with dask_client(scheduler, workers) as client:
        prepared, small = _prepare_partitions(client, files, settings)
        for part in small:
            src = part["source"]
            log.info(
                f"{src.uri}: read {src.read:,}, accepted {src.accepted:,}, "
                f"rejected {src.rejected:,}"
            )
        sample, calibration, holdout = (
            _concat(small, key) for key in ("sample", CALIBRATION, HOLDOUT)
        )
        n_train = sum(p["train_rows"] for p in small)
        positives = sum(p["train_positives"] for p in small)
        if sample[LABEL].sum() < 2 or calibration[LABEL].sum() < 2:
            raise BackorderError(
                f"{input_uri}: too few backorders to train on "
                f"({int(sample[LABEL].sum())} in the sample, "
                f"{int(calibration[LABEL].sum())} in the calibration slice)"
            )

        fit_started = time.perf_counter()
        pipeline = build_pipeline(settings)
        features, clf = pipeline[0], pipeline[-1]
        features.fit(sample)
        n_trees = _trees_by_early_stopping(clf, features.transform(sample), sample, settings)
        log.info(f"early stopping on a {len(sample):,}-row sample: {n_trees} trees")
        log.info(f"fitting {n_trees} trees on {n_train:,} rows across the cluster")
        booster = _fit_on_cluster(client, prepared, clf, n_trees, features.feature_names_out_)

    # Calibrate on rows the booster never saw, as the local engine does on out-of-fold rows.
    y_cal = calibration[LABEL].to_numpy(dtype=np.int64)
    clf.fit_calibration(
        booster, n_trees, features.transform(calibration), y_cal, positives / n_train
    )
    fit_seconds = time.perf_counter() - fit_started
    log.info(f"fitted in {fit_seconds:.1f} s; threshold {clf.decision_threshold_:.4f}")

    return register_trained(
        Fitted(
            pipeline,
            fit_seconds,
            calibration[[*FEATURE_COLUMNS, LABEL]],
            y_cal,
            clf.oof_probability_,
            validation_title="Validation (calibration slice, never trained on)",
            validation_note=(
                "The booster did not see these rows; calibration and threshold were fitted on "
                "them, so threshold-dependent figures here are slightly optimistic."
            ),
            training_rows=n_train,
            training_positives=positives,
            params={"engine": "dask", "partitions": len(files), "sample_rows": len(sample)},
        ),
        settings,
        TrainingRun(
            holdout=Holdout(holdout, holdout[LABEL].to_numpy(dtype=np.int64)),
            data=_labelled_data(small, sample),
            fingerprint=_fingerprint(
                small, positives + int(y_cal.sum()) + int(holdout[LABEL].sum())
            ),
            uris=files,
            started=started,
            output_dir=output_dir,
        ),
        apply_promotion=apply_promotion,
    )


def _prepare_partitions(
    client: Any, files: list[str], settings: Settings
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Start ``prepare_partition`` on every file; return its futures (the training rows stay
    on the workers) and everything else it returned, gathered to the driver."""
    per_partition = max(1, -(-settings.dask_sample_rows // len(files)))
    prepared = client.map(
        prepare_partition,
        files,
        settings_json=settings.model_dump_json(),
        sample_rows=per_partition,
        pure=False,
    )
    small = client.gather(
        [
            client.submit(lambda p: {k: v for k, v in p.items() if k != TRAIN}, part, pure=False)
            for part in prepared
        ]
    )
    return prepared, small


def _concat(small: list[dict[str, Any]], key: str) -> Any:
    import pandas as pd

    return pd.concat([p[key] for p in small], ignore_index=True)


def _trees_by_early_stopping(clf: Any, x_sample: Any, sample: Any, settings: Settings) -> int:
    """Boosting rounds for the cluster fit: early stopping on the driver's sample."""
    import numpy as np

    from backorder.contract import LABEL

    y_sample = sample[LABEL].to_numpy(dtype=np.int64)
    probe = clf.fit_early_stopped(x_sample, y_sample, np.arange(len(sample)), settings.random_seed)
    return max(1, int(probe.best_iteration or probe.current_iteration()))


def _fit_on_cluster(
    client: Any, prepared: list[Any], clf: Any, n_trees: int, feature_names: list[str]
) -> Any:
    """``n_trees`` trees on every training row, with ``lightgbm.dask``; the local booster."""
    import dask.dataframe as dd
    from lightgbm.dask import DaskLGBMClassifier

    from backorder.contract import LABEL

    train_parts = [client.submit(lambda p: p[TRAIN], part, pure=False) for part in prepared]
    train = dd.from_delayed(train_parts, verify_meta=False)
    params = {k: v for k, v in clf.lightgbm_params().items() if k != "num_threads"}
    distributed = DaskLGBMClassifier(client=client, n_estimators=n_trees, **params)
    with warnings.catch_warnings():
        # lightgbm.dask sets threads per worker itself and says so about n_jobs; expected.
        warnings.filterwarnings("ignore", message="Parameter n_jobs will be ignored")
        distributed.fit(train[list(feature_names)], train[LABEL])
    return distributed.to_local().booster_


def _labelled_data(small: list[dict[str, Any]], sample: Any) -> Any:
    """What ``register_trained`` reports of the inputs: sources, rejects and row warnings."""
    from collections import Counter

    import pandas as pd

    from backorder.data import LabelledData

    rejects = [p["rejects"] for p in small if len(p["rejects"])]
    row_warnings: Counter[str] = Counter()
    for p in small:
        row_warnings.update(p["warnings"])
    return LabelledData(
        rows=sample,
        rejects=pd.concat(rejects, ignore_index=True) if rejects else small[0]["rejects"],
        sources=[p["source"] for p in small],
        warnings=row_warnings,
    )


def _fingerprint(small: list[dict[str, Any]], positives: int) -> dict[str, Any]:
    """The data fingerprint: accepted rows, backorders, and a digest of the partitions' digests."""
    import hashlib

    digest = hashlib.sha256()
    for p in small:
        digest.update(p["digest"].encode())
    return {
        "rows": int(sum(p["source"].accepted for p in small)),
        "positives": positives,
        "sha256": digest.hexdigest(),  # of the partitions' digests, in order
    }
