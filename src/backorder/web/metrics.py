"""The app's Prometheus metrics: requests, latency, predictions, rejected inputs, the model."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

PROBABILITY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0)


class Metrics:
    """The app's Prometheus metrics, in their own registry (several apps can live in a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "backorder_http_requests", "HTTP requests", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "backorder_http_request_duration_seconds",
            "Time to answer an HTTP request",
            ["route", "method", "status"],
            buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=r,
        )
        self.predictions = Counter(
            "backorder_predictions", "SKUs scored, by decision", ["decision"], registry=r
        )
        self.probability = Histogram(
            "backorder_predicted_probability",
            "Predicted backorder probabilities",
            buckets=PROBABILITY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "backorder_rejected_inputs", "Input records rejected, by source", ["source"], registry=r
        )
        self.model = Info("backorder_model", "The model answering requests", registry=r)
        self.model_loaded = Gauge(
            "backorder_model_loaded_timestamp_seconds",
            "When the serving model was loaded",
            registry=r,
        )
        self.model_trained = Gauge(
            "backorder_model_trained_timestamp_seconds",
            "When the serving model was trained",
            registry=r,
        )
        self.reload_failures = Counter(
            "backorder_model_reload_failures", "Failed attempts to load a new champion", registry=r
        )

    def observe_scores(self, probability: np.ndarray, flagged: np.ndarray) -> None:
        n_flagged = int(flagged.sum())
        if n_flagged:
            self.predictions.labels("backorder").inc(n_flagged)
        if len(flagged) - n_flagged:
            self.predictions.labels("no_backorder").inc(len(flagged) - n_flagged)
        for p in probability:
            self.probability.observe(float(p))
