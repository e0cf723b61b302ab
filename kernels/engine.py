"""The one Triton multi-tensor engine: device tables of tensor addresses, a block map, one launch.

Every Triton optimizer in fused_optim runs through this file. An optimizer file (``adam.py``, ...) holds its
``@triton.jit`` update rule and a launcher; the addressing lives here:

* :class:`fused_optim.tables.TensorTable` (shared with the native backend) keeps, for one group of tensors that
  share (device, dtypes), one int64 address table per operand (param, grad, exp_avg, ...), the element counts, and
  a block map ``block -> (tensor, element offset)``. The tables are device tensors built once and cached by the
  caller; they are rebuilt only when a tensor's storage changes. Address tables are read in the kernel as typed
  pointers
  (``tl.load(table + i).to(tl.pointer_type(dtype))``, the pattern of Triton's grouped-GEMM tutorial), so one
  launch covers any number of tensors: there is no 4 KB kernel-argument limit as in torch's fused Adam
  (36 tensors / 320 blocks per launch) or apex (110 tensors).
* ``@triton.jit`` helpers that a rule calls: :func:`block_of` (which tensor and which block this program owns,
  and whether the block is full), :func:`piece` (the offsets and mask of one SUB-element piece of the block),
  :func:`operand` (a typed pointer from a table), :func:`load` and :func:`store` (fp32 in registers, masked only
  in a tensor's tail block, rounded to the storage dtype on the way out by :func:`round_to`),
  :func:`last_block_of_tensor` (the per-tensor step counter protocol, below).
  A rule writes its element math once, as a ``@triton.jit`` function with a ``MASKED`` flag, and its kernel
  calls it in two loops over the pieces of its block: for a full block (unmasked, vectorized) and for the tail
  block of a tensor (masked, only the pieces that hold elements).
* :func:`launch`: one launch over the block map; :func:`segment_sum`: deterministic per-segment sums of per-block
  partials (per-tensor norms, row/column statistics), a visible step between passes.

Per-tensor step counters. torch keeps one ``step`` per parameter, and a parameter with no grad in a step does
not advance, so steps differ between tensors of one launch. The kernel reads each tensor's step from its
address table and every program of that tensor uses ``step + 1``. The new value must be written exactly once,
after every program of the tensor has read the old one: each program, after its work, increments the tensor's
``arrivals`` counter (an int32 atomic with acquire-release order); the program that sees ``n_blocks - 1`` is the
last reader, writes ``step + 1`` and resets the counter to 0 for the next step. Integer atomics commute, so the
result is deterministic; there is no float atomic anywhere. A zero-size tensor still gets one (empty) block so
that its step advances, as in torch.

The "2-D tile map" section at the end does the same for rules that need row and column statistics of matrices
(Adafactor): a tile map (fused_optim.tables.TileTable), per-tile row/column partial sums, ``segment_sums`` to
finish them in a fixed order, and the step protocol on tiles (``last_tile_of_tensor``).

Run under ``TRITON_INTERPRET=1`` with CPU tensors, the same code is what CI tests (see tests/README.md).
"""
from __future__ import annotations

import os
import torch
import triton
import triton.language as tl

from fused_optim.tables import DEFAULT_BLOCK, TensorTable, storage_key  # noqa: F401  (re-exported)

# The shape of a block-map program (Adam, LAMB, the global grad norm): a BLOCK = 4096-element block walked in
# SUB_BLOCK = 1024-element pieces by BLOCK_WARPS = 8 warps, so each of the 256 threads handles one 16-byte vector of
# fp32 per operand per piece, four pieces per block: the shape of the native CUDA engine (csrc/multi_tensor.cuh),
# which reached 0.975 (Adam) and 0.978 (LAMB) of copy bandwidth on the H100. The whole block in registers at once
# (4 warps, 32 elements per thread, as until 2026-11-23) compiled to 254-255 registers per thread for Adam and
# LAMB's pass 1 (ptxas -v, sm_90): two programs per SM; those kernels reached 0.918 and 0.810. In a piece loop the
# same kernels compile to under 64 registers (benchmarks/triton_num_warps.py compares the shapes on a GPU).
BLOCK_WARPS = 8
SUB_BLOCK = 1024
# The tile-map kernels (Adafactor's passes): 8 warps, 16 elements of a 32 x 128 tile per thread (ptxas -v, sm_90).
# Where every matrix's column count is a multiple of 16 (COL_MULTIPLE = 16, rows as 16-byte vectors: GPT-2's shapes)
# the passes take 76-105 registers at 8 warps, 128-151 at 4 (until 2026-11-23). With an odd column count
# (COL_MULTIPLE = 1, element-wise 64-bit offsets) 4 warps hit the 255-register cap and spilled 96-504 bytes per
# thread to local memory; 8 warps take 178-222 registers and spill nothing (compile_check --resources checks it).
TILE_WARPS = 8
# Everything else (segment sums, the statistics pass): 4 warps.
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


# Compiled, the kernels run on CUDA tensors; under the interpreter, on CPU tensors (Triton reads TRITON_INTERPRET when
# a kernel is defined, as this does at import). Where torch rounds one pointwise op differently on the two devices
# (addcmul: adam.adam_moments), a kernel rounds as the torch of its device, so that it matches the reference there.
CUDA_ROUNDING = tl.constexpr(not interpreting())


# --------------------------------------------------------------------------------------------------------------
# Device-side helpers, called from the rules.
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def block_of(block_tensor, block_start, numels, BLOCK: tl.constexpr):
    """The tensor index ``t`` of this program's block, the block's first element ``start`` (int64: tensors of more
    than 2**31 elements are addressed completely), the tensor's element count ``n``, and whether the block is full
    (then the rule loads and stores without a mask, which lets the compiler vectorize)."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.multiple_of(tl.load(block_start + pid), BLOCK)
    n = tl.load(numels + t)
    return t, start, n, start + BLOCK <= n


@triton.jit
def piece(start, k, n, SUB: tl.constexpr):
    """64-bit offsets and mask of the SUB elements at ``start + k`` (``k`` a multiple of SUB): one piece of a block.
    Iterate ``for k in range(0, BLOCK, SUB)`` over a full block and ``for k in range(0, (n - start).to(tl.int32),
    SUB)`` over a tensor's tail block, shorter than BLOCK (a zero-size tensor's block has no piece)."""
    base = tl.multiple_of(start + k, SUB)
    offs = base + tl.arange(0, SUB).to(tl.int64)
    return offs, offs < n


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
# Launching. The tables are built by fused_optim.tables (shared with the native backend).
# --------------------------------------------------------------------------------------------------------------
LAUNCHES = {"count": 0}  # counted by tests: the number of launches must not grow with the number of tensors

# Set by kernels/compile_check.py: a function (kernel, args, constexprs) that compiles the launch for GPU targets
# instead of running it, so CI (no GPU) proves that every kernel variant compiles for sm_80 and sm_90.
COMPILE_ONLY = None


def launch_grid(kernel, grid, args, constexprs: dict, num_warps: int | None = None) -> None:
    """Every launch of the engine goes through here (``num_warps``: NUM_WARPS unless given). FP contraction is
    off: ``a * b + c`` is two IEEE-rounded ops on the GPU as in the interpreter; a rule that wants an FMA (to round
    as torch does) writes ``tl.fma``."""
    LAUNCHES["count"] += 1
    warps = NUM_WARPS if num_warps is None else num_warps
    if COMPILE_ONLY is not None:
        COMPILE_ONLY(kernel, args, constexprs, warps)
        return
    kernel[grid](*args, num_warps=warps, enable_fp_fusion=False, **constexprs)


def launch(kernel, table: TensorTable, *args, **constexprs):
    """Launch ``kernel`` once over the whole block map of ``table`` with BLOCK_WARPS warps per program; the
    table's numels, block map and arrival counters follow ``args``, and BLOCK, SUB (SUB_BLOCK, or the block when it
    is smaller) and ALIGNED are added to the constexprs."""
    launch_grid(kernel, (table.n_blocks,),
                (*args, table.numels, table.block_tensor, table.block_start, table.arrivals),
                dict(BLOCK=table.block, SUB=min(SUB_BLOCK, table.block), ALIGNED=table.aligned, **constexprs),
                num_warps=BLOCK_WARPS)


# --------------------------------------------------------------------------------------------------------------
# Deterministic per-segment reductions (LAMB's per-tensor norms, Adafactor's row/column statistics, global norms).
# A pass writes one partial sum per block (or tile) into a buffer; ``segment_sum`` then adds, for each segment, its
# contiguous range of partials in a fixed order. Same inputs, bitwise the same sums, on every run: there is no
# float atomic. The reduction is a separate, visible launch between passes, so that under FSDP an all-reduce over
# the sharded mesh dimensions can be inserted on its output.
# --------------------------------------------------------------------------------------------------------------
SEGMENT_CHUNK = 1024


@triton.jit
def _segment_sum_kernel(partials, seg_start, out, n_partials, n_segments, CHUNK: tl.constexpr):
    """out[q, s] = sum(partials[q, seg_start[s] : seg_start[s + 1]]) for quantity q = program_id(1), summed in the
    dtype of ``partials``."""
    s = tl.program_id(0)
    q = tl.program_id(1).to(tl.int64)
    lo = tl.load(seg_start + s).to(tl.int64)
    hi = tl.load(seg_start + s + 1).to(tl.int64)
    acc = tl.zeros([CHUNK], dtype=partials.dtype.element_ty)
    row = partials + q * n_partials
    for i in range(lo, hi, CHUNK):
        offs = i + tl.arange(0, CHUNK).to(tl.int64)
        acc += tl.load(row + offs, mask=offs < hi, other=0.0)
    tl.store(out + q * n_segments + s, tl.sum(acc, axis=0))


def segment_sum(partials: torch.Tensor, seg_start: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-segment sums of ``partials`` (float32 or float64, shape ``[Q, P]``; LAMB's are float64): ``out[q, s]``
    sums ``partials[q, seg_start[s]:seg_start[s+1]]`` in the dtype of ``partials`` (``seg_start``: int32/int64
    ``[S + 1]``, non-decreasing). One launch of S x Q programs; deterministic. With a table, ``seg_start =
    table.first_block`` gives per-tensor sums of per-block partials."""
    if partials.dim() == 1:
        partials = partials.unsqueeze(0)
    n_q, n_p = partials.shape
    n_s = seg_start.numel() - 1
    if out is None:
        out = torch.empty((n_q, n_s), dtype=partials.dtype, device=partials.device)
    if n_s > 0 and n_q > 0:
        launch_grid(_segment_sum_kernel, (n_s, n_q), (partials, seg_start, out, n_p, n_s), dict(CHUNK=SEGMENT_CHUNK))
    return out


# ==============================================================================================================
# 2-D tile map: per-tile row and column partial sums of matrices (Adafactor's factored second moments).
#
# The tables are fused_optim.tables.TileTable: each tensor is a batch of n x m matrices (or flat), cut into
# TILE_R x TILE_C tiles, one program per tile. A tile pass writes, per tile, TILE_R row partials and TILE_C column
# partials into one buffer (``store_tile_partials``) and/or one per-tile total (at ``n_partials + tile``); the
# statistics are then finished by ``segment_sums`` over ``TileTable.stat_seg`` (row sums, column sums and
# per-tensor sums in one launch), a separate, visible step: under FSDP an all-reduce of its output goes there.
# ``stat_of`` walks the finished statistics vector (row statistics of every matrix, then column statistics) for
# elementwise work on it. ``last_tile_of_tensor`` is the step protocol of this map (see the module docstring).
# ==============================================================================================================
from fused_optim.tables import TILE_META_FIELDS, TileTable  # noqa: E402,F401  (re-exported)

TM_WIDTH = tl.constexpr(len(TILE_META_FIELDS))
TM_NUMEL = tl.constexpr(TILE_META_FIELDS.index("numel"))
TM_BATCHES = tl.constexpr(TILE_META_FIELDS.index("batches"))
TM_ROWS = tl.constexpr(TILE_META_FIELDS.index("rows"))
TM_COLS = tl.constexpr(TILE_META_FIELDS.index("cols"))
TM_ROW_TILES = tl.constexpr(TILE_META_FIELDS.index("row_tiles"))
TM_COL_TILES = tl.constexpr(TILE_META_FIELDS.index("col_tiles"))
TM_TILES = tl.constexpr(TILE_META_FIELDS.index("tiles"))
TM_FIRST_TILE = tl.constexpr(TILE_META_FIELDS.index("first_tile"))
TM_ROW_BASE = tl.constexpr(TILE_META_FIELDS.index("row_base"))
TM_COL_BASE = tl.constexpr(TILE_META_FIELDS.index("col_base"))
TM_BATCH_BASE = tl.constexpr(TILE_META_FIELDS.index("batch_base"))
TM_ROW_PART_BASE = tl.constexpr(TILE_META_FIELDS.index("row_part_base"))
TM_COL_PART_BASE = tl.constexpr(TILE_META_FIELDS.index("col_part_base"))
TM_MATRIX = tl.constexpr(TILE_META_FIELDS.index("matrix"))

STAT_BLOCK = 1024  # entries of the statistics vector per program of a ``launch_stats`` kernel


@triton.jit
def tile_of(tile_tensor, meta, TILE_R: tl.constexpr, TILE_C: tl.constexpr, COL_MULTIPLE: tl.constexpr):
    """The tile this program owns: tensor ``t``, its meta row ``tm`` (read fields as ``tl.load(tm + TM_...)``),
    matrix ``b``, row tile ``rt``, column tile ``ct``, the tile's row and column indices ``r`` [TILE_R] and
    ``c`` [TILE_C] (int64), the matrix size ``n`` x ``m``, element offsets ``offs`` [TILE_R, TILE_C] in the tensor,
    their mask, and whether the tile is full (then loads and stores need no mask).

    ``COL_MULTIPLE``: every matrix's column count is a multiple of it (host-checked); with 16-byte-aligned
    addresses, full tiles then load rows as vectors. (Meta fields are loaded inline rather than through a helper:
    under TRITON_INTERPRET every nested jit call costs about a millisecond, and CI runs the interpreter.)"""
    pid = tl.program_id(0)
    t = tl.load(tile_tensor + pid)
    tm = meta + t * TM_WIDTH
    numel = tl.load(tm + TM_NUMEL)
    n = tl.load(tm + TM_ROWS)
    m = tl.load(tm + TM_COLS)
    if COL_MULTIPLE > 1:
        m = tl.multiple_of(m, COL_MULTIPLE)
    n_ct = tl.load(tm + TM_COL_TILES)
    n_rt = tl.load(tm + TM_ROW_TILES)
    local = pid - tl.load(tm + TM_FIRST_TILE)
    ct = local % n_ct
    rt = (local // n_ct) % n_rt
    b = local // (n_ct * n_rt)
    r = rt * TILE_R + tl.arange(0, TILE_R).to(tl.int64)
    c = ct * TILE_C + tl.arange(0, TILE_C).to(tl.int64)
    offs = ((b * n + r) * m)[:, None] + c[None, :]
    mask = ((r < n)[:, None] & (c < m)[None, :]) & (offs < numel)
    # A flat tensor's last tile may end inside a row: the third test.
    full = ((rt + 1) * TILE_R <= n) & ((ct + 1) * TILE_C <= m) & (
        (b * n + (rt + 1) * TILE_R - 1) * m + (ct + 1) * TILE_C <= numel)
    return t, tm, b, rt, ct, r, c, n, m, offs, mask, full


@triton.jit
def store_tile_partials(partials, tm, b, rt, ct, r, c, n, m, row_part, col_part):
    """Write a tile's row partials [TILE_R] and column partials [TILE_C] at their places in the partials
    buffer: row (b, r) owns ``col_tiles`` consecutive partials, column (b, c) owns ``row_tiles``."""
    row_at = tl.load(tm + TM_ROW_PART_BASE) + (b * n + r) * tl.load(tm + TM_COL_TILES) + ct
    col_at = tl.load(tm + TM_COL_PART_BASE) + (b * m + c) * tl.load(tm + TM_ROW_TILES) + rt
    tl.store(partials + row_at, row_part, mask=r < n)
    tl.store(partials + col_at, col_part, mask=c < m)


@triton.jit
def last_tile_of_tensor(arrivals, t, tm):
    """The step protocol of ``last_block_of_tensor`` on the tile map: True in exactly one program per tensor,
    the last of its tiles to arrive, which then writes the new step; resets the counter for the next launch."""
    arrived = tl.atomic_add(arrivals + t, 1, sem="acq_rel")
    last = arrived == (tl.load(tm + TM_TILES) - 1).to(tl.int32)
    if last:
        tl.store(arrivals + t, 0)
    return last


@triton.jit
def stat_of(stat_tensor, meta, n_rows, n_stats, BLOCK: tl.constexpr):
    """Entries of the statistics vector this program owns: their index ``i`` (int64) and mask, the tensor ``t``
    of each, whether it is a row statistic, and its index ``j`` among that tensor's B * n row (or B * m column)
    statistics. The mean of a row statistic is over the tensor's ``cols``, of a column statistic over ``rows``."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = i < n_stats
    t = tl.load(stat_tensor + i, mask=mask, other=0)
    is_row = i < n_rows
    row_base = tl.load(meta + t * TM_WIDTH + TM_ROW_BASE, mask=mask, other=0)
    col_base = tl.load(meta + t * TM_WIDTH + TM_COL_BASE, mask=mask, other=0)
    j = i - tl.where(is_row, row_base, col_base)
    return i, mask, t, is_row, j


@triton.jit
def _segment_sums_kernel(partials, seg_start, out, n_segments, SEGS: tl.constexpr, CHUNK: tl.constexpr):
    """out[s] = sum(partials[seg_start[s] : seg_start[s + 1]]) for SEGS consecutive segments per program."""
    s = tl.program_id(0).to(tl.int64) * SEGS + tl.arange(0, SEGS).to(tl.int64)
    valid = s < n_segments
    lo = tl.load(seg_start + s, mask=valid, other=0)
    hi = tl.load(seg_start + s + 1, mask=valid, other=0)
    longest = tl.max(hi - lo, axis=0)
    acc = tl.zeros([SEGS, CHUNK], dtype=tl.float32)
    for k in range(0, longest, CHUNK):
        offs = lo[:, None] + k + tl.arange(0, CHUNK).to(tl.int64)[None, :]
        acc += tl.load(partials + offs, mask=offs < hi[:, None], other=0.0)
    tl.store(out + s, tl.sum(acc, axis=1), mask=valid)


def segment_sums(partials: torch.Tensor, seg_start: torch.Tensor, out: torch.Tensor, longest: int, *,
                 max_chunk: int = 256) -> torch.Tensor:
    """``segment_sum`` for many segments of any length (row and column statistics: hundreds of thousands of
    segments of a few partials each, next to a few long ones): ``out[s] = sum(partials[seg_start[s]:
    seg_start[s+1]])`` for 1-D fp32 ``partials`` and int64 ``seg_start`` [S + 1].

    One program sums SEGS consecutive segments as a [SEGS, CHUNK] tile, CHUNK = the longest segment rounded up
    to a power of two within [16, max_chunk] (``longest``: known on the host, no device read), SEGS = 4096 /
    CHUNK. Each segment is summed in a fixed order (lane k adds partials k, k + CHUNK, ..., then a tree over the
    lanes): same inputs, bitwise the same sums on every run; no float atomics. One launch."""
    n_s = seg_start.numel() - 1
    if n_s > 0:
        chunk = min(max_chunk, max(16, triton.next_power_of_2(max(1, longest))))
        segs = max(1, 4096 // chunk)
        launch_grid(_segment_sums_kernel, (triton.cdiv(n_s, segs),), (partials, seg_start, out, n_s),
                    dict(SEGS=segs, CHUNK=chunk))
    return out


def launch_tiles(kernel, table: TileTable, *args, **constexprs) -> None:
    """Launch ``kernel`` once over the whole tile map of ``table``: one program of TILE_WARPS warps per tile. The
    tile map and the arrival counters follow ``args``; TILE_R, TILE_C, ALIGNED and COL_MULTIPLE are added to the constexprs."""
    tile_r, tile_c = table.tile
    launch_grid(kernel, (table.n_tiles,), (*args, table.tile_tensor, table.meta, table.arrivals),
                dict(TILE_R=tile_r, TILE_C=tile_c, ALIGNED=table.aligned, COL_MULTIPLE=table.col_multiple,
                     **constexprs), num_warps=TILE_WARPS)


def launch_stats(kernel, table: TileTable, *args, **constexprs) -> None:
    """Launch ``kernel`` once over the statistics vector of ``table`` (STAT_BLOCK entries per program); the
    owner map, meta table, n_rows and n_stats follow ``args``."""
    if table.n_stats:
        launch_grid(kernel, (triton.cdiv(table.n_stats, STAT_BLOCK),),
                    (*args, table.stat_tensor, table.meta, table.n_rows, table.n_stats),
                    dict(BLOCK=STAT_BLOCK, **constexprs))
