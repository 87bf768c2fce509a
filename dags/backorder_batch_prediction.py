"""Daily, and on demand: score every landed batch that has not been scored yet.

find_pending -> validate -> drift -> score -> record, one mapped task group per batch. Tasks
call one ``backorder.pipelines`` function each and pass batch ids and URIs (JSON XComs, never
pickles).
Re-running is safe: outputs are keyed by batch id and replaced whole, and the manifest record
(the last step) is what marks a batch as done, so a retry or a backfill redoes only what did
not finish and never duplicates output.

Configuration: BACKORDER_CONFIG (settings file) or BACKORDER_* variables; the landing root is
the ``landing_root`` param, else the ``landing_root`` setting.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import dag, task, task_group

from backorder.dag_support import PARAMS, final, landing_root, settings

DEFAULT_ARGS = {
    # Transient store outages heal; bad files and drift blocks fail at once (no retry).
    "retries": 2,
    "retry_delay": timedelta(minutes=2),
}


@dag(
    dag_id="backorder_batch_prediction",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    tags=["backorder"],
    doc_md=__doc__,
)
def backorder_batch_prediction() -> None:
    @task
    def find_pending() -> list[str]:
        from airflow.sdk.exceptions import AirflowSkipException

        from backorder.pipelines import pending_scoring

        pending = pending_scoring(landing_root())
        if not pending:
            raise AirflowSkipException("no unscored batches")
        return pending

    @task
    def validate(batch_id: str) -> str:
        from backorder.pipelines import validate_batch

        try:
            validate_batch(landing_root(), batch_id, settings())
        except Exception as exc:
            raise final(exc) from None
        return batch_id

    @task
    def drift(batch_id: str) -> dict[str, Any]:
        from backorder.pipelines import check_drift

        try:
            return check_drift(landing_root(), batch_id, settings())
        except Exception as exc:
            raise final(exc) from None

    @task
    def score(drift_summary: dict[str, Any]) -> dict[str, Any]:
        from backorder.pipelines import score_batch

        try:
            scored = score_batch(landing_root(), drift_summary["batch_id"], settings())
        except Exception as exc:
            raise final(exc) from None
        return scored | {"drift": drift_summary}

    @task
    def record(scored: dict[str, Any]) -> str:
        from backorder.pipelines import record_scoring

        drift_summary = scored.pop("drift")
        return record_scoring(landing_root(), scored, settings(), drift_summary)

    # One mapped group per batch: a broken batch fails its own tasks, never its neighbours'.
    @task_group
    def one_batch(batch_id: str) -> None:
        record(score(drift(validate(batch_id))))

    one_batch.expand(batch_id=find_pending())


backorder_batch_prediction()
