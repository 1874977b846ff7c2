#!/usr/bin/env bash
# Check cellgate's Prometheus rules: `promtool check rules` on every rules file and
# `promtool test rules` on tests.yml. Installs promtool (Debian's `prometheus` package) when
# missing and running as root, without starting the Prometheus service. Starts no server.
# Exit status: 0 when everything passes, non-zero otherwise.
set -euo pipefail

dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
rule_files=("$dir/rules.yml" "$dir/alerts.yml")
tests="$dir/tests.yml"

install_promtool() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "check.sh: promtool not found and not running as root; install it with" >&2
        echo "  sudo apt-get install -y --no-install-recommends prometheus   (Debian/Ubuntu)" >&2
        echo "or put a promtool binary (https://prometheus.io/download/) on PATH." >&2
        exit 2
    fi
    if ! command -v apt-get >/dev/null; then
        echo "check.sh: promtool not found and apt-get is not available; put promtool on PATH" >&2
        exit 2
    fi
    # Keep the package's maintainer scripts from starting the prometheus service:
    # invoke-rc.d / deb-systemd-invoke ask policy-rc.d, and 101 means "not allowed".
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    local before
    before="$(pgrep -x prometheus || true)"
    echo "check.sh: installing promtool (apt-get install prometheus)..." >&2
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
    } >/tmp/cellgate-promtool-install.log 2>&1 || rc=$?
    if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi
    # Belt and braces: stop a prometheus server the install started (only new PIDs).
    local pid
    for pid in $(pgrep -x prometheus || true); do
        if ! grep -qx "$pid" <<<"$before"; then
            echo "check.sh: stopping prometheus (pid $pid) started by the package install" >&2
            kill "$pid" 2>/dev/null || true
        fi
    done
    if [ "$rc" -ne 0 ] || ! command -v promtool >/dev/null; then
        echo "check.sh: installing prometheus failed (rc $rc); log: /tmp/cellgate-promtool-install.log" >&2
        tail -n 20 /tmp/cellgate-promtool-install.log >&2 || true
        exit 2
    fi
}

command -v promtool >/dev/null || install_promtool
echo "check.sh: $(promtool --version 2>&1 | head -n 1)"

status=0
echo "== promtool check rules"
promtool check rules "${rule_files[@]}" || status=1

echo "== promtool test rules"
test_out="$(cd "$dir" && promtool test rules "$(basename "$tests")" 2>&1)" || status=1
echo "$test_out"

# Counts for the summary line (from the files, so they do not depend on promtool's wording).
count() { grep -cE "$1" "$2" || true; }
n_record=$(count '^[[:space:]]*- record:' "$dir/rules.yml")
n_alert_rules=$(count '^[[:space:]]*- alert:' "$dir/alerts.yml")
n_alerts=$(grep -E '^[[:space:]]*- alert:' "$dir/alerts.yml" | awk '{print $3}' | sort -u | wc -l)
n_groups=$(count '^[[:space:]]*- name:' "$tests")
n_cases=$(count '^[[:space:]]*- eval_time:' "$tests")

if [ "$status" -eq 0 ]; then
    echo "OK: ${#rule_files[@]} rule files checked ($n_record recording rules, $n_alert_rules alerting rules = $n_alerts alerts); $n_groups/$n_groups test groups passed ($n_cases alert evaluations)"
else
    echo "FAILED: rule check or rule tests failed (${#rule_files[@]} rule files, $n_alert_rules alerting rules, $n_groups test groups)" >&2
fi
exit "$status"
