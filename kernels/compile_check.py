"""Compile every Triton kernel variant for GPU targets on a machine without a GPU.

The interpreter (how CI runs the kernels) is more permissive than the compiler: it runs Python, so type errors,
unsupported ops or a dtype the backend cannot lower pass there and fail on the GPU. This check compiles the real
kernels down to cubin for sm_80 and sm_90 with Triton's own compiler (ptxas included), no driver needed.

    python -m fused_optim.kernels.compile_check            # sm_80 and sm_90
    python -m fused_optim.kernels.compile_check --arch 90
    python -m fused_optim.kernels.compile_check --resources  # and, per kernel: registers, spills, vector accesses

``--resources`` runs ptxas -v on each kernel's PTX for the last architecture given and prints, per kernel of a
variant, its warps, registers per thread, spilled bytes and 16-byte global loads/stores (``ld/st.global.v4``); it
fails when a kernel spills registers to local memory (memory-bound kernels must not: the spills add traffic) or
when no block-map kernel of an fp32 variant uses vector loads (the unmasked full-block path lost its alignment).

Each kernel module lists its variants in ``compile_variants()``: zero-argument callables that call the module's
launcher on small CPU tensors. While this check runs, ``engine.launch_grid`` compiles instead of launching, with a
signature taken from the real launch arguments. Must run without ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

_TORCH_TO_SIG = {
    torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
}


def signature_of(kernel, args, constexprs: dict):
    """Triton signature and constexprs of a launch ``kernel[grid](*args, **constexprs)``."""
    sig, const = {}, dict(constexprs)
    params = {p.name: p for p in kernel.params}
    for name, value in zip(kernel.arg_names, args):
        if value is None:
            sig[name] = "constexpr"
            const[name] = None
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + _TORCH_TO_SIG[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i64" if not -2**31 <= value < 2**31 else "i32"
        elif isinstance(value, float):
            annotation = params[name].annotation if name in params else ""
            sig[name] = annotation if annotation.startswith(("fp", "bf")) else "fp32"
        else:
            raise TypeError(f"cannot derive a Triton type for argument {name}={value!r}")
    for name in constexprs:
        sig[name] = "constexpr"
    return sig, const


def compile_for(kernel, args, constexprs: dict, archs, num_warps: int | None = None) -> list:
    """Compile ``kernel[grid](*args, **constexprs)`` for each of ``archs`` with ``num_warps`` warps per program
    (default: the engine's NUM_WARPS); returns the compiled kernels."""
    import triton
    from triton.backends.compiler import GPUTarget

    from .engine import NUM_WARPS
    num_warps = NUM_WARPS if num_warps is None else num_warps
    sig, const = signature_of(kernel, args, constexprs)
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=const)
    out = []
    for arch in archs:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=num_warps, enable_fp_fusion=False))
        out.append(compiled)
    return out


def resources(compiled, arch: int) -> dict:
    """Registers per thread and spilled bytes (ptxas -v on the kernel's PTX, with the ptxas Triton compiles with),
    and the count of 16-byte global loads and stores in the PTX."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia import compiler as nvidia

    try:
        ptxas = nvidia.get_ptxas(arch)
    except TypeError:  # older Triton: no argument
        ptxas = nvidia.get_ptxas()
    ptxas = getattr(ptxas, "path", ptxas[0] if isinstance(ptxas, tuple) else ptxas)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return dict(regs=int(regs.group(1)) if regs else -1, spill_bytes=int(spills.group(1)) if spills else 0,
                ld_v4=len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
                st_v4=len(re.findall(r"st\.global(?:\.\w+)*\.v4", ptx)))


def variants():
    """(name, callable) for every registered kernel variant and the engine's own kernels."""
    from . import RULES, engine
    found = []
    seen = set()
    for launcher in RULES.values():
        module = sys.modules[launcher.__module__]
        if module in seen:
            continue
        seen.add(module)
        for name, fn in module.compile_variants():
            found.append((f"{module.__name__.rsplit('.', 1)[-1]}:{name}", fn))
    found.append(("engine:segment_sum", lambda: engine.segment_sum(torch.zeros(2, 10), torch.tensor([0, 4, 10]))))
    return found


def run(archs=(80, 90), verbose=True, with_resources=False) -> list:
    """Compile every variant for ``archs``; returns rows (name, arch list, seconds, kernels), ``kernels`` a list of
    (kernel name, warps, resources of the last arch) when ``with_resources``; raises on the first failure."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the compile check needs compiled Triton kernels: unset TRITON_INTERPRET")
    from . import engine
    rows = []
    for name, fn in variants():
        t0 = time.perf_counter()
        kernels = []

        def compile_only(kernel, args, const, warps):
            compiled = compile_for(kernel, args, const, archs, warps)
            if with_resources:
                kernels.append((kernel.fn.__name__, warps, resources(compiled[-1], archs[-1])))

        engine.COMPILE_ONLY = compile_only
        try:
            fn()
        except Exception as exc:
            raise RuntimeError(f"{name} does not compile for sm_{archs}: {type(exc).__name__}: {exc}") from exc
        finally:
            engine.COMPILE_ONLY = None
        rows.append((name, archs, time.perf_counter() - t0, kernels))
        if verbose:
            print(f"  compiled {name:<40s} sm_{'/sm_'.join(map(str, archs))}  {rows[-1][2]:.1f} s", flush=True)
            for kname, warps, r in kernels:
                print(f"    {kname:<22s} {warps:2d} warps  {r['regs']:3d} registers  {r['spill_bytes']:3d} B spilled  "
                      f"ld.v4 {r['ld_v4']:3d}  st.v4 {r['st_v4']:3d}", flush=True)
    return rows


def resource_problems(rows) -> list:
    """What ``--resources`` fails on: a kernel that spills, or an fp32 variant whose block-map kernels (the ones
    launched with engine.BLOCK_WARPS over the 1-D block map: Adam, LAMB, the grad norm) have no vector load."""
    problems = []
    for name, _, _, kernels in rows:
        for kname, warps, r in kernels:
            if r["spill_bytes"]:
                problems.append(f"{name}: {kname} spills {r['spill_bytes']} bytes per thread ({r['regs']} registers)")
        block_map = [r for kname, _, r in kernels if kname in ("_adam_kernel", "_lamb_kernel", "_grad_sq_kernel")]
        if name.split(":")[1].startswith("fp32") and block_map and not all(r["ld_v4"] for r in block_map):
            problems.append(f"{name}: a block-map kernel has no 16-byte vector load")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default: 80 90)")
    ap.add_argument("--resources", action="store_true",
                    help="report registers, spills and vector accesses per kernel (last arch); fail on spills")
    args = ap.parse_args(argv)
    rows = run(tuple(args.arch), with_resources=args.resources)
    print(f"ok: {len(rows)} kernel variants compile for sm_{', sm_'.join(map(str, args.arch))}")
    if args.resources:
        problems = resource_problems(rows)
        for line in problems:
            print("FAILED " + line)
        if problems:
            return 1
        print(f"ok: no kernel spills registers on sm_{args.arch[-1]}; fp32 block-map kernels load 16-byte vectors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
