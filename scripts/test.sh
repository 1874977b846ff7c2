#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine: installs what the tests need (PostgreSQL
# server binaries; redis-server for the read cache; Node.js, npm and python3-venv for the MongoDB
# test peers), then runs every test of the workspace against real backends.
# Usage: bash scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/deps.sh

ensure_rust
ensure_postgres
ensure_redis
ensure_etcd
ensure_peer_tools
# MongoDB test peers (CongoDB from npm, MockupDB from PyPI) into git-ignored folders.
bash tests/peers/mongo/install.sh

echo "== cargo test --workspace (benches are built by clippy --all-targets; run them with cargo bench)"
if [ $# -gt 0 ]; then
  cargo test --workspace "$@"
  exit
fi
cargo test --workspace -- --skip real_server_round_trip

# Real-server tests run separately with their output shown, so each says by name that it was
# skipped (CELLGATE_TEST_MONGO_URL / CELLGATE_TEST_MSSQL_URL unset) or runs against that server.
echo "== real-server tests (MongoDB: CELLGATE_TEST_MONGO_URL, SQL Server: CELLGATE_TEST_MSSQL_URL)"
# --workspace: the same feature set as the run above, so nothing is rebuilt.
cargo test --workspace --test mongo --test mssql real_server_round_trip -- --nocapture
