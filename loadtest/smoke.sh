#!/usr/bin/env bash
# Load-test smoke: starts the local demo (deploy/local/demo.sh: 3 PostgreSQL shards with
# replicas, the marketplace data, cellgate) on free loopback ports, runs cellgate-loadtest
# against it for 30 s with 20 users, stops the demo and exits with the load test's code
# (0 only if no request failed).
# Usage: bash loadtest/smoke.sh [extra cellgate-loadtest options, e.g. --run-time 10s]
# Env: LOADTEST_BIN (skip the cargo build), SMOKE_REPORT (HTML report path).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET_DIR=${CARGO_TARGET_DIR:-target}
REPORT=${SMOKE_REPORT:-$TARGET_DIR/loadtest/smoke-report.html}
mkdir -p "$(dirname "$REPORT")"

if [ -z "${LOADTEST_BIN:-}" ]; then
  # --workspace, like CI's other cargo invocations, so shared dependencies keep one feature set.
  cargo build -q --workspace --bins
  LOADTEST_BIN=$TARGET_DIR/debug/cellgate-loadtest
fi

source scripts/lib/deps.sh   # free_port
DATA_PORT=$(free_port)
ADMIN_PORT=$(free_port)

LOG=$(mktemp /tmp/cellgate-smoke.XXXXXX)
DEMO_PID=""
stop_demo() {
  if [ -n "$DEMO_PID" ] && kill -0 "$DEMO_PID" 2>/dev/null; then
    kill -TERM "$DEMO_PID"
    wait "$DEMO_PID" 2>/dev/null || true
  fi
  rm -f "$LOG"
}
trap stop_demo EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "== starting the demo (data :$DATA_PORT, admin :$ADMIN_PORT); the first run builds a release binary"
bash deploy/local/demo.sh --data-port "$DATA_PORT" --admin-port "$ADMIN_PORT" > "$LOG" 2>&1 &
DEMO_PID=$!
READY=""
for _ in $(seq 1 1800); do  # up to 30 min: a cold release build on 2 cores takes several
  READY=$(grep -m1 '^cellgate demo ready:' "$LOG" || true)
  [ -n "$READY" ] && break
  kill -0 "$DEMO_PID" 2>/dev/null || { cat "$LOG" >&2; echo "demo exited before it was ready" >&2; exit 1; }
  sleep 1
done
[ -n "$READY" ] || { tail -50 "$LOG" >&2; echo "demo not ready in time" >&2; exit 1; }
DATA_URL=$(sed -n 's/.* data=\([^ ]*\).*/\1/p' <<< "$READY")
export CELLGATE_TOKEN
CELLGATE_TOKEN=$(sed -n 's/.* token=\([^ ]*\).*/\1/p' <<< "$READY")

echo "== cellgate-loadtest against $DATA_URL"
set +e
"$LOADTEST_BIN" --host "$DATA_URL" --users 20 --increase-rate 20 --run-time 30s \
  --report-file "$REPORT" --quiet "$@"
CODE=$?
set -e
echo "== report: $REPORT; load test exit code $CODE"
exit "$CODE"
