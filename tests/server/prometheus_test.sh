#!/usr/bin/env bash
# Expert-load metrics through a real Prometheus server (Debian's `prometheus`), on loopback: a
# `moeserve serve` (demo model) is scraped every second; requests of both routing modes run
# concurrently; then PromQL over Prometheus's HTTP API must show, per MoE layer and mode, an
# increase of moeserve_expert_tokens_total equal to the token-expert assignments that the
# requests' own routing statistics report (sum over n of n * experts_per_token_histogram[n]),
# expert-choice max/mean exactly 1 (request scope, whole blocks) and token-choice max/mean above 1.
# Prints the PromQL results.
#
# usage: prometheus_test.sh MOESERVE MOESERVE_CLI
set -u
MOESERVE="$1"
CLI="$2"
PY=/usr/bin/python3
TMP=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  rm -rf "$TMP"
}
trap cleanup EXIT
free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
fail() { echo "FAIL: $*"; exit 1; }

MPORT=$(free_port)
"$MOESERVE" serve --host 127.0.0.1 --port 0 --metrics_port "$MPORT" --expert_load_window 1000 \
  >"$TMP/serve.log" 2>&1 &
pids+=("$!")
for _ in $(seq 1 400); do grep -q "ready: health SERVING" "$TMP/serve.log" && break; sleep 0.05; done
grep -q "ready: health SERVING" "$TMP/serve.log" || { cat "$TMP/serve.log"; fail "server start"; }
PORT=$(sed -n 's/.*listening on [^ ]*:\([0-9]*\) .*/\1/p' "$TMP/serve.log" | head -1)

PPORT=$(free_port)
cat >"$TMP/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: moeserve
    static_configs:
      - targets: ["127.0.0.1:$MPORT"]
EOF
prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/tsdb" \
  --web.listen-address="127.0.0.1:$PPORT" >"$TMP/prometheus.log" 2>&1 &
pids+=("$!")
API="http://127.0.0.1:$PPORT/api/v1"

# query PROMQL: the JSON result vector, compact.
query() {
  curl -sf --get "$API/query" --data-urlencode "query=$1"
}
# Waits until Prometheus has a sample of the target newer than now (a fresh scrape).
wait_fresh_scrape() {
  local since
  since=$(date +%s.%N)
  for _ in $(seq 1 100); do
    if query 'timestamp(up{job="moeserve"})' | "$PY" -c "
import json, sys
r = json.load(sys.stdin)['data']['result']
sys.exit(0 if r and float(r[0]['value'][1]) > $since and r[0]['value'][1] else 1)" 2>/dev/null; then
      return 0
    fi
    sleep 0.2
  done
  return 1
}
wait_fresh_scrape || { tail -5 "$TMP/prometheus.log"; fail "Prometheus never scraped the server"; }
[ "$(query 'up{job="moeserve"}' | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["data"]["result"][0]["value"][1])')" = 1 ] ||
  fail "up != 1"
echo "ok: Prometheus scrapes the server (up == 1)"
BEFORE='sum by (layer, routing) (moeserve_expert_tokens_total)'
query "$BEFORE" >"$TMP/before.json" || fail "query before"

# Requests of both modes at once, each printing its own routing statistics.
for i in 1 2 3; do
  for mode in token_choice expert_choice; do
    "$CLI" generate --target "127.0.0.1:$PORT" --prompt "request $i in $mode" --max_new_tokens 40 \
      --routing "$mode" --json >"$TMP/resp_${mode}_$i.json" 2>"$TMP/resp_${mode}_$i.err" &
  done
done
wait_all_ok=0
for job in $(jobs -p); do
  case " ${pids[*]} " in *" $job "*) continue ;; esac
  wait "$job" || wait_all_ok=1
done
[ "$wait_all_ok" -eq 0 ] || fail "a generate request failed"
echo "ok: 6 concurrent requests, 3 token-choice and 3 expert-choice"
wait_fresh_scrape || fail "no scrape after the requests"
query "$BEFORE" >"$TMP/after.json" || fail "query after"
query 'moeserve_expert_load_max_over_mean' >"$TMP/mom.json" || fail "query max/mean"
query 'moeserve_expert_load_cv' >"$TMP/cv.json" || fail "query cv"

"$PY" - "$TMP" <<'EOF'
import glob, json, sys
tmp = sys.argv[1]
def vector(name):
    out = {}
    for r in json.load(open(f"{tmp}/{name}.json"))["data"]["result"]:
        out[(int(r["metric"]["layer"]), r["metric"]["routing"])] = float(r["value"][1])
    return out
before, after = vector("before"), vector("after")
reported = {}
for path in glob.glob(f"{tmp}/resp_*.json"):
    resp = json.load(open(path))
    mode = resp["routing_stats"]["routing"]["mode"].replace("ROUTING_MODE_", "").lower()
    for layer in resp["routing_stats"]["layers"]:
        hist = [int(x) for x in layer["experts_per_token_histogram"]]
        key = (int(layer["layer"]), mode)
        reported[key] = reported.get(key, 0) + sum(n * h for n, h in enumerate(hist))
failures = 0
print("PromQL increase(sum by (layer, routing) (moeserve_expert_tokens_total)) vs the responses:")
for key in sorted(reported):
    delta = after.get(key, 0) - before.get(key, 0)
    ok = delta == reported[key]
    failures += not ok
    print(f"  layer {key[0]} {key[1]:14s} prometheus {delta:8.0f}  responses {reported[key]:8d}"
          f"  {'ok' if ok else 'MISMATCH'}")
if len(reported) < 2 or {m for _, m in reported} != {"token_choice", "expert_choice"}:
    print("FAIL: the responses did not cover both modes"); failures += 1
mom, cv = vector("mom"), vector("cv")
print("PromQL moeserve_expert_load_max_over_mean / moeserve_expert_load_cv:")
for key in sorted(mom):
    print(f"  layer {key[0]} {key[1]:14s} max/mean {mom[key]:.4f}  cv {cv.get(key, float('nan')):.4f}")
    if key[1] == "expert_choice" and mom[key] != 1.0:
        print("FAIL: expert-choice max/mean is not exactly 1"); failures += 1
    if key[1] == "token_choice" and not mom[key] > 1.0:
        print("FAIL: token-choice max/mean is not above 1"); failures += 1
sys.exit(1 if failures else 0)
EOF
[ $? -eq 0 ] || fail "PromQL results differ from the requests' routing statistics"
echo "ok: PromQL per-expert sums equal the requests' routing statistics; EC max/mean 1, TC > 1"
echo "1 passed, 0 failed"
