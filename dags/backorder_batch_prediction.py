"""Daily, and on demand: score every landed batch that has not been scored yet.

find_pending -> validate -> drift -> score, one mapped task group per batch. Tasks call one
``backorder.pipelines`` function each and pass batch ids and URIs (JSON XComs, never pickles).
Re-running is safe: outputs are keyed by batch id and replaced whole, and the manifest record
(written last) is what marks a batch as done, so a retry or a backfill redoes only what did
not finish and never duplicates output. ``score`` scores and records a batch under its lease on
the landing root: a batch that ``backorder score-pending`` (or another run) has is skipped.

Configuration: BACKORDER_CONFIG (settings file) or BACKORDER_* variables; the landing root is
the ``landing_root`` param, else the ``landing_root`` setting.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import dag, task, task_group

from backorder.catalog import UNSCORED
from backorder.dag_support import (
    DAG_ARGS,
    drift,
    final_on_bad_input,
    landing_root,
    settings,
    validate,
)

DEFAULT_ARGS = {
    # Transient store outages heal; bad files and drift blocks fail at once (no retry).
    "retries": 2,
    "retry_delay": timedelta(minutes=2),
}


@dag(
    dag_id="backorder_batch_prediction",
    schedule="@daily",
    default_args=DEFAULT_ARGS,
    doc_md=__doc__,
    **DAG_ARGS,
)
def backorder_batch_prediction() -> None:
    @task
    def find_pending() -> list[str]:
        from airflow.sdk.exceptions import AirflowSkipException

        from backorder.catalog import pending_scoring

        pending = pending_scoring(landing_root())
        if not pending:
            raise AirflowSkipException("no unscored batches")
        return pending

    @task
    def score(drift_summary: dict[str, Any]) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        from backorder.catalog import BatchTaken
        from backorder.pipelines import score_and_record

        batch_id = drift_summary["batch_id"]
        try:
            with final_on_bad_input():
                return score_and_record(landing_root(), batch_id, settings(), drift_summary)
        except BatchTaken as exc:  # another runner has the batch, or scored it already
            raise AirflowSkipException(str(exc)) from None

    # One mapped group per batch: a broken batch fails its own tasks, never its neighbours'.
    @task_group
    def one_batch(batch_id: str) -> None:
        score(drift(validate(batch_id, UNSCORED), UNSCORED))

    one_batch.expand(batch_id=find_pending())


backorder_batch_prediction()
