#!/usr/bin/env bash
# A Ray head that listens on 127.0.0.1 only (a single-node development cluster).
# Usage: cluster/local/start_head.sh [TEMP_DIR]      stop it with: ray stop
set -euo pipefail
TEMP_DIR="${1:-$PWD/.stack/ray-head}"
export RAY_USAGE_STATS_ENABLED=0
# On Linux Ray rewrites --node-ip-address=127.0.0.1 to the routable address unless this is set:
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
mkdir -p "$TEMP_DIR"
ray start --head --node-ip-address=127.0.0.1 --port=6390 \
  --dashboard-host=127.0.0.1 --dashboard-port=8265 \
  --num-cpus="${RAY_NUM_CPUS:-4}" --object-store-memory=1000000000 \
  --temp-dir="$TEMP_DIR" --disable-usage-stats \
  --min-worker-port=20000 --max-worker-port=20200
echo "Ray head on 127.0.0.1; submit with: RAY_ADDRESS=http://127.0.0.1:8265 cluster/local/submit_demo.sh"
