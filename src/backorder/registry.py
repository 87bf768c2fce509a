"""Runs and the model registry, in MLflow.

Each training run logs params, metrics, the data fingerprint, the report and the model artifact,
and registers a model version. Aliases say which version serves: ``champion`` (scores batches
and requests) and ``challenger`` (the newest candidate). A registered-model tag keeps the order
of past champions, so ``rollback`` can restore the previous one.

Promotion and rollback hold one lock in the state store (``StateStore.lock``), shared by every
process and machine using it, and re-read the champion under it: the alias and its history move
together, and a training run promotes only over the champion it was compared with. Each
version records the SHA-256 of its files (``artifact_sha256``), and ``load`` checks them.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Final, Literal

from backorder.config import Settings
from backorder.errors import ModelNotFoundError
from backorder.state import StateStore

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

from backorder.mlflow_model import (  # noqa: E402
    ARTIFACT_HASHES,
    REFERENCE_FILE,
    file_digests,
    load_verified,
    log_pyfunc_model,
    pipeline_folder,
    recorded_digests,
)
from backorder.model import LoadedModel, Scorer, save_pipeline  # noqa: E402
from backorder.uris import redact  # noqa: E402

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"
MODEL_ARTIFACT = "model"


class _Anyone(Enum):
    CHAMPION = "whichever champion there is"


# `promote(..., compared_with=ANY_CHAMPION)`: a manual promotion, over whichever champion.
ANY_CHAMPION: Final = _Anyone.CHAMPION


@dataclass(frozen=True)
class Promotion:
    """What ``promote`` did: whether the alias moved to the version, the champion after it, and
    why not when it did not."""

    promoted: bool
    champion: str | None
    reason: str = ""


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
            logged = mlflow.initialize_logged_model(name=MODEL_ARTIFACT, source_run_id=run_id)
            version = None
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    model_dir = save_pipeline(
                        pipeline, Path(tmp) / MODEL_ARTIFACT, {**metadata, "run_id": run_id}
                    )
                    if reference is not None:
                        # Travels with the model, so drift is always judged against what it learnt.
                        reference.to_parquet(model_dir / REFERENCE_FILE, index=False)
                    # The version is born with its files' digests (never a moment without,
                    # which would pass for a version from before digests), and is created
                    # before the MLflow model is logged so that the model's config can name
                    # the version its scores report.
                    digests = file_digests(model_dir)
                    version = self._create_version(run_id, logged.model_id, tags, digests)
                    log_pyfunc_model(
                        model_dir, logged.model_id, version, self.settings, reference, digests
                    )
            except BaseException:
                # No version may point at a model that was never written.
                if version is not None:
                    self.client.delete_model_version(self.name, version)
                mlflow.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
                raise
        return run_id, version

    def _create_version(
        self, run_id: str, model_id: str, tags: dict[str, str], digests: dict[str, str]
    ) -> str:
        self._ensure_registered_model()
        recorded = {k: str(v) for k, v in tags.items()}
        recorded[ARTIFACT_HASHES] = json.dumps(digests, sort_keys=True)
        return str(
            self.client.create_model_version(
                self.name,
                source=f"models:/{model_id}",
                run_id=run_id,
                tags=recorded,
                model_id=model_id,
            ).version
        )

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

        Each file is checked against the SHA-256 recorded at registration: a mismatch raises
        ``ArtifactIntegrityError`` (exit 3) and nothing of the version is used.
        """
        version = self.resolve(ref)
        mv = self.client.get_model_version(self.name, version)
        what = f"model version {version} of '{self.name}'"
        expected = recorded_digests(mv.tags.get(ARTIFACT_HASHES), what)
        with tempfile.TemporaryDirectory(prefix="backorder-model-") as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{self.name}/{version}", dst_path=tmp
            )
            files = pipeline_folder(Path(local))
            pipeline, metadata, reference = load_verified(
                files, expected, what, with_reference=with_reference or compiled
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

    @contextmanager
    def _promotion_lock(self) -> Iterator[None]:
        """The lock every promotion and rollback of this model holds, in the state store: one
        at a time across processes and machines."""
        with StateStore.open(self.settings) as store, store.lock(f"promotion:{self.name}"):
            yield

    def _champion_and_history(self) -> tuple[str | None, list[str], list[str]]:
        """The champion, the order of champions and the order as stored, read under the lock.
        A history that does not end with the champion (a process that died between the two
        writes, or an alias moved by hand in MLflow) is completed with it, so the two always
        agree; the stored order lets a write be skipped when nothing changed."""
        champion = self.champion_version()
        stored = self._history()
        history = list(stored)
        if champion is not None and (not history or history[-1] != champion):
            history.append(champion)
        return champion, history, stored

    def promote(
        self,
        version: str,
        compared_with: str | Literal[_Anyone.CHAMPION] | None = ANY_CHAMPION,
    ) -> Promotion:
        """Make ``version`` the champion and remember the order of champions.

        ``compared_with``: the champion the decision to promote was made against (None: there
        was none). Under the lock the champion is read again, and if it is no longer that one
        nothing changes: the returned ``Promotion`` says so and why. The default promotes over
        whichever champion there is (a planner's ``models promote``).
        """
        version = self.resolve(version)
        with self._promotion_lock():
            champion, history, stored = self._champion_and_history()
            if compared_with is not ANY_CHAMPION and champion != compared_with:
                then = f"v{compared_with}" if compared_with is not None else "none"
                now = f"v{champion}" if champion is not None else "none"
                return Promotion(
                    False, champion, f"champion is now {now}; v{version} was compared with {then}"
                )
            if champion == version:
                self._write_history(history, stored)
                return Promotion(False, champion, f"v{version} is already the champion")
            # The alias first: if the process dies before the history is written, the next
            # promotion or rollback completes the history from the alias (see above).
            self.client.set_registered_model_alias(self.name, CHAMPION, version)
            self._write_history([*history, version], stored)
        return Promotion(True, version)

    def _write_history(self, history: list[str], stored: list[str]) -> None:
        if history != stored:
            self.client.set_registered_model_tag(self.name, HISTORY_TAG, json.dumps(history))

    def rollback(self) -> tuple[str, str]:
        """Restore the previous champion; return (from version, to version)."""
        with self._promotion_lock():
            _, history, stored = self._champion_and_history()
            if len(history) < 2:
                raise ModelNotFoundError(f"'{self.name}' has no earlier champion to roll back to")
            current, previous = history[-1], history[-2]
            # The history first: if the process dies before the alias moves, the next promotion
            # or rollback finds the champion still current and puts it back at the end.
            self._write_history(history[:-1], stored)
            self.client.set_registered_model_alias(self.name, CHAMPION, previous)
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
