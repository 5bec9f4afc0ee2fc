#!/usr/bin/env bash
# Bundles built programs with the shared libraries the GPU machine lacks (it has no abseil, gRPC
# or protobuf), for the device tool: `tests/device/bundle.sh OUT_DIR PROGRAM...`, then carry
# OUT_DIR and run there with LD_LIBRARY_PATH=OUT_DIR/lib and MOESERVE_SOURCE_DIR=<tree root>.
# glibc, libstdc++ and libgcc are left out: the machine's own are newer and compatible.
set -euo pipefail
out="$1"
shift
mkdir -p "$out/lib"
for program in "$@"; do
  cp "$program" "$out/"
  ldd "$program" | awk '/=> \// {print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so* | libm.so* | libpthread.so* | libdl.so* | librt.so* | libstdc++.so* | libgcc_s.so* | ld-linux*) ;;
      libcuda.so* | libcudart.so* | libcublas*.so*) ;;
      *) cp -n "$lib" "$out/lib/" ;;
    esac
  done
done
du -sh "$out"
