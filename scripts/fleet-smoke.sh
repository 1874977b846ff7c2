#!/usr/bin/env bash
# Runs the local scale-out demo (deploy/local/fleet.sh: shards, etcd, three cellgate instances in
# etcd mode, HAProxy) on a free data port; runs its printed curl examples as printed (each must
# answer JSON without an error; the cached one, run twice more, must be a hit from the shared
# Redis); runs the goose load test (cellgate-loadtest, as loadtest/smoke.sh) through HAProxy for
# 60 s and, while it runs, the printed `map push ... --wait`, `fleet status` and the two
# `migrate ... start --wait` lines (a cell moved away and back through etcd; each must exit 0);
# the load test must end with 0 failed requests. Then it stops fleet.sh with SIGTERM and checks
# that none of its processes (cluster harness, PostgreSQL, SecantusDB, etcd, Redis, cellgate,
# HAProxy) is left running. Bounded: gives up after FLEET_SMOKE_TIMEOUT
# seconds (default 1500, the first run builds a release binary). Used by .ci/run.
# Env: LOADTEST_BIN (skip the cargo build of cellgate-loadtest), FLEET_SMOKE_TIMEOUT.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/deps.sh
source scripts/lib/smoke.sh
ensure_rust

if [ -z "${LOADTEST_BIN:-}" ]; then
  echo "== building cellgate-loadtest"
  cargo build -q --workspace --bins
  LOADTEST_BIN=${CARGO_TARGET_DIR:-target}/debug/cellgate-loadtest
fi

DEADLINE=$((SECONDS + ${FLEET_SMOKE_TIMEOUT:-1500}))
OUT=$(mktemp)
LOAD_LOG=$(mktemp)
LOAD_REPORT=$(mktemp --suffix=.html)
DATA_PORT=$(free_port)
bash deploy/local/fleet.sh --data-port "$DATA_PORT" > "$OUT" 2>&1 &
FLEET=$!
LOAD=""
stop() {
  if [ -n "$LOAD" ]; then kill -TERM "$LOAD" 2>/dev/null || true; wait "$LOAD" 2>/dev/null || true; fi
  kill -TERM "$FLEET" 2>/dev/null || true; wait "$FLEET" 2>/dev/null || true
}
trap 'stop; rm -f "$OUT" "$LOAD_LOG" "$LOAD_REPORT"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# Run a printed command with what is left of the deadline.
run() { timeout "$((DEADLINE - SECONDS > 1 ? DEADLINE - SECONDS : 1))" bash -c "$1"; }

until grep -q '^cellgate fleet ready: ' "$OUT"; do
  kill -0 "$FLEET" 2>/dev/null || { cat "$OUT" >&2; echo "fleet.sh exited early" >&2; exit 1; }
  [ "$SECONDS" -lt "$DEADLINE" ] || { cat "$OUT" >&2; echo "fleet not ready in time" >&2; exit 1; }
  sleep 0.5
done
READY=$(grep -m1 '^cellgate fleet ready: ' "$OUT")
echo "${READY% token=*} token=…"
grep '^   through HAProxy' "$OUT" || true
DATA_URL=$(sed -n 's/.* data=\([^ ]*\).*/\1/p' <<< "$READY")
# fleet.sh's work directory (the token's header file is in it): every process it starts names it.
WORK=$(grep -o -m1 '/tmp/cellgate-fleet\.[A-Za-z0-9]*' "$OUT")
[ -n "$WORK" ] || { cat "$OUT" >&2; echo "no work directory in the printed examples" >&2; exit 1; }

# Every printed curl command (with its continuation line), run as printed.
n=0
CACHED=""
while IFS= read -r -d $'\0' cmd; do
  n=$((n + 1))
  out=$(run "$cmd")
  body=$out
  if [[ $cmd == "curl -si "* ]]; then body=$(response_body "$out"); fi
  if ! printf '%s' "$body" | jq -e 'type == "object" and (has("error") | not)' >/dev/null; then
    echo "example $n failed:"; echo "$cmd"; echo "$out"; exit 1
  fi
  echo "example $n ok: $(printf '%s' "$body" | head -c 120)"
  if [[ $cmd == *'"cache": {'* ]]; then CACHED=$cmd; CACHED_FIRST=$(cache_status "$out"); fi
done < <(curl_examples "$OUT")
[ "$n" -ge 3 ] || { cat "$OUT" >&2; echo "expected at least 3 curl examples, found $n" >&2; exit 1; }

# The cached example through HAProxy, twice more: round robin sends them to the other
# instances, which find the entry the first one stored in the shared Redis (L2).
[ -n "$CACHED" ] || { cat "$OUT" >&2; echo "no printed example asks for the read cache" >&2; exit 1; }
statuses=("$CACHED_FIRST")
for _ in 1 2; do statuses+=("$(cache_status "$(run "$CACHED")")"); done
CACHE_LINE="cached example through HAProxy: $(printf '"%s" ' "${statuses[@]}")"
if grep -q '^== Redis could not' "$OUT"; then
  [ "${CI:-}" != true ] || { echo "CI: the fleet ran without Redis (redis-server could not be installed or started)" >&2; exit 1; }
  CACHE_LINE+="(WITHOUT Redis: each instance's own memory only)"
else
  case "${statuses[1]}${statuses[2]}" in
    *"cellgate; hit"*) ;;
    *) echo "$CACHE_LINE: no hit after the first fill — the instances do not share the cache" >&2; exit 1 ;;
  esac
fi
echo "$CACHE_LINE"

mapfile -t PUSH < <(grep '^\./target/release/cellgate map push .* --wait' "$OUT" || true)
mapfile -t STATUS < <(grep '^\./target/release/cellgate fleet status ' "$OUT" || true)
[ "${#PUSH[@]}" -eq 1 ] && [ "${#STATUS[@]}" -eq 1 ] ||
  { cat "$OUT" >&2; echo "expected one map push --wait and one fleet status example" >&2; exit 1; }

# The goose load through HAProxy; the token goes to it in its environment, never on its command line.
CELLGATE_TOKEN=$(sed -n 's/.* token=\([^ ]*\).*/\1/p' <<< "$READY") \
  timeout 300 "$LOADTEST_BIN" --host "$DATA_URL" --users 20 --increase-rate 20 --run-time 60s \
  --report-file "$LOAD_REPORT" --quiet > "$LOAD_LOG" 2>&1 &
LOAD=$!
sleep 5   # every user started (20 per second)
kill -0 "$LOAD" 2>/dev/null || { cat "$LOAD_LOG" >&2; echo "the load test ended before the push" >&2; exit 1; }

echo "push: ${PUSH[0]}"
if ! pushed=$(run "${PUSH[0]}" 2>&1); then
  echo "$pushed"; echo "map push --wait failed" >&2; exit 1
fi
echo "$pushed" | sed 's/^/  /'
echo "status: ${STATUS[0]}"
if ! status=$(run "${STATUS[0]}" 2>&1); then
  echo "$status"; echo "fleet status failed (instances disagree or etcd unreadable)" >&2; exit 1
fi
echo "$status" | sed 's/^/  /'
kill -0 "$LOAD" 2>/dev/null || { cat "$LOAD_LOG" >&2; echo "the load test ended before the push did" >&2; exit 1; }

# The printed migration example (a busy cell moved away and back through etcd), run as printed
# while the load writes to it through HAProxy, i.e. through all three instances.
mapfile -t MOVES < <(grep '^\./target/release/cellgate migrate ' "$OUT" || true)
MIGRATIONS="no migration example (the fleet runs without MongoDB)"
if [ "${#MOVES[@]}" -eq 0 ]; then
  grep -q '^# (no live migration example' "$OUT" || { cat "$OUT" >&2; echo "no migration example printed" >&2; exit 1; }
  [ "${CI:-}" != true ] || { echo "CI: the fleet ran without MongoDB (SecantusDB), so its migration example did not run" >&2; exit 1; }
else
  holds=()
  for cmd in "${MOVES[@]}"; do
    echo "migration: $cmd"
    if ! final=$(run "$cmd"); then
      echo "$final"; echo "migration through etcd failed: $cmd" >&2; exit 1
    fi
    echo "migration ok: $(printf '%s' "$final" | jq -r '"\(.from) -> \(.to): state \(.state), rows_copied \(.rows_copied), hold_ms_max \(.hold_ms_max)"')"
    holds+=("$(printf '%s' "$final" | jq -r '"\(.from)->\(.to) \(.hold_ms_max) ms"')")
  done
  kill -0 "$LOAD" 2>/dev/null || { cat "$LOAD_LOG" >&2; echo "the load test ended before the migrations did" >&2; exit 1; }
  MIGRATIONS="${#MOVES[@]} migrations through etcd under load (hold_ms_max: $(IFS=,; echo "${holds[*]}" | sed 's/,/, /g'))"
  echo "$MIGRATIONS"
fi

set +e
wait "$LOAD"
code=$?
set -e
LOAD=""
summary=$(grep -m1 '^cellgate-loadtest summary: ' "$LOAD_LOG" | sed 's/ | .*//' || true)
if [ "$code" -ne 0 ]; then
  cat "$LOAD_LOG" >&2; echo "the load test through HAProxy failed (exit code $code)" >&2; exit 1
fi
echo "load test through HAProxy: exit 0: ${summary#cellgate-loadtest summary: }"

# The cluster harness keeps PostgreSQL's data in /tmp/cg-<its pid>-... (not in fleet.sh's private
# work directory: the `postgres` user must reach it when we run as root).
HARNESS_PIDS=$(pgrep -f "cellgate-cluster up .*--state-file $WORK/" || true)
[ -n "$HARNESS_PIDS" ] || { echo "the fleet's cluster harness is not running" >&2; exit 1; }
stop
trap 'rm -f "$OUT" "$LOAD_LOG" "$LOAD_REPORT"' EXIT
grep -q '^cellgate fleet stopped' "$OUT" || { tail -n 20 "$OUT" >&2; echo "fleet.sh did not stop cleanly" >&2; exit 1; }
# Every process of the fleet names its work directory (other fleets may run beside it).
sleep 0.5
left=$(pgrep -af "$WORK/" || true)
for p in $HARNESS_PIDS; do left+=$(pgrep -af "postgres -D /tmp/cg-$p-" || true); done
if [ -n "$left" ]; then
  echo "$left" >&2; echo "fleet.sh left processes running" >&2; exit 1
fi
echo "fleet smoke: $n examples ok; $CACHE_LINE; map push --wait and fleet status under load ok; $MIGRATIONS; goose through HAProxy: ${summary#cellgate-loadtest summary: }; stopped cleanly"
