"""The command line: ``python -m fused_optim info`` and ``check`` (``bench`` has its own tests)."""
import os
import subprocess
import sys

import pytest

from fused_optim import cli
from cases import fused_backends


def test_info_runs_and_explains_backends():
    proc = subprocess.run([sys.executable, "-m", "fused_optim", "info"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "torch" in out and "triton" in out
    for name in ("triton", "native", "reference"):
        assert name in out
    assert "backend='auto' picks" in out


def test_check_passes_on_this_machine(capsys):
    code = cli.main(["check", "--optimizer", "adamw", "--dtype", "float32", "bfloat16", "--steps", "12"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "adamw" in out and "float32" in out and "bfloat16+master" in out and " 0 failed" in out
    # LAMB, end to end (its default), one run of two steps per fused backend that has its rule (~2 s each): the
    # second step starts from the gaps of the first.
    code = cli.main(["check", "--optimizer", "lamb", "--dtype", "float32", "--steps", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    lamb_backends = fused_backends(rule="lamb")
    assert "lamb" in out and "float32" in out and f"\n{len(lamb_backends)} runs, 0 failed" in out
    for backend in lamb_backends:
        assert f"lamb       {backend:<8} float32" in out, out


def test_check_fails_on_a_wrong_kernel(monkeypatch, capsys):
    """A kernel with a 0.1% error in its learning rate must make ``check`` exit 1."""
    from fused_optim import kernels
    real = kernels.RULES["adam"]

    def off_by_a_bit(table, hp, **kw):
        return real(table, dict(hp, lr=float(hp["lr"]) * 1.001), **kw)
    off_by_a_bit.OPERANDS = real.OPERANDS
    monkeypatch.setitem(kernels.RULES, "adam", off_by_a_bit)
    code = cli.main(["check", "--optimizer", "adamw", "--dtype", "float32", "--steps", "12", "--backend", "triton"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "FAIL" in out


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU-only machine behaviour")
def test_check_subprocess_turns_on_the_interpreter_without_a_gpu():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET")
    proc = subprocess.run([sys.executable, "-m", "fused_optim", "check", "--optimizer", "adam", "--dtype",
                           "float16", "--steps", "3"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "triton" in proc.stdout and "float16+master" in proc.stdout
