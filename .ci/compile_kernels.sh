#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (nothing runs: CI has no GPU).
#  * nvcc compiles hmqsearch/kernels/*.cu for sm_80 and sm_90 (objects discarded);
#  * nvcc drives the host compiler over the torch binding (*.cpp) with -fsyntax-only,
#    against the installed torch's headers, when torch is importable.
# Exits non-zero on a compile error; skips (exit 0) without nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc="$(command -v nvcc || true)"
if [[ -z "$nvcc" && -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
  nvcc="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
fi
if [[ -z "$nvcc" ]]; then
  echo "compile_kernels: nvcc not found, skipping the CUDA compile check"
  exit 0
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

for src in hmqsearch/kernels/*.cu; do
  echo "compile_kernels: nvcc $src (sm_80, sm_90)"
  "$nvcc" -std=c++17 -O3 -Xcompiler -Wall \
    -gencode arch=compute_80,code=sm_80 \
    -gencode arch=compute_90,code=sm_90 \
    -c "$src" -o "$out/$(basename "$src").o"
done

if ! includes="$(python -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))' 2>/dev/null)"; then
  echo "compile_kernels: torch not importable, skipping the binding syntax check"
  exit 0
fi
flags=(-isystem "$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')")
for dir in $includes; do
  flags+=(-isystem "$dir")
  # The CPU wheel ships c10/cuda without its generated cuda_cmake_macros.h (build-time
  # export macros only): an empty stand-in is enough for a syntax check.
  if [[ -d "$dir/c10/cuda" && ! -f "$dir/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
    mkdir -p "$out/stub/c10/cuda/impl"
    : > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
    flags+=(-isystem "$out/stub")
  fi
done
for src in hmqsearch/kernels/*.cpp; do
  echo "compile_kernels: syntax check of $src against torch's headers"
  "$nvcc" -std=c++17 -Xcompiler -fsyntax-only,-Wall,-Wextra "${flags[@]}" \
    -DTORCH_EXTENSION_NAME=hmqsearch_fake_quant -DTORCH_API_INCLUDE_EXTENSION_H \
    -c "$src" -o "$out/$(basename "$src").o"
done
echo "compile_kernels: ok"
