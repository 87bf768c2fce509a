"""Drift: does a batch still look like the data the model learnt from?

Per feature: the population stability index (PSI) on the reference's deciles (numbers; missing
values are a bin of their own) or categories (flags), the Kolmogorov-Smirnov statistic for
numbers, and a chi-square test for flags. With a model, the same PSI on its predicted
probabilities. A feature drifts when its PSI reaches ``drift_psi_threshold`` (0.2 by the usual
rule of thumb: < 0.1 stable, 0.1-0.2 moderate, > 0.2 significant). p-values are reported but not
used to decide: with hundreds of thousands of rows every difference is "significant".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from scipy import stats

from backorder.contract import FEATURE_COLUMNS, FLAG_COLUMNS
from backorder.io import write_json_atomic, write_text_atomic
from backorder.model import Scorer
from backorder.report import TEMPLATES, Plot, png
from backorder.uris import redact, redact_fields

EPSILON = 1e-4  # floor for empty bins, so that PSI stays finite
N_BINS = 10


def _shares(counts: np.ndarray) -> np.ndarray:
    return np.maximum(counts / max(counts.sum(), 1), EPSILON)


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI of two bin-count vectors: sum (c - r) * ln(c / r) over bins."""
    r, c = _shares(reference), _shares(current)
    return float(np.sum((c - r) * np.log(c / r)))


def numeric_bins(reference: pd.Series, current: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Counts per reference decile (ties merged) plus one bin for missing values."""
    known = reference.dropna().to_numpy()
    edges: np.ndarray = (
        np.unique(np.quantile(known, np.linspace(0, 1, N_BINS + 1))) if len(known) else np.zeros(0)
    )
    inner = edges[1:-1]

    def counts(series: pd.Series) -> np.ndarray:
        values = series.to_numpy(dtype="float64")
        missing = np.isnan(values)
        binned = np.bincount(
            np.searchsorted(inner, values[~missing], side="right"), minlength=len(inner) + 1
        )
        return np.append(binned, missing.sum())

    return counts(reference), counts(current)


@dataclass
class DriftResult:
    features: pd.DataFrame  # one row per feature (and the prediction when a model was given)
    reference_rows: int
    current_rows: int
    threshold: float

    @property
    def drifted(self) -> list[str]:
        return self.features.loc[self.features["drifted"], "feature"].tolist()

    def summary(self) -> dict[str, Any]:
        return {
            "reference_rows": self.reference_rows,
            "current_rows": self.current_rows,
            "psi_threshold": self.threshold,
            "drifted": self.drifted,
            "features": self.features.to_dict(orient="records"),
        }


def compare(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    threshold: float = 0.2,
    reference_probability: np.ndarray | None = None,
    current_probability: np.ndarray | None = None,
) -> DriftResult:
    """Compare ``current`` with ``reference`` feature by feature (typed, validated rows)."""
    records = []
    for name in FEATURE_COLUMNS:
        ref, cur = reference[name], current[name]
        if name in FLAG_COLUMNS:
            r = np.array([(ref == 0).sum(), (ref == 1).sum()])
            c = np.array([(cur == 0).sum(), (cur == 1).sum()])
            table_ = np.vstack([r, c])
            p_value = (
                float(stats.chi2_contingency(table_)[1]) if (table_.sum(axis=0) > 0).all() else 1.0
            )
            record = {
                "feature": name,
                "kind": "flag",
                "psi": psi(r, c),
                "ks": None,
                "p_value": p_value,
            }
        else:
            r, c = numeric_bins(ref, cur)
            both = ref.dropna(), cur.dropna()
            ks = stats.ks_2samp(*both) if len(both[0]) and len(both[1]) else None
            record = {
                "feature": name,
                "kind": "number",
                "psi": psi(r, c),
                "ks": float(ks.statistic) if ks else None,
                "p_value": float(ks.pvalue) if ks else None,
            }
        record |= {
            "reference_mean": float(ref.mean()),
            "current_mean": float(cur.mean()),
            "reference_missing": float(ref.isna().mean()),
            "current_missing": float(cur.isna().mean()),
        }
        records.append(record)
    if reference_probability is not None and current_probability is not None:
        r, c = numeric_bins(pd.Series(reference_probability), pd.Series(current_probability))
        ks = stats.ks_2samp(reference_probability, current_probability)
        records.append(
            {
                "feature": "predicted probability",
                "kind": "prediction",
                "psi": psi(r, c),
                "ks": float(ks.statistic),
                "p_value": float(ks.pvalue),
                "reference_mean": float(np.mean(reference_probability)),
                "current_mean": float(np.mean(current_probability)),
                "reference_missing": 0.0,
                "current_missing": 0.0,
            }
        )
    frame = pd.DataFrame.from_records(records)
    frame["drifted"] = frame["psi"] >= threshold
    frame = frame.sort_values("psi", ascending=False, ignore_index=True)
    return DriftResult(frame, len(reference), len(current), threshold)


def drift_metrics(result: DriftResult, batch: str) -> CollectorRegistry:
    """The drift figures as Prometheus gauges (for a textfile collector or a push)."""
    registry = CollectorRegistry()
    psi_gauge = Gauge(
        "backorder_drift_psi",
        "Population stability index against the reference.",
        ["batch", "feature"],
        registry=registry,
    )
    for row in result.features.itertuples():
        # 6 significant digits, as the figures have always been published.
        psi_gauge.labels(batch=batch, feature=row.feature).set(float(f"{row.psi:.6g}"))
    Gauge(
        "backorder_drift_features_drifted",
        "Features at or over the PSI threshold.",
        ["batch"],
        registry=registry,
    ).labels(batch=batch).set(len(result.drifted))
    return registry


def _psi_plot(result: DriftResult) -> Plot:
    frame = result.features.iloc[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(frame) + 1))
    colours = ["#c0392b" if d else "#7f8c8d" for d in frame["drifted"]]
    ax.barh(frame["feature"], frame["psi"], color=colours)
    ax.axvline(result.threshold, ls="--", color="#c0392b", label=f"threshold {result.threshold}")
    ax.axvline(0.1, ls=":", color="grey", label="0.1 (moderate)")
    ax.set_xlabel("PSI (reference vs current)")
    ax.legend(loc="lower right")
    return png(fig, "PSI per feature")


def _distribution_plots(
    reference: pd.DataFrame, current: pd.DataFrame, names: list[str]
) -> list[Plot]:
    parts = []
    for name in names:
        fig, ax = plt.subplots(figsize=(5, 2.6))
        ref, cur = reference[name].dropna(), current[name].dropna()
        if name in FLAG_COLUMNS:
            ax.bar(["ref No", "ref Yes"], [(ref == 0).mean(), (ref == 1).mean()], color="#7f8c8d")
            ax.bar(["cur No", "cur Yes"], [(cur == 0).mean(), (cur == 1).mean()], color="#2e86c1")
        else:
            both = np.concatenate([ref.to_numpy(), cur.to_numpy()])
            lo, hi = np.quantile(both, [0.01, 0.99]) if len(both) else (0, 1)
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 40).tolist()
            ax.hist(ref.clip(lo, hi), bins=bins, density=True, alpha=0.5, label="reference")
            ax.hist(cur.clip(lo, hi), bins=bins, density=True, alpha=0.5, label="current")
            ax.legend()
        ax.set_title(name)
        parts.append(png(fig, f"distribution of {name}"))
    return parts


def drift_report(
    result: DriftResult,
    reference: pd.DataFrame,
    current: pd.DataFrame,
    reference_name: str,
    current_name: str,
) -> str:
    shown = [f for f in result.features["feature"] if f in FEATURE_COLUMNS][:6]
    verdict = ", ".join(result.drifted) if result.drifted else "none"
    return TEMPLATES.get_template("report_drift.html").render(
        title="Drift report",
        intro=[
            ("reference", redact(reference_name)),
            ("current", redact(current_name)),
            ("reference rows", result.reference_rows),
            ("current rows", result.current_rows),
            ("PSI threshold", result.threshold),
            ("drifted", verdict),
        ],
        psi_plot=_psi_plot(result),
        features=result.features,
        distributions=_distribution_plots(reference, current, shown),
    )


@dataclass
class DriftCheck:
    """A comparison and where its outputs went."""

    result: DriftResult
    report: str | Path  # drift_report.html
    metrics: CollectorRegistry  # the figures written to drift.prom, for a push


@dataclass
class DriftFiles:
    """Where a drift check writes its files and how they are labelled."""

    folder: str | Path  # a local folder or an fsspec URL
    batch: str  # the ``batch`` label of drift.prom
    names: tuple[str, str]  # the reference's and the current batch's, as the report shows them
    details: dict[str, Any] | None = None  # added to drift.json's summary


def check_and_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    files: DriftFiles,
    threshold: float,
    model: Scorer | None = None,
) -> DriftCheck:
    """Compare ``current`` with ``reference`` (and, with a model, its predicted probabilities)
    and write drift_report.html, drift.json (the summary plus ``files.details``) and drift.prom
    (labelled ``files.batch``) into ``files.folder``."""
    folder, batch, names = files.folder, redact(files.batch), files.names
    # The report and drift.json are shared: they name data without passwords, whatever given.
    details = redact_fields(files.details or {})
    probabilities = (
        (model.probability(reference), model.probability(current))
        if model is not None
        else (None, None)
    )
    result = compare(reference, current, threshold, *probabilities)
    report = write_text_atomic(
        f"{folder}/drift_report.html", drift_report(result, reference, current, *names)
    )
    write_json_atomic(f"{folder}/drift.json", result.summary() | details)
    metrics = drift_metrics(result, batch)
    # Not write_to_textfile: it writes local paths only, and the folder may be an S3 prefix.
    write_text_atomic(f"{folder}/drift.prom", generate_latest(metrics).decode())
    return DriftCheck(result, report, metrics)
