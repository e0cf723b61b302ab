#!/usr/bin/env bash
# Compile every CUDA source of the native backend with nvcc for sm_80 and sm_90, compile only: no GPU and no torch
# headers needed (the .cu files are plain CUDA over raw pointers; ATen lives in the .cpp bindings). CI runs this so
# that CUDA code cannot rot unseen on machines without a GPU.
#
#   csrc/check_cuda_compile.sh                      # nvcc from PATH (or $NVCC), $(nproc) parallel jobs
#   NVCC_ARCHS="80 90" JOBS=4 PYTHON=python csrc/check_cuda_compile.sh
#
# Then, when $PYTHON imports torch, the CUDA bindings (the .cpp files of _build.py's CUDA_SOURCES: host C++ against
# ATen) are syntax-checked with the host compiler and torch's headers. A CPU wheel of torch lacks one generated
# header, c10/cuda/impl/cuda_cmake_macros.h; a one-line stand-in for it (C10_CUDA_BUILD_SHARED_LIBS, as CUDA builds
# generate it) is written to a temporary include directory. This catches type and API errors in the bindings, not
# link errors.
#
# Exit status: 0 when every source compiles for every architecture, 2 when nvcc is absent, 1 otherwise.
# The flags are the extension build's (fused_optim/_build.py: NVCC_FLAGS, NVCC_CHECK_FLAGS, CUDA_DEFINES) plus
# -Werror all-warnings.
# Takes about 4-5 minutes wall on 2 cores for both architectures (240 Adam, 71 LAMB and ~100 Adafactor kernel
# variants each).
set -u
here=$(cd "$(dirname "$0")" && pwd)
nvcc=${NVCC:-nvcc}
if ! command -v "$nvcc" >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 2
fi
archs=${NVCC_ARCHS:-"80 90"}
jobs=${JOBS:-$(nproc 2>/dev/null || echo 2)}
python=${PYTHON:-$(command -v python || command -v python3)}
flags=$("$python" -c "import runpy; b = runpy.run_path('$here/../fused_optim/_build.py'); print(' '.join(b['NVCC_FLAGS'] + b['NVCC_CHECK_FLAGS'] + b['CUDA_DEFINES']))") || exit 1
bindings=$("$python" -c "import runpy; b = runpy.run_path('$here/../fused_optim/_build.py'); print(' '.join(s for s in b['CUDA_SOURCES'] if s.endswith('.cpp')))") || exit 1
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$nvcc" --version | tail -n 1

sources=$(cd "$here" && find . -name '*.cu' | sed 's|^\./||' | sort)
for src in $sources; do
  for arch in $archs; do
    tag="$(echo "$src" | tr '/' '_').sm_$arch"
    (
      if "$nvcc" $flags -Werror all-warnings -I"$here" -gencode "arch=compute_$arch,code=sm_$arch" \
          -c "$here/$src" -o "$out/$tag.o" >"$out/$tag.log" 2>&1; then
        echo "ok    $src  sm_$arch" >"$out/$tag.result"
      else
        echo "FAIL  $src  sm_$arch" >"$out/$tag.result"
      fi
    ) &
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
  done
done
wait

status=0
if torch_includes=$("$python" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))" 2>/dev/null); then
  mkdir -p "$out/shim/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$out/shim/c10/cuda/impl/cuda_cmake_macros.h"
  # nvcc's own include directory (nvcc may be a wrapper script outside the toolkit), as its dry run reports it.
  cuda_include=$("$nvcc" -v -E -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)
  for binding in $bindings; do
    if "${CXX:-c++}" -std=c++20 -fsyntax-only -Wall -Werror -I"$out/shim" $torch_includes -I"$cuda_include" \
        -I"$here" "$here/$binding" >"$out/binding.log" 2>&1; then
      echo "ok    $binding  (syntax, host compiler, torch headers)"
    else
      echo "FAIL  $binding  (syntax, host compiler, torch headers)"
      cat "$out/binding.log" >&2
      status=1
    fi
  done
else
  echo "skip  $bindings  ($python cannot import torch)"
fi
for src in $sources; do
  for arch in $archs; do
    tag="$(echo "$src" | tr '/' '_').sm_$arch"
    cat "$out/$tag.result"
    if grep -q '^FAIL' "$out/$tag.result"; then
      cat "$out/$tag.log" >&2
      status=1
    fi
  done
done
exit $status
