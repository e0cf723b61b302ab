#!/usr/bin/env bash
# Compile every CUDA source of the native backend with nvcc for sm_80 and sm_90, compile only: no GPU and no torch
# headers needed (the .cu files are plain CUDA over raw pointers; ATen lives in the .cpp bindings). CI runs this so
# that CUDA code cannot rot unseen on machines without a GPU.
#
#   csrc/check_cuda_compile.sh                      # nvcc from PATH (or $NVCC), $(nproc) parallel jobs
#   NVCC_ARCHS="80 90" JOBS=4 csrc/check_cuda_compile.sh
#
# Exit status: 0 when every source compiles for every architecture, 2 when nvcc is absent, 1 otherwise.
# The flags are the extension build's (fused_optim/_build.py NVCC_FLAGS) plus -Werror all-warnings.
# Takes about 4 minutes of CPU time per architecture (240 kernel variants; ~2 minutes wall on 2 cores).
set -u
here=$(cd "$(dirname "$0")" && pwd)
nvcc=${NVCC:-nvcc}
if ! command -v "$nvcc" >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 2
fi
archs=${NVCC_ARCHS:-"80 90"}
jobs=${JOBS:-$(nproc 2>/dev/null || echo 2)}
flags=$("${PYTHON:-python3}" -c "import runpy; print(' '.join(runpy.run_path('$here/../fused_optim/_build.py')['NVCC_FLAGS']))") || exit 1
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
