#!/bin/sh
# One-off set-up of Airflow (the compose service airflow-init): migrate the metadata database,
# then write the simple auth manager's passwords file from the environment, so the admin's
# password lives in .env and a volume, never in the image. Safe to re-run: it changes the
# password to the one in .env.
set -eu

: "${AIRFLOW_ADMIN_USER:?set AIRFLOW_ADMIN_USER in .env}"
: "${AIRFLOW_ADMIN_PASSWORD:?set AIRFLOW_ADMIN_PASSWORD in .env}"
: "${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:?}"

airflow db migrate

# Python, not echo: any character in the password ends up as valid JSON.
python - <<'PY'
import json
import os
from pathlib import Path

path = Path(os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
path.parent.mkdir(parents=True, exist_ok=True)
staged = path.with_name(path.name + ".tmp")
staged.write_text(
    json.dumps({os.environ["AIRFLOW_ADMIN_USER"]: os.environ["AIRFLOW_ADMIN_PASSWORD"]}) + "\n"
)
staged.chmod(0o600)
staged.replace(path)
print(f"airflow-init: passwords file {path} holds user {os.environ['AIRFLOW_ADMIN_USER']}")
PY
