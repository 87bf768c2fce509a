# syntax=docker/dockerfile:1
# One image for every process of the product: `backorder serve` by default, and each Airflow 3
# component (api-server, scheduler, dag-processor, triggerer) with the entrypoint overridden.
#
#   docker build -t backorder:dev .                      # runtime + the `pipelines` extra (Airflow)
#   docker build --build-arg EXTRAS= -t backorder:web .  # the package alone, no Airflow
#   docker run --rm -p 127.0.0.1:8000:8000 -v backorder-home:/var/lib/backorder backorder:dev
#
# Compose runs one process per container, from this image:
#   web:        (defaults)  backorder serve --host 0.0.0.0 --port 8000, HEALTHCHECK below
#   scheduler:  entrypoint: ["airflow"]  command: ["scheduler"]
#               healthcheck: airflow jobs check --job-type SchedulerJob --local
#   api-server: entrypoint: ["airflow"]  command: ["api-server", "--port", "8080"]
#               healthcheck: python urlopen http://127.0.0.1:8080/api/v2/monitor/health
#   dag-processor / triggerer: as the scheduler, with DagProcessorJob / TriggererJob.
# The HEALTHCHECK below probes the web app, so every Airflow service must override it (or set
# `healthcheck: {disable: true}`), else Docker marks those containers unhealthy.

# The same base, pinned by version and by digest of the multi-architecture index, for both
# stages: the venv built in the first stage refers to /usr/local/bin/python3.11 of this image.
# Bump the tag and the digest together, in both FROM lines.
FROM python:3.11.17-slim-bookworm@sha256:2333bd330d12de02514770b3585cad313644316047cdee24a7acfdece6de6efb AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# Extras of the package to install, comma-separated ("" for none). `pipelines` is Airflow, so
# the same image runs the DAGs; dev and quality are for development and benchmarks only.
ARG EXTRAS=pipelines

WORKDIR /build
COPY pyproject.toml constraints.txt ./

# Dependencies first, in their own layer, so a change to src/ alone does not reinstall ~1 GB.
# Wheels only: nothing is compiled, so the image needs no compiler. The install of the package
# below resolves again against the same constraints, so this layer is only a cache.
RUN python -m venv /opt/venv \
    && python -c "import os, tomllib; \
project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [name for name in os.environ.get('EXTRAS', '').split(',') if name]; \
wanted = project['dependencies'] + [r for e in extras for r in project['optional-dependencies'][e]]; \
print('\n'.join(r for r in wanted if not r.startswith('backorder')))" > requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --only-binary=:all: \
        -c constraints.txt -r requirements.txt

# README.md is the package's readme (pyproject `readme`), so building the wheel needs it.
COPY README.md ./
COPY src/ ./src/
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && wheel="$(echo /wheels/backorder-*.whl)" \
    && /opt/venv/bin/pip install --no-cache-dir --only-binary=:all: \
        -c constraints.txt "${wheel}${EXTRAS:+[${EXTRAS}]}" \
    && /opt/venv/bin/pip check


FROM python:3.11.17-slim-bookworm@sha256:2333bd330d12de02514770b3585cad313644316047cdee24a7acfdece6de6efb AS runtime

LABEL org.opencontainers.image.title="backorder" \
      org.opencontainers.image.description="Predicts which SKUs go on backorder: web app, API, CLI and Airflow DAGs" \
      org.opencontainers.image.licenses="Apache-2.0"

# libgomp1: LightGBM's OpenMP runtime (its wheel does not bundle it). Nothing else is needed:
# psycopg-binary bundles libpq, llvmlite (lleaves) bundles LLVM and needs only libstdc++6 and
# zlib, which the base already has. The exact version is bookworm's; when Debian replaces it,
# the build fails here and the pin is bumped (apt-cache policy libgomp1).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1=12.2.0-14+deb12u1 \
    && rm -rf /var/lib/apt/lists/*

# A fixed UID/GID, so volumes and Kubernetes' runAsUser can name it; the data home and
# AIRFLOW_HOME (logs, airflow.cfg) belong to it, the code and the DAGs stay root-owned.
RUN groupadd --system --gid 10001 backorder \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/backorder \
        --no-create-home --shell /usr/sbin/nologin backorder \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/backorder /opt/airflow \
        /opt/airflow/logs /opt/airflow/auth

COPY --from=builder /opt/venv /opt/venv
COPY dags/ /opt/airflow/dags/

# GIT_PYTHON_REFRESH: MLflow imports GitPython, and the image has no git (nothing to record).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/backorder \
    BACKORDER_HOME=/var/lib/backorder \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/airflow/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    GIT_PYTHON_REFRESH=quiet

WORKDIR /var/lib/backorder
# backorder (10001:10001), by number so that a runtime can verify it is not root.
USER 10001:10001

EXPOSE 8000

# /healthz answers 200 once a model is loaded (the server refuses to start without one). No curl
# in the slim base: Python's urllib exits non-zero on a refused connection or any non-2xx.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# Inside a container the server must listen on 0.0.0.0; compose publishes it on 127.0.0.1 only.
ENTRYPOINT ["backorder"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
