#!/usr/bin/env bash
# The local scale-out demo (docs/fleet.md, "The local fleet demo"): the same shards and data as
# deploy/local/demo.sh (3 × PostgreSQL primary + 1 streaming replica, a SecantusDB per shard when
# Python 3.11 with venv is available, the musician marketplace), plus one etcd holding the map,
# three cellgate instances in etcd mode, and HAProxy in front of them on one data port
# (HTTP/1.1 and h2c), health-checked via each instance's /readyz.
# A Redis shared by the instances as the read cache's L2 when redis-server is available.
# Prints a ready line and examples (a cached read, a map push with --wait, fleet status, a live
# migration through etcd). Ctrl-C / SIGTERM stops all.
# Usage: bash deploy/local/fleet.sh [--data-port 8080]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/deps.sh

DATA_PORT=8080
while [ $# -gt 0 ]; do
  case "$1" in
    --data-port) DATA_PORT="$2"; shift 2 ;;
    -h|--help) sed -n 2,8p "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
INSTANCES=3
PREFIX=/cellgate/demo

ensure_rust
ensure_postgres
ensure_etcd
ensure_haproxy
# Redis: the instances' shared cache level and invalidation channel (docs/cache.md); without it
# each instance caches in its own memory only.
REDIS=1
ensure_redis || true
command -v redis-server >/dev/null 2>&1 || REDIS=0
command -v jq >/dev/null || apt_install jq
command -v curl >/dev/null || apt_install curl
MONGO=1
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  apt_install python3-venv >/dev/null 2>&1 || true
fi
if ! bash tests/peers/mongo/install.sh --secantus-only; then
  MONGO=0
fi

echo "== building (release)"
cargo build --release -q -p cellgate -p cellgate-harness
CG=./target/release/cellgate

# Every file written from here on is private (0600 / 0700): the work directory holds the
# cluster's state file (passwords in its URLs) and the token's header file. Every process this
# script starts names the work directory on its command line (data dir, config, state file), so
# scripts/fleet-smoke.sh can check that none is left.
umask 077
WORK=$(mktemp -d /tmp/cellgate-fleet.XXXXXX)
CLUSTER_PID=""
ETCD_PID=""
HAPROXY_PID=""
REDIS_PID=""
CELLGATE_PIDS=()
MONGO_PIDS=()
# A stopped process's status (143 after SIGTERM) must not end the cleanup: errexit is off in it.
stop_pid() { kill -TERM "$1" 2>/dev/null && wait "$1" 2>/dev/null; return 0; }
cleanup() {
  trap - EXIT INT TERM
  set +e
  [ -n "$HAPROXY_PID" ] && stop_pid "$HAPROXY_PID"
  for p in "${CELLGATE_PIDS[@]}"; do stop_pid "$p"; done
  [ -n "$ETCD_PID" ] && stop_pid "$ETCD_PID"
  [ -n "$REDIS_PID" ] && stop_pid "$REDIS_PID"
  for p in "${MONGO_PIDS[@]}"; do stop_pid "$p"; done
  [ -n "$CLUSTER_PID" ] && stop_pid "$CLUSTER_PID"
  rm -rf "$WORK"
  echo "cellgate fleet stopped"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the shards and their data: the same steps as deploy/local/demo.sh --------------------------
# (demo.sh has no "shards only" mode; these are its steps, with the same cluster harness,
# migration role and `cellgate demo load`.)
SUPERUSER_PASSWORD="su-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export CELLGATE_DEMO_PG_PASSWORD="demo-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export CELLGATE_DEMO_MIGRATOR_PASSWORD="migrator-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
echo "== starting 3 shards x (primary + 1 replica)"
CELLGATE_CLUSTER_APP_PASSWORD="$CELLGATE_DEMO_PG_PASSWORD" CELLGATE_CLUSTER_SUPERUSER_PASSWORD="$SUPERUSER_PASSWORD" \
  ./target/release/cellgate-cluster up --shards 3 --replicas 1 \
  --state-file "$WORK/cluster.json" > "$WORK/cluster.out" 2> "$WORK/cluster.err" &
CLUSTER_PID=$!
for _ in $(seq 1 900); do
  [ -s "$WORK/cluster.json" ] && break
  kill -0 "$CLUSTER_PID" 2>/dev/null || { cat "$WORK/cluster.err" >&2; exit 1; }
  sleep 0.1
done
[ -s "$WORK/cluster.json" ] || { echo "cluster did not start" >&2; exit 1; }
i=0
for s in AM1 EU1 AS1; do
  export "CELLGATE_DEMO_${s}_PRIMARY_PORT=$(jq -r ".shards[$i].primary.port" "$WORK/cluster.json")"
  export "CELLGATE_DEMO_${s}_REPLICA_PORT=$(jq -r ".shards[$i].replicas[0].port" "$WORK/cluster.json")"
  i=$((i + 1))
done
# The map's `admin` connections use this role (see demo.sh and docs/migrations.md, Privileges).
PSQL="${CELLGATE_PG_BINDIR:+$CELLGATE_PG_BINDIR/}psql"
[ -x "$PSQL" ] || PSQL=psql
for port in $(jq -r '.shards[].primary.port' "$WORK/cluster.json"); do
  printf "CREATE ROLE cellgate_migrator LOGIN SUPERUSER PASSWORD '%s';\n" "$CELLGATE_DEMO_MIGRATOR_PASSWORD" |
    PGPASSWORD="$SUPERUSER_PASSWORD" "$PSQL" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d core
done
unset SUPERUSER_PASSWORD

if [ "$MONGO" = 1 ]; then
  echo "== starting a SecantusDB per shard (MongoDB wire protocol on WiredTiger) for the profiles database"
  for s in AM1 EU1 AS1; do
    start_secantus "$WORK/secantus-$s" "$WORK/secantus-$s.log" || { MONGO_PIDS+=("$SECANTUS_PID"); exit 1; }
    MONGO_PIDS+=("$SECANTUS_PID")
    export "CELLGATE_DEMO_${s}_MONGO_PORT=$SECANTUS_PORT"
  done
else
  echo "== SecantusDB could not be installed: the MongoDB profiles database is NOT started"
  echo "   (/v1/docs/profiles/... requests will answer 503 shard_unavailable; it needs python3.11 with venv and PyPI)"
  for s in AM1 EU1 AS1; do export "CELLGATE_DEMO_${s}_MONGO_PORT=$(free_port)"; done
fi

echo "== loading the marketplace (50,000 musicians around real cities)"
"$CG" demo load --map shard-maps/demo.toml

# --- etcd ----------------------------------------------------------------------------------------
ETCD_PORT=$(free_port)
ETCD_PEER_PORT=$(free_port)
ETCD="http://127.0.0.1:$ETCD_PORT"
echo "== starting etcd on $ETCD (data in the work directory)"
etcd --name fleet --data-dir "$WORK/etcd" \
  --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "fleet=http://127.0.0.1:$ETCD_PEER_PORT" > "$WORK/etcd.log" 2>&1 &
ETCD_PID=$!
for _ in $(seq 1 200); do
  ETCDCTL_API=3 etcdctl --endpoints "$ETCD" --dial-timeout 1s endpoint health >/dev/null 2>&1 && break
  kill -0 "$ETCD_PID" 2>/dev/null || { cat "$WORK/etcd.log" >&2; echo "etcd did not start" >&2; exit 1; }
  sleep 0.1
done
ETCDCTL_API=3 etcdctl --endpoints "$ETCD" --dial-timeout 1s endpoint health >/dev/null 2>&1 ||
  { tail -20 "$WORK/etcd.log" >&2; echo "etcd not healthy" >&2; exit 1; }

CACHE_REDIS=""
if [ "$REDIS" = 1 ]; then
  echo "== starting Redis for the read cache, shared by the instances (loopback, no persistence)"
  start_redis "$WORK" || REDIS=0
fi
[ "$REDIS" = 1 ] || echo "== Redis could not be installed or started: each instance caches in its own memory only"

# The map text goes into etcd as written: its ${VAR} references (ports, passwords) are resolved
# by each instance from its own environment, which this script exported above.
echo "== pushing shard-maps/demo.toml into etcd at $PREFIX/map"
"$CG" map push shard-maps/demo.toml --etcd "$ETCD" --prefix "$PREFIX"

# --- three cellgate instances in etcd mode --------------------------------------------------------
TOKEN="fleet-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
TOKEN_SHA=$(printf '%s\n' "$TOKEN" | "$CG" token-hash)
printf 'authorization: Bearer %s\n' "$TOKEN" > "$WORK/auth.header"
AUTH="$WORK/auth.header"
DATA_PORTS=()
ADMIN_PORTS=()
for n in $(seq 1 "$INSTANCES"); do
  d=$(free_port); a=$(free_port)
  while [ "$d" = "$a" ] || [ "$d" = "$DATA_PORT" ] || [ "$a" = "$DATA_PORT" ]; do a=$(free_port); d=$(free_port); done
  DATA_PORTS+=("$d"); ADMIN_PORTS+=("$a")
  cat > "$WORK/cellgate-i$n.toml" <<TOML
[map.etcd]
endpoints = ["$ETCD"]
prefix = "$PREFIX"
instance_id = "i$n"
[listen]
data = "127.0.0.1:$d"
admin = "127.0.0.1:$a"
[[tokens]]
name = "demo"
sha256 = "$TOKEN_SHA"
scopes = ["read", "write", "admin"]
# The read cache: L1 in this instance, L2 and the invalidation channel in the shared Redis — a
# write through any instance invalidates the cached reads of its cell on all of them.
[cache]
enabled = true
TOML
  if [ -n "$CACHE_REDIS" ]; then printf 'redis = "%s"\n' "$CACHE_REDIS" >> "$WORK/cellgate-i$n.toml"; fi
  "$CG" serve --config "$WORK/cellgate-i$n.toml" 2> "$WORK/cellgate-i$n.log" &
  CELLGATE_PIDS+=($!)
done
echo "== started $INSTANCES cellgate instances (etcd mode): data ports ${DATA_PORTS[*]}, admin ports ${ADMIN_PORTS[*]}"
for n in $(seq 1 "$INSTANCES"); do
  a=${ADMIN_PORTS[$((n - 1))]}
  for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:$a/readyz" >/dev/null 2>&1 && break
    kill -0 "${CELLGATE_PIDS[$((n - 1))]}" 2>/dev/null || { cat "$WORK/cellgate-i$n.log" >&2; echo "instance i$n exited" >&2; exit 1; }
    sleep 0.1
  done
  curl -fsS "http://127.0.0.1:$a/readyz" >/dev/null 2>&1 || { tail -20 "$WORK/cellgate-i$n.log" >&2; echo "instance i$n not ready" >&2; exit 1; }
  # The cache serves once the instance's Redis link is live (until then reads go to the shards).
  if [ "$REDIS" = 1 ]; then
    for _ in $(seq 1 100); do
      curl -fsS "http://127.0.0.1:$a/admin/cache" -H @"$AUTH" 2>/dev/null | jq -e '.serving == true' >/dev/null && break
      sleep 0.1
    done
  fi
done

# --- HAProxy --------------------------------------------------------------------------------------
# `mode http` on a clear-text bind without `proto`: HAProxy speaks HTTP/1.1 and switches to HTTP/2
# when a client opens with the HTTP/2 preface (h2c with prior knowledge), so one port serves both.
# Each instance is health-checked on its admin port's /readyz.
{
  cat <<CFG
global
  log stderr format short local0 notice
  maxconn 2000
defaults
  mode http
  log global
  option dontlognull
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  timeout http-request 10s
  retries 2
  option redispatch
frontend cellgate_data
  bind 127.0.0.1:$DATA_PORT
  default_backend cellgate_fleet
backend cellgate_fleet
  balance roundrobin
  option httpchk GET /readyz
  http-check expect status 200
  default-server inter 1s fall 2 rise 1
CFG
  for n in $(seq 1 "$INSTANCES"); do
    echo "  server i$n 127.0.0.1:${DATA_PORTS[$((n - 1))]} check port ${ADMIN_PORTS[$((n - 1))]}"
  done
} > "$WORK/haproxy.cfg"
haproxy -c -q -f "$WORK/haproxy.cfg"
haproxy -db -f "$WORK/haproxy.cfg" 2> "$WORK/haproxy.log" &
HAPROXY_PID=$!
D="http://127.0.0.1:$DATA_PORT"
for _ in $(seq 1 100); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$D/v1/sql/core/query" -H @"$AUTH" -H 'content-type: application/json' \
      -d '{"region": {"lat": 40.4168, "lng": -3.7038}, "sql": "SELECT 1"}' 2>/dev/null)" = 200 ] && break
  kill -0 "$HAPROXY_PID" 2>/dev/null || { cat "$WORK/haproxy.log" >&2; echo "haproxy exited" >&2; exit 1; }
  sleep 0.1
done
for v in --http1.1 --http2-prior-knowledge; do
  got=$(curl -sS $v -o /dev/null -w '%{http_code} HTTP/%{http_version}' "$D/v1/sql/core/query" -H @"$AUTH" \
    -H 'content-type: application/json' -d '{"region": {"lat": 40.4168, "lng": -3.7038}, "sql": "SELECT 1"}')
  case "$got" in 200*) echo "   through HAProxy with curl $v: $got" ;; *) cat "$WORK/haproxy.log" >&2; echo "HAProxy $v: $got" >&2; exit 1 ;; esac
done

if [ "$MONGO" = 1 ]; then
  echo "== loading 300 musician profiles into MongoDB through HAProxy (one batch, split by location)"
  tail -n +2 tests/data/cities15000.csv | grep -v '"' | sort -t, -k6,6nr | awk 'NR <= 300' | \
    jq -R -s -c '[split("\n")[] | select(length > 0) | split(",") | {name: ("Profile of a musician in " + .[1]),
      city: .[1], country: .[2], instruments: ["guitar", "voice"], rating: {"$numberDecimal": "4.5"},
      location: {type: "Point", coordinates: [(.[4] | tonumber), (.[3] | tonumber)]}}] | {documents: .}' \
    > "$WORK/profiles.json"
  resp=$(curl -sS "$D/v1/docs/profiles/profiles/insert" -H @"$AUTH" \
    -H 'content-type: application/json' --data-binary @"$WORK/profiles.json")
  printf '%s' "$resp" | jq -e -r '"   inserted \(.inserted_count): " + ([.shards[] | "\(.id) \(.inserted_ids | length)"] | join(", "))' \
    || { echo "profile insert failed: $resp" >&2; exit 1; }
fi

# The next map version for the push example: the demo map with `version` + 1.
V=$(sed -n 's/^version = \([0-9]*\)$/\1/p' shard-maps/demo.toml)
sed "s/^version = $V\$/version = $((V + 1))/" shard-maps/demo.toml > "$WORK/demo-next.toml"
chmod 0644 "$WORK/demo-next.toml"

A="http://127.0.0.1:${ADMIN_PORTS[0]}"
ADMINS=$(for a in "${ADMIN_PORTS[@]}"; do printf 'http://127.0.0.1:%s ' "$a"; done)
cat <<TXT

The fleet: etcd $ETCD (prefix $PREFIX), instances i1..i$INSTANCES (admin ${ADMINS% }),
HAProxy on $D (HTTP/1.1 and h2c, round robin over the instances that answer /readyz).
Try these (copy and paste; $AUTH holds the header "authorization: Bearer <token>"):

# musicians near Madrid, through HAProxy (HTTP/1.1)
curl -s $D/v1/sql/core/query -H @$AUTH -H 'content-type: application/json' \\
  -d '{"region": {"lat": 40.4168, "lng": -3.7038}, "sql": "SELECT id, name, instrument, city FROM musicians WHERE city = \$1 ORDER BY id LIMIT 5", "params": ["Madrid"]}'

# the same over h2c (HTTP/2 with prior knowledge), same port
curl -s --http2-prior-knowledge $D/v1/sql/core/query -H @$AUTH -H 'content-type: application/json' \\
  -d '{"region": {"lat": 40.4168, "lng": -3.7038}, "sql": "SELECT id, name, instrument, city FROM musicians WHERE city = \$1 ORDER BY id LIMIT 5", "params": ["Madrid"]}'

# the 5 musicians nearest to central Madrid through the read cache (30 s): run it three times —
# HAProxy sends each to another instance; from the second on the Cache-Status header says hit
# (from the shared Redis on an instance's first visit, then from its own memory)
curl -si $D/v1/sql/core/query -H @$AUTH -H 'content-type: application/json' \\
  -d '{"region": {"lat": 40.4168, "lng": -3.7038}, "sql": "SELECT id, name, instrument, city, (lat - \$1)^2 + (lng - \$2)^2 AS dist FROM musicians ORDER BY dist LIMIT 5", "params": [40.4168, -3.7038], "cache": {"ttl_ms": 30000}}'

# one instance's view of the fleet (etcd connection, registrations, agreement)
curl -s $A/admin/fleet -H @$AUTH

# push the next map version (version $((V + 1)), otherwise the demo map) into etcd and wait until
# every live instance serves it (exit 0; 3 = version conflict, 4 = not applied in time)
$CG map push $WORK/demo-next.toml --etcd $ETCD --prefix $PREFIX --wait=30s

# the live instances and the version each serves (exit 0 when all agree with etcd)
$CG fleet status --etcd $ETCD --prefix $PREFIX

TXT
if [ "$MONGO" = 1 ]; then
  # The busy cell around Shanghai of the demo's migration example (deploy/local/demo.sh).
  MOVE_CELL=8130bffffffffff
  MOVE_FROM=$("$CG" locate --map shard-maps/demo.toml --cell "$MOVE_CELL" --json |
    jq -r 'select(.shards | length == 1) | .shards[0]')
  [ -n "$MOVE_FROM" ] || { echo "cell $MOVE_CELL is not owned by one shard in the demo map" >&2; exit 1; }
  MOVE_TO=am-1
  [ "$MOVE_FROM" = am-1 ] && MOVE_TO=eu-1
  cat <<TXT
# live migration through etcd (docs/migrations.md, "etcd mode"): instance i1 orchestrates; the
# freeze and the new map travel through etcd and every live instance acknowledges them before
# the cutover, whichever instance HAProxy sends a write to. Move the busy cell around Shanghai
# from $MOVE_FROM to $MOVE_TO, then back; each line waits until its migration is \`done\`
$CG migrate --admin $A --token-file $AUTH start --wait --hold-ms 5000 --to $MOVE_TO $MOVE_CELL
$CG migrate --admin $A --token-file $AUTH start --wait --hold-ms 5000 --to $MOVE_FROM $MOVE_CELL

TXT
else
  printf '%s\n\n' "# (no live migration example: a migration moves the cell's MongoDB profiles too, and the MongoDB profiles database is not running)"
fi
cat <<TXT
cellgate fleet ready: data=$D admin=$A etcd=$ETCD token=$TOKEN
TXT
# Until a signal, or until any process of the fleet exits.
wait -n "$CLUSTER_PID" "$ETCD_PID" "$HAPROXY_PID" ${REDIS_PID:+"$REDIS_PID"} "${CELLGATE_PIDS[@]}" || true
echo "a process of the fleet exited; stopping" >&2
exit 1
