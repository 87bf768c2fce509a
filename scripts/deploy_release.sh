#!/bin/sh
# Installs one release of the compose stack on the app host and starts it. Runs as root through
# SSM send-command: .github/workflows/release.yml puts the checked values below in front of this
# file and sends the whole as the command. Steps:
#   1. download releases/<tag>/stack.tar.gz, check its SHA-256 (what the release job uploaded)
#      and what it holds (compose.yaml, compose.aws.yaml, .env.example, deploy/; plain files, no
#      .env), and extract it into a staging directory inside APP_DIR (same file system: the swaps
#      below are renames);
#   2. stop, changing nothing but .env.example, unless APP_DIR/.env exists (it holds the stack's
#      secrets, an operator writes it on the host, CI never ships it) and INFRA_ENV names the
#      region and the buckets (user_data writes it from Terraform's values);
#   3. check the new compose.yaml with compose.aws.yaml merged over it (the AWS stack: the
#      Terraform buckets and the instance role, no SeaweedFS) against that .env, then swap both
#      in, and deploy/ when its files differ (the old ones stay as *.previous); .env is never
#      replaced;
#   4. record the image, the infra settings and COMPOSE_FILE in .env, log in to ECR, pull, start,
#      restart the services that mount a changed deploy/ (a bind mount is resolved when a
#      container starts), wait for the health URL.
#
# Input (shell variables): RELEASE_TAG (the image tag), BACKORDER_IMAGE (<registry>/<repository>;
# compose.yaml runs ${BACKORDER_IMAGE}:${BACKORDER_IMAGE_TAG}),
# STACK_URI (s3://...), STACK_SHA256, AWS_REGION, HEALTH_URL; optional APP_DIR (/opt/backorder),
# INFRA_ENV (/etc/backorder/infra.env), HEALTH_ATTEMPTS (60) and HEALTH_INTERVAL (5 seconds).
set -eu

fail() {
    echo "deploy: $*" >&2
    exit 1
}

# Every value ends up in sed, .env or a URL: letters, digits and . _ : / @ - only.
checked() {
    case $2 in
        '' | *[!A-Za-z0-9_.:/@-]*) fail "refusing $1='$2' (only letters, digits and . _ : / @ -)" ;;
    esac
}
checked RELEASE_TAG "${RELEASE_TAG:-}"
checked BACKORDER_IMAGE "${BACKORDER_IMAGE:-}"
checked STACK_URI "${STACK_URI:-}"
checked AWS_REGION "${AWS_REGION:-}"
checked HEALTH_URL "${HEALTH_URL:-}"
case ${STACK_SHA256:-} in
    *[!0-9a-f]* | '') fail "refusing STACK_SHA256='${STACK_SHA256:-}' (64 hex digits)" ;;
esac
[ "${#STACK_SHA256}" -eq 64 ] || fail "refusing STACK_SHA256='$STACK_SHA256' (64 hex digits)"

app_dir=${APP_DIR:-/opt/backorder}
[ -d "$app_dir" ] || fail "$app_dir does not exist: the instance's user_data creates it"
umask 022

# 1. Download, verify, extract.
staging=$(mktemp -d "$app_dir/.release.XXXXXX")
trap 'rm -rf "$staging"' EXIT
bundle="$staging/stack.tar.gz"
aws s3 cp --only-show-errors --region "$AWS_REGION" "$STACK_URI" "$bundle"
echo "$STACK_SHA256  $bundle" | sha256sum -c --status - ||
    fail "$STACK_URI is not the archive the release uploaded (SHA-256 differs from $STACK_SHA256)"

tar -tzf "$bundle" >"$staging/members"
unexpected=$(grep -Ev '^(compose(\.aws)?\.yaml|\.env\.example|deploy/[A-Za-z0-9_./-]*)$' "$staging/members" || true)
unsafe=$(grep -E '(^|/)\.\.(/|$)|(^|/)\.env$|^deploy/(.*/)?\.env\.' "$staging/members" || true)
[ -z "$unexpected$unsafe" ] ||
    fail "refusing $STACK_URI: it holds $(echo "$unexpected $unsafe" | tr '\n' ' ')(only compose.yaml, compose.aws.yaml, .env.example and deploy/; never .env)"
# Plain files and directories only: a link could point the extraction outside the stack.
if tar -tvzf "$bundle" | cut -c1 | grep -qv '^[-d]$'; then
    fail "refusing $STACK_URI: it holds links or special files"
fi
mkdir "$staging/stack"
tar -xzf "$bundle" -C "$staging/stack" --no-same-owner --no-same-permissions
for part in compose.yaml compose.aws.yaml deploy; do
    [ -e "$staging/stack/$part" ] || fail "refusing $STACK_URI: $part is missing"
done

# 2. The operator's .env: secrets never come from CI.
if [ -f "$staging/stack/.env.example" ]; then
    mv -f "$staging/stack/.env.example" "$app_dir/.env.example"
fi
if [ ! -f "$app_dir/.env" ]; then
    fail "$app_dir/.env is missing, so the stack was not changed. Create it on the host from $app_dir/.env.example (cp $app_dir/.env.example $app_dir/.env, fill in every secret, chmod 600), then run the release again."
fi

# Terraform's values, as user_data wrote them: the region and the two product buckets. Read as
# data (never sourced) and checked like the inputs above.
infra_env=${INFRA_ENV:-/etc/backorder/infra.env}
[ -f "$infra_env" ] ||
    fail "$infra_env is missing, so the stack was not changed: the instance's user_data writes it (infra/user_data.sh.tftpl)"
infra_setting() {
    infra_value=$(sed -n "s/^$1=//p" "$infra_env" | tail -n 1)
    [ -n "$infra_value" ] ||
        fail "$infra_env has no $1=..., so the stack was not changed (infra/user_data.sh.tftpl writes it)"
    checked "$1" "$infra_value"
}
infra_setting AWS_DEFAULT_REGION
stack_region=$infra_value
infra_setting BACKORDER_BUCKET
data_bucket=$infra_value
infra_setting MLFLOW_BUCKET
mlflow_bucket=$infra_value

# compose.aws.yaml removes compose.yaml's S3 keys and endpoints with !reset (Compose 2.24.4).
compose_version=$(docker compose version --short) || fail "docker compose is not installed"
compose_version=${compose_version#v}
[ "$(printf '%s\n' 2.24.4 "$compose_version" | sort -V | head -n 1)" = 2.24.4 ] ||
    fail "Docker Compose $compose_version cannot merge compose.aws.yaml (its !reset needs 2.24.4 or later); nothing was changed"

# 3. The new pair must resolve against this .env (and the values step 4 writes into it) before
# anything is swapped.
cd "$app_dir"
AWS_DEFAULT_REGION="$stack_region" BACKORDER_BUCKET="$data_bucket" MLFLOW_BUCKET="$mlflow_bucket" \
    BACKORDER_IMAGE="$BACKORDER_IMAGE" BACKORDER_IMAGE_TAG="$RELEASE_TAG" \
    docker compose --project-directory "$app_dir" \
    -f "$staging/stack/compose.yaml" -f "$staging/stack/compose.aws.yaml" config --quiet ||
    fail "the compose.yaml and compose.aws.yaml of $RELEASE_TAG do not resolve with $app_dir/.env (see above); nothing was changed"
for file in compose.yaml compose.aws.yaml; do
    if [ -e "$file" ]; then cp -p "$file" "$file.previous"; fi
    mv -f "$staging/stack/$file" "$file"
done
# Same files: keep the directory that running containers have mounted. Different: swap it in
# whole, and restart what mounts it (step 4) so nothing keeps reading deploy.previous.
deploy_changed=no
if [ ! -d deploy ]; then
    mv "$staging/stack/deploy" deploy
elif ! diff -r deploy "$staging/stack/deploy" >/dev/null 2>&1; then
    rm -rf deploy.previous
    mv deploy deploy.previous
    mv "$staging/stack/deploy" deploy
    deploy_changed=yes
fi

# 4. The image, then the stack.
set_env() {
    if grep -q "^$1=" .env; then
        sed -i "s|^$1=.*|$1=$2|" .env
    else
        printf '%s=%s\n' "$1" "$2" >>.env
    fi
}
echo "release: $(sed -n 's/^BACKORDER_IMAGE_TAG=//p' .env) -> $RELEASE_TAG"
set_env BACKORDER_IMAGE_TAG "$RELEASE_TAG"
set_env BACKORDER_IMAGE "$BACKORDER_IMAGE"
# Terraform's buckets replace the local names .env.example holds; COMPOSE_FILE makes an
# operator's plain `docker compose ...` in APP_DIR read the same pair as this script.
set_env AWS_DEFAULT_REGION "$stack_region"
set_env BACKORDER_BUCKET "$data_bucket"
set_env MLFLOW_BUCKET "$mlflow_bucket"
set_env COMPOSE_FILE compose.yaml:compose.aws.yaml

# The AWS stack: compose.yaml with compose.aws.yaml merged over it.
stack() {
    docker compose -f compose.yaml -f compose.aws.yaml "$@"
}

aws ecr get-login-password --region "$AWS_REGION" |
    docker login --username AWS --password-stdin "${BACKORDER_IMAGE%%/*}"
stack pull
stack up -d --remove-orphans
if [ "$deploy_changed" = yes ]; then
    # python3 is on the host (cloud-init needs it); compose prints bind sources as absolute paths.
    mounting=$(stack config --format json | python3 -c '
import json, sys
deploy = sys.argv[1] + "/deploy"
services = json.load(sys.stdin)["services"]
print(" ".join(sorted({
    name for name, service in services.items()
    for volume in service.get("volumes", [])
    if volume.get("type") == "bind"
    and (volume["source"] == deploy or volume["source"].startswith(deploy + "/"))
})))' "$app_dir")
    if [ -n "$mounting" ]; then
        echo "deploy/ changed: restarting $mounting"
        # shellcheck disable=SC2086 # one word per service name
        stack restart $mounting
    fi
fi
stack ps

attempt=0
while [ "$attempt" -lt "${HEALTH_ATTEMPTS:-60}" ]; do
    if curl -fsS --max-time 5 "$HEALTH_URL"; then
        echo
        exit 0
    fi
    attempt=$((attempt + 1))
    sleep "${HEALTH_INTERVAL:-5}"
done
echo "deploy: not healthy after $attempt attempts: $HEALTH_URL" >&2
stack logs --tail 100 >&2
exit 1
