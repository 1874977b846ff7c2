#!/usr/bin/env bash
# Runs the README's demo command on free ports, pastes every curl example it prints exactly as
# printed, checks each answers JSON without an error (`curl -si` examples: the body after the
# headers), runs the example that asks for the read cache a second time and requires its
# `Cache-Status` to say `hit`, and checks through /admin/cache that the cache runs with the demo's
# Redis (in CI a demo without Redis fails); then starts the goose load test
# (cellgate-loadtest, as loadtest/smoke.sh) and, while it runs, the printed live-migration lines
# exactly as printed (each must exit 0: its migration reached `done`); the load test must end
# with 0 failed requests (its summary gives the cache's hit ratio). Then it stops the demo with
# SIGTERM and checks that nothing is left running (its Redis included). Used by .ci/run.
# Env: LOADTEST_BIN (skip the cargo build of cellgate-loadtest).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/deps.sh
source scripts/lib/smoke.sh
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
CACHED=""        # the example that asks for the read cache ("cache": {...})
CACHED_FIRST=""  # its first Cache-Status
CACHE_ADMIN=""   # the /admin/cache example
while IFS= read -r -d $'\0' cmd; do
  n=$((n + 1))
  out=$(bash -c "$cmd")
  body=$out
  if [[ $cmd == "curl -si "* ]]; then body=$(response_body "$out"); fi
  if ! printf '%s' "$body" | jq -e 'type == "object" and (has("error") | not)' >/dev/null; then
    echo "example $n failed:"; echo "$cmd"; echo "$out"; exit 1
  fi
  echo "example $n ok: $(printf '%s' "$body" | head -c 160)"
  if [[ $cmd == *'"cache": {'* ]]; then
    [[ $cmd == "curl -si "* ]] || { echo "example $n asks for the cache but prints no headers (curl -si)" >&2; exit 1; }
    CACHED=$cmd
    CACHED_FIRST=$(cache_status "$out")
  fi
  if [[ $cmd == *"/admin/cache "* ]]; then CACHE_ADMIN=$cmd; fi
done < <(curl_examples "$OUT")
[ "$n" -ge 4 ] || { echo "expected at least 4 examples, found $n" >&2; exit 1; }

# The read cache, end to end: the cached example again must be a hit (the demo waits for the
# cache to serve before its ready line), and the cache must run with the demo's Redis.
[ -n "$CACHED" ] || { echo "no printed example asks for the read cache" >&2; exit 1; }
[ -n "$CACHE_ADMIN" ] || { echo "no printed /admin/cache example" >&2; exit 1; }
out=$(bash -c "$CACHED")
CACHED_SECOND=$(cache_status "$out")
printf '%s' "$(response_body "$out")" | jq -e '.rows | length == 5' >/dev/null ||
  { echo "the cached example's second answer:"; echo "$out"; exit 1; }
case "$CACHED_SECOND" in
  "cellgate; hit"*) ;;
  *) echo "the cached example's second answer is not a hit: Cache-Status: ${CACHED_SECOND:-none} (first: ${CACHED_FIRST:-none})" >&2
     exit 1 ;;
esac
CACHE="cached example: \"${CACHED_FIRST:-none}\" then \"$CACHED_SECOND\""
if grep -q '^== Redis could not' "$OUT"; then
  if [ "${CI:-}" = true ]; then
    cat "$OUT" >&2
    echo "CI: the demo ran without Redis (redis-server could not be installed or started): the cache was L1 only" >&2
    exit 1
  fi
  CACHE="$CACHE (L1 only: the demo ran without Redis)"
elif ! bash -c "$CACHE_ADMIN" | jq -e '.enabled and .mode == "l1+redis" and .serving and .redis.subscribed' >/dev/null; then
  bash -c "$CACHE_ADMIN" >&2; echo; echo "the read cache does not serve with the demo's Redis" >&2; exit 1
else
  CACHE="$CACHE, with Redis"
fi
echo "$CACHE"

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
  grep -m1 '^cellgate-loadtest summary: ' "$LOAD_LOG" | sed -n 's/.* | \(cache .*\)/load test \1/p' || true
  bash -c "$CACHE_ADMIN" | jq -r '"cellgate cache after the load (\(.mode)): " + (.counters | to_entries | map("\(.key)=\(.value)") | join(" "))
    + (if .redis then .redis | " | redis: sessions=\(.sessions) errors=\(.errors) bumps_owed_total=\(.bumps_owed_total) generation_bumps=\(.generation_bumps) bump_to_visible_ms_p99=\(.bump_to_visible_ms.p99)" else "" end)' || true
fi

stop
trap 'rm -f "$OUT" "$LOAD_LOG" "$LOAD_REPORT"' EXIT
grep -q '^cellgate demo stopped' "$OUT" || { tail -n 20 "$OUT" >&2; echo "demo did not stop cleanly" >&2; exit 1; }
# Patterns name this demo's own work directory (from its "Try these (...; DIR/auth.header holds"
# line): tests of other checkouts, and other demos, may run clusters and peers too.
DEMO_WORK=$(sed -n 's#^Try these (copy and paste; \(/tmp/cellgate-demo\.[^/]*\)/auth\.header .*#\1#p' "$OUT" | head -n 1)
DEMO_WORK=${DEMO_WORK:-/tmp/cellgate-demo}
if pgrep -f "cellgate serve --config $DEMO_WORK" >/dev/null \
  || pgrep -f "cellgate-cluster up .*--state-file $DEMO_WORK" >/dev/null \
  || pgrep -f "secantusd-py .*--storage-path $DEMO_WORK" >/dev/null \
  || pgrep -f "redis-server $DEMO_WORK" >/dev/null; then
  pgrep -af "$DEMO_WORK" >&2 || true
  echo "demo left processes running" >&2; exit 1
fi
echo "demo smoke: $n examples ok; $CACHE; $MIGRATIONS; stopped cleanly"
