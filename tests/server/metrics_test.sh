#!/usr/bin/env bash
# The Prometheus endpoint of a live `moeserve serve` (demo model): requests of both routing modes
# and a rejected one, then /metrics is scraped with curl and linted by `promtool check metrics`;
# the alerting rules pass `promtool check rules` and their unit tests; the Grafana dashboard
# parses and names only exported metrics; with --auth_token_file, /metrics needs basic auth with
# the token as password, and --expert_metrics per_layer drops the per-expert family.
#
# usage: metrics_test.sh MOESERVE MOESERVE_CLI SOURCE_DIR
set -u
MOESERVE="$1"
CLI="$2"
SRC="$3"
PY=/usr/bin/python3
TMP=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  rm -rf "$TMP"
}
trap cleanup EXIT
failures=0
check() {  # check NAME EXPECTED_RC ACTUAL_RC
  if [ "$2" -eq "$3" ]; then echo "ok: $1"; else echo "FAIL: $1 (exit $3, expected $2)"; failures=$((failures + 1)); fi
}

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_server LOG ARGS...: moeserve serve with a free gRPC and metrics port; sets PORT, MPORT.
start_server() {
  local log="$1"
  shift
  MPORT=$(free_port)
  "$MOESERVE" serve --port 0 --metrics_port "$MPORT" "$@" >"$log" 2>&1 &
  pids+=("$!")
  local pid=$!
  PORT=""
  for _ in $(seq 1 400); do
    grep -q "ready: health SERVING" "$log" && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  PORT=$(sed -n 's/.*listening on [^ ]*:\([0-9]*\) .*/\1/p' "$log" | head -1)
  [ -n "$PORT" ] && grep -q "ready: health SERVING" "$log"
}

# value FILE SERIES: the value of one sample (empty if absent).
value() {
  awk -v s="$2" 'index($0, s " ") == 1 { print $2 }' "$1"
}

start_server "$TMP/serve.log"; check "server starts with --metrics_port" 0 $?
grep -q "metrics on http://.*:$MPORT/metrics" "$TMP/serve.log"; check "server logs the metrics address" 0 $?
T="localhost:$PORT"
for mode in token_choice expert_choice token_choice expert_choice; do
  "$CLI" generate --target "$T" --prompt hi --max_new_tokens 16 --routing "$mode" \
    >/dev/null 2>&1; check "generate ($mode)" 0 $?
done
"$CLI" generate --target "$T" --prompt hi --routing expert_choice --capacity_factor 100 \
  >/dev/null 2>&1; check "a bad request fails" 1 $?

curl -sf "http://127.0.0.1:$MPORT/metrics" >"$TMP/metrics.txt"; check "scrape /metrics" 0 $?
promtool check metrics <"$TMP/metrics.txt" >"$TMP/lint.txt" 2>&1; check "promtool check metrics" 0 $?
[ ! -s "$TMP/lint.txt" ] && grep -q '^moeserve_expert_tokens_total{' "$TMP/metrics.txt"
check "... with no findings, on a scrape that has the expert family" 0 $?
cat "$TMP/lint.txt"
M="$TMP/metrics.txt"
[ "$(value "$M" 'moeserve_requests_total{code="OK",routing="expert_choice"}')" = 2 ]
check "2 OK expert-choice requests" 0 $?
[ "$(value "$M" 'moeserve_requests_total{code="OK",routing="token_choice"}')" = 2 ]
check "2 OK token-choice requests" 0 $?
[ "$(value "$M" 'moeserve_requests_total{code="INVALID_ARGUMENT",routing="expert_choice"}')" = 1 ]
check "the rejected request counted as INVALID_ARGUMENT, expert_choice" 0 $?
"$PY" - "$M" <<'EOF'
import re, sys
sums = {}
for line in open(sys.argv[1]):
    m = re.match(r'moeserve_expert_tokens_total\{.*routing="(\w+)"\} (\S+)', line)
    if m:
        sums[m.group(1)] = sums.get(m.group(1), 0) + float(m.group(2))
assert sums.get("expert_choice", 0) > 0 and sums.get("token_choice", 0) > 0, sums
EOF
check "expert tokens moved for both routing modes" 0 $?
[ "$(value "$M" 'moeserve_time_to_first_block_seconds_count{routing="expert_choice"}')" = 2 ]
check "time to first block observed" 0 $?
awk '$1 == "moeserve_forwards_total" && $2 > 0 { found = 1 } END { exit !found }' "$M"
check "forwards counted" 0 $?
grep -q 'moeserve_build_info{backend="cpu",model="demo (random weights)",version=' "$M"
check "build info" 0 $?
! grep -qi 'request_id\|prompt="\|hi"' "$M"; check "no request contents in labels" 0 $?

# --- rules and their unit tests ---
promtool check rules "$SRC/deploy/prometheus/alerts.yml" >"$TMP/rules.txt" 2>&1
check "promtool check rules alerts.yml" 0 $?
(cd "$SRC/deploy/prometheus" && promtool test rules alerts_test.yml) >"$TMP/rules_test.txt" 2>&1
check "promtool test rules alerts_test.yml" 0 $? || cat "$TMP/rules_test.txt"
promtool check config "$SRC/deploy/prometheus/prometheus.yml" >"$TMP/config.txt" 2>&1
check "promtool check config prometheus.yml" 0 $?

# --- the dashboard: valid JSON, only exported metric names ---
"$PY" - "$SRC/deploy/grafana/moeserve-dashboard.json" "$M" "$SRC/deploy/prometheus/alerts.yml" <<'EOF'
import json, re, sys
dashboard = json.load(open(sys.argv[1]))
exported = set()
for line in open(sys.argv[2]):
    m = re.match(r"# TYPE (\S+) (\S+)", line)
    if m:
        exported.add(m.group(1))
        if m.group(2) == "histogram":
            exported.update(m.group(1) + s for s in ("_bucket", "_sum", "_count"))
texts = []
def walk(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "query", "definition") and isinstance(v, str):
                texts.append(v)
            elif isinstance(v, dict) and k == "query" and "query" in v:
                texts.append(v["query"])
            walk(v)
    elif isinstance(node, list):
        for v in node:
            walk(v)
walk(dashboard)
assert texts, "no queries in the dashboard"
names = set()
for t in texts:
    names.update(re.findall(r"\bmoeserve_[a-z_]+", t))
for t in open(sys.argv[3]).read().split("expr:")[1:]:
    names.update(re.findall(r"\bmoeserve_[a-z_]+", t.split("\n    for:")[0]))
unknown = sorted(names - exported)
assert not unknown, unknown
panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
assert any(p["type"] == "heatmap" for p in panels)
variables = {v["name"] for v in dashboard["templating"]["list"]}
assert {"datasource", "layer", "routing"} <= variables, variables
print("dashboard:", len(panels), "panels,", len(names), "metric names, all exported")
EOF
check "dashboard JSON parses and names only exported metrics" 0 $?
# Every dashboard expression through Prometheus's own PromQL parser: written as recording rules
# (Grafana's variables replaced by values of their kind) for `promtool check rules`.
"$PY" - "$SRC/deploy/grafana/moeserve-dashboard.json" "$TMP/dashboard_rules.yml" <<'EOF'
import json, sys
exprs = []
def walk(node):
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            exprs.append(node["expr"])
        for v in node.values():
            walk(v)
    elif isinstance(node, list):
        for v in node:
            walk(v)
walk(json.load(open(sys.argv[1])))
subst = {"$__rate_interval": "1m", "$layer": "1", "$routing": "token_choice"}
with open(sys.argv[2], "w") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, e in enumerate(exprs):
        for k, v in subst.items():
            e = e.replace(k, v)
        out.write(f"      - record: dashboard:expr_{i}\n        expr: {json.dumps(e)}\n")
print(len(exprs), "dashboard expressions")
EOF
promtool check rules "$TMP/dashboard_rules.yml" >"$TMP/dashboard_rules.txt" 2>&1
check "every dashboard PromQL expression parses (promtool)" 0 $? || cat "$TMP/dashboard_rules.txt"

# --- /metrics behind the token; per_layer level ---
printf 's3cret-token\n' >"$TMP/token"
start_server "$TMP/auth.log" --auth_token_file "$TMP/token" --expert_metrics per_layer
check "server starts with --auth_token_file" 0 $?
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$MPORT/metrics")
[ "$code" = 401 ]; check "/metrics without credentials is 401 (got $code)" 0 $?
code=$(curl -s -o /dev/null -w '%{http_code}' -u prometheus:wrong "http://127.0.0.1:$MPORT/metrics")
[ "$code" = 401 ]; check "/metrics with a wrong token is 401 (got $code)" 0 $?
"$CLI" generate --target "localhost:$PORT" --auth_token_file "$TMP/token" --prompt hi \
  --max_new_tokens 16 --routing expert_choice >/dev/null 2>&1; check "generate with the token" 0 $?
curl -sf -u prometheus:s3cret-token "http://127.0.0.1:$MPORT/metrics" >"$TMP/auth_metrics.txt"
check "/metrics with the token as basic-auth password" 0 $?
promtool check metrics <"$TMP/auth_metrics.txt" >"$TMP/lint2.txt" 2>&1 && [ ! -s "$TMP/lint2.txt" ]
check "promtool check metrics (per_layer)" 0 $?
! grep -q '^moeserve_expert_tokens_total' "$TMP/auth_metrics.txt"
check "per_layer: no moeserve_expert_tokens_total" 0 $?
[ "$(grep -c '^moeserve_expert_load_cv{' "$TMP/auth_metrics.txt")" = 6 ]
check "per_layer: 3 MoE layers x 2 modes of moeserve_expert_load_cv" 0 $?

# A port in use is an error at startup.
"$MOESERVE" serve --port 0 --metrics_port "$MPORT" >"$TMP/busy.log" 2>&1
check "a metrics port in use: exit 1" 1 $?

echo "$failures failure(s)"
[ "$failures" -eq 0 ]
