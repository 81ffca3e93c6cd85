#!/usr/bin/env bash
# Copies the non-system shared libraries that build/cuda/bin/* need (abseil, spdlog, fmt, xxhash;
# not CUDA's, which the GPU machine has) into build/cuda/devlibs, so the binaries run there.
set -eu
mkdir -p build/cuda/devlibs
for b in build/cuda/bin/*; do
  ldd "$b" | awk '/=> \//{print $3}' | grep -E 'libabsl|libspdlog|libfmt|libxxhash|libbenchmark' |
    while read -r lib; do cp -L "$lib" build/cuda/devlibs/; done
done
du -sh build/cuda/devlibs
