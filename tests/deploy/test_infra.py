"""The Terraform root module in infra/: its offline checks pass, and the deployment rules hold.

The first tests run scripts/check_infra.sh (fmt, init, validate, `terraform test` against a mocked
AWS provider, checkov) and show it fails when it should. The rest read the .tf files as text:
python-hcl2 is not a dependency, so blocks are cut out by brace matching, which is enough for
this module's plain HCL (no heredocs) and fails loudly if a block is not found.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
CHECK_SCRIPT = ROOT / "scripts" / "check_infra.sh"
TERRAFORM = shutil.which("terraform")
CHECKOV = next(
    (
        str(path)
        for path in (ROOT / ".venv-checkov" / "bin" / "checkov", shutil.which("checkov"))
        if path and os.access(path, os.X_OK)
    ),
    None,
)

# checkov may skip: .ci/run (and ci.yml) install it into .venv-checkov, so CI never skips it.
# terraform may not: no registry here has it, .ci/run cannot install it, and it comes with this
# machine's image and ci.yml's setup-terraform; a machine without it fails instead of passing.
needs_checkov = pytest.mark.skipif(
    CHECKOV is None, reason="no checkov in .venv-checkov/bin or on PATH (.ci/run installs it)"
)


@pytest.fixture
def terraform() -> str:
    assert TERRAFORM is not None, "terraform is not on PATH (setup-terraform in ci.yml)"
    return TERRAFORM


def infra_files() -> list[Path]:
    """Every file of the module, without a local .terraform/ provider cache."""
    return sorted(
        path for path in INFRA.rglob("*") if path.is_file() and ".terraform" not in path.parts
    )


def tf_text() -> str:
    return "\n".join(path.read_text() for path in sorted(INFRA.glob("*.tf")))


def block(text: str, header: str) -> str:
    """The body of the first block (`header {` or `header = {`, header a regex), braces balanced."""
    match = re.search(header + r"\s*=?\s*\{", text)
    assert match, f"no block matching {header!r} in infra/*.tf"
    depth, start = 1, match.end()
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index]
    raise AssertionError(f"unbalanced braces after {header!r}")


def blocks(text: str, header: str) -> dict[str, str]:
    """Bodies of all blocks `header "<name>" {`, by name."""
    names = re.findall(header + r'\s+"([^"]+)"\s*\{', text)
    return {name: block(text, header + rf'\s+"{re.escape(name)}"') for name in names}


def attribute(body: str, name: str) -> str:
    """The raw value of `name = value` at the start of a line of a block body."""
    match = re.search(rf"^\s*{name}\s*=\s*(.+?)\s*$", body, re.MULTILINE)
    assert match, f"no {name} = ... in block"
    return match.group(1)


def run_check(
    root: Path, path: str | None = None, checkov: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"CHECKOV", "TF_DATA_DIR"}}
    if path is not None:
        env["PATH"] = path
    if checkov is not None:
        env["CHECKOV"] = checkov
    return subprocess.run(
        ["/bin/bash", str(root / "scripts" / "check_infra.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def copy_checkout(tmp_path: Path) -> Path:
    """infra/ and the check script in a scratch tree, safe to break."""
    root = tmp_path / "checkout"
    shutil.copytree(INFRA, root / "infra", ignore=shutil.ignore_patterns(".terraform"))
    (root / "scripts").mkdir()
    shutil.copy2(CHECK_SCRIPT, root / "scripts" / "check_infra.sh")
    return root


def path_without_tools(tmp_path: Path) -> str:
    """A PATH holding only what the script needs besides terraform and checkov."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    dirname = shutil.which("dirname")
    assert dirname
    (bin_dir / "dirname").symlink_to(dirname)
    return str(bin_dir)


def snapshot() -> dict[str, str]:
    return {
        str(path.relative_to(INFRA)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in infra_files()
    }


# -- the check script ------------------------------------------------------------------------
@pytest.mark.usefixtures("terraform")
def test_check_script_passes_and_leaves_the_tree_alone() -> None:
    had_cache = (INFRA / ".terraform").exists()
    before = snapshot()
    result = run_check(ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for step in ("terraform fmt", "terraform validate", "terraform test", "infra checks passed"):
        assert step in result.stdout, output
    assert "0 failed" in result.stdout, output
    assert snapshot() == before, "the checks changed files in infra/ (lock file?)"
    assert (INFRA / ".terraform").exists() == had_cache, "init must use a temporary TF_DATA_DIR"


@pytest.mark.usefixtures("terraform")
def test_check_script_fails_on_unformatted_terraform(tmp_path: Path) -> None:
    root = copy_checkout(tmp_path)
    with (root / "infra" / "outputs.tf").open("a") as handle:
        handle.write('\noutput "badly_formatted" {\nvalue="x"\ndescription = "x"\n}\n')
    result = run_check(root, checkov="/nonexistent/checkov")
    assert result.returncode != 0
    assert "outputs.tf" in result.stdout + result.stderr


def test_check_script_skips_absent_tools_and_says_so(tmp_path: Path) -> None:
    result = run_check(copy_checkout(tmp_path), path=path_without_tools(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped: terraform" in result.stdout
    assert "skipped: checkov" in result.stdout


@needs_checkov
def test_check_script_fails_on_a_checkov_finding(tmp_path: Path) -> None:
    root = copy_checkout(tmp_path)
    ec2 = root / "infra" / "ec2.tf"
    text = ec2.read_text()
    ec2.write_text(text.replace('http_tokens   = "required"', 'http_tokens   = "optional"'))
    assert ec2.read_text() != text
    assert CHECKOV is not None
    result = run_check(root, path=path_without_tools(tmp_path), checkov=CHECKOV)
    assert result.returncode != 0
    assert "CKV_AWS_79" in result.stdout  # IMDSv2


def test_check_script_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not on PATH")
    result = subprocess.run(
        [shellcheck, str(CHECK_SCRIPT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


# -- the module as data ----------------------------------------------------------------------
def test_backend_is_partial_s3_with_native_locking_in_the_root_module() -> None:
    with_backend = [path for path in INFRA.rglob("*.tf") if 'backend "' in path.read_text()]
    assert [path.parent for path in with_backend] == [INFRA], with_backend
    backend = block(with_backend[0].read_text(), r'backend\s+"s3"')
    assert attribute(backend, "use_lockfile") == "true"
    for setting in ("bucket", "key", "region"):  # from backend.hcl, never committed
        assert not re.search(rf"^\s*{setting}\s*=", backend, re.MULTILINE)
    example = (INFRA / "backend.hcl.example").read_text()
    for setting in ("bucket", "key", "region"):
        assert re.search(rf"^{setting}\s*=", example, re.MULTILINE), setting


def test_gitignore_keeps_state_plans_caches_and_backend_settings_out() -> None:
    paths = [
        "infra/backend.hcl",
        "infra/.terraform/terraform.tfstate",
        "infra/terraform.tfstate",
        "infra/terraform.tfstate.backup",
        "infra/release.tfplan",
        "infra/plan.tfplan",  # what .github/workflows/terraform.yml writes
        ".env",  # the compose stack's secrets
        "deploy/airflow/.env",
    ]
    for path in paths:
        result = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path], check=False)
        assert result.returncode == 0, f"{path} is not git-ignored"
    for path in ("infra/backend.hcl.example", "infra/.terraform.lock.hcl", ".env.example"):
        result = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path], check=False)
        assert result.returncode == 1, f"{path} must be committed"


def test_no_static_credentials_anywhere_in_infra() -> None:
    forbidden = re.compile(r"\b(access_key|secret_key|aws_access_key_id|aws_secret_access_key)\b")
    key_id = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
    for path in infra_files():
        text = path.read_text()
        assert not forbidden.search(text), f"{path} names a static key setting"
        assert not key_id.search(text), f"{path} holds what looks like an AWS access key ID"
    assert "aws_iam_access_key" not in tf_text()
    assert "aws_iam_user" not in tf_text()


def test_security_group_ingress_is_https_or_listed_ssh_only() -> None:
    text = tf_text()
    # Every rule is a standalone resource, so all of them are checked below.
    assert not re.search(r"^\s*ingress\s*\{", text, re.MULTILINE), "inline ingress block"
    assert 'resource "aws_security_group_rule"' not in text
    rules = blocks(text, r'resource\s+"aws_vpc_security_group_ingress_rule"')
    assert rules, "no ingress rules found"
    ports = {}
    for name, body in rules.items():
        assert attribute(body, "from_port") == attribute(body, "to_port"), name
        assert attribute(body, "description"), name
        ports[name] = int(attribute(body, "from_port"))
    assert set(ports.values()) == {443, 22}, ports
    for name, port in ports.items():
        if port == 22:
            assert attribute(rules[name], "for_each") == "toset(var.ssh_ingress_cidrs)"
    for name, body in blocks(text, r'resource\s+"aws_vpc_security_group_egress_rule"').items():
        assert attribute(body, "description"), name
        assert attribute(body, "from_port") == attribute(body, "to_port") == "443", name


def test_ssh_is_off_by_default_and_never_from_everywhere() -> None:
    variable = block(tf_text(), r'variable\s+"ssh_ingress_cidrs"')
    assert attribute(variable, "default") == "[]"
    assert '!endswith(cidr, "/0")' in variable


def test_instance_is_hardened_and_named_for_the_release_workflow() -> None:
    text = tf_text()
    instance = block(text, r'resource\s+"aws_instance"\s+"app"')
    assert attribute(block(instance, "metadata_options"), "http_tokens") == '"required"'
    assert attribute(block(instance, "root_block_device"), "encrypted") == "true"
    assert attribute(instance, "monitoring") == "true"
    assert attribute(instance, "ebs_optimized") == "true"
    assert attribute(instance, "iam_instance_profile")
    assert attribute(block(instance, "tags"), "Name") == "local.instance_name"
    assert attribute(text, "instance_name") == '"${var.project}-app"'
    assert attribute(block(text, r'variable\s+"project"'), "default") == '"backorder"'
    assert "AmazonSSMManagedInstanceCore" in text


def test_provider_is_pinned_to_the_offline_mirror() -> None:
    versions = (INFRA / "versions.tf").read_text()
    assert attribute(versions, "required_version") == '">= 1.10"'
    assert attribute(block(versions, "aws"), "version") == '"~> 5.100"'
    lock = (INFRA / ".terraform.lock.hcl").read_text()
    locked = re.search(r'version\s*=\s*"([0-9.]+)"', lock)
    assert locked and locked.group(1).startswith("5.100.")
    mirror = Path("/opt/tf-plugins/registry.terraform.io/hashicorp/aws")
    if mirror.is_dir():
        assert locked.group(1) in [path.name for path in mirror.iterdir()]


def test_every_variable_and_output_is_described_and_in_the_readme() -> None:
    text = tf_text()
    readme = (INFRA / "README.md").read_text()
    for kind in ("variable", "output"):
        found = blocks(text, kind)
        assert found, kind
        for name, body in found.items():
            assert attribute(body, "description").strip('"'), f"{kind} {name} has no description"
            assert f"| `{name}` |" in readme, f"{kind} {name} is missing from infra/README.md"


def test_every_checkov_skip_names_a_check_and_says_why() -> None:
    for path in sorted(INFRA.glob("*.tf")):
        for line in path.read_text().splitlines():
            if "checkov:skip" not in line:
                continue
            match = re.fullmatch(r"\s*#checkov:skip=(CKV2?_AWS_\d+):(.+)", line)
            assert match, f"{path.name}: malformed skip {line.strip()!r}"
            assert len(match.group(2).split()) >= 5, f"{path.name}: {match.group(1)} needs a reason"


# -- the roles of the Terraform workflow ------------------------------------------------------
def subjects(trust: str) -> list[str]:
    """The `sub` values a trust policy document accepts."""
    conditions = [
        block(trust[match.start() :], "condition")
        for match in re.finditer(r"condition\s*\{", trust)
    ]
    (sub,) = [c for c in conditions if "githubusercontent.com:sub" in c]
    return re.findall(r'"(repo:[^"]+)"', sub)


def test_apply_role_trusts_only_the_infrastructure_environment() -> None:
    text = tf_text()
    trust = block(text, r'data\s+"aws_iam_policy_document"\s+"github_terraform_apply_trust"')
    assert subjects(trust) == [
        "repo:${var.github_repository}:environment:${var.github_terraform_environment}"
    ]
    assert '"StringEquals"' in trust and '"StringLike"' not in trust, "no wildcards"
    variable = block(text, r'variable\s+"github_terraform_environment"')
    assert attribute(variable, "default") == '"infrastructure"'
    role = block(text, r'resource\s+"aws_iam_role"\s+"github_terraform_apply"')
    assert (
        attribute(role, "permissions_boundary") == "aws_iam_policy.terraform_apply_boundary[0].arn"
    )


def test_plan_role_trusts_pull_requests_and_main_and_only_reads() -> None:
    text = tf_text()
    trust = block(text, r'data\s+"aws_iam_policy_document"\s+"github_terraform_plan_trust"')
    assert sorted(subjects(trust)) == [
        "repo:${var.github_repository}:pull_request",
        "repo:${var.github_repository}:ref:refs/heads/${var.github_branch}",
    ]
    attached = block(
        text, r'resource\s+"aws_iam_role_policy_attachment"\s+"github_terraform_plan_read_only"'
    )
    assert attribute(attached, "policy_arn").endswith(':iam::aws:policy/ReadOnlyAccess"')
    plan_roles = [
        body
        for body in blocks(text, r'resource\s+"aws_iam_role_policy_attachment"').values()
        if "github_terraform_plan" in body
    ]
    assert plan_roles == [attached], "the plan role gets ReadOnlyAccess and nothing broader"
    policy = block(text, r'data\s+"aws_iam_policy_document"\s+"github_terraform_plan"')
    statements = [
        block(policy[match.start() :], "statement")
        for match in re.finditer(r"statement\s*\{", policy)
    ]
    writes = [s for s in statements if "PutObject" in s and '"Deny"' not in s]
    assert len(writes) == 1 and "local.terraform_lock_object" in writes[0], writes
    assert "local.terraform_state_object" not in writes[0], "a plan must never write the state"


def test_terraform_roles_are_optional_and_their_arns_are_outputs() -> None:
    text = tf_text()
    for kind, name in [
        ("aws_iam_role", "github_terraform_plan"),
        ("aws_iam_role", "github_terraform_apply"),
        ("aws_iam_policy", "terraform_apply_boundary"),
        ("aws_iam_role_policy_attachment", "github_terraform_apply_admin"),
    ]:
        body = block(text, rf'resource\s+"{kind}"\s+"{name}"')
        assert attribute(body, "count") == "local.terraform_roles", name
    assert "var.create_github_terraform_roles ? 1 : 0" in text
    outputs = blocks(text, "output")
    assert "aws_iam_role.github_terraform_plan[*].arn" in outputs["github_terraform_plan_role_arn"]
    assert (
        "aws_iam_role.github_terraform_apply[*].arn" in outputs["github_terraform_apply_role_arn"]
    )


def test_release_stacks_are_written_by_the_deploy_role_and_read_by_the_instance() -> None:
    text = tf_text()
    assert attribute(text, "release_prefix") == '"releases/"'
    deploy = block(text, r'data\s+"aws_iam_policy_document"\s+"github_deploy"')
    upload = block(deploy[deploy.index('"UploadReleaseStack"') - 40 :], "statement")
    assert attribute(upload, "actions") == '["s3:PutObject"]'
    assert attribute(upload, "resources") == "local.release_stacks_arns"
    instance = block(text, r'data\s+"aws_iam_policy_document"\s+"instance_s3"')
    assert '"s3:GetObject"' in instance  # on every object of the product buckets
    guard = block(instance[instance.index('"ReleaseStacksAreReadOnly"') - 40 :], "statement")
    assert attribute(guard, "effect") == '"Deny"'
    assert attribute(guard, "resources") == "local.release_stacks_arns"
