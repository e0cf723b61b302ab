"""The one Triton multi-tensor engine: device tables of tensor addresses, a block map, one launch.

Every Triton optimizer in fused_optim runs through this file. An optimizer file (``adam.py``, ...) holds its
``@triton.jit`` update rule and a launcher; the addressing lives here:

* :class:`TensorTable` keeps, for one group of tensors that share (device, dtypes), one int64 address table per
  operand (param, grad, exp_avg, ...), the element counts, and a block map ``block -> (tensor, element offset)``.
  The tables are device tensors built once and cached by the caller; they are rebuilt only when a tensor's
  storage changes. Address tables are read in the kernel as typed pointers
  (``tl.load(table + i).to(tl.pointer_type(dtype))``, the pattern of Triton's grouped-GEMM tutorial), so one
  launch covers any number of tensors: there is no 4 KB kernel-argument limit as in torch's fused Adam
  (36 tensors / 320 blocks per launch) or apex (110 tensors).
* ``@triton.jit`` helpers that a rule calls: :func:`block_of` (which tensor and which elements this program
  owns, and whether the block is full), :func:`operand` (a typed pointer from a table), :func:`load` and
  :func:`store` (fp32 in registers, masked only in a tensor's tail block, rounded to the storage dtype on the way
  out by :func:`round_to`), :func:`last_block_of_tensor` (the per-tensor step counter protocol, below).
  A rule writes its element math once, as a ``@triton.jit`` function with a ``MASKED`` flag, and its kernel
  calls it twice: for full blocks (unmasked, vectorized) and for the tail block.
* :func:`launch`: one launch over the block map.

Per-tensor step counters. torch keeps one ``step`` per parameter, and a parameter with no grad in a step does
not advance, so steps differ between tensors of one launch. The kernel reads each tensor's step from its
address table and every program of that tensor uses ``step + 1``. The new value must be written exactly once,
after every program of the tensor has read the old one: each program, after its work, increments the tensor's
``arrivals`` counter (an int32 atomic with acquire-release order); the program that sees ``n_blocks - 1`` is the
last reader, writes ``step + 1`` and resets the counter to 0 for the next step. Integer atomics commute, so the
result is deterministic; there is no float atomic anywhere. A zero-size tensor still gets one (empty) block so
that its step advances, as in torch.

Run under ``TRITON_INTERPRET=1`` with CPU tensors, the same code is what CI tests (see tests/README.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Elements per program. 4096 fp32 elements = 16 KB per operand, 32 elements (eight 16-byte vectors) per thread
# at 4 warps: large enough to hide DRAM latency with a few programs per SM, small enough that the tail block of
# a 4,096-element tensor wastes nothing. The interpreter runs one Python call per program, so CPU tests use
# the same constant with small tensors; tests pass an explicit smaller block to cross block boundaries cheaply.
DEFAULT_BLOCK = 4096
NUM_WARPS = 4

_TORCH_TO_TL = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}
SUPPORTED_DTYPES = tuple(_TORCH_TO_TL)


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch dtype the kernels support (fp32, fp16, bf16)."""
    return _TORCH_TO_TL[dtype]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------------------------
# Device-side helpers, called from the rules.
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def block_of(block_tensor, block_start, numels, BLOCK: tl.constexpr):
    """The tensor index, 64-bit element offsets and mask of the elements this program owns, and whether the
    block is full (then the rule loads and stores without a mask, which lets the compiler vectorize)."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    # int64 offsets: tensors of more than 2**31 elements are addressed completely.
    start = tl.multiple_of(tl.load(block_start + pid), BLOCK)
    n = tl.load(numels + t)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    return t, offs, offs < n, start + BLOCK <= n


@triton.jit
def operand(table, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed pointer to tensor ``t`` of one operand's address table. ``ALIGNED``: the host checked that every
    address of the launch is a multiple of 16 bytes; with the block offset a multiple of BLOCK, full blocks then
    compile to 16-byte vector loads and stores (``ld.global.v4``) instead of one load per element."""
    ptr = tl.load(table + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def load(ptr, offs, mask, MASKED: tl.constexpr):
    """Load a block as fp32; masked only for the tail block of a tensor."""
    if MASKED:
        return tl.load(ptr + offs, mask=mask).to(tl.float32)
    else:
        return tl.load(ptr + offs).to(tl.float32)


@triton.jit
def store(ptr, offs, value, mask, MASKED: tl.constexpr):
    """Store a block, rounding fp32 to the pointer's dtype (see ``round_to``)."""
    value = round_to(value, ptr.dtype.element_ty)
    if MASKED:
        tl.store(ptr + offs, value, mask=mask)
    else:
        tl.store(ptr + offs, value)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, round to nearest even.

    bf16 is rounded by hand: the GPU's conversion rounds to nearest even, but Triton's interpreter truncates,
    and CI proves the kernels in the interpreter. Adding 0x7FFF plus the lowest kept bit and dropping the low 16
    bits is round-to-nearest-even on the bit pattern (it carries into the exponent and to inf exactly when the
    value rounds up to it); NaN is kept a quiet NaN. Four integer ops per element on a memory-bound kernel.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, bits | 0x400000, rounded)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def last_block_of_tensor(arrivals, t, numels, BLOCK: tl.constexpr):
    """Called once per program after it has read the tensor's step: True in exactly one program per tensor,
    the last to arrive, which then writes the new step. Resets the counter for the next launch."""
    n = tl.load(numels + t)
    n_blocks = tl.maximum(tl.cdiv(n, BLOCK), 1)
    arrived = tl.atomic_add(arrivals + t, 1, sem="acq_rel")
    last = arrived == (n_blocks - 1).to(tl.int32)
    if last:
        tl.store(arrivals + t, 0)
    return last


# --------------------------------------------------------------------------------------------------------------
# Host side.
# --------------------------------------------------------------------------------------------------------------
def storage_key(tensors) -> tuple:
    """What a cached table depends on: every operand's address and size. ``None`` entries stay ``None``."""
    return tuple(0 if t is None else (t.data_ptr(), t.numel()) for t in tensors)


@dataclass
class TensorTable:
    """Device tables for one launch group. Build with :meth:`build`; keep and reuse while the key matches."""

    key: tuple
    ptrs: dict  # operand name -> int64 device tensor [n_tensors] of addresses (0 for an absent operand)
    numels: torch.Tensor  # int64 [n_tensors]
    block_tensor: torch.Tensor  # int32 [n_blocks]
    block_start: torch.Tensor  # int64 [n_blocks], element offset of the block inside its tensor
    first_block: torch.Tensor  # int32 [n_tensors + 1], block range of each tensor (for per-tensor reductions)
    arrivals: torch.Tensor  # int32 [n_tensors], zeroed, see module docstring
    n_tensors: int
    n_blocks: int
    block: int
    aligned: bool  # every address is a multiple of 16 bytes (see ``operand``)
    _host: torch.Tensor | None = None  # the pinned staging buffer, kept alive until the async copy is done

    @classmethod
    def build(cls, operands: dict, device: torch.device, block: int = DEFAULT_BLOCK) -> "TensorTable":
        """``operands`` maps a name to a list of tensors (or ``None``s for an absent operand); every list has one
        entry per tensor of the group, and the first list gives the element counts."""
        names = list(operands)
        lists = [operands[n] for n in names]
        count = len(lists[0])
        if any(len(lst) != count for lst in lists):
            raise ValueError("every operand list of a TensorTable needs one entry per tensor")
        numels = [t.numel() for t in lists[0]]
        blocks_per = [max(1, -(-n // block)) for n in numels]
        n_blocks = sum(blocks_per)
        block_tensor, block_start, first_block = [], [], [0]
        for i, nb in enumerate(blocks_per):
            block_tensor.extend([i] * nb)
            block_start.extend(range(0, nb * block, block))
            first_block.append(first_block[-1] + nb)

        # One int64 host buffer, one host->device copy; the device tables are views into it.
        pieces = [[0 if t is None else t.data_ptr() for t in lst] for lst in lists]
        pieces += [numels, block_start, block_tensor, first_block, [0] * count]
        flat = [v for piece in pieces for v in piece]
        host = torch.tensor(flat, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
            dev = host.to(device, non_blocking=True)
        else:
            dev = host.to(device)
        views, at = [], 0
        for piece in pieces:
            views.append(dev[at:at + len(piece)])
            at += len(piece)
        ptrs = dict(zip(names, views[: len(names)]))
        numels_t, start_t, btensor_t, first_t, arrivals_t = views[len(names):]
        return cls(
            key=storage_key([t for lst in lists for t in lst]),
            ptrs=ptrs,
            numels=numels_t,
            block_tensor=btensor_t.to(torch.int32),
            block_start=start_t,
            first_block=first_t.to(torch.int32),
            arrivals=arrivals_t.to(torch.int32),
            n_tensors=count,
            n_blocks=n_blocks,
            block=block,
            aligned=all(v % 16 == 0 for piece in pieces[: len(names)] for v in piece),
            _host=host if device.type == "cuda" else None,
        )


LAUNCHES = {"count": 0}  # counted by tests: the number of launches must not grow with the number of tensors


def launch(kernel, table: TensorTable, *args, **constexprs):
    """Launch ``kernel`` once over the whole block map of ``table``.

    FP contraction is off, so ``a * b + c`` is two IEEE-rounded ops on the GPU as in the interpreter and in the
    reference (see tests/README.md, "Why fused may differ from the reference").
    """
    LAUNCHES["count"] += 1
    kernel[(table.n_blocks,)](
        *args,
        table.numels,
        table.block_tensor,
        table.block_start,
        table.arrivals,
        BLOCK=table.block,
        ALIGNED=table.aligned,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
        **constexprs,
    )
