#!/usr/bin/env bash
# Runs the README's demo command on free ports, pastes every curl example it prints exactly as
# printed, checks each answers JSON without an error; then starts the goose load test
# (cellgate-loadtest, as loadtest/smoke.sh) and, while it runs, the printed live-migration lines
# exactly as printed (each must exit 0: its migration reached `done`); the load test must end
# with 0 failed requests. Then it stops the demo with SIGTERM and checks that nothing is left
# running. Used by .ci/run.
# Env: LOADTEST_BIN (skip the cargo build of cellgate-loadtest).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/deps.sh
ensure_rust

if [ -z "${LOADTEST_BIN:-}" ]; then
  # Before the demo starts, so the build does not compete with it. --workspace, like CI's other
  # cargo invocations, so shared dependencies keep one feature set.
  echo "== building cellgate-loadtest"
  cargo build -q --workspace --bins
  LOADTEST_BIN=${CARGO_TARGET_DIR:-target}/debug/cellgate-loadtest
fi

OUT=$(mktemp)
LOAD_LOG=$(mktemp)
LOAD_REPORT=$(mktemp --suffix=.html)
DATA_PORT=$(free_port)
ADMIN_PORT=$(free_port)
bash deploy/local/demo.sh --data-port "$DATA_PORT" --admin-port "$ADMIN_PORT" > "$OUT" 2>&1 &
DEMO=$!
LOAD=""
stop() {
  if [ -n "$LOAD" ]; then kill -TERM "$LOAD" 2>/dev/null || true; wait "$LOAD" 2>/dev/null || true; fi
  kill -TERM "$DEMO" 2>/dev/null || true; wait "$DEMO" 2>/dev/null || true
}
trap 'stop; rm -f "$OUT" "$LOAD_LOG" "$LOAD_REPORT"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for _ in $(seq 1 1800); do
  grep -q '^cellgate demo ready: ' "$OUT" && break
  kill -0 "$DEMO" 2>/dev/null || { cat "$OUT" >&2; echo "demo exited early" >&2; exit 1; }
  sleep 0.5
done
grep -q '^cellgate demo ready: ' "$OUT" || { cat "$OUT" >&2; echo "demo not ready in 15 min" >&2; exit 1; }
grep '^cellgate demo ready: ' "$OUT"

# Every printed curl command (with its continuation line), run as printed.
n=0
while IFS= read -r -d $'\0' cmd; do
  n=$((n + 1))
  body=$(bash -c "$cmd")
  if ! printf '%s' "$body" | jq -e 'type == "object" and (has("error") | not)' >/dev/null; then
    echo "example $n failed:"; echo "$cmd"; echo "$body"; exit 1
  fi
  echo "example $n ok: $(printf '%s' "$body" | head -c 160)"
done < <(awk '/^curl /{cmd=$0; while (cmd ~ /\\$/) { getline line; cmd=cmd "\n" line } printf "%s%c", cmd, 0}' "$OUT")
[ "$n" -ge 4 ] || { echo "expected at least 4 examples, found $n" >&2; exit 1; }

# The printed live-migration example (a busy cell moved away and back), run as printed while the
# goose load writes to it.
mapfile -t MOVES < <(grep '^\./target/release/cellgate migrate ' "$OUT" || true)
if [ "${#MOVES[@]}" -eq 0 ] && grep -q '^# (no live migration example' "$OUT"; then
  if [ "${CI:-}" = true ]; then
    cat "$OUT" >&2
    echo "CI: the demo ran without MongoDB (SecantusDB could not be installed), so its migration example did not run" >&2
    exit 1
  fi
  MIGRATIONS="SKIPPED migration example: the demo runs without MongoDB (no SecantusDB)"
  echo "$MIGRATIONS"
else
  [ "${#MOVES[@]}" -ge 2 ] || { cat "$OUT" >&2; echo "expected the migration example (2 lines), found ${#MOVES[@]}" >&2; exit 1; }
  READY=$(grep -m1 '^cellgate demo ready: ' "$OUT")
  DATA_URL=$(sed -n 's/.* data=\([^ ]*\).*/\1/p' <<< "$READY")
  # The token goes to the load test in its environment, never on its command line.
  CELLGATE_TOKEN=$(sed -n 's/.* token=\([^ ]*\).*/\1/p' <<< "$READY") \
    "$LOADTEST_BIN" --host "$DATA_URL" --users 20 --increase-rate 20 --run-time 30s \
    --report-file "$LOAD_REPORT" --quiet > "$LOAD_LOG" 2>&1 &
  LOAD=$!
  sleep 5   # every user started (20 per second) and writing
  kill -0 "$LOAD" 2>/dev/null || { cat "$LOAD_LOG" >&2; echo "the load test ended before the migrations started" >&2; exit 1; }
  holds=()
  for cmd in "${MOVES[@]}"; do
    echo "migration: $cmd"
    if ! final=$(bash -c "$cmd"); then
      echo "$final"; echo "migration failed (exit code not 0): $cmd" >&2; exit 1
    fi
    hold=$(printf '%s' "$final" | jq -r '"\(.from) -> \(.to): state \(.state), rows_copied \(.rows_copied), hold_ms_max \(.hold_ms_max)"')
    echo "migration ok: $hold"
    holds+=("$(printf '%s' "$final" | jq -r '"\(.from)->\(.to) \(.hold_ms_max) ms"')")
  done
  # The moves must have happened under the load, not after it.
  kill -0 "$LOAD" 2>/dev/null || { cat "$LOAD_LOG" >&2; echo "the load test ended before the migrations did" >&2; exit 1; }
  set +e
  wait "$LOAD"
  code=$?
  set -e
  LOAD=""
  summary=$(grep -m1 '^cellgate-loadtest summary: ' "$LOAD_LOG" | sed 's/ | .*//' || true)
  if [ "$code" -ne 0 ]; then
    cat "$LOAD_LOG" >&2; echo "the load test failed (exit code $code) while the cell moved" >&2; exit 1
  fi
  MIGRATIONS="${#MOVES[@]} migrations done under load (hold_ms_max: $(IFS=,; echo "${holds[*]}" | sed 's/,/, /g')); load test exit 0: ${summary#cellgate-loadtest summary: }"
  echo "$MIGRATIONS"
fi

stop
trap 'rm -f "$OUT" "$LOAD_LOG" "$LOAD_REPORT"' EXIT
grep -q '^cellgate demo stopped' "$OUT" || { tail -n 20 "$OUT" >&2; echo "demo did not stop cleanly" >&2; exit 1; }
# Patterns name the demo's own folder: tests of other checkouts may run clusters and peers too.
if pgrep -f "cellgate serve --config /tmp/cellgate-demo" >/dev/null \
  || pgrep -f "cellgate-cluster up .*--state-file /tmp/cellgate-demo" >/dev/null \
  || pgrep -f "secantusd-py .*--storage-path /tmp/cellgate-demo" >/dev/null; then
  echo "demo left processes running" >&2; exit 1
fi
echo "demo smoke: $n examples ok; $MIGRATIONS; stopped cleanly"
