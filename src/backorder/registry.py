"""Runs and the model registry, in MLflow.

Each training run logs params, metrics, the data fingerprint, the report and the model artifact,
and registers a model version. Aliases say which version serves: ``champion`` (scores batches
and requests) and ``challenger`` (the newest candidate). A registered-model tag keeps the order
of past champions, so ``rollback`` can restore the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backorder.config import Settings
from backorder.errors import ModelNotFoundError

# Offline by default: no usage telemetry leaves the machine.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow's database-migration chatter is not news to a planner.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
# A model is a few small files; a tqdm bar per download would break one-line stderr output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
logging.getLogger("alembic").setLevel(logging.WARNING)

import mlflow  # noqa: E402  (the environment above must be set before MLflow is imported)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.entities import LoggedModelStatus  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402

from backorder.mlflow_model import log_pyfunc_model, pipeline_folder  # noqa: E402
from backorder.model import LoadedModel, Scorer, load_pipeline, save_pipeline  # noqa: E402
from backorder.uris import redact  # noqa: E402

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"
MODEL_ARTIFACT = "model"
REFERENCE_FILE = "reference.parquet"


@dataclass
class RunRecord:
    """What a training run logs to MLflow beside its model: the model's metadata, the run's
    params, metrics, tags and artifacts, and the drift reference that travels with the model."""

    metadata: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    reference: pd.DataFrame | None = None


class Registry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.model_name
        uri = settings.resolved_tracking_uri
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.tracking_uri = uri

    # -- runs ----------------------------------------------------------------------------------
    def experiment_id(self) -> str:
        existing = self.client.get_experiment_by_name(self.settings.experiment_name)
        if existing is not None:
            return str(existing.experiment_id)
        location = self.settings.artifact_location
        if location is None and self.tracking_uri.startswith("sqlite:///"):
            # Keep artifacts beside the database rather than in the working directory.
            location = (self.settings.home / "mlartifacts").resolve().as_uri()
        return str(self.client.create_experiment(self.settings.experiment_name, location))

    def log_training_run(self, pipeline: Pipeline, record: RunRecord) -> tuple[str, str]:
        """Log one training run and register its model (an MLflow pyfunc model, see
        ``backorder.mlflow_model``); return (run id, model version)."""
        metadata, params, metrics = record.metadata, record.params, record.metrics
        tags, artifacts, reference = record.tags, record.artifacts, record.reference
        with mlflow.start_run(experiment_id=self.experiment_id()) as run:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            mlflow.log_metrics(metrics)
            mlflow.set_tags(tags)
            for path in artifacts:
                mlflow.log_artifact(str(path))
            run_id = run.info.run_id
            # The version is created first, for a pending MLflow model, so that the model's
            # config can name the version its scores report.
            logged = mlflow.initialize_logged_model(name=MODEL_ARTIFACT, source_run_id=run_id)
            self._ensure_registered_model()
            version = str(
                self.client.create_model_version(
                    self.name,
                    source=f"models:/{logged.model_id}",
                    run_id=run_id,
                    tags={k: str(v) for k, v in tags.items()},
                    model_id=logged.model_id,
                ).version
            )
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    model_dir = save_pipeline(
                        pipeline, Path(tmp) / MODEL_ARTIFACT, {**metadata, "run_id": run_id}
                    )
                    if reference is not None:
                        # Travels with the model, so drift is always judged against what it learnt.
                        reference.to_parquet(model_dir / REFERENCE_FILE, index=False)
                    log_pyfunc_model(model_dir, logged.model_id, version, self.settings, reference)
            except BaseException:
                # No version may point at a model that was never written.
                self.client.delete_model_version(self.name, version)
                mlflow.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
                raise
        return run_id, version

    def _ensure_registered_model(self) -> None:
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(
                self.name, description="Probability that a SKU goes on backorder."
            )

    # -- loading -------------------------------------------------------------------------------
    def resolve(self, ref: str) -> str:
        """Model version for ``ref``: an alias (champion, challenger), a version number, or
        ``models:/NAME/VERSION`` / ``models:/NAME@ALIAS``."""
        ref = ref.strip()
        if ref.startswith("models:/"):
            rest = ref.removeprefix("models:/")
            name, _, tail = rest.partition("@") if "@" in rest else rest.partition("/")
            if name != self.name:
                raise ModelNotFoundError(f"model '{name}' is not this registry's '{self.name}'")
            ref = tail
        if ref.isdigit():
            try:
                self.client.get_model_version(self.name, ref)
            except MlflowException:
                raise ModelNotFoundError(
                    f"model version {ref} of '{self.name}' not found in {redact(self.tracking_uri)}"
                ) from None
            return ref
        try:
            return str(self.client.get_model_version_by_alias(self.name, ref).version)
        except MlflowException:
            hint = " (train a model first: backorder train --data FILE)" if ref == CHAMPION else ""
            raise ModelNotFoundError(
                f"no model '{self.name}@{ref}' in {redact(self.tracking_uri)}{hint}"
            ) from None

    def load(
        self,
        ref: str = CHAMPION,
        base_rate: float | None = None,
        with_reference: bool = False,
        compiled: bool = False,
    ) -> LoadedModel:
        """Download a version's artifact and rebuild its fitted pipeline.

        ``base_rate`` re-calibrates its probabilities to a known backorder rate of the data to be
        scored (see ``Scorer``). ``compiled`` scores with
        compiled trees (``backorder.compiled``), checked against LightGBM on the stored training
        reference; LightGBM remains the fallback.
        """
        version = self.resolve(ref)
        mv = self.client.get_model_version(self.name, version)
        with tempfile.TemporaryDirectory(prefix="backorder-model-") as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{self.name}/{version}", dst_path=tmp
            )
            files = pipeline_folder(Path(local))
            pipeline, metadata = load_pipeline(files)
            reference_file = files / REFERENCE_FILE
            reference = (
                pd.read_parquet(reference_file)
                if (with_reference or compiled) and reference_file.is_file()
                else None
            )
        scorer = Scorer(pipeline, base_rate)
        return LoadedModel(
            pipeline=pipeline,
            base_rate=base_rate,
            compiled=self._compiled_trees(scorer, reference) if compiled else None,
            version=version,
            metadata=metadata,
            aliases=list(mv.aliases),
            reference=reference if with_reference else None,
        )

    def load_for_scoring(self, ref: str = CHAMPION) -> LoadedModel:
        """``load`` as everything that scores does: at the configured scoring base rate, with
        compiled trees when the settings ask for them."""
        return self.load(
            ref, self.settings.scoring_base_rate, compiled=self.settings.compiled_trees
        )

    def _compiled_trees(self, scorer: Scorer, reference: pd.DataFrame | None) -> Any:
        from backorder.compiled import compile_booster

        if reference is not None:
            check = scorer.features(reference).to_numpy(dtype="float64")
        else:  # models saved before references were stored: random rows still walk the trees
            rng = np.random.default_rng(0)
            check = rng.lognormal(2.0, 2.0, size=(2_000, len(scorer.feature_names)))
        return compile_booster(
            scorer.classifier.booster_,
            self.settings.home / "compiled",
            check,
            scorer.probability_from_raw,
            n_jobs=self.settings.lightgbm.n_jobs,
        )

    def champion_version(self) -> str | None:
        try:
            return self.resolve(CHAMPION)
        except ModelNotFoundError:
            return None

    # -- aliases -------------------------------------------------------------------------------
    def _history(self) -> list[str]:
        tags = self.client.get_registered_model(self.name).tags
        return list(json.loads(tags.get(HISTORY_TAG, "[]")))

    def set_challenger(self, version: str) -> None:
        self.client.set_registered_model_alias(self.name, CHALLENGER, version)

    def promote(self, version: str) -> None:
        """Make ``version`` the champion and remember the order of champions."""
        version = self.resolve(version)
        history = self._history()
        if history and history[-1] == version:
            return
        self.client.set_registered_model_alias(self.name, CHAMPION, version)
        self.client.set_registered_model_tag(
            self.name, HISTORY_TAG, json.dumps([*history, version])
        )

    def rollback(self) -> tuple[str, str]:
        """Restore the previous champion; return (from version, to version)."""
        history = self._history()
        if len(history) < 2:
            raise ModelNotFoundError(f"'{self.name}' has no earlier champion to roll back to")
        current, previous = history[-1], history[-2]
        self.client.set_registered_model_alias(self.name, CHAMPION, previous)
        self.client.set_registered_model_tag(self.name, HISTORY_TAG, json.dumps(history[:-1]))
        return current, previous

    def versions(self) -> list[dict[str, Any]]:
        try:
            found = self.client.search_model_versions(f"name='{self.name}'")
        except MlflowException:
            return []
        rows = []
        for found_version in sorted(found, key=lambda v: int(v.version)):
            # Search results omit aliases; a direct lookup has them.
            mv = self.client.get_model_version(self.name, found_version.version)
            run = self.client.get_run(mv.run_id) if mv.run_id else None
            metrics = run.data.metrics if run else {}
            rows.append(
                {
                    "version": str(mv.version),
                    "aliases": sorted(mv.aliases),
                    "created": int(mv.creation_timestamp),
                    "run_id": mv.run_id,
                    "holdout_average_precision": metrics.get("holdout_average_precision"),
                    "holdout_roc_auc": metrics.get("holdout_roc_auc"),
                    "validation_average_precision": metrics.get("validation_average_precision"),
                    "validation_roc_auc": metrics.get("validation_roc_auc"),
                    "threshold": metrics.get("validation_threshold"),
                }
            )
        return rows
