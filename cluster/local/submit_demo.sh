#!/usr/bin/env bash
# Submit the demo batch to a running head (cluster/local/start_head.sh or `personalize stack up`).
# Usage: cluster/local/submit_demo.sh [BATCH_CONFIG]   (default: configs/batch/demo.yaml)
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG="${1:-configs/batch/demo.yaml}"
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
PY="${PYTHON:-$PWD/.venv/bin/python}"
# storage must be absolute (or s3://) under a job: the job runs in a temporary copy of this folder
exec "$(dirname "$PY")/ray" job submit --working-dir . --runtime-env cluster/runtime_env.yaml \
  -- "$PY" -m pipelines.batch "$CONFIG" "storage=${STORAGE:-$PWD/outputs/batch}"
