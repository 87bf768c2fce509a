#!/usr/bin/env bash
# Offline checks of the Terraform root module in infra/: fmt, init (into a temporary
# TF_DATA_DIR, so no .terraform/ is left in the tree), validate, `terraform test` (mocked AWS
# provider, no credentials) and checkov. A tool that is absent is reported as skipped (exit 0);
# any check that runs and fails exits non-zero.
#
# Environment: TF_PLUGIN_DIR (provider mirror, default /opt/tf-plugins; registry when absent),
# CHECKOV (checkov binary; else .venv-checkov/bin/checkov, else checkov on PATH).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
infra="$root/infra"
plugin_dir="${TF_PLUGIN_DIR:-/opt/tf-plugins}"
skipped=()

# A TF_CLI_CONFIG_FILE naming a missing file only makes terraform warn on every command.
if [[ -n "${TF_CLI_CONFIG_FILE:-}" && ! -f "$TF_CLI_CONFIG_FILE" ]]; then
    unset TF_CLI_CONFIG_FILE
fi

if command -v terraform >/dev/null 2>&1; then
    export TF_IN_AUTOMATION=1
    # Plain text in logs and pytest output; colours only on a terminal.
    color=()
    [[ -t 1 ]] || color=(-no-color)

    TF_DATA_DIR="$(mktemp -d)"
    export TF_DATA_DIR
    trap 'rm -rf "$TF_DATA_DIR"' EXIT

    echo "== terraform fmt -check -recursive"
    terraform -chdir="$infra" fmt -check -recursive -diff "${color[@]}"

    # -lockfile=readonly: fail rather than silently rewrite the committed .terraform.lock.hcl.
    init_args=(-backend=false -input=false -lockfile=readonly)
    if [[ -d "$plugin_dir" ]]; then
        init_args+=("-plugin-dir=$plugin_dir")
    fi
    echo "== terraform init ${init_args[*]}"
    terraform -chdir="$infra" init "${init_args[@]}" "${color[@]}" >/dev/null

    echo "== terraform validate"
    terraform -chdir="$infra" validate "${color[@]}"

    echo "== terraform test"
    terraform -chdir="$infra" test "${color[@]}"
else
    skipped+=("terraform fmt/init/validate/test: terraform is not on PATH")
fi

checkov_bin="${CHECKOV:-}"
if [[ -z "$checkov_bin" && -x "$root/.venv-checkov/bin/checkov" ]]; then
    checkov_bin="$root/.venv-checkov/bin/checkov"
fi
if [[ -z "$checkov_bin" ]]; then
    checkov_bin="$(command -v checkov || true)"
fi
if [[ -n "$checkov_bin" ]]; then
    echo "== checkov ($checkov_bin)"
    "$checkov_bin" --skip-download --quiet --compact -d "$infra" --framework terraform
else
    skipped+=("checkov: set CHECKOV, create .venv-checkov or put checkov on PATH")
fi

for reason in "${skipped[@]}"; do
    echo "skipped: $reason"
done
echo "infra checks passed"
