# Two commands on a fresh machine: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := out/demo
export BACKORDER_HOME ?= .backorder

.PHONY: setup demo serve test lint typecheck check bench bench-train bench-quality bench-tune bench-serve bench-scoring screenshot airflow-demo ops-check docs docs-build clean

setup: $(STAMP)

# Idempotent: re-runs only when the dependency pins or the package metadata change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/backorder train --data data/sample/labelled.csv.gz --output $(DEMO)/training
	$(BIN)/backorder evaluate --data data/sample/holdout.csv.gz --output $(DEMO)/evaluation
	$(BIN)/backorder predict --input data/sample/new_batch.csv.gz --output $(DEMO)/predictions.parquet
	@echo
	@echo "Demo outputs:"
	@echo "  training report    $(DEMO)/training/report.html"
	@echo "  evaluation report  $(DEMO)/evaluation/report.html (metrics: $(DEMO)/evaluation/metrics.json)"
	@echo "  predictions        $(DEMO)/predictions.parquet"
	@echo "  rejects            $(DEMO)/predictions.rejects.parquet"
	@echo "  model registry     $(BACKORDER_HOME)/mlflow.db (backorder models list)"

# Both Airflow DAGs end to end (`airflow dags test`, temporary AIRFLOW_HOME) on the bundled sample.
airflow-demo: setup
	scripts/airflow_demo.sh out/airflow-demo

# The web page and API on http://127.0.0.1:8000 for the champion `make demo` trained.
serve: setup
	$(BIN)/backorder serve

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: setup
	$(BIN)/ruff check src tests bench scripts dags deploy
	$(BIN)/ruff format --check src tests bench scripts dags deploy

typecheck: setup
	$(BIN)/mypy src

check: lint typecheck test

# The deployment files, offline: Dockerfile (hadolint), workflows (actionlint, which runs
# shellcheck on their scripts), Prometheus config, rules and rule tests (promtool), and the
# Terraform module (fmt, validate, test, checkov: scripts/check_infra.sh). The tests run these
# too; this target is the quick loop and what .ci/run calls before the tests.
# The Prometheus config with --syntax-only: its scrape token file exists only in the container
# (tests/deploy/test_observability.py checks a copy with a token in full).
ops-check: setup
	$(BIN)/hadolint Dockerfile
	$(BIN)/actionlint .github/workflows/*.yml
	shellcheck scripts/*.sh deploy/*/*.sh
	promtool check config --syntax-only deploy/prometheus/prometheus.yml
	promtool check rules deploy/prometheus/alerts.yml
	promtool test rules deploy/prometheus/alerts_test.yml deploy/prometheus/alerts_days_test.yml
	scripts/check_infra.sh

bench-train: setup
	$(BIN)/python bench/train_time.py

# Model comparison on the shared samples (~35 min on 2 cores) and the Optuna search behind the
# defaults (~20 min); both need ../shared and skip without it.
bench-quality: setup
	$(BIN)/python bench/quality.py --repeats 2 --feature-sets raw,all

bench-tune: setup
	$(BIN)/python bench/tune.py --trials 40

# Latency and throughput of `backorder serve` (trains on both shared samples when present).
bench-serve: setup
	$(BIN)/python bench/serve_latency.py

# Scoring throughput and peak memory, 1 M to 10 M up-sampled rows, every engine (~40 min; needs
# ../shared; trains the default model first when out/bench-scoring/home has none).
bench-scoring: setup
	$(BIN)/python bench/scoring.py

# Refresh the screenshot of the page in the docs (the browser test saves it).
screenshot: setup
	SAVE_SCREENSHOT=$(CURDIR)/docs/guide/web-page.png $(BIN)/python -m pytest -q tests/test_live_server.py -k browser_signs_in

# The documentation site (mkdocs.yml, docs/) with live reload on http://127.0.0.1:8001.
docs: setup
	$(BIN)/mkdocs serve -a 127.0.0.1:8001

# The site into out/site; --strict makes a broken link or anchor fail (CI runs this). The
# variable silences mkdocs-material 9.8's banner about MkDocs 2, which is not news per build.
docs-build: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Every benchmark; the ones that need ../shared say so and skip without it.
bench: setup
	$(BIN)/python bench/train_time.py --repeat 3
	$(BIN)/python bench/crossfile_quality.py
	$(BIN)/python bench/scoring.py
	$(BIN)/python bench/serve_latency.py

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .mypy_cache
