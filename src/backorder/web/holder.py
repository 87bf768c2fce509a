"""The serving model, hot-swappable, and the typical SKU that warms it up and probes it.

The champion is loaded once at start-up; a watcher thread asks the registry every
``serve_reload_seconds`` whether the alias moved and, if so, loads the new version beside the
old one and swaps a single reference. A request takes that reference once, so it is answered
entirely by one model, and no request waits for a load.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from datetime import datetime
from typing import Any

from fastapi import HTTPException

from backorder.api_schema import SkuRecord, records_frame
from backorder.compiled import CompiledTreesUnavailable
from backorder.config import Settings
from backorder.errors import ModelNotFoundError
from backorder.model import LoadedModel
from backorder.predict import score_with_reasons
from backorder.registry import Registry
from backorder.web.metrics import Metrics

log = logging.getLogger("backorder.serve")

# A typical healthy SKU (the median-ish row of the samples): the form's starting point, the
# warm-up of a newly loaded model and the readiness probe.
FORM_DEFAULTS: dict[str, Any] = {
    "national_inv": 15,
    "lead_time": 8,
    "in_transit_qty": 0,
    "forecast_3_month": 0,
    "forecast_6_month": 0,
    "forecast_9_month": 0,
    "sales_1_month": 0,
    "sales_3_month": 1,
    "sales_6_month": 2,
    "sales_9_month": 4,
    "min_bank": 0,
    "pieces_past_due": 0,
    "perf_6_month_avg": 0.85,
    "perf_12_month_avg": 0.83,
    "local_bo_qty": 0,
    "potential_issue": "No",
    "deck_risk": "No",
    "oe_constraint": "No",
    "ppap_risk": "No",
    "stop_auto_buy": "Yes",
    "rev_stop": "No",
}


class ModelHolder:
    """Holds the serving model; ``refresh`` loads a newly promoted one and swaps it in."""

    def __init__(self, settings: Settings, ref: str, metrics: Metrics) -> None:
        self.settings = settings
        self.ref = ref
        self.metrics = metrics
        self.current: LoadedModel | None = None
        self._lock = threading.Lock()  # one load at a time; readers never take it
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def refresh(self) -> bool:
        """Load the version ``ref`` points to if it is not the one serving; True if swapped."""
        with self._lock:
            registry = Registry(self.settings)
            version = registry.resolve(self.ref)
            if self.current is not None and self.current.version == version:
                return False
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CompiledTreesUnavailable)
                model = registry.load_for_scoring(version)
            for warning in caught:
                log.warning(str(warning.message), extra={"model_version": version})
            warm = records_frame([SkuRecord(**FORM_DEFAULTS)])
            score_with_reasons(model, warm, self.settings)  # first request pays no lazy set-up
            previous = self.current.version if self.current else None
            self.current = model
        self.metrics.model.info(
            {
                "version": model.version,
                "ref": self.ref,
                "scoring_engine": model.scoring_engine,
            }
        )
        self.metrics.model_loaded.set(time.time())
        trained = model.metadata.get("trained_at")
        if trained:
            self.metrics.model_trained.set(datetime.fromisoformat(trained).timestamp())
        log.info(
            "model loaded", extra={"model_version": model.version, "previous_version": previous}
        )
        return True

    def require(self) -> LoadedModel:
        model = self.current
        if model is None:
            raise HTTPException(503, "no model loaded yet")
        return model

    def start_watching(self, every_seconds: float) -> None:
        if every_seconds <= 0 or self.ref.isdigit():
            return  # a pinned version never changes

        def watch() -> None:
            while not self._stop.wait(every_seconds):
                try:
                    self.refresh()
                except ModelNotFoundError as exc:
                    # The alias vanished under a serving model, or its files were refused.
                    if self.current is not None:
                        self.metrics.reload_failures.inc()
                        log.warning(
                            "model reload failed; still serving the previous model",
                            extra={"reason": str(exc)},
                        )
                    # else: still waiting for the first model, as configured; nothing is wrong
                except Exception:  # keep serving the old model; say why
                    self.metrics.reload_failures.inc()
                    log.warning(
                        "model reload failed; still serving the previous model", exc_info=True
                    )

        self._watcher = threading.Thread(target=watch, name="model-watcher", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
