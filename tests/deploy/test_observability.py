"""Monitoring: Prometheus config and alert rules, Grafana dashboards, and a real Prometheus
scraping a real app.

Every metric a dashboard panel or an alert asks for must exist. The inventory is taken from
the real producers, never from a list kept by hand:
- the app: its /metrics after a prediction and a refused request (so labelled series exist);
- the pipelines: a real batch scored by `score_pending` and a training record, pushed to a real
  Pushgateway and scraped from it (the Pushgateway adds push_time_seconds);
- the host: a real node-exporter on a free loopback port;
- Airflow: deploy/statsd/mapping.yml applied to StatsD lines a real Airflow 3.3.2 sent
  (tests/data/airflow_statsd_sample.txt), because statsd-exporter has no Debian package here;
- Prometheus itself: `up` and the scrape series it adds to every target.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from backorder.config import Settings
from tests.conftest import ROOT, SAMPLE
from tests.support.keys import bearer, make_key, signed_in_client
from tests.support.servers import HOST, _kill, free_port, launch, running, serving

DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
STATSD_MAPPING = DEPLOY / "statsd" / "mapping.yml"
STATSD_SAMPLE = ROOT / "tests" / "data" / "airflow_statsd_sample.txt"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
NODE_EXPORTER = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
PUSHGATEWAY = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
APT_HINT = "apt-get install prometheus prometheus-node-exporter prometheus-pushgateway"
# Series Prometheus adds to every scrape target.
PROMETHEUS_BUILTINS = {
    "up": {"job", "instance"},
    "scrape_duration_seconds": {"job", "instance"},
    "scrape_samples_scraped": {"job", "instance"},
    "ALERTS": {"alertname", "alertstate", "severity", "job", "instance"},
}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series

Catalog = dict[str, set[str]]  # metric name -> label names it carries


# -- PromQL: which metrics and labels an expression uses --------------------------------------
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "start",
    "end",
}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
SELECTOR = re.compile(r"(?<![\w:])([a-zA-Z_:][\w:]*)?\s*\{([^{}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")


def strip_strings(expr: str) -> str:
    return STRING.sub('""', expr)


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: not functions, keywords, labels or durations."""
    text = strip_strings(expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges and subqueries: [5m], [$__rate_interval]
    text = GROUPING.sub(" ", text)  # by (le, route), on (job), group_left (version)
    text = re.sub(r"\$\w+", " ", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        name, call = match.groups()
        if call or name.lower() in KEYWORDS:
            continue  # a function or aggregation (rate(, sum(, histogram_quantile() or keyword
        names.add(name)
    return names


def label_uses(expr: str) -> dict[str, set[str]]:
    """Labels matched on per metric name, from selectors like name{label="value"}."""
    uses: dict[str, set[str]] = {}
    for name, body in SELECTOR.findall(strip_strings(expr)):
        if name and name.lower() not in KEYWORDS:
            uses.setdefault(name, set()).update(MATCHER.findall(body))
    return uses


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for group in GROUPING.findall(strip_strings(expr))
        for label in group.split(",")
        if label.strip()
    }


def test_promql_parser() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(x_bucket{route=~"/v1/predict|/",'
        ' status!="500"}[5m]))) > 1 and on (job) sum(increase(y_total[$__rate_interval]))'
        " >= 20 unless z offset 1h or absent(w) or time() - max(t_seconds) > 26 * 3600"
        " or count(count by (cpu) (c)) or vector(1) or a:b:rate5m or sum(q) without (mode)"
    )
    assert metric_names(expr) == {
        "x_bucket",
        "y_total",
        "z",
        "w",
        "t_seconds",
        "c",
        "a:b:rate5m",
        "q",
    }
    assert metric_names('sum by (decision) (p_total{decision="by (le)"})') == {"p_total"}
    assert metric_names("1e3 * m / 2.5e-3 + nan + Inf") == {"m"}
    assert label_uses('x{route="a{b}", method=~"P.*"} / y{status="5xx"} + z') == {
        "x": {"route", "method"},
        "y": {"status"},
    }
    assert grouping_labels("sum by (le, route) (x) / on (job) group_left (version) y") == {
        "le",
        "route",
        "job",
        "version",
    }


# -- where queries live -----------------------------------------------------------------------
def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) of every Prometheus query in the dashboards."""
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            default = (panel.get("datasource") or {}).get("type")
            for target in panel.get("targets", []):
                kind = (target.get("datasource") or {}).get("type", default)
                if kind == "prometheus":
                    found.append((path.stem, panel["title"], target["expr"]))
    return found


def loki_queries() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                if (target.get("datasource") or {}).get("type") == "loki":
                    found.append((path.stem, panel["title"], target["expr"]))
    return found


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_dashboard_has_queries_and_every_alert_the_required_fields() -> None:
    boards = {stem for stem, _, _ in dashboard_queries()}
    assert boards == {"service", "model", "pipelines", "host"}
    assert {stem for stem, _, _ in loki_queries()} == {"service", "pipelines"}
    names = set()
    for rule in alert_rules():
        names.add(rule["alert"])
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert "for" in rule, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert {
        "BackorderAppDown",
        "BackorderHighErrorRate",
        "BackorderHighLatencyP99",
        "BackorderDriftDetected",
        "BackorderBatchScoringStale",
        "BackorderBatchScoringNeverSucceeded",
        "BackorderChampionStale",
        "BackorderModelReloadFailing",
    } <= names


# -- promtool ---------------------------------------------------------------------------------
def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if PROMTOOL is None:
        pytest.skip(f"promtool is not installed ({APT_HINT})")
    return subprocess.run(
        [PROMTOOL, *args],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_promtool_checks_the_config_and_its_rule_files(tmp_path: Path) -> None:
    """In full on a copy whose scrape token file exists (the real one is only in the container)
    and whose rule files are named by absolute path; the file itself as `make ops-check` does."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    [app_job] = [job for job in config["scrape_configs"] if job["job_name"] == "backorder-app"]
    token_file = app_job["authorization"]["credentials_file"]
    local_token = tmp_path / "metrics-token"
    local_token.write_text("bo_" + "x" * 40 + "\n")
    app_job["authorization"]["credentials_file"] = str(local_token)
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout
    # As shipped: refused here for the missing token file alone, valid by syntax.
    missing = promtool("check", "config", "prometheus.yml")
    assert missing.returncode != 0
    assert f"{token_file}: no such file" in missing.stdout + missing.stderr
    syntax = promtool("check", "config", "--syntax-only", "prometheus.yml")
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(alert_rules())} rules found" in result.stdout


def test_promtool_rule_tests_pass_and_cover_every_alert() -> None:
    files = sorted(p.name for p in PROMETHEUS_DIR.glob("*_test.yml"))
    assert files == ["alerts_days_test.yml", "alerts_test.yml"]
    result = promtool("test", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    fires, quiet = set(), set()
    for name in files:
        for case in yaml.safe_load((PROMETHEUS_DIR / name).read_text())["tests"]:
            for check in case["alert_rule_test"]:
                (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    every = {rule["alert"] for rule in alert_rules()}
    assert fires == every, "alerts never shown firing"
    assert quiet == every, "alerts never shown staying quiet"


def test_promtool_fails_a_broken_rule(tmp_path: Path) -> None:
    """So that a promtool that passes everything cannot pass the tests above."""
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n- name: x\n  rules:\n  - alert: X\n    expr: rate(up[5m]\n")
    result = promtool("check", "rules", str(broken))
    assert result.returncode != 0


# -- the metric inventory, from the real producers --------------------------------------------
def scrape(text: str) -> Catalog:
    """Sample names (with _bucket/_sum/_count/_total/_created as exposed) and their labels."""
    catalog: Catalog = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            catalog.setdefault(sample.name, set()).update(sample.labels)
    return catalog


def merge(*catalogs: Catalog) -> Catalog:
    merged: Catalog = {}
    for catalog in catalogs:
        for name, labels in catalog.items():
            merged.setdefault(name, set()).update(labels)
    return merged


def get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def app_catalog(settings: Settings) -> Catalog:
    from backorder.web import FORM_DEFAULTS

    with signed_in_client(settings) as client:
        ok = client.post("/v1/predict", json={"records": [{"sku": "1", **FORM_DEFAULTS}]})
        assert ok.status_code == 200, ok.text
        refused = client.post("/v1/predict", json={"records": [{**FORM_DEFAULTS, "lead_time": -1}]})
        assert refused.status_code == 422
        return scrape(client.get("/metrics").text)


class Exporter:
    """A Prometheus exporter binary on a free loopback port, stopped by PID."""

    def __init__(self, binary: str, log: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = log
        self.proc = launch(
            [binary, f"--web.listen-address={HOST}:{self.port}", *args],
            log,
            lambda: get(f"{self.url}/metrics"),
            binary,
            term_first=True,
        )

    def stop(self) -> None:
        _kill(self.proc, term_first=True)


def pipelines_catalog(settings: Settings, tmp_path: Path) -> Catalog:
    """Score a landed batch and record a training run, pushing to a real Pushgateway."""
    from backorder.catalog import UNSCORED, Landing
    from backorder.pipelines import record_training, score_pending

    assert PUSHGATEWAY is not None
    gateway = Exporter(PUSHGATEWAY, tmp_path / "pushgateway.log")
    try:
        pushing = settings.model_copy(update={"pushgateway_url": gateway.url})
        root = str(tmp_path / "landing")
        Landing(root).land(SAMPLE / "new_batch.csv.gz", UNSCORED, "20261102T000000Z")
        [scored] = score_pending(root, pushing)
        assert scored["read"] == scored["scored"] + scored["rejected"]
        record_training(root, {"run": "20261101T000000Z", "promoted": True}, pushing)
        catalog = scrape(get(f"{gateway.url}/metrics"))
    finally:
        gateway.stop()
    written = {p.name for p in (tmp_path / "landing" / "metrics").glob("*.prom")}
    assert written == {"batch_prediction.prom", "drift.prom", "training.prom"}
    for prom in (tmp_path / "landing" / "metrics").glob("*.prom"):
        assert scrape(prom.read_text()).keys() <= catalog.keys(), f"{prom.name} was not pushed"
    return catalog


def node_catalog(tmp_path: Path) -> Catalog:
    assert NODE_EXPORTER is not None
    exporter = Exporter(NODE_EXPORTER, tmp_path / "node-exporter.log")
    try:
        return scrape(get(f"{exporter.url}/metrics"))
    finally:
        exporter.stop()


# -- Airflow: the statsd-exporter mapping applied to real StatsD lines -------------------------
STATSD_TYPES = {"c": "counter", "g": "gauge", "ms": "observer", "h": "observer", "d": "observer"}


def statsd_lines() -> list[tuple[str, str]]:
    """(metric, statsd-exporter type) of each line Airflow sent."""
    lines = []
    for line in STATSD_SAMPLE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, rest = line.partition(":")
            lines.append((name, STATSD_TYPES[rest.split("|")[1]]))
    return lines


def mapping_regex(mapping: dict[str, Any]) -> re.Pattern[str]:
    if mapping.get("match_type") == "regex":
        return re.compile(mapping["match"])
    # statsd-exporter glob: * is one dot-free part of the name
    parts = (re.escape(part) if part != "*" else "([^.]+)" for part in mapping["match"].split("."))
    return re.compile(r"\.".join(parts))


def map_statsd(name: str, kind: str, mappings: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The metric statsd-exporter makes of one StatsD line (first match wins; None: dropped)."""
    for mapping in mappings:
        if mapping.get("match_metric_type", kind) != kind:
            continue
        match = mapping_regex(mapping).fullmatch(name)
        if match is None:
            continue
        if mapping.get("action") == "drop":
            return None
        labels = {
            key: re.sub(r"\$(\d+)", lambda m, g=match: g.group(int(m.group(1))), str(value))
            for key, value in (mapping.get("labels") or {}).items()
        }
        return {"mapping": mapping["match"], "name": mapping["name"], "labels": labels}
    raise AssertionError(f"{name}: no mapping (the catch-all should drop it)")


def airflow_catalog() -> Catalog:
    config = yaml.safe_load(STATSD_MAPPING.read_text())
    mappings = config["mappings"]
    observer = config["defaults"]["observer_type"]
    catalog: Catalog = {}
    used = set()
    for name, kind in statsd_lines():
        mapped = map_statsd(name, kind, mappings)
        if mapped is None:
            continue
        used.add(mapped["mapping"])
        labels = set(mapped["labels"]) | TARGET_LABELS
        base = mapped["name"]
        if kind == "observer":
            assert observer == "histogram"
            suffixes = ["_bucket", "_sum", "_count"]
            catalog.setdefault(base + "_bucket", set()).update(labels | {"le"})
            for suffix in suffixes[1:]:
                catalog.setdefault(base + suffix, set()).update(labels)
        else:
            if kind == "counter":
                assert base.endswith("_total"), f"{base}: a counter's name ends in _total"
            catalog.setdefault(base, set()).update(labels)
    dead = {m["match"] for m in mappings if m.get("action") != "drop"} - used
    assert not dead, f"mappings that match nothing Airflow 3.3.2 sends: {sorted(dead)}"
    return catalog


def test_statsd_mapping_names_labels_and_drops() -> None:
    mappings = yaml.safe_load(STATSD_MAPPING.read_text())["mappings"]
    mapped = map_statsd("airflow.ti.finish.backorder_training.train.failed", "counter", mappings)
    assert mapped == {
        "mapping": "airflow.ti.finish.*.*.*",
        "name": "airflow_ti_finish_total",
        "labels": {"dag_id": "backorder_training", "task_id": "train", "state": "failed"},
    }
    # the untagged duplicate Airflow also sends, and anything unmapped, are dropped
    assert map_statsd("airflow.ti.finish", "counter", mappings) is None
    assert map_statsd("airflow.dagrun.duration.success", "observer", mappings) is None
    assert map_statsd("airflow.scheduler_heartbeat", "gauge", mappings) is None  # wrong type
    assert {m["name"] for m in mappings} >= {"airflow_dagrun_duration_seconds", "dropped"}
    assert airflow_catalog()["airflow_dagrun_duration_seconds_count"] >= {"dag_id", "state"}


@pytest.fixture(scope="module")
def catalog(trained_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    if NODE_EXPORTER is None or PUSHGATEWAY is None:
        pytest.skip(f"node-exporter or the Pushgateway is not installed ({APT_HINT})")
    from tests.conftest import make_settings

    tmp = tmp_path_factory.mktemp("metrics")
    home = tmp / "home"
    shutil.copytree(trained_home, home)
    settings = make_settings(home)
    app = {name: labels | TARGET_LABELS for name, labels in app_catalog(settings).items()}
    return merge(
        app,
        pipelines_catalog(settings, tmp),
        {name: labels | TARGET_LABELS for name, labels in node_catalog(tmp).items()},
        airflow_catalog(),
        PROMETHEUS_BUILTINS,
    )


def test_the_producers_expose_what_the_readme_promises(catalog: Catalog) -> None:
    for name in (
        "backorder_http_requests_total",
        "backorder_http_request_duration_seconds_bucket",
        "backorder_predictions_total",
        "backorder_predicted_probability_bucket",
        "backorder_rejected_inputs_total",
        "backorder_model_info",
        "backorder_model_trained_timestamp_seconds",
        "backorder_model_reload_failures_total",
        "backorder_batch_last_success_timestamp_seconds",
        "backorder_drift_psi",
        "backorder_training_promoted",
        "node_cpu_seconds_total",
    ):
        assert name in catalog, name
    # the names a query must not use: the family name of a counter or histogram
    assert "backorder_http_requests" not in catalog
    assert "backorder_http_request_duration_seconds" not in catalog


def check_expr(where: str, expr: str, catalog: Catalog) -> list[str]:
    problems = []
    names = metric_names(expr)
    if not names:
        problems.append(f"{where}: no metric in {expr!r}")
    for name in sorted(names - catalog.keys()):
        problems.append(f"{where}: {name} is not exposed by anything scraped")
    for name, labels in label_uses(expr).items():
        for label in sorted(labels - catalog.get(name, set()) - {"__name__"}):
            problems.append(f"{where}: {name} has no label {label}")
    known = set().union(*(catalog.get(name, set()) for name in names)) | {"le"}
    for label in sorted(grouping_labels(expr) - known):
        problems.append(f"{where}: grouped by {label}, which none of {sorted(names)} has")
    return problems


def test_dashboard_queries_use_only_real_metrics(catalog: Catalog) -> None:
    problems = []
    for board, title, expr in dashboard_queries():
        problems += check_expr(f"{board}.json / {title}", expr, catalog)
    assert not problems, "\n".join(problems)


def test_alert_rules_use_only_real_metrics(catalog: Catalog) -> None:
    problems = []
    for rule in alert_rules():
        problems += check_expr(f"alerts.yml / {rule['alert']}", rule["expr"], catalog)
    assert not problems, "\n".join(problems)


def test_log_panels_select_streams_promtail_makes() -> None:
    promtail = yaml.safe_load((DEPLOY / "promtail" / "promtail.yml").read_text())
    labels: set[str] = set()
    services: set[str] = set()
    for job in promtail["scrape_configs"]:
        for relabel in job.get("relabel_configs", []):
            labels.add(relabel["target_label"])
        for static in job.get("static_configs", []):
            labels |= {k for k in static["labels"] if not k.startswith("__")}
            services.add(static["labels"].get("service", ""))
        for stage in job["pipeline_stages"]:
            labels |= set(stage.get("labels") or {})
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services |= set(compose["services"])
    for board, title, expr in loki_queries():
        selector = re.match(r"\{([^}]*)\}", expr)
        assert selector, f"{board} / {title}: {expr}"
        for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', selector.group(1)):
            assert label in labels, f"{board} / {title}: no stream label {label}"
            if label == "service":
                pattern = value if op in ("=~", "!~") else re.escape(value)
                assert any(re.fullmatch(pattern, s) for s in services), f"{board} / {title}"


# -- a real Prometheus scraping a real app ------------------------------------------------------
@pytest.fixture(scope="module")
def app_home(trained_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Its own copy of the session's registry (serving writes the compiled-trees cache)."""
    home = tmp_path_factory.mktemp("serve") / "home"
    shutil.copytree(trained_home, home)
    return home


@pytest.fixture(scope="module")
def app_viewer_key(app_home: Path) -> str:
    """Made before the server starts (a running server picks up new keys within a second)."""
    return make_key(app_home, "viewer")


@pytest.fixture(scope="module")
def app_server(app_home: Path, app_viewer_key: str) -> Iterator[str]:
    """`backorder serve` as a real process on a free loopback port."""
    with serving(app_home, app_home.parent / "serve.log") as url:
        yield url


@pytest.fixture
def prometheus(app_server: str, app_home: Path, tmp_path: Path) -> Iterator[str]:
    if PROMETHEUS is None:
        pytest.skip(f"prometheus is not installed ({APT_HINT})")
    port = free_port()
    # Prometheus scrapes with a key of role `metrics`, read from a file, as in the compose stack.
    credentials = tmp_path / "metrics.key"
    credentials.write_text(make_key(app_home, "metrics") + "\n")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
        "scrape_configs": [
            {
                "job_name": "backorder-app",
                "authorization": {"credentials_file": str(credentials)},
                "static_configs": [{"targets": [urllib.parse.urlsplit(app_server).netloc]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://{HOST}:{port}"
    with running(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={HOST}:{port}",
        ],
        tmp_path / "prometheus.log",
        lambda: get(f"{url}/-/ready"),
        "prometheus",
    ):
        yield url


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    body = json.loads(get(url))
    assert body["status"] == "success", body
    return body["data"]["result"]


def poll(what: str, check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.5)


def test_prometheus_scrapes_the_app_and_loads_the_alert_rules(
    app_server: str, app_viewer_key: str, prometheus: str
) -> None:
    from backorder.web import FORM_DEFAULTS

    viewer = app_viewer_key
    predictions = 3
    for i in range(predictions):
        response = httpx.post(
            f"{app_server}/v1/predict",
            json={"records": [{"sku": str(i), **FORM_DEFAULTS}]},
            headers={"X-Request-ID": f"observability-{i}", **bearer(viewer)},
            timeout=10,
        )
        assert response.status_code == 200, response.text

    def counted() -> list[dict[str, Any]]:
        result = query(
            prometheus, 'backorder_http_requests_total{route="/v1/predict", status="200"}'
        )
        return result if result and float(result[0]["value"][1]) >= predictions else []

    [sample] = poll("backorder_http_requests_total in Prometheus", counted)
    assert float(sample["value"][1]) == predictions
    assert sample["metric"]["job"] == "backorder-app"
    assert sample["metric"]["method"] == "POST"
    [up] = query(prometheus, 'up{job="backorder-app"}')
    assert up["value"][1] == "1"
    flagged = query(prometheus, "sum(backorder_predictions_total)")
    assert float(flagged[0]["value"][1]) == predictions

    expected = {
        group["name"]: {rule["alert"] for rule in group["rules"]}
        for group in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    }

    def evaluated() -> list[dict[str, Any]]:
        groups = json.loads(get(f"{prometheus}/api/v1/rules"))["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        done = rules and all(rule.get("lastEvaluation", "").startswith("20") for rule in rules)
        return groups if done else []

    groups = poll("alert rules evaluated", evaluated)
    assert {g["name"]: {r["name"] for r in g["rules"]} for g in groups} == expected
    for group in groups:
        for rule in group["rules"]:
            assert rule["type"] == "alerting"
            assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
    # The app is up and healthy: none of its alerts fires.
    firing = {
        alert["labels"]["alertname"]
        for alert in json.loads(get(f"{prometheus}/api/v1/alerts"))["data"]["alerts"]
        if alert["state"] == "firing"
    }
    assert not firing & {
        "BackorderAppDown",
        "BackorderHighErrorRate",
        "BackorderModelReloadFailing",
    }
