"""Weekly: retrain when labelled batches have landed, and promote only a better model.

find_new_labelled -> validate -> drift -> train -> promote_or_keep -> report. Training uses all
labelled batches (history plus the new ones); the challenger is compared with the champion on
the same holdout rows and becomes champion only if it wins. No new data is a skip, not a
failure. Tasks pass batch ids, versions and URIs (JSON XComs, never pickles).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import dag, task

from backorder.catalog import LABELLED
from backorder.dag_support import DAG_ARGS, drift, landing_root, settings, validate

DEFAULT_ARGS = {"retries": 1, "retry_delay": timedelta(minutes=5)}


@dag(
    dag_id="backorder_training",
    schedule="@weekly",
    default_args=DEFAULT_ARGS,
    doc_md=__doc__,
    **DAG_ARGS,
)
def backorder_training() -> None:
    @task
    def find_new_labelled() -> list[str]:
        from airflow.sdk.exceptions import AirflowSkipException

        from backorder.catalog import pending_training

        new = pending_training(landing_root())
        if not new:
            raise AirflowSkipException("no new labelled batches")
        return new

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

    valid = validate.partial(kind=LABELLED).expand(batch_id=find_new_labelled())
    drifted = drift.partial(kind=LABELLED).expand(batch_id=valid)
    report(promote_or_keep(train(drifted)))


backorder_training()
