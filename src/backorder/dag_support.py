"""What both Airflow DAGs share: settings, the landing root, and which errors are final.

Imported only by the DAG files in ``dags/`` (it needs Airflow); the pipelines do not.
"""

from __future__ import annotations

from airflow.sdk import Param, get_current_context
from airflow.sdk.exceptions import AirflowFailException

from backorder.config import Settings, load_settings
from backorder.errors import InputFileError
from backorder.logs import fields_into_messages
from backorder.pipelines import DriftBlocked

# Airflow's task logs keep a stdlib record's message and drop its extra fields: put the batch
# id, model version and counts into the message instead.
fields_into_messages()

# Every run may point at another landing root; by default the `landing_root` setting.
PARAMS = {"landing_root": Param(None, type=["null", "string"], description="Landing root URI")}


def settings() -> Settings:
    """From BACKORDER_CONFIG and BACKORDER_* variables, read when a task runs."""
    return load_settings(None)


def landing_root() -> str:
    given = get_current_context()["params"].get("landing_root")
    return str(given or settings().resolved_landing_root)


def final(exc: Exception) -> Exception:
    """Problems a retry cannot fix (a bad file, a drift block) fail the task for good, with the
    one-line message; anything else (a store outage, say) stays retryable."""
    if isinstance(exc, InputFileError | DriftBlocked):
        return AirflowFailException(str(exc))
    return exc
