"""The one benchmark harness: workloads, dtype configurations, byte models, providers, timing and output.

An optimizer module (``adamw.py``, ``lamb.py``, ``adafactor.py``) declares an :class:`OptimizerSpec`: its
providers (torch.optim variants, fused_optim backends, other libraries), its byte model per dtype configuration
and the fused_optim class it benchmarks. Everything else is here and is the same for every optimizer:

* workloads are parameter lists built from real shapes alone (no weights): :data:`WORKLOADS`;
* a step is timed after warm-up as the median over many steps (CUDA events on a GPU, ``time.perf_counter`` on
  the CPU); when one param set (params, grads, optimizer state, master weights: the distinct bytes in memory) is
  smaller than 4x the last-level cache, 1 + ceil(4 x cache / its size) independent copies of the params and
  optimizer (at most 8) are stepped in rotation, so that at least 4x the cache of other data passes between two
  steps of one copy and no step finds its data in cache (a provider that cannot be rotated, torch.compile, gets
  the cache flushed before each step instead);
* on a GPU each workload is also timed with the step captured in a CUDA graph (launch overhead removed) where
  the provider can be captured;
* GB/s = n_params x bytes_per_param / time, with the byte model the optimizer states in code; the denominator
  of ``bw_fraction`` is a large streaming pass measured in the same run, bytes read + written: a device-to-device
  copy on a GPU, an in-place add ``dst += src`` on the CPU (:func:`copy_bandwidth`);
* rows go to stdout as a table, and are appended as JSON Lines to ``<out>/<device-slug>.jsonl``; a PNG plot of
  ``bw_fraction`` per provider and workload is drawn from that file.

Run it with ``python -m fused_optim bench`` (see ``cli.py`` and benchmarks/README.md).
"""
from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

import fused_optim

# ================================================================================================================
# Dtype configurations
# ================================================================================================================


@dataclass(frozen=True)
class DtypeConfig:
    """How params, grads and optimizer state are stored.

    ``master``: the optimizer keeps fp32 master weights and updates them; the low-precision param is written from
    the master (fused_optim: ``master_weights=True``; torch.optim, which has no such option: the optimizer runs on
    fp32 copies, with the grads cast into them before the step and the params copied back after it).
    ``state``: dtype of the per-element optimizer state (moments).
    """

    name: str
    param: torch.dtype  # model params and their grads
    state: torch.dtype
    master: bool
    describe: str

    @property
    def param_bytes(self) -> int:
        return torch.empty((), dtype=self.param).element_size()

    @property
    def state_bytes(self) -> int:
        return torch.empty((), dtype=self.state).element_size()


DTYPES = {
    c.name: c
    for c in (
        DtypeConfig("fp32", torch.float32, torch.float32, False, "fp32 params, grads and state"),
        DtypeConfig("bf16-master", torch.bfloat16, torch.float32, True,
                    "bf16 params and grads; fp32 master weights and state"),
        DtypeConfig("bf16", torch.bfloat16, torch.bfloat16, False, "bf16 params, grads and state"),
    )
}


# ================================================================================================================
# Byte models
# ================================================================================================================


@dataclass(frozen=True)
class ByteModel:
    """Bytes one step must move per parameter: the floor a fused kernel is measured against.

    ``passes``: one ``(reads, writes)`` pair per pass over the data, each a tuple of ``(operand, bytes)``.
    Per-tensor scalars (step counters, norms, row/column statistics) are left out: they are O(tensors) or
    O(rows + columns), not O(elements).
    """

    passes: tuple

    @property
    def bytes_per_param(self) -> int:
        """Traffic: every read and write of every pass."""
        return sum(b for reads, writes in self.passes for _, b in (*reads, *writes))

    @property
    def resident_bytes_per_param(self) -> int:
        """Distinct bytes in memory: each operand the step touches counted once (params, grads, state, master
        weights), however many times it is read or written. What a rotated copy holds (:func:`rotation_copies`)."""
        sizes: dict = {}
        for reads, writes in self.passes:
            for name, b in (*reads, *writes):
                sizes[name] = max(b, sizes.get(name, 0))
        return sum(sizes.values())

    def formula(self) -> str:
        parts = []
        for reads, writes in self.passes:
            r = " ".join(f"{n}{b}" for n, b in reads)
            w = " ".join(f"{n}{b}" for n, b in writes)
            parts.append(f"read {r}; write {w}" if w else f"read {r}")
        body = " | ".join(f"pass {i + 1}: {p}" for i, p in enumerate(parts)) if len(parts) > 1 else parts[0]
        return f"{body} = {self.bytes_per_param} B/param"


# ================================================================================================================
# Workloads: parameter shapes only
# ================================================================================================================


def gpt2_small_shapes(quick: bool = False) -> list[tuple]:
    """GPT-2 small (Radford et al. 2019; HF ``gpt2``): 124,439,808 params in 148 tensors, the LM head tied to
    ``wte``. Quick: the same 148 tensors with d_model 64, vocab 1,024, context 128 (0.67M params)."""
    d, vocab, ctx, layers = (64, 1024, 128, 12) if quick else (768, 50257, 1024, 12)
    shapes = [(vocab, d), (ctx, d)]  # wte, wpe
    for _ in range(layers):
        shapes += [
            (d,), (d,),  # ln_1 weight, bias
            (d, 3 * d), (3 * d,),  # attn.c_attn (Conv1D: in x out)
            (d, d), (d,),  # attn.c_proj
            (d,), (d,),  # ln_2
            (d, 4 * d), (4 * d,),  # mlp.c_fc
            (4 * d, d), (d,),  # mlp.c_proj
        ]
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def llama_1b_shapes(quick: bool = False) -> list[tuple]:
    """A LLaMA-style stack with the shapes of Llama 3.2 1B: d 2,048, 16 layers, 32 query / 8 key-value heads of
    64, SwiGLU 8,192, vocab 128,256, embeddings tied, RMSNorm without bias: 1,235,814,400 params in 146 tensors.
    Quick: the same 146 tensors with d 128, kv 32, ffn 512, vocab 2,048 (4.07M params)."""
    d, kv, ffn, vocab, layers = (128, 32, 512, 2048, 16) if quick else (2048, 512, 8192, 128256, 16)
    shapes = [(vocab, d)]  # embed_tokens (tied LM head)
    for _ in range(layers):
        shapes += [
            (d,),  # input_layernorm
            (d, d), (kv, d), (kv, d), (d, d),  # q_proj, k_proj, v_proj, o_proj
            (d,),  # post_attention_layernorm
            (ffn, d), (ffn, d), (d, ffn),  # gate_proj, up_proj, down_proj
        ]
    shapes += [(d,)]  # final norm
    return shapes


def many_small_shapes(quick: bool = False) -> list[tuple]:
    """1,000 tensors of 4,096 elements: launch-bound (per-tensor launches, per-launch tensor limits).
    Quick: 1,000 tensors of 1,024."""
    return [(1024 if quick else 4096,)] * 1000


def cpu_20m_shapes(quick: bool = False) -> list[tuple]:
    """~20M params in 60 tensors (30 matrices of 640 x 1024 and their 1,024-element biases): the CPU training /
    optimizer-offload case of the native backend's goal (>= 3x torch's foreach AdamW). Quick: 64-row matrices."""
    rows = 64 if quick else 640
    return [(rows, 1024), (1024,)] * 30


# 2**31 + 2**20 + 1 elements: past int32 indexing, and odd, so the last block of every engine is a partial one.
HUGE_NUMEL = 2**31 + 2**20 + 1


def huge_shapes(quick: bool = False) -> list[tuple]:
    """One tensor of more than 2**31 elements (int64 addressing); GPU only."""
    if quick:
        raise Unavailable("no quick size: the point of this workload is more than 2**31 elements")
    return [(HUGE_NUMEL,)]


@dataclass(frozen=True)
class Workload:
    name: str
    shapes: Callable[[bool], list]  # quick -> list of shapes
    describe: str
    devices: tuple = ("cuda", "cpu")  # device types it can run on
    default_devices: tuple = ("cuda", "cpu")  # device types whose default sweep includes it


WORKLOADS = {
    w.name: w
    for w in (
        Workload("gpt2-small", gpt2_small_shapes, "GPT-2 small, 124M params, 148 tensors"),
        Workload("llama-1b", llama_1b_shapes, "LLaMA-style 1.24B params, 146 tensors", default_devices=("cuda",)),
        Workload("many-small", many_small_shapes, "1,000 tensors of 4,096 elements"),
        Workload("huge", huge_shapes, "one tensor of 2**31 + 2**20 + 1 elements", devices=("cuda",)),
        Workload("cpu-20m", cpu_20m_shapes, "19.7M params in 60 tensors (CPU training, offloaded state)",
                 devices=("cpu",), default_devices=()),
    )
}


def numel(shape: tuple) -> int:
    return math.prod(shape)


# ================================================================================================================
# Providers
# ================================================================================================================


class Unavailable(Exception):
    """This provider / workload / dtype cannot run here; the message says why."""


@dataclass
class Case:
    """What a provider's ``build`` gets: one set of params (with grads) to step."""

    params: list  # leaf tensors of the config's param dtype, ``.grad`` set
    cfg: DtypeConfig
    device: torch.device
    capturable: bool  # the step will be captured in a CUDA graph
    lr: float = 1e-3

    def lr_arg(self):
        """lr as a device tensor when the step is captured (a Python float would be baked into the graph, and
        torch.optim requires a tensor lr with capturable=True to change it later); a float otherwise."""
        return torch.tensor(self.lr, device=self.device) if self.capturable else self.lr


@dataclass(frozen=True)
class Provider:
    """One implementation of an optimizer step.

    ``build(case)`` returns a zero-argument step function, or raises :class:`Unavailable`.
    """

    name: str
    build: Callable[[Case], Callable[[], None]]
    devices: tuple = ("cuda", "cpu")
    device_reason: str = ""  # why not on the other device types
    graph: bool = True  # its step can be captured in a CUDA graph
    graph_reason: str = ""
    rotate: bool = True  # independent copies may be built and stepped in rotation
    compiles: bool = False  # report the warm-up time spent compiling as compile_s
    default_devices: tuple = ("cuda", "cpu")


@dataclass(frozen=True)
class OptimizerSpec:
    """What an optimizer module declares.

    ``byte_model(cfg, shape)``: the byte model of one tensor of ``shape`` (``shape=None``: the first of
    ``shape_classes``); a workload's bytes per param are its tensors' models weighted by their sizes
    (:func:`workload_bytes`). ``shape_classes``: ``(label, example shape)`` of each class of tensors that has a
    model of its own (``--list`` prints one line per class); one class, ``("", None)``, when the model is the
    same for every shape.
    """

    name: str  # the rows' "optimizer"
    fused_class: str  # the fused_optim class it benchmarks (e.g. "FusedAdamW")
    byte_model: Callable[[DtypeConfig, tuple | None], ByteModel]
    providers: tuple
    describe: str = ""
    lr: float = 1e-3  # what every provider of this optimizer is built with
    default: bool = True  # in the default sweep once its fused_optim class exists
    shape_classes: tuple = (("", None),)
    # The provider every row's ratio_to_baseline divides by (same workload, dtype and graph mode, same run): torch's
    # best implementation of this optimizer. One of ``providers``.
    baseline: str = "torch-fused"

    def __post_init__(self):
        self.baseline_provider()  # raises when it is not one of the providers

    def baseline_provider(self) -> Provider:
        for p in self.providers:
            if p.name == self.baseline:
                return p
        raise ValueError(f"{self.name}: baseline {self.baseline!r} is not one of its providers")

    def fused_available(self) -> bool:
        return getattr(fused_optim, self.fused_class, None) is not None

    def byte_models(self, cfg: DtypeConfig) -> list:
        """``(label, ByteModel)`` of each shape class, for ``cfg``."""
        return [(label, self.byte_model(cfg, shape)) for label, shape in self.shape_classes]


def workload_bytes(spec: OptimizerSpec, cfg: DtypeConfig, shapes: list) -> tuple[float, float]:
    """``(traffic, resident)`` bytes per param of one step over ``shapes``: the byte model of each tensor
    (``spec.byte_model(cfg, shape)``), weighted by its number of elements."""
    n = traffic = resident = 0
    models: dict = {}
    for shape in shapes:
        shape = tuple(shape)
        if shape not in models:
            models[shape] = spec.byte_model(cfg, shape)
        k = numel(shape)
        n += k
        traffic += k * models[shape].bytes_per_param
        resident += k * models[shape].resident_bytes_per_param
    return (traffic / n, resident / n) if n else (0.0, 0.0)


def torch_provider(name: str, make: Callable[[list, Case], torch.optim.Optimizer], *, per_tensor_copy: bool = False,
                   compile: bool = False, **provider_kw) -> Provider:
    """A provider built from a torch.optim-style optimizer ``make(params, case)``.

    bf16-master: torch.optim has no master weights, so the optimizer runs on fp32 copies of the params; the step
    casts the bf16 grads into the copies' fp32 grads, steps, and copies the fp32 params back to bf16, the usual
    mixed-precision recipe: cast (read g2, write g4) + fp32 step (28) + copy back (read master4, write p2) =
    40 B/param instead of a fused kernel's 28. ``per_tensor_copy``: do those copies one tensor at a time (for the
    for-loop provider) instead of with ``torch._foreach_copy_``.
    ``compile``: the whole step (copies included) is ``torch.compile``d.
    """

    def build(case: Case):
        if compile and case.device.type == "cpu" and _cpu_compiler_missing():
            raise Unavailable("torch.compile on the CPU needs a C++ compiler (none found on PATH)")
        if not case.cfg.master:
            opt = make(case.params, case)
            step = opt.step
        else:
            params = case.params
            masters = [p.detach().to(torch.float32).requires_grad_() for p in params]
            for m in masters:
                m.grad = torch.empty_like(m)
            grads = [p.grad for p in params]
            master_grads = [m.grad for m in masters]
            opt = make(masters, case)

            if per_tensor_copy:
                @torch.no_grad()
                def step():
                    for mg, g in zip(master_grads, grads):
                        mg.copy_(g)
                    opt.step()
                    for p, m in zip(params, masters):
                        p.copy_(m)
            else:
                @torch.no_grad()
                def step():
                    torch._foreach_copy_(master_grads, grads)
                    opt.step()
                    torch._foreach_copy_(params, masters)
        if compile:
            step = torch.compile(step)
        return step

    return Provider(name, build, compiles=compile, **provider_kw)


def fused_provider(name: str, class_name: str, backend: str, kwargs: Callable[[Case], dict] | None = None,
                   **provider_kw) -> Provider:
    """A provider that builds ``fused_optim.<class_name>(params, lr=..., backend=backend)``; ``kwargs(case)`` gives
    the other keywords, and the lr when it has one (Adafactor's relative step: ``lr=None``).

    fused_optim keeps per-element state in fp32 whatever the param dtype, so the "bf16" configuration (bf16
    state) is not one of its options; "bf16-master" is (``master_weights=True``).
    """

    def build(case: Case):
        cls = getattr(fused_optim, class_name, None)
        if cls is None:
            raise Unavailable(f"fused_optim {fused_optim.__version__} has no {class_name} yet")
        if case.cfg.state != torch.float32:
            raise Unavailable(f"fused_optim keeps optimizer state in fp32 for {case.cfg.param} params; "
                              f"{case.cfg.name} ({case.cfg.describe}) is not one of its configurations")
        extra = dict(kwargs(case)) if kwargs else {}
        lr = extra.pop("lr") if "lr" in extra else case.lr_arg()
        try:
            opt = cls(case.params, lr=lr, backend=backend, master_weights=case.cfg.master, **extra)
        except (fused_optim.BackendUnavailable, ValueError) as exc:
            raise Unavailable(f"{class_name}(backend={backend!r}): {exc}") from None
        return opt.step

    return Provider(name, build, **provider_kw)


# The triton backend runs CPU tensors only inside Triton's interpreter: a test tool, orders of magnitude slower
# than any real engine, so it is not benchmarked on the CPU.
TRITON_DEVICE_REASON = ("GPU only: Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1), a test "
                        "tool that is not benchmarked")


def fused_providers(class_name: str, kwargs: Callable[[Case], dict] | None = None) -> tuple:
    """The fused_optim providers every optimizer module lists: triton, native, and the reference path (the
    spec: per tensor, readable; on the CPU's default sweep only)."""
    return (
        fused_provider("triton", class_name, "triton", kwargs, devices=("cuda",), device_reason=TRITON_DEVICE_REASON),
        fused_provider("native", class_name, "native", kwargs),
        fused_provider("reference", class_name, "reference", kwargs, graph=False,
                       graph_reason="the reference path reads step counters on the host",
                       default_devices=("cpu",)),
    )


_cpu_compiler: list = []


def _cpu_compiler_missing() -> bool:
    if not _cpu_compiler:
        import shutil

        _cpu_compiler.append(any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++")))
    return not _cpu_compiler[0]


# ================================================================================================================
# Device facts
# ================================================================================================================


def device_name(device: torch.device) -> str:
    """The device as rows name it: the GPU's name, or the CPU model and the number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown"
    n = torch.get_num_threads()
    return f"CPU {model} ({n} thread{'s' if n != 1 else ''})"


def slug(name: str) -> str:
    """File-name form of a device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache the working set must not fit in (GPU L2, CPU L3)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20)
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        m = re.fullmatch(r"(\d+)([KMG]?)", f.read_text().strip())
        if m:
            sizes.append(int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])
    return max(sizes, default=32 * 2**20)


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def repo_root() -> Path | None:
    """The checkout fused_optim is imported from (editable install or PYTHONPATH), or None for an installed copy."""
    root = Path(fused_optim.__file__).resolve().parent.parent
    return root if (root / "setup.py").is_file() and (root / "fused_optim").is_dir() else None


def git_commit() -> str:
    """``$FUSED_OPTIM_COMMIT`` when set (the GPU script passes on the commit it was sent: the device machine's copy
    of the tree can carry a stale .git, whose HEAD would be wrong); else the short hash of the checkout fused_optim
    runs from, "-dirty" if tracked files differ; else (an installed package) "unknown"."""
    given = os.environ.get("FUSED_OPTIM_COMMIT", "").strip()
    if given:
        return given
    fallback = "unknown"
    root = repo_root()
    if root is None:
        return fallback
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=20)
        lines = sha.stdout.split()
        if sha.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root:
            return fallback  # not a checkout, or the checkout is some other repository's
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20)
        return lines[1] + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return fallback


def versions() -> dict:
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version}


# ================================================================================================================
# Timing
# ================================================================================================================


@dataclass
class Timing:
    ms: float  # median of the timed steps
    steps: int  # how many were timed
    warmup_s: list  # wall time of each warm-up call, in seconds (first calls compile)
    copies: int  # independent param sets stepped in rotation

    @property
    def compile_s(self) -> float:
        """Warm-up wall time beyond that of as many steady-state steps: compilation and recompiles."""
        return max(0.0, sum(self.warmup_s) - len(self.warmup_s) * self.ms / 1e3)


@dataclass
class TimingPolicy:
    warmup: int = 3  # untimed calls of each copy (also what a provider's compile happens in)
    max_steps: int = 50  # timed steps, at most
    min_steps: int = 5  # timed steps, at least, whatever the budget
    budget_s: float = 2.0  # wall time per configuration the timed steps aim for
    graph_warmup: int = 3  # eager steps on a side stream before capture (lazy state init, allocator, JIT)


def _wall(fn, device) -> float:
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def capture_graphs(steps: Sequence[Callable], device: torch.device, warmup: int) -> tuple[list, list]:
    """Capture each step function in its own CUDA graph; return the graphs and the warm-up times.

    The warm-up runs on a side stream, as capture requires: it initializes the optimizer state lazily, lets the
    caching allocator settle and JIT-compiles kernels before anything is recorded.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    warm = []
    with torch.cuda.stream(side):
        for step in steps:
            for _ in range(warmup):
                warm.append(_wall(step, device))
    torch.cuda.current_stream(device).wait_stream(side)
    synchronize(device)
    graphs = []
    for step in steps:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        graphs.append(g)
    synchronize(device)
    return graphs, warm


def time_steps(steps: Sequence[Callable], device: torch.device, policy: TimingPolicy,
               flush: Tensor | None = None) -> Timing:
    """Median time of one call, calling ``steps`` in rotation.

    ``flush``: a buffer several times the last-level cache, overwritten before each timed call and outside its
    timing (for a provider that cannot be rotated; the step then finds its data evicted, at the price of the
    flush's dirty lines being written back during it, as with ``triton.testing.do_bench``).

    CUDA: one pair of events around each call; the median of their elapsed times. When the host cannot launch
    as fast as the GPU runs (a launch-bound step), the GPU waits between the events and that wait is counted:
    it is the step's real cost. CPU: ``time.perf_counter`` around each call.
    """
    k = len(steps)
    # ``policy.warmup`` rounds over every copy: each copy's first steps (lazy state init, table builds, the step
    # plan) are slow, and a copy first stepped in the timed loop put them among the timed steps. (With 8 copies,
    # as a 260 MiB L3 asks for 115 MB working sets, and 3 warm-up calls in all, half of a 10-step CPU sample was
    # first steps: 29 ms medians for a 5.5 ms step.)
    warm = [_wall(steps[i % k], device) for i in range(policy.warmup * k)]
    estimate = min(warm[-2:]) if warm else _wall(steps[0], device)
    n = max(policy.min_steps, min(policy.max_steps, int(policy.budget_s / max(estimate, 1e-6))))
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            if flush is not None:
                flush.zero_()
            starts[i].record()
            steps[i % k]()
            ends[i].record()
        synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        times = []
        for i in range(n):
            if flush is not None:
                flush.zero_()
            t0 = time.perf_counter()
            steps[i % k]()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(ms=statistics.median(times), steps=n, warmup_s=warm, copies=k)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 20) -> float:
    """GB/s (bytes read + bytes written, median over ``reps``) of the streaming pass that is the denominator of
    ``bw_fraction``. On a GPU a device-to-device copy (cudaMemcpyAsync). On the CPU an in-place add,
    ``dst += src`` (read 2n, write n): a plain copy writes lines it never read, and the CPU first reads each of
    them into the cache (write-allocate), a third of its traffic that bytes read + written do not count. It
    measured 22 GB/s on this project's 2-core CPU machine where in-place passes, an optimizer step among them, move 34-37, so
    fractions above 1. An optimizer updates its state in place, as the add does."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.ones_like(src)
    if device.type == "cpu":
        step, moved = (lambda: dst.add_(src)), 3 * n * 4
    else:
        step, moved = (lambda: dst.copy_(src)), 2 * n * 4
    timing = time_steps([step], device, TimingPolicy(warmup=3, max_steps=reps, min_steps=reps, budget_s=0.0))
    return moved / (timing.ms / 1e3) / 1e9


# ================================================================================================================
# The sweep
# ================================================================================================================

PROVIDER_ORDER = ("torch-fused", "torch-forloop", "torch-foreach", "torch-compile", "torch-ops", "torch-adafactor",
                  "transformers", "reference", "triton", "native")


@dataclass(frozen=True)
class Config:
    spec: OptimizerSpec
    workload: Workload
    cfg: DtypeConfig
    provider: Provider
    graph: bool

    def label(self) -> str:
        g = " graph" if self.graph else ""
        return f"{self.spec.name} {self.workload.name} {self.cfg.name} {self.provider.name}{g}"


@dataclass
class SweepResult:
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (Config or description, reason)
    errors: list = field(default_factory=list)  # (Config, message)
    copy_gbps: float = 0.0
    device: str = ""


def make_params(shapes: list, cfg: DtypeConfig, device: torch.device, seed: int = 0) -> list:
    """Leaf params of ``cfg.param`` dtype with random values and random grads (N(0, 0.02) and N(0, 1e-3):
    finite, non-zero, no denormals; the values do not change the time of an elementwise kernel)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.empty(shape, dtype=cfg.param, device=device)
        p.normal_(0.0, 0.02, generator=gen)
        p.requires_grad_()
        p.grad = torch.empty_like(p).normal_(0.0, 1e-3, generator=gen)
        params.append(p)
    return params


MAX_COPIES = 8


def rotation_copies(resident: float, device: torch.device, rotate: bool) -> int:
    """How many independent param sets to step in rotation, given the distinct bytes one set holds (``resident``:
    params, grads, state and master weights, each counted once, not the traffic of a step).

    Between two steps of one set, the k - 1 other sets are stepped: (k - 1) x resident distinct bytes pass through
    the cache. k = 1 + ceil(4 x cache / resident) makes that at least 4x the last-level cache; at most
    :data:`MAX_COPIES` (then (MAX_COPIES - 1) x resident pass); 1 when one set alone is already 4x the cache.
    """
    if not rotate or resident <= 0:
        return 1
    four_caches = 4 * cache_bytes(device)
    if resident >= four_caches:
        return 1
    return min(MAX_COPIES, 1 + math.ceil(four_caches / resident))


def plan(specs, workloads, dtypes, providers, device: torch.device, graph_modes, *, quick: bool,
         explicit_providers: bool, explicit_workloads: bool) -> tuple[list, list]:
    """The configurations to time, in order, and the (description, reason) of those that cannot run here."""
    todo, skipped = [], []
    dev = device.type
    for spec in specs:
        provs = [p for p in spec.providers if providers is None or p.name in providers]
        # the spec's baseline first (its time is every later row's ratio_to_baseline), then PROVIDER_ORDER
        provs.sort(key=lambda p: (p.name != spec.baseline,
                                  PROVIDER_ORDER.index(p.name) if p.name in PROVIDER_ORDER else len(PROVIDER_ORDER)))
        for wl in workloads:
            if dev not in wl.devices:
                skipped.append((f"{wl.name}", f"runs on {', '.join(wl.devices)} only"))
                continue
            if not explicit_workloads and dev not in wl.default_devices:
                continue
            if quick:
                try:
                    wl.shapes(True)
                except Unavailable as exc:
                    skipped.append((f"{wl.name} --quick", str(exc)))
                    continue
            for cfg in dtypes:
                for graph in graph_modes:
                    for prov in provs:
                        c = Config(spec, wl, cfg, prov, graph)
                        if dev not in prov.devices:
                            skipped.append((prov.name, prov.device_reason or f"runs on {', '.join(prov.devices)}"))
                        elif not explicit_providers and dev not in prov.default_devices:
                            skipped.append((prov.name, f"not in the default {dev} sweep (--provider {prov.name} "
                                                       "runs it)"))
                        elif graph and not prov.graph:
                            skipped.append((f"{prov.name} graph", prov.graph_reason or "cannot be captured"))
                        else:
                            todo.append(c)
    return todo, dedupe(skipped)


def dedupe(items):
    """(what, why) pairs without repeats, in order."""
    seen, out = set(), []
    for it in items:
        key = (str(it[0]), it[1])
        if key not in seen:
            seen.add(key)
            out.append(it)
    return out


def run_config(c: Config, device: torch.device, policy: TimingPolicy, *,
               quick: bool) -> tuple[Timing, int, int, float]:
    """Build and time one configuration; returns (timing, n_params, n_tensors, bytes_per_param). Raises
    Unavailable."""
    shapes = c.workload.shapes(quick)
    n_params = sum(numel(s) for s in shapes)
    bpp, resident = workload_bytes(c.spec, c.cfg, shapes)
    wanted = rotation_copies(n_params * resident, device, True)
    copies = wanted if c.provider.rotate else 1
    # Resident memory: about the byte model's count (params, grads, state, plus the temporaries of the unfused
    # providers), per copy, with a 10% margin.
    need = int(n_params * bpp * copies * 1.1)
    free = free_memory(device)
    if need > free:
        raise Unavailable(f"{c.workload.name} {c.cfg.name} needs about {need / 2**30:.1f} GiB, "
                          f"{free / 2**30:.1f} GiB free on {device}")
    graphs, flush = [], None
    try:
        if wanted > 1 and copies == 1:  # the working set fits in cache and the provider cannot be rotated
            flush = torch.empty(4 * cache_bytes(device), dtype=torch.uint8, device=device)
        steps = []
        for i in range(copies):
            params = make_params(shapes, c.cfg, device, seed=i)
            steps.append(c.provider.build(Case(params, c.cfg, device, capturable=c.graph, lr=c.spec.lr)))
        if c.graph:
            graphs, warm = capture_graphs(steps, device, policy.graph_warmup)
            timing = time_steps([g.replay for g in graphs], device, policy, flush)
            timing.warmup_s = warm + timing.warmup_s
        else:
            timing = time_steps(steps, device, policy, flush)
        return timing, n_params, len(shapes), bpp
    finally:
        del graphs, flush
        steps = params = None
        if c.provider.compiles:  # dynamo's code cache holds the compiled step, and through it the params
            torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _sig(x: float, digits: int = 5) -> float:
    return float(f"{x:.{digits}g}")


def make_row(c: Config, timing: Timing, n_params: int, n_tensors: int, *, device: str, copy_gbps: float,
             meta: dict, baseline_ms: float | None, bytes_per_param: float, baseline_graph: bool | None = None) -> dict:
    """One JSON row. ``bytes_per_param``: the workload's (:func:`workload_bytes`); stored as an int when it is
    one (every tensor has the same model), else to 4 decimals (GB/s is computed from the exact value).
    ``baseline_ms``: the time of ``c.spec.baseline`` in this run (None when it did not run), eager or replayed
    from a CUDA graph as ``baseline_graph`` says. ``ratio_to_torch_fused`` is kept for the optimizers whose
    baseline torch-fused is (the rows' key before ``ratio_to_baseline``), null for the others."""
    bpp = bytes_per_param
    gbps = n_params * bpp / (timing.ms / 1e3) / 1e9
    row = {
        "device": device,
        "optimizer": c.spec.name,
        "provider": c.provider.name,
        "workload": c.workload.name,
        "dtype": c.cfg.name,
        "ms": _sig(timing.ms),
        "bytes_per_param": int(bpp) if float(bpp).is_integer() else round(bpp, 4),
        "gbps": _sig(gbps),
        "copy_gbps": _sig(copy_gbps),
        "bw_fraction": _sig(gbps / copy_gbps, 4),
        "graph": c.graph,
        "commit": meta["commit"],
        "torch": meta["torch"],
        "triton": meta["triton"],
        "date": meta["date"],
        "n_params": n_params,
        "n_tensors": n_tensors,
        "baseline": c.spec.baseline,
        "baseline_graph": baseline_graph if baseline_ms else None,
        "ratio_to_baseline": _sig(timing.ms / baseline_ms, 4) if baseline_ms else None,
        "ratio_to_torch_fused": (_sig(timing.ms / baseline_ms, 4) if baseline_ms and c.spec.baseline == "torch-fused"
                                 else None),
    }
    if c.provider.compiles:
        row["compile_s"] = _sig(timing.compile_s, 3)
    return row


def run_sweep(configs: list, device: torch.device, policy: TimingPolicy, *, quick: bool, copy_bytes: int,
              on_row: Callable[[dict], None] | None = None, progress: bool = True) -> SweepResult:
    """Time ``configs`` in order; rows are handed to ``on_row`` as soon as they are measured (so an interrupted
    sweep keeps what it measured)."""
    result = SweepResult(device=device_name(device))
    meta = {"commit": git_commit(), **versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    result.copy_gbps = copy_bandwidth(device, copy_bytes)
    baselines: dict = {}
    bar = _progress(len(configs), progress)
    try:
        for c in configs:
            bar.set_description(c.label())
            try:
                timing, n_params, n_tensors, bpp = run_config(c, device, policy, quick=quick)
            except Unavailable as exc:  # the reason names what it depends on; one line per provider and reason
                result.skipped.append((f"{c.spec.name} {c.provider.name}", str(exc)))
            except torch.cuda.OutOfMemoryError as exc:
                result.skipped.append((c.label(), f"out of memory: {str(exc).splitlines()[0]}"))
            except Exception as exc:  # a provider that crashes must not end the sweep; it is reported
                result.errors.append((c.label(), f"{type(exc).__name__}: {exc}"))
            else:
                key = (c.spec.name, c.workload.name, c.cfg.name, c.graph)
                if c.provider.name == c.spec.baseline:
                    baselines[key] = timing.ms
                # A graph row's baseline is the baseline's graph replay; its eager step when it cannot be captured
                # (torch.optim.Adafactor reads scalars on the host): what the graph saves is then part of the ratio.
                base_key = key[:3] + (c.graph and c.spec.baseline_provider().graph,)
                row = make_row(c, timing, n_params, n_tensors, device=result.device, copy_gbps=result.copy_gbps,
                               meta=meta, baseline_ms=baselines.get(base_key), bytes_per_param=bpp,
                               baseline_graph=base_key[3])
                result.rows.append(row)
                if on_row:
                    on_row(row)
            bar.update(1)
    finally:
        bar.close()
    return result


class _NoBar:
    def set_description(self, *_):
        pass

    def update(self, *_):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    # disable=None: no bar when stderr is not a terminal (logs of the GPU script stay readable)
    return tqdm(total=total, unit="config", dynamic_ncols=True, leave=False, disable=None)


# ================================================================================================================
# Output: JSON Lines, table, plot
# ================================================================================================================

REQUIRED_KEYS = ("device", "optimizer", "provider", "workload", "dtype", "ms", "bytes_per_param", "gbps",
                 "copy_gbps", "bw_fraction", "graph", "commit", "torch", "triton", "date")


def append_jsonl(path: Path, rows) -> None:
    """Append rows to ``path``, one JSON object per line, flushed row by row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            f.flush()


def read_jsonl(path: Path) -> list:
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def config_key(row: dict) -> tuple:
    return (row["device"], row["optimizer"], row["workload"], row.get("n_params"), row["dtype"], row["provider"],
            bool(row["graph"]))


def latest(rows) -> list:
    """The latest row of each configuration (by date; a later line wins a tie)."""
    best: dict = {}
    for row in rows:
        key = config_key(row)
        if key not in best or row["date"] >= best[key]["date"]:
            best[key] = row
    return list(best.values())


def ratio_to_baseline(row: dict):
    """The row's time over its optimizer's baseline's (rows written before ``ratio_to_baseline`` existed have only
    ``ratio_to_torch_fused``, whose baseline was torch-fused)."""
    return row["ratio_to_baseline"] if "ratio_to_baseline" in row else row.get("ratio_to_torch_fused")


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def format_table(rows, copy_gbps: float | None = None, device: str = "") -> str:
    """The stdout table: one line per row ("x base": ``ratio_to_baseline``)."""
    head = ("optimizer", "workload", "params", "dtype", "provider", "graph", "ms", "GB/s", "bw_frac",
            "x base", "compile_s")
    lines = [[
        r["optimizer"], r["workload"], _human(r.get("n_params")), r["dtype"], r["provider"],
        "yes" if r["graph"] else "no", _fmt(r["ms"], ".4g"), _fmt(r["gbps"], ".1f"), _fmt(r["bw_fraction"], ".3f"),
        _fmt(ratio_to_baseline(r), ".2f"), _fmt(r.get("compile_s"), ".1f"),
    ] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = []
    if device:
        copy = f"; copy {copy_gbps:.1f} GB/s (read + write)" if copy_gbps else ""
        out.append(f"device: {device}{copy}")
    out.append("  ".join(h.rjust(w) if i >= 6 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths))))
    for line in lines:
        out.append("  ".join(v.rjust(w) if i >= 6 else v.ljust(w) for i, (v, w) in enumerate(zip(line, widths))))
    return "\n".join(out)


def _human(n) -> str:
    if n is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def plot(rows, path: Path) -> str | None:
    """Bar chart of ``bw_fraction`` per provider (bars) and workload (groups), one panel per optimizer and dtype;
    graph-captured rows are hatched. Returns why no plot was drawn, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'fused_optim[bench]')"
    rows = list(rows)
    if not rows:
        return "no rows to plot"
    panels = sorted({(r["optimizer"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.6 * len(panels)), squeeze=False)
    wl_order = list(WORKLOADS)
    for ax, (opt, dt) in zip(axes[:, 0], panels):
        sub = [r for r in rows if r["optimizer"] == opt and r["dtype"] == dt]
        workloads = sorted({r["workload"] for r in sub}, key=lambda w: wl_order.index(w) if w in wl_order else 99)
        series = sorted({(r["provider"], bool(r["graph"])) for r in sub},
                        key=lambda s: (PROVIDER_ORDER.index(s[0]) if s[0] in PROVIDER_ORDER else 99, s[1]))
        width = 0.8 / max(1, len(series))
        cmap = plt.get_cmap("tab10")
        for j, (prov, graph) in enumerate(series):
            xs, ys = [], []
            for i, wl in enumerate(workloads):
                hit = [r for r in sub if r["workload"] == wl and r["provider"] == prov and bool(r["graph"]) == graph]
                if hit:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(hit[-1]["bw_fraction"])
            color = cmap(PROVIDER_ORDER.index(prov) % 10 if prov in PROVIDER_ORDER else 9)
            bars = ax.bar(xs, ys, width, label=prov + (" (graph)" if graph else ""), color=color,
                          hatch="//" if graph else None, edgecolor="black", linewidth=0.4)
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(workloads)))
        sizes = {r["workload"]: _human(r.get("n_params")) for r in sub}
        ax.set_xticklabels([f"{wl} ({sizes[wl]} params)" for wl in workloads])
        ax.set_ylabel("bw_fraction")
        ax.set_ylim(0, max(1.1, max(r["bw_fraction"] for r in sub) * 1.1))
        ax.set_title(f"{opt}, {dt}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    def _summary(key):
        values = sorted({str(r[key]) for r in rows})
        return ", ".join(values[:3]) + (f" (+{len(values) - 3})" if len(values) > 3 else "")

    dates = sorted(r["date"][:10] for r in rows)
    span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    fig.suptitle(f"{_summary('device')}: bw_fraction = (bytes/param x params / time) / copy GB/s\n"
                 f"torch {_summary('torch')}, triton {_summary('triton')}, commit {_summary('commit')}, {span}",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
