"""The Triton kernels compile for sm_80 and sm_90 (real compiler, ptxas included), checked without a GPU.

The interpreter, which runs the kernels in CI, accepts programs the compiler rejects; this closes that gap. The
check runs in a subprocess because TRITON_INTERPRET (set by conftest.py without a GPU) is read when kernels are
defined."""
import os
import subprocess
import sys

import pytest


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def test_every_kernel_variant_compiles_for_sm80_and_sm90_without_spills():
    """Every variant compiles; on sm_90 no kernel spills registers to local memory and the fp32 block-map kernels
    load 16-byte vectors (ptxas -v; ``--resources`` exits 1 otherwise)."""
    proc = subprocess.run([sys.executable, "-m", "fused_optim.kernels.compile_check", "--arch", "80", "90",
                           "--resources"], env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "adam:bf16-master-scaler" in proc.stdout and "engine:segment_sum" in proc.stdout
    assert "ok: no kernel spills registers on sm_90" in proc.stdout
    # One report line per launched kernel: Adam's fp32 kernel with its registers and vector accesses.
    adam = proc.stdout.split("compiled adam:fp32 ")[1].splitlines()[1].split()
    assert adam[0] == "_adam_kernel" and int(adam[adam.index("ld.v4") + 1]) > 0, proc.stdout


def test_resource_check_fails_on_spills_and_scalar_loads():
    """The judge of ``--resources`` flags what it exists to catch (rows shaped as ``run`` returns them)."""
    from fused_optim.kernels.compile_check import resource_problems

    ok = dict(regs=48, spill_bytes=0, ld_v4=4, st_v4=3)
    assert resource_problems([("adam:fp32", (90,), 0.1, [("_adam_kernel", 8, ok)])]) == []
    spilling = [("adafactor:fp32", (90,), 0.1, [("_pass1_kernel", 4, dict(ok, regs=255, spill_bytes=96))])]
    assert "spills 96 bytes" in resource_problems(spilling)[0]
    scalar = [("lamb:fp32", (90,), 0.1, [("_lamb_kernel", 8, ok), ("_lamb_kernel", 8, dict(ok, ld_v4=0))])]
    assert "no 16-byte vector load" in resource_problems(scalar)[0]
    # bf16 loads are 8-byte vectors: not judged
    assert resource_problems([("adam:bf16", (90,), 0.1, [("_adam_kernel", 8, dict(ok, ld_v4=0))])]) == []


def test_compile_check_catches_a_kernel_the_interpreter_accepts(tmp_path):
    """A kernel that runs under the interpreter (numpy broadcasts the mismatched shapes) but cannot compile."""
    script = tmp_path / "broken.py"
    script.write_text(
        "import torch, triton, triton.language as tl\n"
        "from fused_optim.kernels.compile_check import compile_for\n"
        "@triton.jit\n"
        "def k(x, BLOCK: tl.constexpr):\n"
        "    a = tl.load(x + tl.arange(0, BLOCK))\n"
        "    b = tl.load(x + tl.arange(0, BLOCK * 2))\n"
        "    tl.store(x + tl.arange(0, BLOCK), a + b)\n"
        "compile_for(k, (torch.zeros(64),), dict(BLOCK=32), (90,))\n")
    proc = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "CompilationError" in proc.stderr or "incompatible" in proc.stderr.lower() or "shape" in proc.stderr.lower()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the interpreter guard")
def test_compile_check_refuses_to_run_interpreted():
    proc = subprocess.run([sys.executable, "-m", "fused_optim.kernels.compile_check"], capture_output=True,
                          text=True, env=dict(os.environ, TRITON_INTERPRET="1"), timeout=300)
    assert proc.returncode != 0 and "unset TRITON_INTERPRET" in proc.stderr
