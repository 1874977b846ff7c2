#!/usr/bin/env bash
# Render every kustomization (base, overlays, the optional ServiceMonitor component on the fleet)
# with `kubectl kustomize` — any error fails — then run checkov over each rendered file
# (--framework kubernetes) and over deploy/container/Dockerfile (--framework dockerfile).
# Fails on any failed check; every skip carries its reason next to it (checkov.io/skipN
# annotations in the manifests, `# checkov:skip=` comments in the Dockerfile).
# Prints passed/failed/skipped per target. checkov is installed into deploy/.venv (gitignored)
# on first use. Usage: bash deploy/kubernetes/check.sh     Env: CHECKOV (a checkov to use).
set -euo pipefail
cd "$(dirname "$0")/../.."
K=deploy/kubernetes

command -v kubectl >/dev/null || { echo "kubectl is required (kubectl kustomize)" >&2; exit 1; }

CHECKOV=${CHECKOV:-}
if [ -z "$CHECKOV" ]; then
  CHECKOV=deploy/.venv/bin/checkov
  if [ ! -x "$CHECKOV" ]; then
    echo "== installing checkov into deploy/.venv"
    python3 -m venv deploy/.venv
    timeout 900 deploy/.venv/bin/pip install -q checkov
  fi
fi

OUT=$(mktemp -d /tmp/cellgate-k8s-check.XXXXXX)
trap 'rm -rf "$OUT"' EXIT

# The component needs an overlay to sit in: a throwaway one over overlays/fleet (kustomize
# wants relative paths).
mkdir -p "$OUT/fleet-monitored"
rel() { python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$PWD/$1" "$OUT/fleet-monitored"; }
cat > "$OUT/fleet-monitored/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $(rel "$K/overlays/fleet")
components:
  - $(rel "$K/components/servicemonitor")
YAML

declare -A SRC=(
  [base]=$K/base
  [single]=$K/overlays/single
  [fleet]=$K/overlays/fleet
  [fleet+servicemonitor]=$OUT/fleet-monitored
)
targets=(base single fleet fleet+servicemonitor)

echo "== kubectl kustomize"
for t in "${targets[@]}"; do
  timeout 60 kubectl kustomize "${SRC[$t]}" > "$OUT/$t.yaml"
  echo "$t: $(grep -c '^kind:' "$OUT/$t.yaml") objects ($(grep '^kind:' "$OUT/$t.yaml" | awk '{print $2}' | sort | uniq -c | awk '{printf "%s%s×%s", sep, $2, $1; sep=", "}'))"
done

failed=0
# checkov's JSON: one object per framework run (or a list of them); sum the summary counts.
summary() {
  python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
runs = d if isinstance(d, list) else [d]
p = f = s = 0
for r in runs:
    sm = r.get("summary", {})
    p += sm.get("passed", 0); f += sm.get("failed", 0); s += sm.get("skipped", 0)
    for c in r.get("results", {}).get("failed_checks", []):
        print("  FAILED %s %s (%s)" % (c["check_id"], c["check_name"], c.get("resource")), file=sys.stderr)
    for c in r.get("results", {}).get("skipped_checks", []):
        why = (c.get("check_result") or {}).get("suppress_comment", "")
        print("  skipped %s (%s): %s" % (c["check_id"], c.get("resource"), why), file=sys.stderr)
print(p, f, s)
' "$1"
}

run_checkov() { # name framework file
  local name=$1 fw=$2 file=$3 json="$OUT/$1.checkov.json"
  # Exit status is checkov's verdict; the counts come from its JSON. --skip-download: offline
  # (no guideline links from Prisma Cloud; the checks are bundled with checkov).
  timeout 300 "$CHECKOV" --skip-download --compact --output json --framework "$fw" -f "$file" > "$json" 2>"$OUT/$name.stderr" || true
  if ! [ -s "$json" ]; then
    echo "$name: checkov produced no report" >&2; cat "$OUT/$name.stderr" >&2; failed=1; return
  fi
  read -r p f s < <(summary "$json")
  printf '%-22s %-11s passed %3d  failed %d  skipped %d\n' "$name" "$fw" "$p" "$f" "$s"
  if [ "$f" -ne 0 ] || [ "$p" -eq 0 ]; then failed=1; fi
}

echo "== checkov $("$CHECKOV" --version)"
for t in "${targets[@]}"; do
  run_checkov "$t" kubernetes "$OUT/$t.yaml"
done
run_checkov Dockerfile dockerfile deploy/container/Dockerfile

if [ "$failed" -ne 0 ]; then echo "check.sh: FAILED" >&2; exit 1; fi
echo "check.sh: ok (every overlay renders, no failed checkov check)"
