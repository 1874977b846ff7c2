#!/usr/bin/env bash
# Runs the README's demo command on free ports, pastes every curl example it prints exactly as
# printed, checks each answers JSON without an error, then stops the demo with SIGTERM and checks
# that nothing is left running. Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/deps.sh

OUT=$(mktemp)
DATA_PORT=$(free_port)
ADMIN_PORT=$(free_port)
bash deploy/local/demo.sh --data-port "$DATA_PORT" --admin-port "$ADMIN_PORT" > "$OUT" 2>&1 &
DEMO=$!
stop() { kill -TERM "$DEMO" 2>/dev/null || true; wait "$DEMO" 2>/dev/null || true; }
trap 'stop; rm -f "$OUT"' EXIT

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

stop
trap 'rm -f "$OUT"' EXIT
grep -q '^cellgate demo stopped' "$OUT" || { tail -n 20 "$OUT" >&2; echo "demo did not stop cleanly" >&2; exit 1; }
# Patterns name the demo's own folder: tests of other checkouts may run clusters and peers too.
if pgrep -f "cellgate serve --config /tmp/cellgate-demo" >/dev/null \
  || pgrep -f "cellgate-cluster up .*--state-file /tmp/cellgate-demo" >/dev/null \
  || pgrep -f "secantusd-py .*--storage-path /tmp/cellgate-demo" >/dev/null; then
  echo "demo left processes running" >&2; exit 1
fi
echo "demo smoke: $n examples ok, stopped cleanly"
