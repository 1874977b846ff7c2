#!/usr/bin/env bash
# Builds the cellgate container image without a registry, from Debian packages: mmdebstrap
# extracts a minimal runtime root filesystem (libc6, libgcc-s1, the Mozilla CA bundle — no shell,
# no package manager), buildah puts the release binary (debug info stripped) on it, sets the same
# configuration as deploy/container/Dockerfile (non-root 65532, exec-form entrypoint, ports,
# STOPSIGNAL SIGTERM) and writes an OCI archive. Then it tries to run the image with podman; where
# the machine forbids containers (this sandbox refuses setrlimit to crun), it says why and runs the
# image's own root filesystem with chroot instead: the binary, with the image's libraries, serves
# /livez and /admin/map as uid 65532. Prints the image's entrypoint, user, ports and size.
# Usage: bash deploy/container/build-offline.sh     Env: IMAGE_OUT (OCI archive path), IMAGE_TAG.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/deps.sh
ensure_rust

OUT=${IMAGE_OUT:-${CARGO_TARGET_DIR:-target}/container/cellgate-image.oci.tar}
TAG=${IMAGE_TAG:-localhost/cellgate:dev}
SUITE=bookworm
USER_ID=65532

missing=()
for t in mmdebstrap buildah podman; do command -v "$t" >/dev/null || missing+=("$t"); done
[ "${#missing[@]}" -eq 0 ] || apt_install mmdebstrap buildah podman crun uidmap >/dev/null

echo "== release binary (same package set as the demo, so neither rebuilds the other)"
cargo build --release -q -p cellgate -p cellgate-harness
BIN=${CARGO_TARGET_DIR:-target}/release/cellgate

WORK=$(mktemp -d /tmp/cellgate-image.XXXXXX)
SERVE_PID=""
B=(buildah --storage-driver vfs --root "$WORK/storage" --runroot "$WORK/run")
P=(podman --storage-driver vfs --root "$WORK/storage" --runroot "$WORK/run")
cleanup() {
  [ -n "$SERVE_PID" ] && kill -TERM "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null
  # buildah's vfs layers are plain directories under $WORK.
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== runtime root filesystem (mmdebstrap, $SUITE: libc6, libgcc-s1, ca-certificates; extracted, no scripts run)"
ROOT="$WORK/root"
as_root mmdebstrap --quiet --variant=extract --include=libc6,libgcc-s1,ca-certificates --mode=root \
  "$SUITE" "$ROOT" >/dev/null
# ca-certificates' maintainer script (not run by `extract`) would build this bundle.
as_root mkdir -p "$ROOT/etc/ssl/certs" "$ROOT/etc/cellgate" "$ROOT/var/lib/cellgate" "$ROOT/usr/local/bin" "$ROOT/tmp"
cat "$ROOT"/usr/share/ca-certificates/mozilla/*.crt | as_root tee "$ROOT/etc/ssl/certs/ca-certificates.crt" >/dev/null
printf 'root:x:0:0:root:/root:/nonexistent\ncellgate:x:%s:%s:cellgate:/var/lib/cellgate:/nonexistent\n' "$USER_ID" "$USER_ID" |
  as_root tee "$ROOT/etc/passwd" >/dev/null
printf 'root:x:0:\ncellgate:x:%s:\n' "$USER_ID" | as_root tee "$ROOT/etc/group" >/dev/null
as_root chown "$USER_ID:$USER_ID" "$ROOT/var/lib/cellgate"
as_root chmod 1777 "$ROOT/tmp"
as_root cp "$BIN" "$ROOT/usr/local/bin/cellgate"
as_root strip --strip-debug "$ROOT/usr/local/bin/cellgate"
as_root chmod 0755 "$ROOT/usr/local/bin/cellgate"
as_root tar -C "$ROOT" -cf "$WORK/root.tar" .

echo "== image (buildah, from scratch)"
ctr=$("${B[@]}" from scratch)
"${B[@]}" add "$ctr" "$WORK/root.tar" / >/dev/null
"${B[@]}" config --user "$USER_ID:$USER_ID" --workingdir /var/lib/cellgate \
  --entrypoint '["/usr/local/bin/cellgate"]' --cmd 'serve --config /etc/cellgate/cellgate.toml --log-format json' \
  --port 8080 --port 9090 --stop-signal SIGTERM \
  --label org.opencontainers.image.title=cellgate \
  --label org.opencontainers.image.source=deploy/container/build-offline.sh "$ctr"
"${B[@]}" commit --quiet --format oci "$ctr" "$TAG" >/dev/null
mkdir -p "$(dirname "$OUT")"
rm -f "$OUT"
"${B[@]}" push --quiet "$TAG" "oci-archive:$OUT:$TAG"
cfg=$("${B[@]}" inspect --type image "$TAG" | jq -c '.OCIv1.config | {User, Entrypoint, Cmd, ExposedPorts, StopSignal}')
size=$(du -m "$OUT" | cut -f1)
echo "image $TAG -> $OUT (${size} MiB): $cfg"
jq -e '.User == "65532:65532" and .Entrypoint == ["/usr/local/bin/cellgate"] and .StopSignal == "SIGTERM"
       and (.ExposedPorts | (has("8080") or has("8080/tcp")) and (has("9090") or has("9090/tcp")))' <<< "$cfg" >/dev/null \
  || { echo "image configuration is not what deploy/container/Dockerfile declares" >&2; exit 1; }

echo "== run it"
if err=$("${P[@]}" run --rm --network host "$TAG" --version 2>&1); then
  echo "podman run: $err"
  RUN=("${P[@]}" run --rm --network host -v "$WORK/etc:/etc/cellgate:ro" "$TAG")
  MODE=podman
else
  echo "podman cannot run containers on this machine ($(tail -n1 <<< "$err")):"
  echo "running the image's root filesystem with chroot as uid $USER_ID instead (same binary, libraries, users)"
  as_root chroot --userspec="$USER_ID:$USER_ID" "$ROOT" /usr/local/bin/cellgate --version
  MODE=chroot
fi

# Serve with a one-shard map whose database is not reachable: /livez and /admin/map need none.
ADMIN_PORT=$(free_port)
DATA_PORT=$(free_port)
CLOSED=$(free_port)
TOKEN="image-check-$RANDOM$RANDOM"
ETC="$WORK/etc"
[ "$MODE" = chroot ] && ETC="$ROOT/etc/cellgate"
as_root mkdir -p "$ETC"
as_root tee "$ETC/map.toml" >/dev/null <<TOML
version = 7
resolution = 5
[[shards]]
id = "s1"
  [shards.databases.core]
  kind = "postgres"
  primary = "postgres://app:x@127.0.0.1:$CLOSED/core"
[[assign]]
shard = "s1"
cells = ["8039fffffffffff"]
[fallback]
mode = "reject"
TOML
as_root tee "$ETC/cellgate.toml" >/dev/null <<TOML
map = { path = "/etc/cellgate/map.toml", watch = false }
[listen]
data = "127.0.0.1:$DATA_PORT"
admin = "127.0.0.1:$ADMIN_PORT"
[[tokens]]
name = "admin"
sha256 = "$(printf '%s\n' "$TOKEN" | "$BIN" token-hash)"
scopes = ["admin"]
TOML
# Started directly (not through the as_root function, whose subshell would get the PID while
# cellgate ran on as its child): chroot execs cellgate, so $! is cellgate's own PID (with sudo,
# sudo's, which passes SIGTERM on).
SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)
if [ "$MODE" = podman ]; then
  "${RUN[@]}" > "$WORK/serve.log" 2>&1 &
else
  "${SUDO[@]}" chroot --userspec="$USER_ID:$USER_ID" "$ROOT" /usr/local/bin/cellgate serve \
    --config /etc/cellgate/cellgate.toml --log-format json > "$WORK/serve.log" 2>&1 &
fi
SERVE_PID=$!
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$ADMIN_PORT/livez" >/dev/null 2>&1 && break
  kill -0 "$SERVE_PID" 2>/dev/null || { cat "$WORK/serve.log" >&2; echo "the image's cellgate exited" >&2; exit 1; }
  sleep 0.1
done
live=$(curl -fsS "http://127.0.0.1:$ADMIN_PORT/livez")
version=$(printf 'authorization: Bearer %s\n' "$TOKEN" | curl -fsS -H @- "http://127.0.0.1:$ADMIN_PORT/admin/map" | jq -r .version)
[ "$version" = 7 ] || { cat "$WORK/serve.log" >&2; echo "admin/map answered version $version, want 7" >&2; exit 1; }
kill -TERM "$SERVE_PID"
wait "$SERVE_PID" 2>/dev/null || true
SERVE_PID=""
# Nothing of it may be left running (the listener's port is the check: only it bound there).
for _ in $(seq 1 50); do
  curl -s -o /dev/null "http://127.0.0.1:$ADMIN_PORT/livez" 2>/dev/null || break
  sleep 0.1
done
if curl -s -o /dev/null "http://127.0.0.1:$ADMIN_PORT/livez" 2>/dev/null; then
  echo "the image's cellgate is still serving after SIGTERM" >&2; exit 1
fi
echo "image check ($MODE): /livez $live, /admin/map version $version, stopped on SIGTERM; image ${size} MiB"
