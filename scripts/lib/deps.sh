# Shared install steps for the demo, the tests and CI. Installs only what is missing.
# Sourced, not executed.

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to run: $*" >&2; return 1; fi
}

apt_install() {
  # apt-get update once per run: apt-cache and installs need fresh lists on a new machine.
  if [ -z "${CELLGATE_APT_UPDATED:-}" ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    export CELLGATE_APT_UPDATED=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# A TCP port on 127.0.0.1 free right now (probed, never fixed). Drawn from below the kernel's
# ephemeral range: a port inside it can be the local end of an outgoing connection (a replica's
# walreceiver, a TIME_WAIT from the previous run) which a connect probe cannot see but bind
# refuses — that race failed a CI run. `ss` sees every socket state; the probe is the fallback.
free_port() {
  local lo=32768 hi p
  read -r lo hi < /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
  hi=$((lo - 1))
  [ "$hi" -gt 11000 ] || hi=60000
  for p in $(shuf -i "10000-$hi" -n 50); do
    if command -v ss >/dev/null; then
      [ -z "$(ss -Htan "( sport = :$p )" 2>/dev/null)" ] && { echo "$p"; return; }
    elif ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"; return
    fi
  done
  echo "no free port" >&2; return 1
}

# Starts a SecantusDB on a port the kernel picks (--port 0, read back from its log line
# "secantus listening on HOST:PORT"), so no probe can race another socket. Sets SECANTUS_PID
# and SECANTUS_PORT; fails with the server's log when it does not come up in 30 s.
start_secantus() { # storage_dir log_file
  local storage=$1 log=$2
  tests/peers/mongo/.secantus/bin/secantusd-py --host 127.0.0.1 --port 0 \
    --storage-path "$storage" > "$log" 2>&1 &
  SECANTUS_PID=$!
  SECANTUS_PORT=
  for _ in $(seq 1 300); do
    SECANTUS_PORT=$(sed -n 's/.*secantus listening on [0-9.]*:\([0-9][0-9]*\).*/\1/p' "$log" | head -n 1)
    [ -n "$SECANTUS_PORT" ] && return 0
    kill -0 "$SECANTUS_PID" 2>/dev/null || break
    sleep 0.1
  done
  cat "$log" >&2
  echo "SecantusDB did not start" >&2
  return 1
}

# Starts a Redis for the read cache (docs/cache.md) with its files in DIR: no persistence
# (nothing in it needs to survive), loopback only, a random password in a 0600 config file (not
# on the command line: `ps` shows those to every local user; without one any local user could
# write entries the cache would serve). `--set-proc-title no` keeps the command line, which names
# DIR, visible for the smoke scripts' check that nothing is left running. Sets REDIS_PID and
# CACHE_REDIS (the URL with the password: write it only into 0600 files); returns 1, with
# REDIS_PID empty, when it does not come up in 10 s.
start_redis() { # dir
  local dir=$1 port password
  port=$(free_port)
  password="redis-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  mkdir -p "$dir/redis"
  (umask 077; printf 'requirepass %s\n' "$password" > "$dir/redis.conf")
  redis-server "$dir/redis.conf" --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
    --dir "$dir/redis" --logfile "$dir/redis.log" --daemonize no --set-proc-title no &
  REDIS_PID=$!
  CACHE_REDIS=""
  for _ in $(seq 1 100); do
    grep -q 'Ready to accept connections' "$dir/redis.log" 2>/dev/null && break
    kill -0 "$REDIS_PID" 2>/dev/null || break
    sleep 0.1
  done
  if grep -q 'Ready to accept connections' "$dir/redis.log" 2>/dev/null && kill -0 "$REDIS_PID" 2>/dev/null; then
    CACHE_REDIS="redis://:$password@127.0.0.1:$port"
    REDIS_PORT=$port
    return 0
  fi
  tail -n 5 "$dir/redis.log" >&2 2>/dev/null || true
  { kill -TERM "$REDIS_PID" && wait "$REDIS_PID"; } 2>/dev/null || true
  REDIS_PID=""
  return 1
}

ensure_rust() {
  if ! command -v cargo >/dev/null; then
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
  fi
  command -v cargo >/dev/null || { echo "cargo not found: install the Rust toolchain first" >&2; exit 1; }
}

# PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup, postgres) and psql/pgbench.
pg_bindir() {
  if [ -n "${CELLGATE_PG_BINDIR:-}" ]; then echo "$CELLGATE_PG_BINDIR"; return; fi
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

ensure_postgres() {
  local dir
  dir=$(pg_bindir)
  if [ -z "$dir" ] || [ ! -x "$dir/initdb" ] || [ ! -x "$dir/pg_basebackup" ] || ! command -v psql >/dev/null; then
    echo "== installing PostgreSQL from Debian"
    apt_install postgresql postgresql-contrib postgresql-client
    dir=$(pg_bindir)
  fi
  [ -x "$dir/initdb" ] || { echo "PostgreSQL server binaries not found after install" >&2; exit 1; }
  # When running as root the harness runs PostgreSQL as the `postgres` user; Debian's package
  # creates it, but a machine with only a client package might not have it.
  if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    as_root useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
  fi
  export CELLGATE_PG_BINDIR="$dir"
  echo "== PostgreSQL: $("$dir/postgres" --version)"
}

# redis-server (the read cache's shared L2 and bump channel, docs/cache.md). Debian's package
# starts no server here (no init system in CI); the tests and the demo start their own.
ensure_redis() {
  if ! command -v redis-server >/dev/null; then
    echo "== installing redis-server from Debian"
    apt_install redis-server
  fi
  echo "== Redis: $(redis-server --version | cut -d' ' -f1-3)"
}

# etcd (fleet mode, tests/etcd.rs starts its own on free ports) and protoc, which the
# etcd-client crate's build script needs to compile the etcd protos.
ensure_etcd() {
  local missing=()
  command -v etcd >/dev/null || missing+=(etcd-server)
  command -v etcdctl >/dev/null || missing+=(etcd-client)
  command -v protoc >/dev/null || missing+=(protobuf-compiler)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]} from Debian"
    apt_install "${missing[@]}"
  fi
  echo "== etcd: $(etcd --version | head -1); $(protoc --version)"
}

# HAProxy (Debian; 2.6 on bookworm): the load balancer of deploy/local/fleet.sh.
ensure_haproxy() {
  if ! command -v haproxy >/dev/null; then
    echo "== installing haproxy from Debian"
    apt_install haproxy
  fi
  echo "== haproxy: $(haproxy -v | head -1)"
}

# Node.js + npm (the CongoDB test peer) and Python's venv (the MockupDB test peer).
ensure_peer_tools() {
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "== installing Node.js and npm from Debian"
    apt_install nodejs npm
  fi
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo "== installing python3-venv from Debian"
    apt_install python3-venv
  fi
}
