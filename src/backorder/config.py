"""One settings object for the whole product.

Values come, highest priority first, from keyword arguments, ``BACKORDER_*`` environment
variables (nested fields with ``__``, e.g. ``BACKORDER_LIGHTGBM__NUM_LEAVES=63``) and an
optional YAML file named by ``--config`` or ``BACKORDER_CONFIG``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from backorder.errors import ConfigError
from backorder.uris import encoded_credentials

# Who may do what on the server. viewer < planner < admin; `metrics` may only read /metrics
# (the key Prometheus scrapes with).
Role = Literal["viewer", "planner", "admin", "metrics"]
ROLES: tuple[Role, ...] = ("viewer", "planner", "admin", "metrics")


class LightGBMSettings(BaseModel):
    """Booster hyper-parameters; the number of trees is found by early stopping.

    Defaults come from an Optuna search confirmed with repeated stratified 5-fold CV on the
    168,786-row sample, and were confirmed again on both shared samples, where a second search's
    winner did no better on fresh folds (see docs/benchmarks/model-comparison.md).
    """

    learning_rate: float = Field(0.022, gt=0, le=1)
    num_leaves: int = Field(98, ge=2)
    max_depth: int = Field(
        8, ge=-1, description="Caps tree depth (-1: none); exact per-row reasons cost ~depth^2."
    )
    min_child_samples: int = Field(20, ge=1)
    min_child_weight: float = Field(0.2, ge=0)
    subsample: float = Field(0.66, gt=0, le=1)
    subsample_freq: int = Field(1, ge=0)
    colsample_bytree: float = Field(0.8, gt=0, le=1)
    reg_lambda: float = Field(1.3, ge=0)
    path_smooth: float = Field(16.0, ge=0, description="Shrinks small leaves toward their parent.")
    min_split_gain: float = Field(0.006, ge=0)
    max_trees: int = Field(3000, ge=1, description="Upper bound; early stopping picks fewer.")
    early_stopping_rounds: int = Field(200, ge=1)
    n_jobs: int = Field(
        2,
        ge=1,
        description="Threads. Never more than free cores: oversubscribed, LightGBM slows ~20x.",
    )


class Settings(BaseSettings):
    """Every tunable of the product. Field descriptions give meaning and unit."""

    model_config = SettingsConfigDict(
        env_prefix="BACKORDER_", env_nested_delimiter="__", extra="forbid"
    )

    home: Path = Field(
        Path(".backorder"), description="Folder for the local MLflow store and run outputs."
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; falls back to MLFLOW_TRACKING_URI, then SQLite in home.",
    )
    experiment_name: str = "backorder"
    artifact_location: str | None = Field(
        None,
        description=(
            "Where a new experiment keeps run artifacts and models, e.g. s3://bucket/mlflow "
            "(endpoint and keys from the AWS variables); default: HOME/mlartifacts."
        ),
    )
    model_name: str = Field("backorder", description="Registered model name in MLflow.")

    # Business costs, in the same (arbitrary) currency unit; only their ratio matters.
    cost_missed_backorder: float = Field(
        10.0, gt=0, description="Cost of a backorder the model did not flag."
    )
    cost_false_alarm: float = Field(
        1.0, gt=0, description="Cost of reviewing/expediting a SKU that would not backorder."
    )
    alert_budgets: list[float] = Field(
        default_factory=lambda: [0.01, 0.02, 0.05],
        description="Shares of SKUs a planner can review; operating points are reported for each.",
    )
    watchlist_fraction: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="risk_band is 'medium' from this fraction of the decision threshold upwards.",
    )
    reasons_per_row: int = Field(3, ge=1, le=10)
    reason_method: Literal["path", "shap"] = Field(
        "path",
        description=(
            "How reasons are computed: 'path' (exact path attributions, ~0.5 ms a row) or "
            "'shap' (exact TreeSHAP, ~8 ms a row with the default model)."
        ),
    )
    reasons_for: Literal["all", "watchlist", "none"] = Field(
        "watchlist",
        description=(
            "Batch rows that get reasons: 'watchlist' = medium and high risk bands. Reasons "
            "cost several times a prediction, and planners read them for flagged SKUs."
        ),
    )

    derived_features: list[str] | None = Field(
        default_factory=list,
        description=(
            "Derived features the model uses (names in `backorder.features`); [] = only the 21 "
            "contract columns (the default: in CV on both shared samples the derived features "
            "lowered average precision), null = all of them."
        ),
    )
    scoring_base_rate: float | None = Field(
        None,
        gt=0,
        lt=1,
        description=(
            "Known backorder rate of the batches to be scored; probabilities are re-calibrated "
            "to it (prior shift). null = the training data's rate."
        ),
    )
    cv_folds: int = Field(5, ge=2, description="Stratified folds for out-of-fold validation.")
    early_stopping_fraction: float = Field(
        0.15, gt=0, lt=0.5, description="Share of each training fold kept for early stopping."
    )
    holdout_fraction: float = Field(
        0.1,
        ge=0,
        lt=0.5,
        description=(
            "Share of labelled rows, chosen by a hash of their feature values, that no model ever "
            "trains on; champion and challenger are compared on them."
        ),
    )
    random_seed: int = 42

    promotion_min_ap_gain: float = Field(
        0.005, ge=0, description="Average-precision gain a challenger needs over the champion."
    )
    promotion_max_auc_loss: float = Field(
        0.0, ge=0, description="ROC AUC the challenger may lose against the champion."
    )

    dask_sample_rows: int = Field(
        200_000,
        ge=1_000,
        description="train --engine dask: rows gathered to choose the number of trees.",
    )
    dask_calibration_fraction: float = Field(
        0.1,
        gt=0,
        lt=0.5,
        description="train --engine dask: hash slice kept from the booster to calibrate on.",
    )

    drift_psi_threshold: float = Field(
        0.2, gt=0, description="PSI at which a feature counts as drifted (0.1 moderate, 0.2 large)."
    )
    compiled_trees: bool = Field(
        True,
        description=(
            "Score with compiled trees (lleaves; cached in HOME/compiled, checked against "
            "LightGBM when loaded); LightGBM's predict is the fallback."
        ),
    )
    drift_policy: Literal["warn", "block_training", "block_scoring", "block_both"] = Field(
        "warn",
        description=(
            "What the pipelines do when a batch drifts from the champion's training data: only "
            "warn, or also refuse to train on it, to score it, or both."
        ),
    )
    drift_reference_rows: int = Field(
        50_000, ge=1_000, description="Training rows stored with each model as drift reference."
    )
    landing_root: str | None = Field(
        None,
        description=(
            "Folder or URL (s3://bucket/prefix) of the landing layout the pipelines read and "
            "write (default: HOME/landing)."
        ),
    )
    pushgateway_url: str | None = Field(
        None, description="Prometheus Pushgateway for batch-job and drift metrics (optional)."
    )
    serve_reload_seconds: float = Field(
        10.0,
        ge=0,
        description="How often `backorder serve` checks for a new champion (0 = never).",
    )
    serve_wait_for_model: bool = Field(
        False,
        description=(
            "`backorder serve` starts without a model and loads the first one promoted "
            "(a fresh stack); otherwise a missing model stops it at start-up."
        ),
    )
    state_url: str | None = Field(
        None,
        description=(
            "SQLAlchemy URL of the product's own state store (API keys, sign-in sessions, the "
            "planner's records); default: SQLite at HOME/state.db."
        ),
    )
    auth: Literal["keys", "proxy", "none"] = Field(
        "keys",
        description=(
            "Who the server answers: 'keys' (API keys from `backorder keys`, and a sign-in page), "
            "'proxy' (identity headers from a single-sign-on proxy in trusted_proxies) or 'none' "
            "(anyone; only allowed while listening on loopback)."
        ),
    )
    session_hours: float = Field(
        12.0, gt=0, description="Lifetime of a page sign-in session, in hours."
    )
    rate_limit_per_minute: int = Field(
        600,
        ge=0,
        description=(
            "Requests a key (or, unauthenticated, an address) may make per minute; over it: 429. "
            "0 = no limit."
        ),
    )
    trusted_proxies: list[str] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"],
        description=(
            "Addresses or networks (CIDR) whose identity and X-Forwarded-Proto headers are "
            "believed; from anywhere else they are ignored."
        ),
    )
    proxy_user_header: str = Field(
        "X-Forwarded-Email", description="auth: proxy — header naming the signed-in person."
    )
    proxy_groups_header: str = Field(
        "X-Forwarded-Groups",
        description="auth: proxy — header listing their groups (comma-separated).",
    )
    proxy_group_roles: dict[str, Role] = Field(
        default_factory=dict,
        description=(
            "auth: proxy — group name to role, e.g. {planning: planner}; a person gets the "
            "highest role of their groups, and 403 with none."
        ),
    )
    trusted_hosts: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "localhost", "::1", "[::1]"],
        description=(
            "Host headers the server answers (DNS-rebinding guard); add the names clients use, "
            "e.g. backorder.example.com. '*' = any."
        ),
    )
    api_docs: bool = Field(
        True, description="Serve the interactive API docs at /docs and the schema at /openapi.json."
    )
    upload_max_bytes: int = Field(
        256 << 20,
        ge=1 << 10,
        description="Largest upload after decompression, in bytes; checked while reading (413).",
    )
    upload_max_rows: int = Field(
        1_000_000, ge=1, description="Most rows an upload may hold; checked while reading (413)."
    )
    upload_concurrency: int = Field(
        2, ge=1, description="Uploads scored at once; more get 429 with Retry-After."
    )
    upload_timeout_seconds: float = Field(
        300.0, gt=0, description="Time limit for scoring one upload."
    )
    read_block_bytes: int = Field(
        8 << 20, ge=1 << 16, description="CSV bytes parsed per chunk when streaming."
    )
    # A lambda, not the class, so that mypy's pydantic plugin sees a zero-argument factory.
    lightgbm: LightGBMSettings = Field(default_factory=lambda: LightGBMSettings())  # noqa: PLW0108
    serve_workers: int = Field(
        1,
        ge=1,
        description=(
            "`backorder serve`: worker processes for heavy API requests (many records, or "
            "TreeSHAP reasons), so that they never delay light ones; uploads have their own "
            "(upload_concurrency)."
        ),
    )

    @model_validator(mode="after")
    def _derived_features_exist(self) -> Settings:
        if not self.derived_features:  # [] or null: nothing to check, nothing to import
            return self
        # Imported here: features needs scikit-learn, which reading settings should not load.
        from backorder.features import DERIVED_FEATURES

        known = {d.name for d in DERIVED_FEATURES}
        unknown = [n for n in self.derived_features if n not in known]
        if unknown:
            raise ValueError(
                f"derived_features: unknown {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return self

    @model_validator(mode="after")
    def _budgets_are_shares(self) -> Settings:
        if not self.alert_budgets or any(not 0 < b < 1 for b in self.alert_budgets):
            raise ValueError("alert_budgets must be shares strictly between 0 and 1")
        return self

    @property
    def resolved_tracking_uri(self) -> str:
        # Credentials encoded: MLflow's parsers would send part of a raw '@' password to the host.
        if self.tracking_uri:
            return encoded_credentials(self.tracking_uri)
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return encoded_credentials(os.environ["MLFLOW_TRACKING_URI"])
        return f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @property
    def resolved_state_url(self) -> str:
        return self.state_url or f"sqlite:///{(self.home / 'state.db').resolve()}"

    @property
    def resolved_landing_root(self) -> str:
        return self.landing_root or str((self.home / "landing").resolve())

    @property
    def bayes_threshold(self) -> float:
        """Cost-optimal threshold for perfectly calibrated probabilities."""
        return self.cost_false_alarm / (self.cost_false_alarm + self.cost_missed_backorder)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from overrides, environment and an optional YAML file."""
    env_path = os.environ.get("BACKORDER_CONFIG")
    path = config_file or (Path(env_path) if env_path else None)
    file_values: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of setting names to values")
        file_values = loaded

    class _Layered(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return init_settings, env_settings, _DictSource(settings_cls, file_values)

    try:
        layered = _Layered(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        source = f"{path}: " if path else ""
        raise ConfigError(f"{source}setting '{where}': {first['msg']}") from None
    return layered


class _DictSource(PydanticBaseSettingsSource):
    """Lowest-priority source holding the YAML file's values."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._values = values

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)
