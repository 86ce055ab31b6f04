#!/usr/bin/env bash
# Development stack on loopback: a Ray head, an mlflow server and an S3 endpoint (moto_server).
# Usage: infra/local-stack.sh start|stop   (state in ./.stack)
set -euo pipefail
BIN=${BIN:-.venv/bin}
STATE=${STATE:-.stack}
S3_PORT=${S3_PORT:-9000}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
mkdir -p "$STATE"
case "${1:-start}" in
  start)
    "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"$STATE/s3.log" 2>&1 &
    echo $! >"$STATE/s3.pid"
    "$BIN/mlflow" server --backend-store-uri "sqlite:///$PWD/$STATE/mlflow.db" \
      --artifacts-destination "$PWD/$STATE/artifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" \
      --workers 1 >"$STATE/mlflow.log" 2>&1 &
    echo $! >"$STATE/mlflow.pid"
    "$BIN/ray" start --head --num-cpus "${RAY_CPUS:-2}" --dashboard-host 127.0.0.1 >"$STATE/ray.log"
    echo "S3:     http://127.0.0.1:$S3_PORT   (AWS_ACCESS_KEY_ID/SECRET: any value)"
    echo "MLflow: http://127.0.0.1:$MLFLOW_PORT"
    echo "Ray:    RAY_ADDRESS=auto  (dashboard http://127.0.0.1:8265)"
    ;;
  stop)
    "$BIN/ray" stop || true
    for p in s3 mlflow; do [ -f "$STATE/$p.pid" ] && kill "$(cat "$STATE/$p.pid")" 2>/dev/null || true; done
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
