"""Beyond one process: score a partitioned dataset on a Dask cluster.

A partitioned dataset is a folder or object-store prefix of Parquet (or CSV) files. Each file is
one task: a worker loads the model once (compiled trees from the shared cache when available),
runs the same ``predict_file`` as ``backorder predict`` and writes ``<output>/<name>.parquet``
and ``<name>.rejects.parquet`` atomically. The driver reconciles the counts of every partition
and, only when all succeeded, writes ``<output>/_SUCCESS.json`` with the totals: readers wait
for that marker, and a re-run overwrites each partition's files, never duplicating them.

Without ``--scheduler`` a ``LocalCluster`` of processes is started on 127.0.0.1 (dashboard off)
and stopped afterwards. With an address, the existing cluster's workers must reach the same
registry (``tracking_uri``) and storage (S3 or a shared file system) as the driver.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import fsspec.core

from backorder.config import Settings
from backorder.errors import BackorderError, InputFileError
from backorder.io import is_remote, write_json_atomic

PARTITION_SUFFIXES = (".parquet", ".pq", ".csv", ".csv.gz")
_models: dict[tuple[str, str, bool], Any] = {}  # per worker process: loaded once, reused


def partitions(uri: str) -> list[str]:
    """The data files directly under a folder or prefix, sorted by name."""
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        names = sorted(str(p) for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        raise InputFileError(f"{uri}: folder not found") from None
    except Exception as exc:
        raise InputFileError(f"{uri}: cannot be listed ({exc})") from None
    protocol = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
    found = [
        protocol + name
        for name in names
        if name.lower().endswith(PARTITION_SUFFIXES)
        and not Path(name).name.startswith((".", "_"))
        and ".rejects." not in Path(name).name
    ]
    if not found:
        raise InputFileError(f"{uri}: no Parquet or CSV files to score")
    return found


def _output_name(partition: str) -> str:
    name = Path(partition).name
    for suffix in sorted(PARTITION_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] + ".parquet"
    return name + ".parquet"


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
        model = Registry(settings).load(
            model_ref, settings.scoring_base_rate, compiled=settings.compiled_trees
        )
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
        "partition": partition,
        "output": summary.output,
        "rejects": summary.rejects,
        "model_version": summary.model_version,
        "seconds": round(time.perf_counter() - started, 3),
        **summary.counts(),
    }


def predict_partitioned(
    input_uri: str,
    output_uri: str,
    settings: Settings,
    model_ref: str = "champion",
    scheduler: str | None = None,
    workers: int = 2,
    batch_id: str | None = None,
    say: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Score every partition in parallel on Dask; return the reconciled totals."""
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise BackorderError(
            "--engine dask needs Dask: pip install 'backorder[dask]' (dask[distributed])"
        ) from None
    from backorder.predict import new_batch_id
    from backorder.registry import Registry

    files = partitions(input_uri)
    batch_id = batch_id or new_batch_id()
    # Resolve the version once, so every worker scores with the same model even if a new
    # champion is promoted mid-run; compile (and cache) it here once rather than per worker.
    registry = Registry(settings)
    version = registry.resolve(model_ref)
    loaded = registry.load(version, compiled=settings.compiled_trees, say=say)
    say(f"scoring {len(files)} partition(s) with model v{loaded.version} on Dask")
    settings_json = settings.model_dump_json()
    cluster = None
    if scheduler:
        client = Client(scheduler, timeout="30s")
    else:
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        )
        client = Client(cluster)
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    try:
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
            say(
                f"{result['partition']}: scored {result['scored']:,}, "
                f"rejected {result['rejected']:,} in {result['seconds']:.1f} s"
            )
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    if failures:
        raise BackorderError(
            f"{len(failures)} of {len(files)} partition(s) failed; first: {failures[0]}"
        )
    totals = {k: sum(r[k] for r in results) for k in ("read", "scored", "rejected", "flagged")}
    if totals["read"] != totals["scored"] + totals["rejected"]:
        raise RuntimeError(f"row counts do not reconcile: {totals}")
    summary = {
        "batch_id": batch_id,
        "input": input_uri,
        "output": output_uri,
        "model_version": version,
        "partitions": sorted(results, key=lambda r: r["partition"]),
        **totals,
    }
    # The marker comes last: its presence means every partition above is complete.
    write_json_atomic(f"{output_uri.rstrip('/')}/_SUCCESS.json", summary)
    return summary
