"""Tests of the benchmark harness (``fused_optim/bench``) and ``benchmarks/render_results.py``.

    python -m pytest tests/test_bench.py -q          # CPU, about 15 s on 2 cores

Benchmarks are not tests: nothing here asserts a speed. What is checked is that the harness measures what it
says it measures: the workloads have the real models' sizes, the byte models count what their docstrings say,
every row has the keys of issue 6 and its derived columns follow from its measured ones (GB/s from ms and the
byte model, bw_fraction from GB/s and the copy bandwidth, the ratio from torch-fused's time in the same run), rows
round-trip through the JSONL file and the renderer, GPU-only paths are reported unavailable on the CPU with a
reason, and the unfused LAMB baseline computes LAMB. The test marked ``gpu`` runs a quick sweep on CUDA, eager and
captured in a CUDA graph (benchmarks/gpu_verify.sh runs it).
"""
from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch

import fused_optim
from fused_optim import bench
from fused_optim.bench import harness
from fused_optim.bench.harness import DTYPES, WORKLOADS, Case, TimingPolicy, Unavailable

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    """One CPU thread: on a busy CI machine torch's multi-threaded CPU kernels wait at every per-tensor barrier for
    a descheduled thread (seconds per step), and these tests time only to check the bookkeeping."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
CPU = torch.device("cpu")
FAST = TimingPolicy(warmup=1, max_steps=3, min_steps=3, budget_s=0.0)
EXTRA_KEYS = ("n_params", "n_tensors", "ratio_to_torch_fused", "baseline", "baseline_graph", "ratio_to_baseline")


def _render_module():
    spec = importlib.util.spec_from_file_location("render_results", ROOT / "benchmarks" / "render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _provider(optimizer: str, name: str):
    return next(p for p in bench.OPTIMIZERS[optimizer].providers if p.name == name)


# ----------------------------------------------------------------------------------------------------------------
# Workloads and byte models
# ----------------------------------------------------------------------------------------------------------------
def test_workloads_have_the_real_sizes():
    def size(name, quick=False):
        shapes = WORKLOADS[name].shapes(quick)
        return sum(harness.numel(s) for s in shapes), len(shapes)

    assert size("gpt2-small") == (124_439_808, 148)  # HF gpt2: 124,439,808 params (LM head tied to wte)
    assert size("llama-1b") == (1_235_814_400, 146)  # Llama 3.2 1B: 1,235,814,400 params (tied embeddings)
    assert size("many-small") == (4_096_000, 1000)
    n, count = size("huge")
    assert count == 1 and n > 2**31 and n % 2 == 1
    # quick sizes keep the tensor counts (the launch-count side of the benchmark) and shrink the widths
    assert size("gpt2-small", True)[1] == 148 and size("gpt2-small", True)[0] < 1_000_000
    assert size("llama-1b", True)[1] == 146 and size("many-small", True)[1] == 1000
    with pytest.raises(Unavailable, match="2\\*\\*31"):
        WORKLOADS["huge"].shapes(True)


@pytest.mark.parametrize("optimizer, dtype, expected", [
    ("adamw", "fp32", 28),  # read p g m v, write p m v, 4 B each
    ("adamw", "bf16-master", 28),  # read master4 g2 m4 v4, write master4 p2 m4 v4
    ("adamw", "bf16", 14),
    ("adam", "fp32", 28),
    ("lamb", "fp32", 40),  # pass 1: p g m v -> m v; pass 2: p m v -> p
    ("lamb", "bf16-master", 40),
    ("adafactor", "fp32", 24),  # three reads of g, two of p, one write
])
def test_byte_models(optimizer, dtype, expected):
    model = bench.OPTIMIZERS[optimizer].byte_model(DTYPES[dtype])
    assert model.bytes_per_param == expected
    assert model.formula().endswith(f"= {expected} B/param")


@pytest.mark.parametrize("dtype, matrix, vector", [
    # kernels/adafactor.py's byte model: a factored matrix reads g three times and θ twice and writes θ once; a
    # tensor of rank 0/1 reads θ in pass 1, reads and writes its full V in pass 2, reads g, V, θ and writes θ in pass 3
    ("fp32", (24, 8), (32, 12)),
    ("bf16-master", (20, 8), (30, 12)),  # + master 4, the bf16 param only written (2)
    ("bf16", (12, 4), (16, 6)),  # V in the state dtype
])
def test_adafactor_byte_model_follows_the_shapes(dtype, matrix, vector):
    spec, cfg = bench.OPTIMIZERS["adafactor"], DTYPES[dtype]
    for shape, (traffic, resident) in (((6, 5), matrix), ((2, 6, 5), matrix), ((30,), vector), ((), vector)):
        model = spec.byte_model(cfg, shape)
        assert (model.bytes_per_param, model.resident_bytes_per_param) == (traffic, resident), shape
    assert [label for label, _ in spec.byte_models(cfg)] == ["rank >= 2", "rank 0/1"]
    # a workload's bytes per param: the models weighted by the tensors' sizes
    assert harness.workload_bytes(spec, cfg, WORKLOADS["many-small"].shapes(False)) == vector  # all 1-D
    shapes = WORKLOADS["gpt2-small"].shapes(False)
    n = sum(harness.numel(s) for s in shapes)
    n_flat = sum(harness.numel(s) for s in shapes if len(s) < 2)
    assert n_flat == 121_344  # 12 layers x (4 x 768 norms + 2304 + 768 + 3072 + 768 biases) + ln_f 2 x 768
    got = harness.workload_bytes(spec, cfg, shapes)
    assert got == pytest.approx(((matrix[0] * (n - n_flat) + vector[0] * n_flat) / n,
                                 (matrix[1] * (n - n_flat) + vector[1] * n_flat) / n), rel=1e-12)
    # the other optimizers' models do not depend on the shape
    adamw = bench.OPTIMIZERS["adamw"]
    assert harness.workload_bytes(adamw, cfg, shapes)[0] == adamw.byte_model(cfg).bytes_per_param


def test_adafactor_rows_carry_the_workloads_bytes_per_param():
    """many-small is all 1-D: its Adafactor rows count 32 B/param (a full V read and written), not a matrix's 24."""
    spec = bench.OPTIMIZERS["adafactor"]
    todo, _ = harness.plan([spec], [WORKLOADS["many-small"]], [DTYPES["fp32"]], ["torch-adafactor"], CPU, [False],
                           quick=True, explicit_providers=True, explicit_workloads=True)
    result = harness.run_sweep(todo, CPU, FAST, quick=True, copy_bytes=32 * 2**20, progress=False)
    assert not result.errors, result.errors
    (row,) = result.rows
    assert row["bytes_per_param"] == 32
    assert row["gbps"] == pytest.approx(row["n_params"] * 32 / (row["ms"] / 1e3) / 1e9, rel=1e-3)


def test_adafactor_providers_compute_the_same_update():
    """torch.optim.Adafactor, transformers' Adafactor and fused_optim's, built as the benchmark builds them, step the
    same fp32 params with the same grads three times and land on the same params: the benchmark times one update.

    Tolerance, per tensor: ``steps x (1e-4 x max|move| + 2 x eps32 x max|θ|)``, where move = θ_3 - θ_0 (torch's).
    The providers compute the same math in different fp32 orders (norm² vs mean of g², R Cᵀ / mean R vs
    rsqrt ⊗ rsqrt, lerp vs mul-add, sums over up to 780 elements: RMS(θ), RMS(U) and the means each within
    780 x 2^-24 < 5e-5 relative), so one step's updates differ by less than 1e-4 of their size, and each provider
    rounds θ - update to nearest (1 ulp of θ, < eps32 x max|θ|, apart); nothing amplifies a difference (θ enters the
    next step only through RMS(θ)). Measured: 0.4 ulp of max|θ|, 2.6e-6 of the move, some 100x below the bound.
    A different update fails by orders of magnitude: without parameter scaling (the benchmark until it was fixed)
    the others move θ 1 / RMS(θ) = 50x farther than torch; with torch's default ε1 (its machine epsilon, 1.2e-7)
    the element whose grad is 1e-9 moves by |U| = 0.008 x α instead of α.
    """
    spec, cfg = bench.OPTIMIZERS["adafactor"], DTYPES["fp32"]
    shapes = [(6, 130), (3, 4, 5), (7,), (300,), ()]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) * 0.02 for s in shapes]  # N(0, 0.02), as make_params
    steps = 3
    grads = [[torch.randn(s, generator=gen) * 1e-3 for s in shapes] for _ in range(steps)]
    grads[0][3][5] = 1e-9  # below torch's default ε1 (fp32 machine epsilon): clamped there, not by the others
    ran, unavailable = {}, {}
    for provider in spec.providers:
        params = [x.clone().requires_grad_() for x in init]
        for p in params:
            p.grad = torch.zeros_like(p)
        try:
            step = provider.build(Case(params, cfg, CPU, capturable=False, lr=spec.lr))
        except Unavailable as exc:  # transformers not installed, a fused backend not built here
            unavailable[provider.name] = str(exc)
            continue
        for t in range(steps):
            for p, g in zip(params, grads[t]):
                p.grad.copy_(g)
            step()
        ran[provider.name] = [p.detach().clone() for p in params]
    assert {"torch-adafactor", "reference"} <= set(ran), unavailable
    assert "transformers" in ran or "not installed" in unavailable["transformers"]
    eps32 = torch.finfo(torch.float32).eps
    for i, (x0, want) in enumerate(zip(init, ran["torch-adafactor"])):
        move = (want - x0).abs().max().item()
        tol = steps * (1e-4 * move + 2 * eps32 * want.abs().max().item())
        assert move > 100 * tol, shapes[i]  # a real update, far above the tolerance
        for name, got in ran.items():
            diff = (got[i] - want).abs().max().item()
            assert diff <= tol, f"{name} {shapes[i]}: |Δθ| {diff:.3g} > {tol:.3g} (torch moved θ by {move:.3g})"


def test_adamw_fp32_formula_names_its_operands():
    formula = bench.OPTIMIZERS["adamw"].byte_model(DTYPES["fp32"]).formula()
    assert formula == "read p4 g4 m4 v4; write p4 m4 v4 = 28 B/param"


# ----------------------------------------------------------------------------------------------------------------
# A quick CPU sweep through the harness functions
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_sweep():
    specs = [bench.OPTIMIZERS["adamw"]]
    todo, skipped = harness.plan(specs, [WORKLOADS["gpt2-small"]], [DTYPES["fp32"]],
                                 ["torch-fused", "torch-foreach", "reference"], CPU, [False], quick=True,
                                 explicit_providers=True, explicit_workloads=True)
    assert [c.provider.name for c in todo] == ["torch-fused", "torch-foreach", "reference"]  # baseline first
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see _one_thread
    try:
        return harness.run_sweep(todo, CPU, FAST, quick=True, copy_bytes=32 * 2**20, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_quick_sweep_rows(quick_sweep):
    result = quick_sweep
    assert not result.errors, result.errors
    assert [r["provider"] for r in result.rows] == ["torch-fused", "torch-foreach", "reference"]
    assert result.copy_gbps > 0
    fused_ms = result.rows[0]["ms"]
    for row in result.rows:
        assert set(harness.REQUIRED_KEYS + EXTRA_KEYS) <= set(row), row
        assert "compile_s" not in row  # only torch-compile rows have it
        assert row["device"].startswith("CPU ") and row["device"] == result.device
        assert (row["optimizer"], row["workload"], row["dtype"], row["graph"]) == ("adamw", "gpt2-small", "fp32",
                                                                                   False)
        assert row["ms"] > 0
        assert row["bytes_per_param"] == 28
        assert row["n_tensors"] == 148
        assert row["n_params"] == sum(harness.numel(s) for s in WORKLOADS["gpt2-small"].shapes(True))
        assert row["gbps"] == pytest.approx(row["n_params"] * 28 / (row["ms"] / 1e3) / 1e9, rel=1e-3)
        assert row["copy_gbps"] == pytest.approx(result.copy_gbps, rel=1e-4)
        assert row["bw_fraction"] == pytest.approx(row["gbps"] / row["copy_gbps"], rel=1e-3)
        assert row["ratio_to_torch_fused"] == pytest.approx(row["ms"] / fused_ms, rel=1e-3)
        assert row["baseline"] == "torch-fused" and row["baseline_graph"] is False
        assert row["ratio_to_baseline"] == row["ratio_to_torch_fused"]
        assert row["torch"] == torch.__version__
        assert len(row["date"]) == 20 and row["date"].endswith("Z")
        json.dumps(row)  # JSON-serializable as it is


def _fake_sweep(monkeypatch, configs, times):
    """run_sweep over ``configs`` with ``times[(provider, graph)]`` as the measured ms (nothing is built or run:
    a CUDA plan is swept on a CPU-only machine)."""
    monkeypatch.setattr(harness, "copy_bandwidth", lambda device, nbytes: 1000.0)
    monkeypatch.setattr(harness, "device_name", lambda device: "Fake GPU")

    def run_config(c, device, policy, *, quick):
        return harness.Timing(ms=times[(c.provider.name, c.graph)], steps=1, warmup_s=[0.0], copies=1), 1000, 1, 28

    monkeypatch.setattr(harness, "run_config", run_config)
    return harness.run_sweep(configs, torch.device("cuda"), FAST, quick=True, copy_bytes=1, progress=False)


@pytest.mark.parametrize("optimizer, baseline, capturable", [
    ("adamw", "torch-fused", True),
    ("lamb", "torch-ops", True),  # torch.optim has no LAMB: LAMB in torch foreach ops
    ("adafactor", "torch-adafactor", False),  # torch.optim.Adafactor reads scalars on the host: no graph rows
])
def test_every_row_has_a_ratio_to_its_optimizers_torch_baseline(monkeypatch, optimizer, baseline, capturable):
    """Each optimizer names its baseline; every row of a sweep that includes it gets ratio_to_baseline (LAMB and
    Adafactor rows had none: their only baseline was torch-fused). A graph row compares with the baseline's graph
    replay, or with its eager step when the baseline cannot be captured."""
    spec = bench.OPTIMIZERS[optimizer]
    assert spec.baseline == baseline
    # the baseline runs first, whatever order the providers are listed in
    todo, _ = harness.plan([spec], [WORKLOADS["gpt2-small"]], [DTYPES["fp32"]], ["native", "triton", baseline],
                           torch.device("cuda"), [False, True], quick=False, explicit_providers=True,
                           explicit_workloads=True)
    assert [(c.provider.name, c.graph) for c in todo] == (
        [(baseline, False), ("triton", False), ("native", False)]
        + ([(baseline, True)] if capturable else []) + [("triton", True), ("native", True)])
    times = {(baseline, False): 10.0, (baseline, True): 8.0, ("triton", False): 2.0, ("triton", True): 1.0,
             ("native", False): 4.0, ("native", True): 0.5}
    result = _fake_sweep(monkeypatch, todo, times)
    assert not result.errors and len(result.rows) == len(todo)
    for row in result.rows:
        base_graph = row["graph"] and capturable
        assert row["baseline"] == baseline and row["baseline_graph"] is base_graph
        want = times[(row["provider"], row["graph"])] / times[(baseline, base_graph)]
        assert row["ratio_to_baseline"] == pytest.approx(want, rel=1e-6)
        assert row["ratio_to_torch_fused"] == (row["ratio_to_baseline"] if baseline == "torch-fused" else None)
    table = harness.format_table(result.rows)
    assert "x base" in table.splitlines()[0]
    assert table.splitlines()[-1].split()[-2] == format(result.rows[-1]["ratio_to_baseline"], ".2f")


def test_gpu_verify_sweeps_run_each_optimizers_baseline():
    """Every sweep of benchmarks/gpu_verify.sh that names its providers names the baseline of each of its optimizers
    (the torch-compile sweep ran alone: its rows had no ratio)."""
    import re
    import shlex

    text = (ROOT / "benchmarks" / "gpu_verify.sh").read_text().replace("\\\n", " ")
    sweeps = [shlex.split(line.split("#")[0]) for line in text.splitlines()
              if re.match(r"\s*(bench|sweep) .*--optimizer", line)]
    assert len(sweeps) >= 5, sweeps
    checked = 0
    for words in sweeps:
        if "--provider" not in words:
            continue  # every provider of the optimizers named, their baselines among them
        providers = words[words.index("--provider") + 1].split(",")
        for name in words[words.index("--optimizer") + 1].split(","):
            assert bench.OPTIMIZERS[name].baseline in providers, words
        checked += 1
    assert checked >= 4


def test_gpu_verify_gives_every_sweep_its_floor():
    """benchmarks/gpu_verify.sh runs the benchmark sweeps right after the build, and the floors of the sweeps (the
    least time each needs; torch.compile's compile alone took 46 s) fit what a build cut at its cap leaves of the
    deadline. Before, the GPU tests ran first: if they used their cap, the sweeps got 80/40/30/10/30 s."""
    import re

    text = (ROOT / "benchmarks" / "gpu_verify.sh").read_text()
    stages = re.search(r"^ALL_STAGES=\((.*)\)$", text, re.M).group(1).split()
    assert stages[0] == "bench", stages
    deadline = int(re.search(r"DEADLINE=\$\{GPU_VERIFY_DEADLINE:-(\d+)\}", text).group(1))
    build_cap = int(re.search(r'in_group "\$\(limit (\d+) \d+\)" "\$PY" -m pip install', text).group(1))
    sweeps = [(int(cap), int(floor)) for cap, floor in re.findall(r"^\s*sweep (\d+) (\d+) --optimizer", text, re.M)]
    assert len(sweeps) == 5 and all(10 <= floor <= cap for cap, floor in sweeps), sweeps
    assert dict(zip(("adamw", "others", "big", "bf16", "compile"), sweeps))["compile"][1] >= 60
    env_and_checks = 30  # env.txt, the import check, the query of the optimizers: 10-20 s
    assert deadline - build_cap - env_and_checks >= sum(floor for _, floor in sweeps) + 10
    assert re.search(r"^PY=\$\{PYTHON:-\$\(command -v python \|\| command -v python3\)\}$", text, re.M)


def test_time_steps_takes_the_median_and_flushes_outside_the_timing():
    calls, flushes = [], []

    class Flush:
        def zero_(self):
            flushes.append(1)
            time.sleep(0.05)  # would dominate the median if it were timed

    def step():
        calls.append(1)
        time.sleep(0.002)

    timing = harness.time_steps([step], CPU, TimingPolicy(warmup=2, max_steps=5, min_steps=5, budget_s=0.0),
                                flush=Flush())
    assert len(calls) == 7 and len(flushes) == 5 and timing.steps == 5
    assert 2.0 <= timing.ms < 40.0


def test_every_rotated_copy_is_warmed_up_before_timing():
    """A copy's first step (lazy state init) is slow; the warm-up steps every copy, so none is timed."""
    calls = [0, 0, 0]

    def make(i):
        def step():
            calls[i] += 1
            time.sleep(0.05 if calls[i] == 1 else 0.002)
        return step

    timing = harness.time_steps([make(i) for i in range(3)], CPU,
                                TimingPolicy(warmup=1, max_steps=3, min_steps=3, budget_s=0.0))
    assert calls == [2, 2, 2] and len(timing.warmup_s) == 3 and timing.steps == 3
    assert 2.0 <= timing.ms < 40.0  # the median of three steady steps (two first steps would have been 50 ms)


def test_rotation_copies():
    cache = harness.cache_bytes(CPU)
    assert harness.rotation_copies(cache // 10, CPU, True) == 8  # capped
    assert 1 < harness.rotation_copies(cache, CPU, True) <= 8
    assert harness.rotation_copies(4 * cache, CPU, True) == 1
    assert harness.rotation_copies(cache // 10, CPU, False) == 1
    # 1 + ceil(4 x cache / resident): the k - 1 other copies hold at least 4x the cache
    for resident in (cache, 2 * cache, 4 * cache - 1, 3 * cache // 4):  # k <= 8
        k = harness.rotation_copies(resident, CPU, True)
        assert (k - 1) * resident >= 4 * cache and (k - 2) * resident < 4 * cache, (resident, k)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_rotated_copies_keep_four_caches_of_distinct_data_between_visits(monkeypatch, optimizer):
    """The copies come from the bytes a param set holds (AdamW fp32: p g m v = 16 B/param; Adafactor on vectors:
    p g V = 12), not from the bytes a step moves (28, 32): between two steps of one copy, the other copies must
    hold 4x the last-level cache. Counted with traffic, many-small on an H100 (50 MiB L2) got 2 AdamW copies:
    1.25x the L2 between visits."""
    cache = 8 * 2**20
    monkeypatch.setattr(harness, "cache_bytes", lambda device: cache)
    seen = []

    def fake_time_steps(steps, device, policy, flush=None):
        seen.append((len(steps), flush))
        return harness.Timing(ms=1.0, steps=1, warmup_s=[0.0], copies=len(steps))

    monkeypatch.setattr(harness, "time_steps", fake_time_steps)
    spec, cfg = bench.OPTIMIZERS[optimizer], DTYPES["fp32"]
    (config,), _ = harness.plan([spec], [WORKLOADS["many-small"]], [cfg], ["reference"], CPU, [False],
                                quick=True, explicit_providers=True, explicit_workloads=True)
    _, n_params, _, _ = harness.run_config(config, CPU, FAST, quick=True)
    resident = n_params * spec.byte_model(cfg, (1024,)).resident_bytes_per_param
    ((k, flush),) = seen
    assert flush is None and 1 < k <= harness.MAX_COPIES
    assert (k - 1) * resident >= 4 * cache  # 16.4 MB (AdamW) or 12.3 MB (Adafactor) a copy: 4 copies, not 2


def test_latest_row_per_configuration():
    base = {"device": "d", "optimizer": "adamw", "workload": "w", "n_params": 1, "dtype": "fp32", "provider": "p",
            "graph": False}
    rows = [dict(base, date="2025-01-02T00:00:00Z", ms=2.0), dict(base, date="2025-01-01T00:00:00Z", ms=1.0),
            dict(base, date="2025-01-01T00:00:00Z", ms=3.0, graph=True)]
    got = sorted(harness.latest(rows), key=lambda r: r["graph"])
    assert [r["ms"] for r in got] == [2.0, 3.0]
    assert sorted(_render_module().latest(rows), key=lambda r: r["graph"]) == got


# ----------------------------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------------------------
def test_gpu_only_paths_are_unavailable_on_cpu(monkeypatch):
    spec = bench.OPTIMIZERS["adamw"]
    todo, skipped = harness.plan([spec], list(WORKLOADS.values()), [DTYPES["fp32"]], None, CPU, [False],
                                 quick=False, explicit_providers=False, explicit_workloads=False)
    reasons = dict((str(what), why) for what, why in skipped)
    assert "interpreter" in reasons["triton"]
    assert "cuda only" in reasons["huge"]
    assert "default cpu sweep" in reasons["torch-compile"]
    ran = {(c.workload.name, c.provider.name) for c in todo}
    assert {w for w, _ in ran} == {"gpt2-small", "many-small"}  # llama-1b is in the GPU default only
    assert not any(p in ("triton", "torch-compile") for _, p in ran)
    assert {"torch-forloop", "torch-foreach", "torch-fused", "reference", "native"} <= {p for _, p in ran}

    # Even with Triton's interpreter switched on (as tests run), triton is not benchmarked on CPU tensors.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    todo, skipped = harness.plan([spec], [WORKLOADS["gpt2-small"]], [DTYPES["fp32"]], ["triton"], CPU, [False],
                                 quick=True, explicit_providers=True, explicit_workloads=True)
    assert todo == [] and "interpreter" in dict(skipped)["triton"]

    params = harness.make_params([(4, 4)], DTYPES["fp32"], CPU)
    native = _provider("adamw", "native")
    if fused_optim.backends.native_unusable(CPU) is not None:
        with pytest.raises(Unavailable, match="native"):
            native.build(Case(params, DTYPES["fp32"], CPU, capturable=False))
    else:  # the CPU engine exists: it is a CPU provider like the others
        native.build(Case(params, DTYPES["fp32"], CPU, capturable=False))()


def test_cuda_plan_times_eager_then_graph_with_torch_fused_first():
    # Planning touches no device, so the GPU sweep's plan is checked here too.
    todo, skipped = harness.plan([bench.OPTIMIZERS["adamw"]], [WORKLOADS["gpt2-small"]], [DTYPES["fp32"]], None,
                                 torch.device("cuda"), [False, True], quick=False, explicit_providers=False,
                                 explicit_workloads=False)
    got = [(c.provider.name, c.graph) for c in todo]
    assert got == [("torch-fused", False), ("torch-forloop", False), ("torch-foreach", False),
                   ("torch-compile", False), ("triton", False), ("native", False),
                   ("torch-fused", True), ("torch-forloop", True), ("torch-foreach", True),
                   ("triton", True), ("native", True)]
    reasons = dict((str(what), why) for what, why in skipped)
    assert "reduce-overhead" in reasons["torch-compile graph"]
    assert "default cuda sweep" in reasons["reference"]


def test_fused_optim_has_no_bf16_state_configuration():
    params = harness.make_params([(8,)], DTYPES["bf16"], CPU)
    with pytest.raises(Unavailable, match="fp32"):
        _provider("adamw", "reference").build(Case(params, DTYPES["bf16"], CPU, capturable=False))


def test_missing_fused_class_is_unavailable():
    params = harness.make_params([(8,)], DTYPES["fp32"], CPU)
    provider = harness.fused_provider("triton", "FusedNoSuchOptimizer", "triton")
    with pytest.raises(Unavailable, match="FusedNoSuchOptimizer"):
        provider.build(Case(params, DTYPES["fp32"], CPU, capturable=False))


@pytest.mark.parametrize("provider", ["torch-forloop", "torch-foreach"])  # per-tensor and foreach copies
def test_torch_master_weights_step_updates_bf16_params_from_fp32_masters(provider):
    params = harness.make_params([(64,), (3, 5)], DTYPES["bf16-master"], CPU)
    before = [p.detach().clone() for p in params]
    step = _provider("adamw", provider).build(Case(params, DTYPES["bf16-master"], CPU, capturable=False))
    reference = harness.make_params([(64,), (3, 5)], DTYPES["bf16-master"], CPU)
    fused = fused_optim.FusedAdamW(reference, lr=1e-3, weight_decay=0.1, backend="reference", master_weights=True)
    for _ in range(3):
        step()
        fused.step()
    for p, b, r in zip(params, before, reference):
        assert p.dtype == torch.bfloat16 and not torch.equal(p, b)
        # fp32 AdamW on the masters, rounded to bf16 once: the same as fused_optim's master weights up to a bf16
        # rounding of fp32 values that may differ in the last bits (3 steps of lr 1e-3 move params of ~0.02 by
        # ~3e-3, 20x the bf16 tolerance of ~1.6e-2 * 0.02, so a missing update or copy-back fails)
        torch.testing.assert_close(p, r)


def _lamb_per_tensor(p, g, m, v, t, lr, beta1, beta2, eps, wd):
    """LAMB on one tensor, written out (You et al. 2020, Algorithm 2, Adam moments with bias correction)."""
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    r = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps) + wd * p
    w_norm, r_norm = p.norm(), r.norm()
    trust = (w_norm / r_norm) if w_norm > 0 and r_norm > 0 else 1.0
    p.sub_(lr * trust * r)


def test_torch_ops_lamb_is_lamb():
    from fused_optim.bench.lamb import HYPERPARAMETERS, ForeachLAMB

    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 3), (5,), (1,), (130,)]
    params = [torch.randn(s, dtype=torch.float64, generator=gen).requires_grad_() for s in shapes]
    with torch.no_grad():
        params[1].zero_()  # zero weight norm: trust ratio 1
    ref = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in ref]
    v = [torch.zeros_like(p) for p in ref]
    lr = 0.05
    opt = ForeachLAMB(params, lr=lr, **HYPERPARAMETERS)
    beta1, beta2 = HYPERPARAMETERS["betas"]
    for t in range(1, 4):
        grads = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            _lamb_per_tensor(ref[i], g, m[i], v[i], t, lr, beta1, beta2, HYPERPARAMETERS["eps"],
                             HYPERPARAMETERS["weight_decay"])
    # fp64 throughout; lerp vs mul-add and a foreach pow vs Python's ** differ by a few ulps per step.
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-15)
    assert torch.equal(params[1].detach().abs() > 0, ref[1].abs() > 0)
    for i, p in enumerate(params):
        torch.testing.assert_close(opt.state[p]["exp_avg"], m[i], rtol=1e-12, atol=1e-15)
        assert float(opt.state[p]["step"]) == 3.0


# ----------------------------------------------------------------------------------------------------------------
# The command line, the JSONL file and the renderer
# ----------------------------------------------------------------------------------------------------------------
QUICK = ["--quick", "--device", "cpu", "--workload", "gpt2-small", "--steps", "3", "--budget", "0", "--copy-mib", "32",
         "--threads", "1", "--no-progress"]


def test_main_quick_no_save(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status = bench.main(QUICK + ["--no-save", "--provider", "torch-fused,triton,native", "--graph"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert list(tmp_path.iterdir()) == []  # --no-save writes nothing
    assert "(not saved)" in out and "--graph applies to CUDA devices only" in out
    table = [line.split() for line in out.splitlines() if line.startswith("adamw ")]
    native_usable = fused_optim.backends.native_unusable(CPU) is None
    assert [line[4] for line in table] == ["torch-fused"] + (["native"] if native_usable else [])
    assert "triton: GPU only" in out
    if not native_usable:
        assert "adamw native: FusedAdamW(backend='native')" in out
    if not torch.cuda.is_available():
        assert "no CUDA device: GPU providers and GPU workloads are unavailable" in out


def test_bad_arguments_exit_2(capsys):
    assert bench.main(["--workload", "gpt3"]) == 2
    assert "unknown workload 'gpt3'" in capsys.readouterr().err
    assert bench.main(["--provider", "jax"]) == 2


def test_rows_round_trip_through_jsonl_and_renderer(tmp_path, capsys):
    out_dir = tmp_path / "results"
    assert bench.main(QUICK + ["--provider", "torch-fused,torch-foreach", "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    files = list(out_dir.glob("*.jsonl"))
    assert [f.name for f in files] == [harness.slug(harness.device_name(CPU)) + ".jsonl"]
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [r["provider"] for r in rows] == ["torch-fused", "torch-foreach"]
    assert all(set(harness.REQUIRED_KEYS) <= set(r) for r in rows)
    png = files[0].with_suffix(".png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plot not drawn: matplotlib is not installed" in printed
    else:
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"

    render = _render_module()
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n<!-- results:begin -->\nstale\n<!-- results:end -->\n\nafter\n")
    args = ["--results", str(out_dir), "--readme", str(readme)]
    assert render.main(args + ["--check"]) == 1  # stale
    assert render.main(args + ["--write"]) == 0
    assert render.main(args + ["--check"]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\n## Results\n<!-- results:begin -->\n")
    assert text.endswith("<!-- results:end -->\n\nafter\n")
    assert "No GPU results are committed yet" in text  # only CPU rows here
    assert f"### {rows[0]['device']}\n" in text
    assert f"commit `{rows[0]['commit']}`" in text
    line = next(ln for ln in text.splitlines() if "| torch-foreach |" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:4] == ["adamw", "gpt2-small", render._params(rows[1]["n_params"]), "148"]
    assert cells[7] == format(rows[1]["ms"], ".4g") and cells[9] == format(rows[1]["bw_fraction"], ".3f")
    assert cells[10] == format(rows[1]["ratio_to_torch_fused"], ".2f")
    assert cells[11] == f"`{render.short_commit(rows[1]['commit'])}`"  # each row names its commit
    if png.is_file():
        assert f"](results/{png.name})" in text  # relative to the README's folder
    readme.write_text(text.replace("| torch-foreach |", "| torch-foreach* |"))
    assert render.main(args + ["--check"]) == 1  # a hand edit is caught

    # Appending keeps earlier rows; the renderer shows the latest of each configuration.
    later = dict(rows[0], date="2999-01-01T00:00:00Z", ms=12345.0)
    harness.append_jsonl(files[0], [later])
    assert len(files[0].read_text().splitlines()) == 3
    fused_lines = [ln for ln in render.render(render.read_rows(out_dir), tmp_path).splitlines()
                   if "| torch-fused |" in ln]
    assert len(fused_lines) == 1 and "| 1.234e+04 |" in fused_lines[0]


def _row(tmp_path, **kw):
    row = dict(device="Fake GPU", optimizer="adamw", provider="torch-fused", workload="gpt2-small", dtype="fp32",
               ms=1.0, bytes_per_param=28, gbps=1.0, copy_gbps=1.0, bw_fraction=1.0, graph=False,
               commit="0123456789ab", torch="2", triton="3", date="2026-01-01T00:00:00Z", n_params=1, n_tensors=1)
    row.update(kw)
    row["_file"] = tmp_path / "fake-gpu.jsonl"
    return row


def test_renderer_shows_each_optimizers_baseline(tmp_path):
    render = _render_module()
    rows = [
        _row(tmp_path, ratio_to_torch_fused=0.9),  # before ratio_to_baseline: torch-fused was the baseline
        _row(tmp_path, optimizer="lamb", provider="triton", ratio_to_torch_fused=None),  # ... and LAMB had none
        _row(tmp_path, optimizer="lamb", provider="native", workload="many-small", baseline="torch-ops",
             baseline_graph=False, ratio_to_baseline=0.25, ratio_to_torch_fused=None),
        _row(tmp_path, optimizer="adafactor", provider="native", graph=True, baseline="torch-adafactor",
             baseline_graph=False, ratio_to_baseline=0.125, ratio_to_torch_fused=None),
    ]
    text = render.render(rows, tmp_path)
    assert ("its optimizer's baseline in the same run (same workload, dtype and graph mode): adamw torch-fused, "
            "lamb torch-ops, adafactor torch-adafactor; graph rows against the eager step of torch-adafactor") in text
    cells = {(r[0], r[1], r[5]): r for r in ([c.strip() for c in ln.strip("|").split("|")]
                                             for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln)}
    assert cells[("adamw", "gpt2-small", "torch-fused")][10] == "0.90"
    assert cells[("lamb", "gpt2-small", "triton")][10] == "–"
    assert cells[("lamb", "many-small", "native")][10] == "0.25"
    assert cells[("adafactor", "gpt2-small", "native")][10] == "0.12"
    # rows of different runs side by side: each names its commit
    rows[2]["commit"] = "fedcba987654-dirty"
    cells = {(r[0], r[1], r[5]): r for r in ([c.strip() for c in ln.strip("|").split("|")]
                                             for ln in render.render(rows, tmp_path).splitlines()
                                             if ln.startswith("| ") and "---" not in ln)}
    assert cells[("adamw", "gpt2-small", "torch-fused")][11] == "`0123456`"
    assert cells[("lamb", "many-small", "native")][11] == "`fedcba9-dirty`"
    assert render.short_commit("unknown") == "unknown"


def test_renderer_without_results_says_so(tmp_path, capsys):
    render = _render_module()
    assert render.main(["--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "No GPU results are committed yet" in out and "No benchmark results are committed yet" in out
    assert not any(ch.isdigit() for ch in out.split("-->", 1)[1].replace("gpu_verify", ""))  # no numbers at all
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    assert render.main(["--results", str(tmp_path), "--readme", str(readme), "--check"]) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"device": "x"}\n')
    assert render.main(["--results", str(tmp_path)]) == 2
    assert "bad.jsonl:1: row lacks" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# GPU (benchmarks/gpu_verify.sh)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quick_sweep_on_cuda_eager_and_in_a_cuda_graph():
    cuda = torch.device("cuda")
    spec = bench.OPTIMIZERS["adamw"]
    todo, _ = harness.plan([spec], [WORKLOADS["gpt2-small"], WORKLOADS["many-small"]],
                           [DTYPES["fp32"], DTYPES["bf16-master"]], ["torch-fused", "triton"], cuda, [False, True],
                           quick=True, explicit_providers=True, explicit_workloads=True)
    result = harness.run_sweep(todo, cuda, FAST, quick=True, copy_bytes=256 * 2**20, progress=False)
    assert not result.errors, result.errors
    got = {(r["workload"], r["dtype"], r["provider"], r["graph"]) for r in result.rows}
    for wl in ("gpt2-small", "many-small"):
        for dt in ("fp32", "bf16-master"):
            for prov in ("torch-fused", "triton"):
                for graph in (False, True):
                    assert (wl, dt, prov, graph) in got
    for row in result.rows:
        assert row["ms"] > 0 and math.isfinite(row["bw_fraction"]) and row["ratio_to_torch_fused"] is not None


def test_rows_name_the_commit_they_were_given(monkeypatch):
    """FUSED_OPTIM_COMMIT names the tree when set: the GPU machine's copy of the checkout can carry a stale .git
    (seen: its HEAD was the session's first commit, so rows said '<old>-dirty')."""
    from fused_optim.bench import harness
    monkeypatch.setenv("FUSED_OPTIM_COMMIT", "0123456789ab")
    assert harness.git_commit() == "0123456789ab"
    monkeypatch.delenv("FUSED_OPTIM_COMMIT")
    assert harness.git_commit() != "0123456789ab"


def test_cpu_denominator_is_an_in_place_add_counting_three_passes(monkeypatch):
    """On the CPU the bandwidth denominator is ``dst += src`` (read 2n, write n): a CPU copy also reads every line
    it writes (write-allocate), so counting it as 2n made an in-place optimizer step look faster than memory."""
    from fused_optim.bench import harness

    def fake_time_steps(steps, device, policy):
        steps[0]()
        return harness.Timing(ms=1.0, steps=1, warmup_s=[0.0], copies=1)

    monkeypatch.setattr(harness, "time_steps", fake_time_steps)
    n_bytes = 4 * 1000
    assert harness.copy_bandwidth(torch.device("cpu"), n_bytes) == pytest.approx(3 * n_bytes / 1e-3 / 1e9)


def test_docs_name_the_cpu_denominator_the_code_measures():
    """benchmarks/README.md said the CPU denominator was ``dst.copy_(src)`` (2n bytes) while copy_bandwidth times
    ``dst += src`` and counts 3n: the Timing section and the column table must both say in-place add."""
    text = (ROOT / "benchmarks" / "README.md").read_text()
    timing = text[text.index("## Timing"):text.index("## Columns")]
    copy_item = timing[timing.index("* Copy bandwidth"):]
    assert "`dst += src`" in copy_item and "3n" in copy_item
    assert "on the CPU torch's multi-threaded copy" not in copy_item
    columns = text[text.index("## Columns"):]
    assert "on the CPU an in-place add `dst += src`" in columns
    assert "in-place add ``dst += src`` on the CPU" in (ROOT / "fused_optim" / "bench" / "harness.py").read_text()
