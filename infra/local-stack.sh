#!/usr/bin/env bash
# Development stack on loopback: an S3 endpoint (moto_server), an mlflow server whose artifacts
# live on that endpoint, and a Ray head with token authentication.
# Usage: infra/local-stack.sh start|stop|status     (state, logs and the Ray token in $STATE)
# Env: BIN (venv bin dir), STATE, S3_PORT, MLFLOW_PORT, RAY_DASHBOARD_PORT, RAY_CPUS,
#      RAY_AUTH_TOKEN (default: generated once into $STATE/ray_token).
set -euo pipefail

BIN=$(cd "${BIN:-.venv/bin}" && pwd)   # absolute: Ray job entrypoints run from other dirs
STATE=${STATE:-.carryover-stack}      # .carryover*/ is git-ignored: the token stays out of git
S3_PORT=${S3_PORT:-9000}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
MLFLOW_BUCKET=carryover-mlflow
DATA_BUCKET=carryover
S3_URL="http://127.0.0.1:$S3_PORT"
MLFLOW_URL="http://127.0.0.1:$MLFLOW_PORT"
RAY_URL="http://127.0.0.1:$RAY_DASHBOARD_PORT"

mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
# The venv's python/carryover first, also for the Ray head and the jobs it starts.
export PATH="$BIN:$PATH"
# moto accepts any credentials; mlflow's S3 client needs some and the endpoint override.
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export MLFLOW_S3_ENDPOINT_URL="$S3_URL" AWS_ENDPOINT_URL="$S3_URL"

ray_token() {
  # RAY_AUTH_TOKEN wins; else the token generated on first start, kept private in $STATE.
  if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
    printf '%s\n' "$RAY_AUTH_TOKEN"
    return
  fi
  if [ ! -s "$STATE/ray_token" ]; then
    (umask 077 && "$BIN/python" -c 'import secrets;print(secrets.token_hex(32))' >"$STATE/ray_token")
  fi
  cat "$STATE/ray_token"
}

known_token() { # the token in use, without generating one (stop/status)
  if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
    printf '%s\n' "$RAY_AUTH_TOKEN"
  elif [ -s "$STATE/ray_token" ]; then
    cat "$STATE/ray_token"
  fi
}

running() { # running NAME: its recorded pid is alive
  [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null
}

start_bg() { # start_bg NAME CMD...: own session (setsid) so stop can end its whole group
  local name=$1
  shift
  if running "$name"; then
    echo "$name already running (pid $(cat "$STATE/$name.pid"))"
    return
  fi
  setsid "$@" >"$STATE/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/$name.pid"
}

stop_bg() { # stop_bg NAME: TERM the process group started by start_bg, by its recorded pid
  local name=$1 pid
  [ -f "$STATE/$name.pid" ] || return 0
  pid=$(cat "$STATE/$name.pid")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  rm -f "$STATE/$name.pid"
  echo "stopped $name (pid $pid)"
}

wait_http() { # wait_http NAME URL SECONDS: until URL answers (any HTTP status)
  "$BIN/python" - "$1" "$2" "$3" <<'PY'
import sys, time, urllib.error, urllib.request
name, url, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = time.monotonic() + limit
while True:
    try:
        urllib.request.urlopen(url, timeout=2)
        break
    except urllib.error.HTTPError:
        break  # it answers: up
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"{name} did not answer at {url} within {limit:.0f} s")
        time.sleep(0.25)
PY
}

make_buckets() {
  "$BIN/python" - "$S3_URL" "$MLFLOW_BUCKET" "$DATA_BUCKET" <<'PY'
import sys
import boto3

url, *buckets = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
for b in buckets:
    if b not in have:
        s3.create_bucket(Bucket=b)
PY
}

print_exports() {
  cat <<EOF
S3:     $S3_URL        buckets s3://$MLFLOW_BUCKET (MLflow artifacts), s3://$DATA_BUCKET (data)
MLflow: $MLFLOW_URL
Ray:    $RAY_URL  (token auth; token in $STATE/ray_token)

Client environment (also written to $STATE/env: source it):
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/ray_token
    # or: export RAY_AUTH_TOKEN=\$(cat $STATE/ray_token)
  export AWS_ENDPOINT_URL=$S3_URL AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
  export MLFLOW_TRACKING_URI=$MLFLOW_URL
A config pointing at this stack: $STATE/upgrade.yaml (gallery and images on S3). Then:
  carryover data prepare --source digits --out s3://$DATA_BUCKET/images/digits \\
    --config $STATE/upgrade.yaml
  carryover submit --address $RAY_URL --config $STATE/upgrade.yaml --follow
  carryover jobs list --address $RAY_URL
EOF
}

write_config() { # a carryover config for this stack; every other key keeps its default
  [ -f "$STATE/upgrade.yaml" ] && return 0
  cat >"$STATE/upgrade.yaml" <<EOF
# Written by infra/local-stack.sh; edit freely (kept across restarts).
gallery_name: digits
workdir: $STATE/work
gallery: s3://$DATA_BUCKET/galleries/digits
images: s3://$DATA_BUCKET/images/digits
storage: {endpoint_url: "$S3_URL"}
tracking: {uri: "$MLFLOW_URL"}
ray: {address: null}  # a submitted job joins the head through RAY_ADDRESS
EOF
}

write_env() {
  (umask 077 && cat >"$STATE/env" <<EOF
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$STATE/ray_token
export AWS_ENDPOINT_URL=$S3_URL
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export MLFLOW_TRACKING_URI=$MLFLOW_URL
EOF
  )
}

case "${1:-start}" in
  start)
    start_bg s3 "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT"
    wait_http "S3 endpoint" "$S3_URL" 30
    make_buckets
    start_bg mlflow "$BIN/mlflow" server \
      --backend-store-uri "sqlite:///$STATE/mlflow.db" \
      --artifacts-destination "s3://$MLFLOW_BUCKET/artifacts" --serve-artifacts \
      --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
    RAY_AUTH_TOKEN=$(ray_token)
    # Keep the token in $STATE/ray_token also when it came from the environment: clients
    # read it through RAY_AUTH_TOKEN_PATH (see $STATE/env).
    (umask 077 && printf '%s\n' "$RAY_AUTH_TOKEN" >"$STATE/ray_token")
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN
    "$BIN/ray" start --head --dashboard-host 127.0.0.1 --dashboard-port "$RAY_DASHBOARD_PORT" \
      --num-cpus "${RAY_CPUS:-2}" >"$STATE/ray.log" 2>&1 \
      || { echo "ray start failed; see $STATE/ray.log" >&2; tail -n 20 "$STATE/ray.log" >&2; exit 1; }
    wait_http "mlflow server" "$MLFLOW_URL/health" 60
    write_env
    write_config
    print_exports
    ;;
  stop)
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(known_token) "$BIN/ray" stop >/dev/null 2>&1 || true
    echo "stopped ray"
    stop_bg mlflow
    stop_bg s3
    ;;
  status)
    for name in s3 mlflow; do
      if running "$name"; then
        echo "$name: running (pid $(cat "$STATE/$name.pid"), log $STATE/$name.log)"
      else
        echo "$name: stopped"
      fi
    done
    # The dashboard with our token: 200 = our head runs; 401/403 = another one holds the port.
    "$BIN/python" - "$RAY_URL" "$(known_token)" <<'PY'
import sys, urllib.error, urllib.request
url, token = sys.argv[1], sys.argv[2]
req = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
try:
    with urllib.request.urlopen(req, timeout=3):
        print(f"ray: running (dashboard {url})")
except urllib.error.HTTPError as e:
    print(f"ray: a dashboard at {url} rejects this stack's token (HTTP {e.code})")
except OSError:
    print("ray: stopped")
PY
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
