"""What the native extension is built from, and with which flags: one list for setup.py (ahead of time), for
fused_optim/native.py (the JIT fallback) and for csrc/check_cuda_compile.sh (CI's nvcc check).

Plain data, importable without torch (setup.py and the shell script read it with runpy).

Flags that change results are chosen here, once:
* host: -ffp-contract=off so that the compiler never fuses a multiply and an add into an FMA (the rules place
  their FMAs explicitly, where torch has them); no -ffast-math; -O3 for the baseline ISA only (no -march=native:
  the build is distributed; the CPU engine dispatches to an AVX2+FMA build of its loops at run time);
  -fopenmp: ATen's parallel_for is an inline `#pragma omp parallel` (ATen/ParallelOpenMP.h), which a build without
  it runs on one thread; it also honours the `#pragma omp simd` of the CPU loops. The OpenMP runtime is the
  libgomp.so.1 that torch has already loaded (same soname), so torch.set_num_threads applies.
  -fno-math-errno lets sqrt be an instruction (results unchanged).
* nvcc: the rules use CUDA's rounding intrinsics (__fadd_rn, __fdiv_rn, __fsqrt_rn, ...), which no flag can
  contract or approximate; -fmad=false, -prec-div=true and -prec-sqrt=true make the same hold for any other
  float code, and --use_fast_math is never passed.
"""
from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))

# Sources relative to the csrc directory.
# plan.cpp: the step plan's per-tensor check, a Python function of the module ops.cpp creates.
CPU_SOURCES = ["ops.cpp", "plan.cpp", "cpu/adam_cpu.cpp", "cpu/adam_cpu_f32.cpp", "cpu/adam_cpu_f16.cpp",
               "cpu/adam_cpu_bf16.cpp"]
CUDA_SOURCES = ["ops_cuda.cpp", "adam_cuda.cu", "adam_cuda_f32.cu", "adam_cuda_f16.cu", "adam_cuda_bf16.cu"]
# LAMB: its operators (ops_lamb.cpp registers them as a fragment of the library), the CPU loops and CUDA kernels.
CPU_SOURCES += ["ops_lamb.cpp", "cpu/lamb_cpu.cpp", "cpu/lamb_cpu_f32.cpp", "cpu/lamb_cpu_f16.cpp",
                "cpu/lamb_cpu_bf16.cpp"]
CUDA_SOURCES += ["ops_lamb_cuda.cpp", "lamb_cuda.cu", "lamb_cuda_f32.cu", "lamb_cuda_f16.cu", "lamb_cuda_bf16.cu"]
# Adafactor: its operators (a fragment of the library ops.cpp defines), the CPU and CUDA tile engines' launches.
CPU_SOURCES += ["adafactor_ops.cpp", "cpu/adafactor_cpu.cpp", "cpu/adafactor_cpu_f32.cpp", "cpu/adafactor_cpu_f16.cpp",
                "cpu/adafactor_cpu_bf16.cpp"]
CUDA_SOURCES += ["adafactor_ops_cuda.cpp", "adafactor_cuda.cu", "adafactor_cuda_f32.cu", "adafactor_cuda_f16.cu",
                 "adafactor_cuda_bf16.cu"]

# torch.utils.cpp_extension adds -std (c++20 for torch 2.13) and its own defines to these.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
# -lstdc++ dynamically, ahead of the driver's own: a compiler set up to link libstdc++ statically (seen: the GPU
# machine's CXX=/opt/gcc/bin/g++) gives the extension a second copy of the C++ library beside torch's, and a
# TORCH_CHECK message streamed through it loses its numbers (here) or segfaults (there). Named first, the shared
# libstdc++.so.6 that torch uses resolves every symbol and the static archive adds nothing.
LD_FLAGS = ["-fopenmp", "-Wl,--push-state,--no-as-needed,-Bdynamic", "-lstdc++", "-Wl,--pop-state"]
NVCC_FLAGS = ["-O3", "-fmad=false", "-prec-div=true", "-prec-sqrt=true", "-Xcompiler=-ffp-contract=off"]
# What csrc/check_cuda_compile.sh adds to NVCC_FLAGS to compile the .cu files as the extension build does, without
# torch: the C++ standard torch 2.13 builds with, and torch's COMMON_NVCC_FLAGS (cpp_extension.py), which remove
# the implicit conversions and operators of CUDA's half and bfloat16 types (the kernels use explicit intrinsics).
NVCC_CHECK_FLAGS = ["-std=c++20", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"
CUDA_DEFINES = ["-DFUSED_OPTIM_WITH_CUDA"]


def csrc_dir() -> str | None:
    """The C++/CUDA sources: ``csrc/`` of a source checkout (editable installs), or the copy installed with the
    package as ``fused_optim/_csrc``. None when neither exists."""
    for candidate in (os.path.join(HERE, "_csrc"), os.path.join(os.path.dirname(HERE), "csrc")):
        if os.path.isfile(os.path.join(candidate, "ops.cpp")):
            return candidate
    return None
