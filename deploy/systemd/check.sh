#!/usr/bin/env bash
# Static checks of deploy/systemd/cellgate.service (no systemd needs to be running):
#   1. `systemd-analyze verify`: syntax, unknown keys, ExecStart binary present and executable.
#      verify exits 0 on an unknown key (it only warns), so any message about the unit fails too.
#   2. `systemd-analyze security --offline=yes`: the exposure score (0.0 best .. 10.0 worst).
#      Fails when the rating is worse than "OK". systemd's bands (src/analyze/analyze-security.c,
#      badness_table): 0.0 PERFECT, 0.1-0.9 SAFE, 1.0-4.9 OK, 5.0-7.4 MEDIUM, 7.5-8.9 EXPOSED,
#      9.0-9.9 UNSAFE, 10 DANGEROUS. So the limit is 4.9 (MAX_EXPOSURE=4.9 overrides it).
# verify needs the ExecStart binary to exist: the unit is checked as a temporary copy whose
# /usr/local/bin/cellgate points at a built binary (CELLGATE_BIN, else target/release or
# target/debug; built with `cargo build --bin cellgate` if there is none).
# Usage: bash deploy/systemd/check.sh        Exit 0 = both checks pass. Runs nothing in the background.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
unit="$here/cellgate.service"
max_exposure=${MAX_EXPOSURE:-4.9}

if ! command -v systemd-analyze >/dev/null; then
  echo "systemd-analyze missing: installing the systemd package" >&2
  timeout 600 apt-get install -y --no-install-recommends systemd >/dev/null
fi
echo "systemd-analyze: $(systemd-analyze --version | head -n1)"

bin=${CELLGATE_BIN:-}
if [[ -z $bin ]]; then
  for b in "$root/target/release/cellgate" "$root/target/debug/cellgate"; do
    [[ -x $b ]] && { bin=$b; break; }
  done
fi
if [[ -z $bin ]]; then
  (cd "$root" && timeout 1800 cargo build --quiet --bin cellgate)
  bin="$root/target/debug/cellgate"
fi
[[ -x $bin ]] || { echo "FAIL: no executable cellgate binary at $bin" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Same file name (the unit name comes from it), only the binary path changed.
sed "s#/usr/local/bin/cellgate#$bin#g" "$unit" >"$tmp/cellgate.service"
grep -q "^ExecStart=$bin serve " "$tmp/cellgate.service" || { echo "FAIL: ExecStart not found" >&2; exit 1; }

status=0
echo "== systemd-analyze verify"
if ! out=$(timeout 60 systemd-analyze verify "$tmp/cellgate.service" 2>&1); then
  echo "$out"
  echo "FAIL: verify exited non-zero" >&2
  status=1
elif grep -q "cellgate" <<<"$out"; then
  echo "$out"
  echo "FAIL: verify reported problems in the unit" >&2
  status=1
else
  [[ -n $out ]] && echo "$out" # messages about other units on this host, not ours
  echo "ok"
fi

echo "== systemd-analyze security --offline=yes"
# The tool's own exit status is non-zero only above --threshold (tenths); we parse the score.
out=$(timeout 60 systemd-analyze security --offline=yes --no-pager "$tmp/cellgate.service" 2>&1) || true
printf '%s\n' "$out" | grep -E '^✗' || true
line=$(grep -E 'Overall exposure level' <<<"$out" || true)
if [[ -z $line ]]; then
  echo "$out"
  echo "FAIL: no exposure score in the output" >&2
  exit 1
fi
score=$(sed -E 's/.*: ([0-9]+\.[0-9]+) ([A-Z]+).*/\1/' <<<"$line")
rating=$(sed -E 's/.*: ([0-9]+\.[0-9]+) ([A-Z]+).*/\2/' <<<"$line")
echo "exposure: $score $rating (limit $max_exposure: worse than OK fails)"
if awk -v s="$score" -v m="$max_exposure" 'BEGIN { exit !(s > m) }'; then
  echo "FAIL: exposure $score > $max_exposure" >&2
  status=1
fi
case $rating in
  PERFECT | SAFE | OK) ;;
  *) echo "FAIL: rating $rating is worse than OK" >&2; status=1 ;;
esac

if [[ $status -eq 0 ]]; then
  echo "PASS: deploy/systemd/cellgate.service"
fi
exit $status
