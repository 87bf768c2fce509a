"""The registered model as an MLflow pyfunc model, built from code (nothing is pickled).

A registered version is an MLflow Model: its ``MLmodel`` file names ``mlflow_model_code.py``
(which hands MLflow a ``BackorderModel``), the signature from the data contract, an input
example, and one artifact: the folder of ``save_pipeline`` files (booster text, ``model.json``,
the drift reference). So ``mlflow.pyfunc.load_model``, ``mlflow models serve`` and
``mlflow.pyfunc.spark_udf`` score it, through the product's own loader and scoring function.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, DataType, Schema

from backorder import __version__
from backorder.config import Settings, load_settings
from backorder.contract import (
    COLUMNS,
    FLAG_COLUMNS,
    LABEL,
    REASON,
    ROW_NUMBER,
    SKU,
    validate_chunk,
)
from backorder.errors import ModelNotFoundError
from backorder.explain import reason_names
from backorder.model import MODEL_FILE, load_pipeline

if TYPE_CHECKING:
    from backorder.registry import LoadedModel

# The pyfunc artifact holding the ``save_pipeline`` folder, and the file MLflow runs to build
# the model.
PIPELINE_ARTIFACT = "pipeline"
MODEL_CODE = Path(__file__).with_name("mlflow_model_code.py")
# Scoring settings a consumer may override with ``load_model(uri, model_config={...})``.
SCORING_SETTINGS = ("watchlist_fraction", "reason_method", "reasons_for")
MODEL_VERSION = "model_version"
INPUT_EXAMPLE_ROWS = 3

_INPUT_TYPES = {"id": DataType.string, "number": DataType.double, "flag": DataType.boolean}


def input_schema() -> Schema:
    """The contract's scoring columns as MLflow types: numbers double, Yes/No flags boolean,
    ``sku`` optional text."""
    return Schema(
        [
            ColSpec(_INPUT_TYPES[c.kind], c.name, required=c.name != SKU)
            for c in COLUMNS
            if c.name != LABEL
        ]
    )


def output_schema(reasons_per_row: int) -> Schema:
    """``score_rows``'s columns (without the row number: output row i answers input row i)."""
    return Schema(
        [
            ColSpec(DataType.string, SKU, required=False),
            ColSpec(DataType.double, "backorder_probability"),
            ColSpec(DataType.boolean, "will_backorder"),
            ColSpec(DataType.string, "risk_band"),
            *(ColSpec(DataType.string, n, required=False) for n in reason_names(reasons_per_row)),
            ColSpec(DataType.string, "model_version"),
        ]
    )


def as_model_input(rows: pd.DataFrame) -> pd.DataFrame:
    """Validated contract rows (flags 0/1) in the signature's types (flags boolean)."""
    columns = [c for c in input_schema().input_names() if c in rows.columns]
    typed = rows[columns].reset_index(drop=True)
    return typed.astype({f: bool for f in FLAG_COLUMNS})


def log_pyfunc_model(
    pipeline_dir: Path,
    model_id: str,
    version: str,
    settings: Settings,
    reference: pd.DataFrame | None,
) -> None:
    """Log the pipeline folder as the pyfunc model of the (pending) LoggedModel ``model_id``.

    ``version`` is the registry version already created for it, so scores name their version.
    """
    config: dict[str, Any] = {
        MODEL_VERSION: version,
        "reasons_per_row": settings.reasons_per_row,
        **{name: getattr(settings, name) for name in SCORING_SETTINGS},
    }
    example = None
    if reference is not None and len(reference):
        # Complete rows: an empty cell would be NaN, which the JSON example cannot hold.
        complete = reference.dropna()
        rows = complete if len(complete) else reference
        example = as_model_input(rows.head(INPUT_EXAMPLE_ROWS))
    mlflow.pyfunc.log_model(
        name=PIPELINE_ARTIFACT,
        model_id=model_id,
        python_model=str(MODEL_CODE),
        artifacts={PIPELINE_ARTIFACT: str(pipeline_dir)},
        model_config=config,
        signature=ModelSignature(input_schema(), output_schema(settings.reasons_per_row)),
        input_example=example,
        # The product package brings the rest; inferring requirements would load the model twice.
        pip_requirements=[f"backorder=={__version__}"],
    )


def pipeline_folder(downloaded: Path) -> Path:
    """The folder with ``save_pipeline``'s files in a downloaded model version.

    A version registered as an MLflow Model keeps them as its pyfunc artifact; one registered
    before (no ``MLmodel``) keeps them at its root.
    """
    if (downloaded / MLMODEL_FILE_NAME).is_file():
        pyfunc = Model.load(str(downloaded)).flavors.get("python_function", {})
        artifact = pyfunc.get("artifacts", {}).get(PIPELINE_ARTIFACT)
        if artifact is None:
            raise ModelNotFoundError(
                f"{downloaded}: an MLflow model without a '{PIPELINE_ARTIFACT}' artifact; "
                "not a backorder model"
            )
        return downloaded / artifact["path"]
    if (downloaded / MODEL_FILE).is_file():
        return downloaded
    raise ModelNotFoundError(
        f"{downloaded}: neither an MLflow model ({MLMODEL_FILE_NAME}) nor a backorder model "
        f"({MODEL_FILE})"
    )


class BackorderModel(PythonModel):  # type: ignore[misc]
    """Scores contract rows with the product's loader and ``score_rows``."""

    model: LoadedModel
    settings: Settings

    def load_context(self, context: PythonModelContext) -> None:
        # Imported here: the registry imports this module to log and locate models.
        from backorder.registry import LoadedModel

        config = dict(context.model_config or {})
        version = str(config.pop(MODEL_VERSION))
        pipeline, metadata = load_pipeline(Path(context.artifacts[PIPELINE_ARTIFACT]))
        self.settings = load_settings(None, **config)
        self.model = LoadedModel(
            pipeline=pipeline,
            base_rate=self.settings.scoring_base_rate,
            version=version,
            metadata=metadata,
            aliases=[],
        )

    def predict(
        self,
        context: PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        # Imported here: predict imports the registry, which imports this module.
        from backorder.predict import score_rows

        raw = model_input.reset_index(drop=True)
        raw.index = raw.index + 1  # 1-based request rows, as the contract numbers file rows
        checked = validate_chunk(raw, require_label=False)
        if len(checked.rejects):
            first = checked.rejects.iloc[0]
            more = len(checked.rejects) - 1
            raise MlflowException(
                f"row {first[ROW_NUMBER]}: {first[REASON]}"
                + (f" (and {more} more rejected rows)" if more else ""),
                error_code=INVALID_PARAMETER_VALUE,
            )
        scored = score_rows(self.model, checked.rows, self.settings)
        return scored.drop(columns=[ROW_NUMBER]).reset_index(drop=True)
