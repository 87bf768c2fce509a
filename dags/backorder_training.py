"""Weekly: retrain when labelled batches have landed, and promote only a better model.

find_new_labelled -> validate -> drift -> train -> promote_or_keep -> report. Training uses all
labelled batches (history plus the new ones); the challenger is compared with the champion on
the same holdout rows and becomes champion only if it wins. No new data is a skip, not a
failure. Tasks pass batch ids, versions and URIs (JSON XComs, never pickles).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import dag, task

from backorder.dag_support import PARAMS, final, landing_root, settings

DEFAULT_ARGS = {"retries": 1, "retry_delay": timedelta(minutes=5)}


@dag(
    dag_id="backorder_training",
    schedule="@weekly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    tags=["backorder"],
    doc_md=__doc__,
)
def backorder_training() -> None:
    @task
    def find_new_labelled() -> list[str]:
        from airflow.sdk.exceptions import AirflowSkipException

        from backorder.pipelines import pending_training

        new = pending_training(landing_root())
        if not new:
            raise AirflowSkipException("no new labelled batches")
        return new

    @task
    def validate(batch_id: str) -> str:
        from backorder.pipelines import LABELLED, validate_batch

        try:
            validate_batch(landing_root(), batch_id, settings(), kind=LABELLED)
        except Exception as exc:
            raise final(exc) from None
        return batch_id

    @task
    def drift(batch_id: str) -> dict[str, Any]:
        from backorder.pipelines import LABELLED, check_drift

        try:
            return check_drift(landing_root(), batch_id, settings(), kind=LABELLED)
        except Exception as exc:
            raise final(exc) from None

    @task
    def train(drift_summaries: list[dict[str, Any]]) -> dict[str, Any]:
        from backorder.pipelines import train_on_landing

        # Indexing to len() reads each mapped XCom once (iterating probes one past the end).
        summaries = [drift_summaries[i] for i in range(len(drift_summaries))]
        trained = train_on_landing(landing_root(), settings(), [d["batch_id"] for d in summaries])
        return trained | {"drift": summaries}

    @task
    def promote_or_keep(trained: dict[str, Any]) -> dict[str, Any]:
        from backorder.pipelines import promote_or_keep as decide

        return decide(settings(), trained)

    @task
    def report(decided: dict[str, Any]) -> str:
        from backorder.pipelines import record_training

        drift_summaries = decided.pop("drift")
        return record_training(landing_root(), decided, settings(), drift_summaries)

    drifted = drift.expand(batch_id=validate.expand(batch_id=find_new_labelled()))
    report(promote_or_keep(train(drifted)))


backorder_training()
