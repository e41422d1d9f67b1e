#!/usr/bin/env bash
# Rebuilds docs/img/report.png and docs/img/docs.png with no network at all: everything runs in
# a fresh network namespace whose only interface is loopback (run as root: `unshare -n`).
#   sudo docs/img/make_screenshots.sh        (needs Debian's chromium and `make install`)
# The report comes from a real service: the engine (random-tiny) in process, two tenants, an
# embedded store scanned through the admin API, and a 20-trial timing audit through the service.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec unshare -n bash -s <<'INNER'
set -euo pipefail
ip link set lo up
work=$(mktemp -d)
trap 'kill $(cat "$work/pid") 2>/dev/null || true; rm -rf "$work"' EXIT
cat > "$work/c.toml" <<TOML
state_dir = "$work/state"
[upstream]
model = "random-tiny"
[admin]
api_key = "sk-admin-screenshots-0123456789"
[[tenants]]
id = "team-a"
api_keys = ["sk-team-a-screenshots-0123456789"]
[[tenants]]
id = "team-b"
api_keys = ["sk-team-b-screenshots-0123456789"]
[audit]
sample_rate = 1.0
TOML
export CACHESVC_CONFIG="$work/c.toml"
.venv/bin/cachesvc serve --port 8099 > "$work/serve.log" 2>&1 & echo $! > "$work/pid"
for _ in $(seq 120); do curl -sf localhost:8099/healthz >/dev/null && break; sleep 0.5; done
for i in $(seq 8); do
  for k in sk-team-a-screenshots-0123456789 sk-team-b-screenshots-0123456789; do
    for _ in 1 2; do
      curl -s localhost:8099/v1/chat/completions -H "Authorization: Bearer $k" \
        -H 'Content-Type: application/json' \
        -d "{\"model\": \"random-tiny\", \"temperature\": 0, \"max_tokens\": 8,
             \"messages\": [{\"role\": \"user\", \"content\": \"question $i\"}]}" > /dev/null
    done
  done
done
.venv/bin/cachesvc audit scan --url http://127.0.0.1:8099 --admin-key sk-admin-screenshots-0123456789
.venv/bin/cachesvc audit timing --url http://127.0.0.1:8099 --model random-tiny --trials 20 \
  --victim-key sk-team-a-screenshots-0123456789 --probe-key-other-tenant sk-team-b-screenshots-0123456789 \
  --prompt-words 300 --seed 1 || true
kill "$(cat "$work/pid")"; sleep 2   # the auditor saves its coverage at stop
.venv/bin/cachesvc audit report --format html -o "$work/report.html"
# --virtual-time-budget lets the page's scripts run (Swagger UI fetches /openapi.json) first.
shot() { chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars \
  --virtual-time-budget=20000 --window-size="$2" --screenshot="$3" "$1" >/dev/null 2>&1; }
shot "file://$work/report.html" 1280,1750 docs/img/report.png
.venv/bin/cachesvc serve --port 8099 > "$work/serve2.log" 2>&1 & echo $! > "$work/pid"
for _ in $(seq 120); do curl -sf localhost:8099/healthz >/dev/null && break; sleep 0.5; done
shot "http://127.0.0.1:8099/docs" 1280,1100 docs/img/docs.png
# With no network, a page that needed a CDN would be blank: show what the service served it.
grep '"event": "access"' "$work/serve2.log" | grep '/docs' || true
INNER
