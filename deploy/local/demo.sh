#!/usr/bin/env bash
# The local demo: real PostgreSQL shards (3 × primary + 1 streaming replica) on loopback, a
# SecantusDB (MongoDB wire-protocol server on WiredTiger, from PyPI) per shard for the `profiles`
# database when Python 3.11 with venv is available, the musician-marketplace data, a Redis for
# cellgate's read cache (Debian's redis-server, no persistence), and cellgate serving a copy of
# shard-maps/demo.toml (live migrations rewrite the map file they serve) with the cache on.
# Prints ready-to-paste examples, among them one live migration (a busy cell moved to another
# shard and back), which scripts/demo-smoke.sh runs as printed under the goose load.
# Ctrl-C / SIGTERM stops all.
# Usage: bash deploy/local/demo.sh [--data-port 8080] [--admin-port 9090]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/deps.sh

DATA_PORT=8080
ADMIN_PORT=9090
while [ $# -gt 0 ]; do
  case "$1" in
    --data-port) DATA_PORT="$2"; shift 2 ;;
    --admin-port) ADMIN_PORT="$2"; shift 2 ;;
    -h|--help) sed -n 2,4p "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

ensure_rust
ensure_postgres
# Redis: the read cache's shared level and invalidation channel (docs/cache.md). If it cannot
# be installed or started, the demo says so and runs the cache in cellgate's memory only (L1).
REDIS=1
ensure_redis || true
command -v redis-server >/dev/null 2>&1 || REDIS=0
command -v jq >/dev/null || apt_install jq
command -v curl >/dev/null || apt_install curl
# A Python venv runs the SecantusDB peer (MongoDB `profiles`; its wheel is for CPython 3.11);
# without it the demo runs PostgreSQL only.
MONGO=1
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  apt_install python3-venv >/dev/null 2>&1 || true
fi
if ! bash tests/peers/mongo/install.sh --secantus-only; then
  MONGO=0
fi

echo "== building (release)"
cargo build --release -q -p cellgate -p cellgate-harness

# From here on every file the demo writes is private (mode 0600, directories 0700): the work
# directory holds the cluster's state file (passwords in its URLs) and the token's header file.
umask 077
WORK=$(mktemp -d /tmp/cellgate-demo.XXXXXX)
CLUSTER_PID=""
CELLGATE_PID=""
REDIS_PID=""
MONGO_PIDS=()
cleanup() {
  trap - EXIT INT TERM
  [ -n "$CELLGATE_PID" ] && kill -TERM "$CELLGATE_PID" 2>/dev/null && wait "$CELLGATE_PID" 2>/dev/null
  [ -n "$REDIS_PID" ] && kill -TERM "$REDIS_PID" 2>/dev/null && wait "$REDIS_PID" 2>/dev/null
  for p in "${MONGO_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  [ -n "$CLUSTER_PID" ] && kill -TERM "$CLUSTER_PID" 2>/dev/null && wait "$CLUSTER_PID" 2>/dev/null
  rm -rf "$WORK"
  echo "cellgate demo stopped"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Secrets travel in the environment or 0600 files, never on a command line (`ps` shows those to
# every local user). The superuser password is random per run, given to cellgate-cluster in its
# environment (it is also in the 0600 state file's admin URLs); the demo uses it once, to create
# the migration role, and cellgate never sees it.
SUPERUSER_PASSWORD="su-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export CELLGATE_DEMO_PG_PASSWORD="demo-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
# The migration role's password: the map's `admin` connections (shard-maps/demo.toml) use it.
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

# The role of the map's `admin` connections, which live migrations use (docs/migrations.md,
# "Privileges"), on every primary (the replicas get it by streaming). PostgreSQL 15 lets only a
# superuser run CREATE SUBSCRIPTION, and every demo shard can be a migration's target, so the
# role is SUPERUSER: nothing less works on 15. From PostgreSQL 16 a role without SUPERUSER would
# do: LOGIN REPLICATION, `GRANT pg_create_subscription`, CREATE on the database, membership in
# the tables' owner `app`, and `GRANT SET ON PARAMETER session_replication_role`. The
# application role `app` (the map's primary and replica URLs) gets nothing new.
# The SQL (with the password) goes to psql on stdin and the superuser password in PGPASSWORD:
# neither is on a command line.
PSQL="${CELLGATE_PG_BINDIR:+$CELLGATE_PG_BINDIR/}psql"
[ -x "$PSQL" ] || PSQL=psql
for port in $(jq -r '.shards[].primary.port' "$WORK/cluster.json"); do
  printf "CREATE ROLE cellgate_migrator LOGIN SUPERUSER PASSWORD '%s';\n" "$CELLGATE_DEMO_MIGRATOR_PASSWORD" |
    PGPASSWORD="$SUPERUSER_PASSWORD" "$PSQL" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d core
done
unset SUPERUSER_PASSWORD
PG_MAJOR=$(PGPASSWORD="$CELLGATE_DEMO_MIGRATOR_PASSWORD" "$PSQL" -X -qAt -h 127.0.0.1 -p "$CELLGATE_DEMO_AM1_PRIMARY_PORT" \
  -U cellgate_migrator -d core -c 'SHOW server_version_num' | cut -c1-2)
echo "== migration role cellgate_migrator created on every primary (SUPERUSER: PostgreSQL $PG_MAJOR)"
if [ "$PG_MAJOR" -ge 16 ]; then
  echo "   (PostgreSQL $PG_MAJOR would allow a role without SUPERUSER: docs/migrations.md, Privileges)"
fi

if [ "$MONGO" = 1 ]; then
  echo "== starting a SecantusDB per shard (MongoDB wire protocol on WiredTiger) for the profiles database"
  for s in AM1 EU1 AS1; do
    # Its data lives in $WORK, removed on exit (the path also names the demo's servers for
    # scripts/demo-smoke.sh's check that none is left running).
    start_secantus "$WORK/secantus-$s" "$WORK/secantus-$s.log" || { MONGO_PIDS+=("$SECANTUS_PID"); exit 1; }
    MONGO_PIDS+=("$SECANTUS_PID")
    export "CELLGATE_DEMO_${s}_MONGO_PORT=$SECANTUS_PORT"
  done
else
  echo "== SecantusDB could not be installed: the MongoDB profiles database is NOT started"
  echo "   (/v1/docs/profiles/... requests will answer 503 shard_unavailable; it needs python3.11 with venv and PyPI)"
  # Point the map at a port nothing listens on, so the failure is immediate and explicit.
  for s in AM1 EU1 AS1; do export "CELLGATE_DEMO_${s}_MONGO_PORT=$(free_port)"; done
fi

echo "== loading the marketplace (50,000 musicians around real cities)"
./target/release/cellgate demo load --map shard-maps/demo.toml

CACHE_REDIS=""
if [ "$REDIS" = 1 ]; then
  echo "== starting Redis for the read cache (loopback, no persistence, password in a 0600 file)"
  start_redis "$WORK" || REDIS=0
fi
if [ "$REDIS" = 0 ]; then
  echo "== Redis could not be installed or started: the read cache runs in cellgate's memory only"
  echo "   (L1, no shared level; docs/cache.md, \"Without Redis\")"
fi

TOKEN="demo-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
# cellgate serves a copy: a live migration publishes map v+1 by rewriting the file it serves, and
# the repository's map stays as committed.
cp shard-maps/demo.toml "$WORK/demo.toml"
cat > "$WORK/cellgate.toml" <<TOML
map = { path = "$WORK/demo.toml" }
[listen]
data = "127.0.0.1:$DATA_PORT"
admin = "127.0.0.1:$ADMIN_PORT"
[[tokens]]
name = "demo"
sha256 = "$(printf '%s\n' "$TOKEN" | ./target/release/cellgate token-hash)"
scopes = ["read", "write", "admin"]
# The read cache (docs/cache.md): reads that ask for it ("cache": {"ttl_ms": ...}) are served
# from cellgate's memory (L1) or Redis (L2); every write through cellgate invalidates its cell.
[cache]
enabled = true
TOML
# The Redis URL holds its password: it goes only into this 0600 file.
if [ -n "$CACHE_REDIS" ]; then printf 'redis = "%s"\n' "$CACHE_REDIS" >> "$WORK/cellgate.toml"; fi
unset CACHE_REDIS
# curl reads the token from this file (`-H @file`), so it is not on curl's command line either.
printf 'authorization: Bearer %s\n' "$TOKEN" > "$WORK/auth.header"
AUTH="$WORK/auth.header"
./target/release/cellgate serve --config "$WORK/cellgate.toml" 2> "$WORK/cellgate.log" &
CELLGATE_PID=$!
for _ in $(seq 1 300); do
  curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break
  kill -0 "$CELLGATE_PID" 2>/dev/null || { cat "$WORK/cellgate.log" >&2; exit 1; }
  sleep 0.1
done
# The cache serves once its Redis link is live (subscribed, heartbeat back; until then reads
# go to the shards, `Cache-Status: cellgate; fwd=bypass; detail=redis-down`).
CACHE_MODE=l1
if [ "$REDIS" = 1 ]; then
  CACHE_MODE="l1+redis"
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$ADMIN_PORT/admin/cache" -H @"$AUTH" 2>/dev/null | jq -e '.serving == true' >/dev/null && break
    sleep 0.1
  done
  curl -fsS "http://127.0.0.1:$ADMIN_PORT/admin/cache" -H @"$AUTH" 2>/dev/null | jq -e '.serving == true' >/dev/null ||
    echo "== warning: the read cache is not serving yet (its Redis link is not live; see /admin/cache)"
fi

D="http://127.0.0.1:$DATA_PORT"
if [ "$MONGO" = 1 ]; then
  # Musician profiles in MongoDB, inserted through cellgate in one batch: each document's shard
  # comes from its GeoJSON `location` (the [tables.profiles.profiles] geo_field), so the batch is
  # split over the three shards. The 300 largest cities of the data file, one profile each.
  echo "== loading 300 musician profiles into MongoDB through cellgate (one batch, split by location)"
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
TOKYO_H3=$(printf '%d' "0x$(./target/release/cellgate locate --map shard-maps/demo.toml --lat 35.6895 --lng 139.6917 --json | jq -r .point_cell)")
A="http://127.0.0.1:$ADMIN_PORT"
cat <<TXT

Try these (copy and paste; $AUTH holds the header "authorization: Bearer <token>"):

# the 5 musicians nearest to central Madrid (a replica of eu-1 answers), through the read cache
# for 30 s ("cache": {"ttl_ms": 30000}). Run it twice and look at the Cache-Status header (-i):
# "cellgate; fwd=miss; stored; ttl=30" the first time, "cellgate; hit; ttl=29" (and an Age) the
# second, until a write to the cell or the TTL ends it (docs/cache.md)
curl -si $D/v1/sql/core/query -H @$AUTH -H 'content-type: application/json' \\
  -d '{"region": {"lat": 40.4168, "lng": -3.7038}, "sql": "SELECT id, name, instrument, city, (lat - \$1)^2 + (lng - \$2)^2 AS dist FROM musicians ORDER BY dist LIMIT 5", "params": [40.4168, -3.7038], "cache": {"ttl_ms": 30000}}'

# the largest venues near Madrid: no "cache" member, yet cached — the map gives the venues table
# a policy ([tables.core.venues] cache = { ttl_ms = 60000, ... } in shard-maps/demo.toml)
curl -si $D/v1/sql/core/query -H @$AUTH -H 'content-type: application/json' \\
  -d '{"region": {"lat": 40.4168, "lng": -3.7038}, "sql": "SELECT id, name, kind, capacity FROM venues ORDER BY capacity DESC, id LIMIT 3"}'

# nearby search: 25 km around Paris, merged over the owning shards, nearest 5
curl -s $D/v1/sql/core/query -H @$AUTH -H 'content-type: application/json' \\
  -d '{"region": {"lat": 48.8566, "lng": 2.3522, "radius_km": 25}, "sql": "SELECT id, name, (lat - \$1)^2 + (lng - \$2)^2 AS dist FROM musicians ORDER BY dist LIMIT 5", "params": [48.8566, 2.3522], "merge": {"order_by": [{"column": "dist"}], "limit": 5}}'

# post a gig request in Tokyo (the primary of as-1); returns a read-your-writes token. The h3 column
# holds the point's resolution-15 cell (point_cell of \`cellgate locate\`) as a BIGINT
curl -s $D/v1/sql/core/execute -H @$AUTH -H 'content-type: application/json' \\
  -d '{"region": {"lat": 35.6895, "lng": 139.6917}, "sql": "INSERT INTO gig_requests (id, venue_id, title, budget_cents, gig_date, lat, lng, h3) VALUES (\$1, 1, \$2, 50000, \$3, 35.6895, 139.6917, \$4) RETURNING id", "params": [900001, "Jazz night", "2027-01-15", "$TOKYO_H3"]}'

TXT
if [ "$MONGO" = 1 ]; then cat <<TXT
# MongoDB profiles near Madrid (same region, same shard as the SQL example; Extended JSON out)
curl -s $D/v1/docs/profiles/profiles/find -H @$AUTH -H 'content-type: application/json' \\
  -d '{"region": {"lat": 40.4168, "lng": -3.7038}, "filter": {"city": "Madrid"}, "projection": {"_id": 0, "name": 1, "rating": 1}}'

# French musicians' profiles: the region (1,000 km around Paris) picks the owning shards, the
# filter picks the documents; merged on city name, first 5
curl -s $D/v1/docs/profiles/profiles/find -H @$AUTH -H 'content-type: application/json' \\
  -d '{"region": {"lat": 48.8566, "lng": 2.3522, "radius_km": 1000}, "filter": {"country": "FR"}, "sort": {"city": 1}, "limit": 5, "projection": {"_id": 0, "city": 1}}'

TXT
fi
cat <<TXT
# where does a place go?
curl -s "$A/admin/locate?lat=-33.8688&lng=151.2093" -H @$AUTH
# shard health, lag and pools
curl -s $A/admin/shards -H @$AUTH
# the read cache ($CACHE_MODE): hits, misses, fills, its Redis link
curl -s $A/admin/cache -H @$AUTH
TXT
if [ "$MONGO" = 1 ]; then
  # A busy cell: the resolution-1 cell around Shanghai (also Nanjing, Hangzhou, Suzhou, Qingdao),
  # where about 3% of the goose load test's writes land (they are placed by city population).
  MOVE_CELL=8130bffffffffff
  MOVE_FROM=$(./target/release/cellgate locate --map "$WORK/demo.toml" --cell "$MOVE_CELL" --json |
    jq -r 'select(.shards | length == 1) | .shards[0]')
  [ -n "$MOVE_FROM" ] || { echo "cell $MOVE_CELL is not owned by one shard in the demo map" >&2; exit 1; }
  MOVE_TO=am-1
  [ "$MOVE_FROM" = am-1 ] && MOVE_TO=eu-1
  cat <<TXT

# live migration (docs/migrations.md): move the busy cell around Shanghai from $MOVE_FROM to $MOVE_TO,
# then back. Each line waits until its migration is \`done\` (exit 0; the final record on stdout):
# rows (PostgreSQL) and profiles (MongoDB) copied, the map published as the next version. At the
# cutover writes to the cell are held (a little over 1 s: the MongoDB fence's grace is 1 s), for
# at most --hold-ms; past that a held write gets a retryable 503 cells_frozen.
./target/release/cellgate migrate --admin $A --token-file $AUTH start --wait --hold-ms 5000 --to $MOVE_TO $MOVE_CELL
./target/release/cellgate migrate --admin $A --token-file $AUTH start --wait --hold-ms 5000 --to $MOVE_FROM $MOVE_CELL
TXT
else
  echo
  echo "# (no live migration example: a migration moves the cell's MongoDB profiles too, and the"
  echo "#  MongoDB profiles database is not running)"
fi
echo
echo "cellgate demo ready: data=$D admin=$A token=$TOKEN"
wait "$CELLGATE_PID"
