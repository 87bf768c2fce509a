"""The registered model as an MLflow pyfunc model, built from code (nothing is pickled).

A registered version is an MLflow Model: its ``MLmodel`` file names ``mlflow_model_code.py``
(which hands MLflow a ``BackorderModel``), the signature from the data contract, an input
example, and one artifact: the folder of ``save_pipeline`` files (booster text, ``model.json``,
the drift reference). So ``mlflow.pyfunc.load_model``, ``mlflow models serve`` and
``mlflow.pyfunc.spark_udf`` score it, through the product's own loader and scoring function.

The SHA-256 of each of those files is recorded at registration, in the registry (a model-version
tag) and in the model's config; every loader checks the files against it before using them
(``load_verified``), so a changed booster is refused, never scored.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import threading
from collections.abc import Mapping
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
from backorder.errors import ArtifactIntegrityError, ModelNotFoundError
from backorder.explain import reason_names
from backorder.model import BOOSTER_FILE, MODEL_FILE, LoadedModel, pipeline_from_spec
from backorder.predict import score_rows

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

log = logging.getLogger(__name__)

# The pyfunc artifact holding the ``save_pipeline`` folder, and the file MLflow runs to build
# the model.
PIPELINE_ARTIFACT = "pipeline"
MODEL_CODE = Path(__file__).with_name("mlflow_model_code.py")
# Scoring settings a consumer may override with ``load_model(uri, model_config={...})``.
SCORING_SETTINGS = ("watchlist_fraction", "reason_method", "reasons_for")
MODEL_VERSION = "model_version"
INPUT_EXAMPLE_ROWS = 3
# The training reference, beside the booster and model.json: drift is judged against it.
REFERENCE_FILE = "reference.parquet"
# File name -> SHA-256 (hex) of the pipeline folder's files: a model-version tag in the registry
# (what the product checks) and a key of the model's config (what pyfunc consumers check).
ARTIFACT_HASHES = "artifact_sha256"
_warned_unverified: set[str] = set()
_warned_lock = threading.Lock()

# Flags stay "Yes"/"No" as in the contract and the ERP exports, so a frame read from a batch file
# scores as it is (with ``sku`` read as text).
_INPUT_TYPES = {"id": DataType.string, "number": DataType.double, "flag": DataType.string}


def input_schema() -> Schema:
    """The contract's scoring columns as MLflow types: numbers double, flags "Yes"/"No" text,
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
    """Validated contract rows (flags 0/1) in the signature's types (flags "Yes"/"No")."""
    columns = [c for c in input_schema().input_names() if c in rows.columns]
    typed = rows[columns].reset_index(drop=True)
    for flag in FLAG_COLUMNS:
        typed[flag] = typed[flag].map({0: "No", 1: "Yes"}).astype(object)
    return typed


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 (hex) of each file in a ``save_pipeline`` folder, by file name."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.iterdir())
        if path.is_file()
    }


def recorded_digests(recorded: Any, what: str) -> dict[str, str] | None:
    """The digests recorded for a model (a JSON text or a mapping); None when there are none
    (a version registered before digests were recorded)."""
    if recorded is None:
        return None
    try:
        digests = json.loads(recorded) if isinstance(recorded, str) else dict(recorded)
    except (ValueError, TypeError):
        digests = None
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise ArtifactIntegrityError(
            f"{what}: its recorded artifact hashes ({ARTIFACT_HASHES}) are unreadable; "
            "refusing to load it"
        )
    return {str(name): digest for name, digest in digests.items()}


def _read_verified(folder: Path, name: str, expected: Mapping[str, str] | None, what: str) -> bytes:
    """A file's bytes, read once, after checking them against the recorded digest."""
    try:
        data = (folder / name).read_bytes()
    except FileNotFoundError:
        if expected is not None and name in expected:
            raise ArtifactIntegrityError(
                f"{what}: {name} is missing, though it was recorded at registration; "
                "refusing to load it"
            ) from None
        raise ModelNotFoundError(f"{folder}: no {name}; not a backorder model") from None
    if expected is None:
        return data
    recorded = expected.get(name)
    if recorded is None:
        raise ArtifactIntegrityError(
            f"{what}: no SHA-256 was recorded for {name} at registration; refusing to load it"
        )
    found = hashlib.sha256(data).hexdigest()
    if not hmac.compare_digest(found, recorded.lower()):
        raise ArtifactIntegrityError(
            f"{what}: {name} does not match the SHA-256 recorded at registration "
            f"(recorded {recorded[:12]}…, found {found[:12]}…); refusing to load it"
        )
    return data


def _warn_unverified(what: str) -> None:
    with _warned_lock:
        if what in _warned_unverified:
            return
        _warned_unverified.add(what)
    log.warning(
        f"{what} was registered before artifact hashes were recorded: loading it unchecked "
        "(train again for a version whose files are checked)"
    )


def load_verified(
    folder: Path, expected: Mapping[str, str] | None, what: str, with_reference: bool = False
) -> tuple[Pipeline, dict[str, Any], pd.DataFrame | None]:
    """The fitted pipeline, its metadata and (``with_reference``, when stored) the training
    reference from a ``save_pipeline`` folder, each file checked against ``expected`` (file
    name -> SHA-256) before it is used; ``what`` names the model in messages.

    Raises ``ArtifactIntegrityError`` when a file differs or is missing. Without digests (a
    version registered before they were recorded) the files load unchecked, with one warning
    per model and process.
    """
    if expected is None:
        _warn_unverified(what)
    spec_bytes = _read_verified(folder, MODEL_FILE, expected, what)
    booster_bytes = _read_verified(folder, BOOSTER_FILE, expected, what)
    pipeline, metadata = pipeline_from_spec(
        json.loads(spec_bytes), booster_bytes.decode("utf-8"), folder / MODEL_FILE
    )
    reference = None
    stored = (folder / REFERENCE_FILE).is_file() or REFERENCE_FILE in (expected or {})
    if with_reference and stored:
        data = _read_verified(folder, REFERENCE_FILE, expected, what)
        reference = pd.read_parquet(io.BytesIO(data))
    return pipeline, metadata, reference


def log_pyfunc_model(  # noqa: PLR0913, PLR0917
    pipeline_dir: Path,
    model_id: str,
    version: str,
    settings: Settings,
    reference: pd.DataFrame | None,
    digests: Mapping[str, str],
) -> None:
    """Log the pipeline folder as the pyfunc model of the (pending) LoggedModel ``model_id``.

    ``version`` is the registry version already created for it, so scores name their version;
    ``digests`` (``file_digests`` of the folder) let pyfunc consumers check the files.
    """
    config: dict[str, Any] = {
        MODEL_VERSION: version,
        ARTIFACT_HASHES: dict(digests),
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
        config = dict(context.model_config or {})
        version = str(config.pop(MODEL_VERSION))
        what = f"model version {version}"
        expected = recorded_digests(config.pop(ARTIFACT_HASHES, None), what)
        folder = Path(context.artifacts[PIPELINE_ARTIFACT])
        pipeline, metadata, _ = load_verified(folder, expected, what)
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
