#!/usr/bin/env bash
# Copies the non-system shared libraries that a CUDA build's binaries need into BUILD/devlibs, so
# the binaries run on a machine with an NVIDIA GPU that has CUDA's libraries, libc and libstdc++
# but none of the Debian development libraries: abseil, xxhash, gtest, and for the `tokenlake`
# CLI also gRPC, protobuf, upb, re2, c-ares, cpp-httplib, OpenSSL, brotli, zlib.
#
#   bench/pack_devlibs.sh [BUILD_DIR] [MAX_MIB]   # default build/cuda; binaries: BUILD_DIR/bin/*
#
# Left out: CUDA's libraries (/usr/local/cuda, libcuda, libnvidia-*, libnccl: the machine has
# them), and the C/C++ runtime (libc, libm, libdl, libpthread, librt, ld-linux, libgcc_s,
# libstdc++). Prints the size of the folder and of bin + devlibs together, and fails when that
# exceeds MAX_MIB (when given).
# Also writes BUILD_DIR/REVISION (git describe of this checkout).
# There: export LD_LIBRARY_PATH=$PWD/BUILD_DIR/devlibs:$LD_LIBRARY_PATH
set -eu
build=${1:-build/cuda}
max_mib=${2:-0}
mkdir -p "$build/devlibs"
# The commit the binaries were built from, for the benchmarks' JSON on the other machine
# (TOKENLAKE_REVISION; bench/engine_session.sh reads it).
if rev=$(git describe --always --dirty 2>/dev/null); then echo "$rev" > "$build/REVISION"; fi
for b in "$build"/bin/*; do
  [ -x "$b" ] || continue
  ldd "$b" | awk '/=> \//{print $3}' |
    grep -v -E '/usr/local/cuda|/libcuda\.|/libnvidia|/libnccl|/(libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+)\.so|ld-linux' |
    while read -r lib; do cp -L "$lib" "$build/devlibs/"; done
done
du -sh "$build/devlibs"
total_kib=$(du -sk "$build/bin" "$build/devlibs" | awk '{s += $1} END {print s}')
echo "bin + devlibs: $((total_kib / 1024)) MiB"
if [ "$max_mib" -gt 0 ] && [ "$total_kib" -ge $((max_mib * 1024)) ]; then
  echo "pack_devlibs.sh: $build/bin + devlibs is over $max_mib MiB" >&2
  exit 1
fi
