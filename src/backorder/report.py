"""Self-contained HTML reports: every plot is an inline PNG, no external assets.

The pages are Jinja2 templates (templates/report*.html, autoescaped); the plots are matplotlib.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import jinja2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from backorder.metrics import Evaluation, curves, stock_rule_flags
from backorder.model import Scorer

# Rows used for the mean-|contribution| plot: contributions cost several times a prediction.
CONTRIBUTION_SAMPLE = 2_000


class Plot(NamedTuple):
    """A rendered figure, inlined into a report as a PNG data URI."""

    alt: str
    png_base64: str


def png(fig: plt.Figure, alt: str) -> Plot:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Plot(alt, base64.b64encode(buffer.getvalue()).decode("ascii"))


def figure(value: Any) -> str:
    """One table cell or figure as people read it (the templates escape it)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        number = float(value)
        return f"{number:,.4f}" if abs(number) < 1000 else f"{number:,.0f}"
    return str(value)


TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
TEMPLATES.filters["figure"] = figure


def _macro(name: str) -> Callable[..., Any]:
    """A macro of templates/report_macros.html, to call from Python."""
    macro: Callable[..., Any] = getattr(TEMPLATES.get_template("report_macros.html").module, name)
    return macro


def table(frame: pd.DataFrame) -> str:
    return str(_macro("table")(frame))


def key_values(pairs: Iterable[tuple[str, Any]]) -> str:
    return str(_macro("key_values")(list(pairs)))


def _roc_plot(ev: Evaluation, rows: pd.DataFrame) -> Plot:
    c = curves(ev.y, ev.probability)
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.plot(c["fpr"], c["tpr"], label=f"model (AUC {ev.metrics['roc_auc']:.3f})")
    rule = stock_rule_flags(rows)
    positives, negatives = max(ev.y.sum(), 1), max((1 - ev.y).sum(), 1)
    ax.scatter(
        [(rule & (ev.y == 0)).sum() / negatives],
        [(rule & (ev.y == 1)).sum() / positives],
        color="C3",
        zorder=3,
        label="stock rule",
    )
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="chance")
    ax.set(xlabel="false-alarm rate", ylabel="share of backorders caught", title="ROC")
    ax.legend(loc="lower right")
    return png(fig, "ROC curve")


def _pr_plot(ev: Evaluation) -> Plot:
    c = curves(ev.y, ev.probability)
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.plot(c["recall"], c["precision"], label=f"model (AP {ev.metrics['average_precision']:.3f})")
    ax.axhline(ev.metrics["positive_rate"], ls=":", color="grey", label="base rate")
    for point in ev.metrics["alert_budgets"].values():
        ax.scatter([point["recall"]], [point["precision"]], zorder=3)
        ax.annotate(
            f"top {point['budget']:.0%}",
            (point["recall"], point["precision"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set(xlabel="recall", ylabel="precision", title="Precision–recall", ylim=(0, 1.02))
    ax.legend(loc="upper right")
    return png(fig, "Precision-recall curve")


def _reliability_plot(ev: Evaluation) -> Plot:
    rel = ev.reliability
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.plot([1e-4, 1], [1e-4, 1], ls=":", color="grey", label="perfect calibration")
    ax.scatter(
        rel["mean_predicted"],
        rel["observed_rate"].clip(lower=1e-4),
        s=np.sqrt(rel["rows"]) * 2,
        label="bins (area ~ rows)",
    )
    ax.plot(rel["mean_predicted"], rel["observed_rate"].clip(lower=1e-4))
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="mean predicted probability",
        ylabel="observed backorder rate",
        title="Reliability",
    )
    ax.legend(loc="upper left")
    return png(fig, "Reliability curve (calibration)")


def _cost_plot(ev: Evaluation) -> Plot:
    cc = ev.cost_curve
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.plot(cc["threshold"], cc["cost"], label="model")
    never = ev.metrics["baselines"]["never_backorder"]["expected_cost"]
    rule = ev.metrics["baselines"]["stock_rule"]["expected_cost"]
    ax.axhline(never, ls="--", color="C1", label="never backorder")
    ax.axhline(rule, ls="--", color="C3", label="stock rule")
    ax.axvline(ev.metrics["threshold"], ls=":", color="black", label="chosen threshold")
    ax.set(xscale="log", xlabel="threshold", ylabel="expected cost", title="Cost vs threshold")
    ax.legend(loc="upper right", fontsize=8)
    return png(fig, "Cost vs threshold")


def _importance_plot(importance: pd.Series, title: str) -> Plot:
    top = importance.head(20)[::-1]
    fig, ax = plt.subplots(figsize=(5, 5.5))
    ax.barh(top.index, top.to_numpy() / max(top.sum(), 1e-12))
    ax.set(xlabel="share of total", title=title)
    return png(fig, title)


def mean_abs_contribution(model: Scorer, rows: pd.DataFrame) -> pd.Series:
    """Mean |contribution| per feature on a fixed random sample of ``rows``."""
    sample = rows.sample(min(len(rows), CONTRIBUTION_SAMPLE), random_state=0)
    contributions = model.contributions(model.features(sample)).drop(columns="baseline")
    return contributions.abs().mean().sort_values(ascending=False)


def evaluation_sections(ev: Evaluation, rows: pd.DataFrame, model: Scorer) -> str:
    """Headline figures, decisions, curves, calibration, drivers and segments of one evaluation."""
    m = ev.metrics
    importance = model.feature_importance()
    contribution = mean_abs_contribution(model, rows)
    kpis = [
        ("ROC AUC", m["roc_auc"]),
        ("average precision", m["average_precision"]),
        ("recall at threshold", m["recall"]),
        ("precision at threshold", m["precision"]),
        (
            "expected / actual backorders",
            f"{m['expected_backorders']:,.0f} / {m['actual_backorders']:,}",
        ),
    ]
    budgets = pd.DataFrame(
        [
            {
                "review the riskiest": f"{p['budget']:.0%}",
                "SKUs": p["flagged"],
                "probability cut-off": p["probability_cutoff"],
                "precision": p["precision"],
                "recall": p["recall"],
            }
            for p in m["alert_budgets"].values()
        ]
    )
    baselines = pd.DataFrame(
        [
            {
                "policy": f"model at threshold {m['threshold']:.4f}",
                "flagged": m["flagged"],
                "precision": m["precision"],
                "recall": m["recall"],
                "expected cost": m["expected_cost"],
            },
            *[
                {
                    "policy": name.replace("_", " "),
                    "flagged": b["flagged"],
                    "precision": b["precision"],
                    "recall": b["recall"],
                    "expected cost": b["expected_cost"],
                }
                for name, b in m["baselines"].items()
            ],
        ]
    )
    drivers = [
        _importance_plot(importance, "Feature importance (gain)"),
        _importance_plot(
            contribution, f"Mean |contribution| to log-odds ({CONTRIBUTION_SAMPLE:,}-row sample)"
        ),
    ]
    return TEMPLATES.get_template("report_evaluation.html").render(
        m=m,
        kpis=kpis,
        baselines=baselines,
        budgets=budgets,
        curves=[_roc_plot(ev, rows), _pr_plot(ev), _reliability_plot(ev), _cost_plot(ev)],
        reliability=ev.reliability,
        drivers=drivers,
        segments=ev.segments,
    )


def render(title: str, intro_pairs: list[tuple[str, Any]], body: str) -> str:
    """A report page: ``title``, a key-value table of ``intro_pairs``, then ``body`` (HTML)."""
    return TEMPLATES.get_template("report.html").render(title=title, intro=intro_pairs, body=body)
