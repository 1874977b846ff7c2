#!/usr/bin/env bash
# Offline checks of everything under deploy/ (issue 16), bounded, for .ci/run: Prometheus rules
# (promtool check + unit tests), the systemd unit (systemd-analyze verify + security score), the
# Kubernetes manifests and the Dockerfile (kubectl kustomize + checkov), and the container image
# (offline build from Debian packages, inspected, run where the machine allows). Each part installs
# what it needs; each prints its own summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
for part in prometheus/check.sh systemd/check.sh kubernetes/check.sh container/build-offline.sh; do
  echo "== deploy/$part"
  bash "deploy/$part"
done
