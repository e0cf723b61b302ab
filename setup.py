"""Build script: the Python packages (``kernels/`` installs as ``fused_optim.kernels``) and the optional native
extension ``fused_optim._C`` (``csrc/``). Metadata lives in pyproject.toml.

    pip install --no-build-isolation -e .      # or: pip install --no-build-isolation .

The extension is built ahead of time when torch is importable at build time (hence --no-build-isolation: an
isolated build environment has no torch) and a C++ compiler works: with CUDA kernels when torch has CUDA and
nvcc is found, CPU-only otherwise. ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default 8.0;9.0).
``FUSED_OPTIM_BUILD_NATIVE=0`` skips the extension. If it cannot be built, the install still succeeds with the
pure-Python package and prints why; the first use of ``backend="native"`` then tries a JIT build
(fused_optim/native.py) and ``backend="auto"`` falls back to triton or the reference.
"""
import os
import runpy
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = runpy.run_path(os.path.join(HERE, "fused_optim", "_build.py"))  # sources and flags, shared with the JIT

PACKAGES = ["fused_optim", "fused_optim.reference", "fused_optim.kernels", "fused_optim.bench", "fused_optim._csrc"]
PACKAGE_DIR = {"fused_optim": "fused_optim", "fused_optim.kernels": "kernels", "fused_optim._csrc": "csrc"}
# The C++/CUDA sources travel with the package, so that a wheel built without the extension can JIT-build it.
PACKAGE_DATA = {"fused_optim._csrc": ["*.h", "*.cuh", "*.cpp", "*.cu", "*.sh", "cpu/*.h", "cpu/*.cpp"]}


def warn(message: str) -> None:
    print(f"\nWARNING: fused_optim: {message}\n", file=sys.stderr, flush=True)


def native_extension():
    """([extension], cmdclass) for fused_optim._C, or ([], {}) with a warning saying why not."""
    if os.environ.get("FUSED_OPTIM_BUILD_NATIVE", "1") == "0":
        warn("FUSED_OPTIM_BUILD_NATIVE=0: the native extension fused_optim._C is not built")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # ImportError, or a broken torch
        warn(f"torch is not importable at build time ({type(exc).__name__}: {exc}), so the native extension "
             "fused_optim._C is not built (pip's isolated build has no torch: install with "
             "`pip install --no-build-isolation .`). backend='native' will try a JIT build on first use.")
        return [], {}

    def src(names):
        return [os.path.join("csrc", name) for name in names]

    cxx = list(BUILD["CXX_FLAGS"])
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", BUILD["DEFAULT_CUDA_ARCHS"])
        ext = cpp_extension.CUDAExtension(
            "fused_optim._C", src(BUILD["CPU_SOURCES"] + BUILD["CUDA_SOURCES"]),
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx + BUILD["CUDA_DEFINES"], "nvcc": BUILD["NVCC_FLAGS"] + BUILD["CUDA_DEFINES"]},
            extra_link_args=BUILD["LD_FLAGS"],
        )
    else:
        why = "torch has no CUDA" if torch.version.cuda is None else "nvcc was not found (set CUDA_HOME)"
        print(f"fused_optim: building fused_optim._C for CPU only ({why})", flush=True)
        ext = cpp_extension.CppExtension("fused_optim._C", src(BUILD["CPU_SOURCES"]),
                                         include_dirs=[os.path.join(HERE, "csrc")], extra_compile_args={"cxx": cxx},
                                         extra_link_args=BUILD["LD_FLAGS"])

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Builds fused_optim._C; a failure is a warning, and the package installs without it."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # no compiler, compile error, ABI check: anything stops only the extension
                self.extensions = []  # nothing to copy or list as an output
                warn(f"the native extension fused_optim._C could not be built ({type(exc).__name__}: "
                     f"{str(exc).strip()[-2000:]}). The package is installed without it: backend='native' will try "
                     "a JIT build on first use; backend='auto' uses triton (CUDA) or the reference path.")

    return [ext], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = native_extension()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
