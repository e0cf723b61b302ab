"""The native extension's build: the ahead-of-time build imports and registers its operators, the JIT fallback
builds and runs, and every CUDA source compiles with nvcc for sm_80 and sm_90 (compile only: no GPU needed).

    python -m pytest tests/test_native_build.py -q             # the JIT build test is marked slow (~90 s on
    python -m pytest tests/test_native_build.py -q -m "not slow"   # 2 cores the first time, cached afterwards)

The nvcc check is csrc/check_cuda_compile.sh (about 2 minutes on 2 cores for both architectures).
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fused_optim import _build, native
from test_native import run_without_prebuilt

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "csrc" / "check_cuda_compile.sh"
HAVE_CXX = shutil.which(os.environ.get("CXX", "c++")) is not None
NVCC = shutil.which(os.environ.get("NVCC", "nvcc"))


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler: the extension cannot have been built here")
def test_prebuilt_extension_imports_and_registers_its_ops():
    """`pip install --no-build-isolation -e .` built fused_optim._C (CPU-only with a CPU build of torch)."""
    import fused_optim._C  # noqa: F401  (fails when the install skipped the build: run the command above)
    assert native.info().endswith(f"(prebuilt: {fused_optim._C.__file__})"), native.info()
    for op in ("adam_", "lamb_", "grad_sq_", "segment_sum"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_optim::{op}", "CPU"), op
    if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info():
        # ATen's parallel_for is an inline `#pragma omp parallel`: without -fopenmp the CPU engine runs one thread.
        assert "openmp threads" in torch.ops.fused_optim.build_info(), torch.ops.fused_optim.build_info()
    cuda_built = "cuda: compiled" in torch.ops.fused_optim.build_info()
    assert native.has_cuda_kernels() == cuda_built
    if torch.version.cuda is None:
        assert not cuda_built, "a CPU build of torch cannot have compiled the CUDA kernels"


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler for the JIT build")
def test_jit_build_when_the_extension_is_missing(tmp_path):
    """Without fused_optim._C, the first use of backend='native' builds csrc/ with ninja (cached in
    ~/.cache/fused_optim) and steps exactly like the prebuilt extension."""
    proc = run_without_prebuilt("""
import torch, fused_optim
from fused_optim import native
p = torch.nn.Parameter(torch.linspace(-1, 1, 5000))
opt = fused_optim.FusedAdamW([p], lr=1e-2, backend="native")
for k in range(3):
    p.grad = torch.cos(torch.arange(5000.0) * (k + 1))
    opt.step()
print(native.info())
assert native.plan_match() is native.load().plan_match  # the JIT module serves the step plan's check too
torch.save(p.detach(), %r)
""" % str(tmp_path / "jit_param.pt"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(jit: " in proc.stdout, proc.stdout
    p = torch.nn.Parameter(torch.linspace(-1, 1, 5000))
    import fused_optim
    opt = fused_optim.FusedAdamW([p], lr=1e-2, backend="native")
    for k in range(3):
        p.grad = torch.cos(torch.arange(5000.0) * (k + 1))
        opt.step()
    assert torch.equal(torch.load(tmp_path / "jit_param.pt"), p.detach()), "JIT and prebuilt builds differ"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA sources cannot be compile-checked here")
def test_every_cuda_source_compiles_for_sm80_and_sm90():
    proc = subprocess.run(["bash", str(CHECK)], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "NVCC_ARCHS": "80 90", "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for src in [s for s in _build.CUDA_SOURCES if s.endswith(".cu")]:
        for arch in ("80", "90"):
            assert f"ok    {src}  sm_{arch}" in proc.stdout, proc.stdout
    for binding in [s for s in _build.CUDA_SOURCES if s.endswith(".cpp")]:  # ops_cuda.cpp, ops_lamb_cuda.cpp
        assert f"ok    {binding}  (syntax" in proc.stdout, proc.stdout
    assert any(s.startswith("lamb_cuda") for s in _build.CUDA_SOURCES)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_cuda_compile_check_catches_errors(tmp_path):
    """The check fails on a .cu file nvcc rejects (a host-only function called from a kernel) and on a binding
    that does not compile against torch's headers."""
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    (tmp_path / "fused_optim").mkdir()
    shutil.copy(ROOT / "fused_optim" / "_build.py", tmp_path / "fused_optim" / "_build.py")
    for cu in csrc.rglob("*.cu"):
        cu.unlink()
    (csrc / "broken.cu").write_text('#include "numerics.h"\n'
                                    "float host_only(float x) { return x; }\n"
                                    "__global__ void k(float* p) { p[0] = host_only(fused_optim::add_rn(p[0], 1.f)); }\n")
    (csrc / "ops_cuda.cpp").write_text((ROOT / "csrc" / "ops_cuda.cpp").read_text().replace(
        "c10::cuda::getCurrentCUDAStream().stream()", "c10::cuda::getCurrentCUDAStream().no_such_member()"))
    proc = subprocess.run(["bash", str(csrc / "check_cuda_compile.sh")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NVCC_ARCHS": "80", "PYTHON": sys.executable})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL  broken.cu  sm_80" in proc.stdout, proc.stdout
    assert "FAIL  ops_cuda.cpp" in proc.stdout, proc.stdout


def _needed_libraries(path: str) -> str:
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd is not installed")
    return subprocess.run([ldd, path], capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler: the extension cannot have been built here")
def test_extension_links_the_shared_libstdcxx_that_torch_uses():
    """A second, static copy of libstdc++ inside the extension breaks the streams that build TORCH_CHECK messages
    (a segfault on the GPU machine, whose CXX links it statically): the extension must need libstdc++.so.6."""
    import fused_optim._C

    assert "libstdc++.so" in _needed_libraries(fused_optim._C.__file__)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
def test_link_flags_keep_libstdcxx_shared_under_a_static_linking_compiler(tmp_path):
    """Builds a one-op extension with a compiler wrapper that adds -static-libstdc++ (as the GPU machine's
    /opt/gcc/bin/g++ does) and the extension's LD_FLAGS: the error message keeps its number, and the module needs
    the shared libstdc++. Without the flags, the message here loses everything after the first number."""
    wrapper = tmp_path / "static-gxx"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which(os.environ.get("CXX", "c++"))} "$@" -static-libstdc++\n')
    wrapper.chmod(0o755)
    script = tmp_path / "build_and_raise.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        from torch.utils.cpp_extension import load_inline
        from fused_optim import _build
        src = '''
        #include <torch/library.h>
        #include <ATen/ATen.h>
        void boom(at::TensorList xs) {{ TORCH_CHECK(false, "boom ", static_cast<int64_t>(xs.size()) + 41, " end"); }}
        TORCH_LIBRARY(fo_static_check, m) {{ m.def("boom(Tensor[] xs) -> ()"); }}
        TORCH_LIBRARY_IMPL(fo_static_check, CPU, m) {{ m.impl("boom", &boom); }}
        '''
        load_inline("fo_static_check", cpp_sources=[src], extra_ldflags=list(_build.LD_FLAGS),
                    is_python_module=False, build_directory={str(tmp_path)!r})
        try:
            torch.ops.fo_static_check.boom([torch.zeros(1)])
        except RuntimeError as exc:
            print("MESSAGE:", str(exc).splitlines()[0])
        """))
    env = dict(os.environ, CXX=str(wrapper))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "MESSAGE: boom 42 end" in out.stdout, out.stdout[-2000:]
    assert "libstdc++.so" in _needed_libraries(str(tmp_path / "fo_static_check.so"))
