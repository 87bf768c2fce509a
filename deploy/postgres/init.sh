#!/bin/sh
# Creates one database and one owner role each for Airflow, MLflow, the product's tables
# (inputs and outputs) and the product's state store (API keys, sign-in sessions), and only
# what is missing: the postgres-init service runs it on every `docker compose up`, so a stack
# made before a component had its database gets it on the next start. It connects as the
# superuser with the libpq variables it is given (PGHOST, PGPASSWORD); passwords come from the
# environment (.env), never from this file. psql's :'name' quoting makes any password a safe
# SQL literal. An existing role keeps its password (change one with ALTER ROLE).
set -eu

for name in AIRFLOW_DB_PASSWORD MLFLOW_DB_PASSWORD BACKORDER_DB_PASSWORD \
    BACKORDER_STATE_DB_PASSWORD; do
    eval "value=\${$name:-}"
    if [ -z "$value" ]; then
        echo "init.sh: $name is not set (see .env.example)" >&2
        exit 1
    fi
done

create() {
    # $1: role and database name, $2: its password
    psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" \
        --dbname "${POSTGRES_DB:-postgres}" -v name="$1" -v password="$2" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'name', :'password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'name') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'name', :'name')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'name') \gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', :'name', :'name') \gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', :'name') \gexec
SQL
}

create airflow "$AIRFLOW_DB_PASSWORD"
create mlflow "$MLFLOW_DB_PASSWORD"
create backorder "$BACKORDER_DB_PASSWORD"
create backorder_state "$BACKORDER_STATE_DB_PASSWORD"
