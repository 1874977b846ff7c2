#!/usr/bin/env bash
# Installs the MongoDB test peers into git-ignored folders next to this script (idempotent):
#   .congodb/  CongoDB, the in-memory wire-protocol server inside npm @push.rocks/smartmongo@2.2.0
#   .venv/     MockupDB (PyPI mockupdb==1.8.1) for the replica-routing tests
#   .secantus/ SecantusDB (PyPI secantusdb==0.7.0b3, a wire-protocol server on WiredTiger; a
#              CPython 3.11 wheel with its native parts inside) for the data tests and the demo
# The recipe is the one in shared/testpeers/README.md: a plain `npm install @push.rocks/smartmongo`
# fails (not all of its dependencies are on the registry), so only CongoDB's own dependencies are
# installed and the package tarball is unpacked beside them.
# Usage: bash tests/peers/mongo/install.sh [--secantus-only]   (the demo needs only SecantusDB)
set -euo pipefail
only_secantus=0
[[ "${1:-}" == "--secantus-only" ]] && only_secantus=1
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# SecantusDB in its own venv: its pinned dependencies must not meet MockupDB's pymongo.
secantus="$here/.secantus"
if [[ -x "$secantus/bin/secantusd-py" ]] && "$secantus/bin/python" -c 'import secantus' 2>/dev/null; then
  echo "secantusdb: already installed in $secantus"
else
  command -v python3 >/dev/null || { echo "install.sh: python3 (3.11, with venv) is required" >&2; exit 1; }
  rm -rf "$secantus"
  python3 -m venv "$secantus"
  "$secantus/bin/pip" install --quiet 'secantusdb==0.7.0b3'
  [[ -x "$secantus/bin/secantusd-py" ]] || { echo "install.sh: secantusd-py missing after install" >&2; exit 1; }
  echo "secantusdb: installed in $secantus"
fi
[[ $only_secantus == 1 ]] && exit 0

congo="$here/.congodb"
if [[ -f "$congo/package/dist_ts/congodb/index.js" && -d "$congo/node_modules/mingo" ]]; then
  echo "congodb: already installed in $congo"
else
  command -v npm >/dev/null || { echo "install.sh: npm is required (apt-get install nodejs npm)" >&2; exit 1; }
  rm -rf "$congo" && mkdir -p "$congo"
  cat > "$congo/package.json" <<'JSON'
{ "name": "congodb-peer", "private": true, "type": "module",
  "dependencies": { "bson": "6.10.4", "mingo": "7.2.7",
    "@push.rocks/smartfs": "1.5.0", "@push.rocks/smartpath": "5.1.0",
    "@push.rocks/smartpromise": "4.2.3", "@push.rocks/smartrx": "3.0.10" } }
JSON
  (cd "$congo" && npm install --no-audit --no-fund --loglevel=error \
     && npm pack --silent @push.rocks/smartmongo@2.2.0 >/dev/null \
     && tar xzf push.rocks-smartmongo-2.2.0.tgz && rm -f push.rocks-smartmongo-2.2.0.tgz)
  echo "congodb: installed in $congo"
fi
# The starter lives in git; it imports CongoDB relative to its own folder.
cp "$here/congo-start.mjs" "$congo/congo-start.mjs"

venv="$here/.venv"
if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import mockupdb, bson' 2>/dev/null; then
  echo "mockupdb: already installed in $venv"
else
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet 'mockupdb==1.8.1' 'pymongo==4.20.1'
  "$venv/bin/python" -c 'import mockupdb, bson'
  echo "mockupdb: installed in $venv"
fi
