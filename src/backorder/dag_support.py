"""What both Airflow DAGs share: their common arguments, settings, the landing root, which
errors are final, and the per-batch validate and drift tasks.

Imported only by the DAG files in ``dags/`` (it needs Airflow); the pipelines do not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pendulum
from airflow.sdk import Param, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from backorder.config import Settings, load_settings
from backorder.errors import InputFileError
from backorder.logs import fields_into_messages
from backorder.pipelines import DriftBlocked
from backorder.uris import redact_text, remember_secrets

# Airflow's task logs keep a stdlib record's message and drop its extra fields: put the batch
# id, model version and counts into the message instead.
fields_into_messages()

# Every run may point at another landing root; by default the `landing_root` setting.
PARAMS = {"landing_root": Param(None, type=["null", "string"], description="Landing root URI")}
DAG_ARGS: dict[str, Any] = {
    "start_date": pendulum.datetime(2026, 1, 1, tz="UTC"),
    "catchup": False,
    "max_active_runs": 1,
    "params": PARAMS,
    "tags": ["backorder"],
}


def settings() -> Settings:
    """From BACKORDER_CONFIG and BACKORDER_* variables, read when a task runs."""
    loaded = load_settings(None)
    # Task logs and failure messages mask these URIs' passwords wherever they appear.
    remember_secrets(
        loaded.resolved_tracking_uri,
        loaded.artifact_location,
        loaded.resolved_landing_root,
        loaded.pushgateway_url,
    )
    return loaded


def landing_root() -> str:
    given = get_current_context()["params"].get("landing_root")
    remember_secrets(given)
    return str(given or settings().resolved_landing_root)


@contextmanager
def final_on_bad_input() -> Iterator[None]:
    """Problems a retry cannot fix (a bad file, a drift block) fail the task for good, with the
    one-line message; anything else (a store outage, say) stays retryable."""
    try:
        yield
    except (InputFileError, DriftBlocked) as exc:
        raise AirflowFailException(redact_text(str(exc))) from None


@task
def validate(batch_id: str, kind: str) -> str:
    """Fail fast on whole-file problems; pass the batch id on."""
    from backorder.pipelines import validate_batch

    with final_on_bad_input():
        validate_batch(landing_root(), batch_id, settings(), kind=kind)
    return batch_id


@task
def drift(batch_id: str, kind: str) -> dict[str, Any]:
    """Compare the batch with the champion's training reference; apply the drift policy."""
    from backorder.pipelines import check_drift

    with final_on_bad_input():
        return check_drift(landing_root(), batch_id, settings(), kind=kind)
