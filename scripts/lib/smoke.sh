# Helpers of the smoke scripts (scripts/demo-smoke.sh, scripts/fleet-smoke.sh): reading the
# output of the curl examples the demos print. Sourced; defines functions only.

# `curl -si` output: the headers (CRs dropped) up to the first empty line, then the body.
response_headers() { printf '%s' "$1" | tr -d '\r' | sed '/^$/q'; }
response_body() { printf '%s' "$1" | tr -d '\r' | sed '1,/^$/d'; }
cache_status() { response_headers "$1" | sed -n 's/^[Cc]ache-[Ss]tatus: *//p'; }

# Every printed curl command (with its continuation lines), NUL-separated, from the file $1.
curl_examples() {
  awk '/^curl /{cmd=$0; while (cmd ~ /\\$/) { getline line; cmd=cmd "\n" line } printf "%s%c", cmd, 0}' "$1"
}
