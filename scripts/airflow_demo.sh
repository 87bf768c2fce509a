#!/usr/bin/env bash
# Both DAGs end to end with `airflow dags test` (in-process, no scheduler), in a temporary
# AIRFLOW_HOME, on the bundled sample: land a labelled batch and an unscored one, train, score.
# Usage: scripts/airflow_demo.sh [OUTPUT_DIR]   (default out/airflow-demo; re-runs start clean)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.venv/bin"
OUT="$(realpath -m "${1:-out/airflow-demo}")"
rm -rf "$OUT"
mkdir -p "$OUT"

# A throwaway Airflow home; tests pass BACKORDER_DEMO_AIRFLOW_HOME to keep it for more runs.
if [ -n "${BACKORDER_DEMO_AIRFLOW_HOME:-}" ]; then
    AIRFLOW_HOME="$BACKORDER_DEMO_AIRFLOW_HOME"
else
    AIRFLOW_HOME="$(mktemp -d -t backorder-airflow-XXXXXX)"
    trap 'rm -rf "$AIRFLOW_HOME"' EXIT
fi
export AIRFLOW_HOME
export PATH="$BIN:$PATH"
export AIRFLOW__CORE__DAGS_FOLDER="$PWD/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__PARALLELISM=2
export BACKORDER_HOME="$OUT/home"
export BACKORDER_LANDING_ROOT="$OUT/landing"
export BACKORDER_CONFIG="${BACKORDER_CONFIG:-}"
[ -n "$BACKORDER_CONFIG" ] || unset BACKORDER_CONFIG

echo "== airflow $(airflow version) in $AIRFLOW_HOME"
airflow db migrate >"$OUT/airflow-db-migrate.log" 2>&1 || { tail -20 "$OUT/airflow-db-migrate.log"; exit 1; }

backorder land --kind labelled --input data/sample/labelled.csv.gz --batch-id 20261101T000000Z
backorder land --kind unscored --input data/sample/new_batch.csv.gz --batch-id 20261102T000000Z

for dag in backorder_training backorder_batch_prediction; do
    echo "== airflow dags test $dag"
    if ! airflow dags test "$dag" >"$OUT/$dag.log" 2>&1; then
        tail -40 "$OUT/$dag.log"
        echo "error: $dag failed; full log in $OUT/$dag.log" >&2
        exit 1
    fi
    # `dags test` can exit 0 for a failed run: the run's final state is the verdict.
    state=$(grep "DagRun Finished: dag_id=$dag" "$OUT/$dag.log" | tail -1 | grep -o "state=[a-z_]*" || true)
    echo "   $dag: ${state:-no final state}"
    if [ "$state" != "state=success" ]; then
        grep -E "\[error|Traceback|Error:" "$OUT/$dag.log" | tail -20 >&2 || true
        echo "error: $dag did not succeed; full log in $OUT/$dag.log" >&2
        exit 1
    fi
done

echo
backorder batches
echo
echo "DAGs run:           backorder_training, backorder_batch_prediction"
echo "training report:    $(ls "$OUT"/landing/reports/training/*/report.html)"
echo "predictions:        $(ls "$OUT"/landing/predictions/*.parquet)"
echo "rejects:            $(ls "$OUT"/landing/rejects/*.parquet)"
echo "drift report:       $(ls "$OUT"/landing/reports/2*/drift_report.html)"
echo "manifest:           $OUT/landing/manifest/"
echo "task logs:          $OUT/backorder_training.log, $OUT/backorder_batch_prediction.log"
