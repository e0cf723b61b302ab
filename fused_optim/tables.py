"""Device tables for the multi-tensor engines (Triton and native): addresses, sizes and a block map.

For one launch group (tensors sharing device and dtypes), :class:`TensorTable` holds device tensors:

* ``ptrs[name]``: int64 ``[n_tensors]``, the address of each tensor of one operand (0 where absent);
* ``numels``: int64 ``[n_tensors]``;
* ``block_tensor`` (int32) and ``block_start`` (int64, element offset) ``[n_blocks]``: the block map, each tensor
  cut into ``block``-element blocks, a zero-size tensor given one empty block (so that its step advances);
* ``first_block``: int32 ``[n_tensors + 1]``, each tensor's block range (per-tensor reductions read it);
* ``arrivals``: int32 ``[n_tensors]`` zeros, the per-tensor counters of the step protocol (kernels/engine.py).

Rules that keep row and column statistics of matrices (Adafactor) use :class:`TileTable` instead (bottom of this
file): the same address tables, and a 2-D tile map (tensor, matrix of a batch, row tile, column tile) with the
layout of the per-tile row/column partial sums and of the finished statistics.

Built once on the host and copied in one transfer; the caller caches it and rebuilds it only when the params'
shapes change (:func:`storage_key`). When only addresses change (grads re-allocated after
``zero_grad(set_to_none=True)``, state loaded) :func:`readdress` copies new address tables and keeps the map.
A table holds nothing but addresses and sizes (and, for a TileTable, scratch buffers sized by them), so equal
keys mean an identical table. What the kernels take on trust, every operand tensor's size, dtype, layout and
device, is checked when a table is built (:func:`check_operands`), and, apart from the device, again whenever a
cached table is reused with operands read afresh (``table.expect`` keeps the sizes it was built for): a tensor at
the same address can have another size or dtype (a state replaced after the old one was freed, a ``view`` of
another dtype, ``resize_``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import attrgetter, is_, is_not

import torch

# Elements per block. 4096 fp32 elements = 16 KB per operand: large enough to hide DRAM latency with a few blocks
# per SM, small enough that a 4,096-element tensor is exactly one block. Triton's interpreter (CI) runs one
# Python call per block, with numpy doing the elements, so the same size keeps CPU tests fast.
DEFAULT_BLOCK = 4096


def storage_key(operands: dict) -> tuple:
    """What a cached table depends on: every operand's addresses (0 for an absent operand) and the first operand's
    (the params') shapes, from which the block or tile map is cut. Computed at every step: one ``data_ptr()`` call
    per tensor and operand, about 0.1 us each. Equal keys do not prove that the other operands kept their sizes and
    dtypes: :func:`check_operands` with the table's ``expect`` does, on reuse. Keys that differ in the addresses
    alone need no new map: :func:`readdress`."""
    addresses = tuple(chain.from_iterable(map(_addresses, operands.values())))
    return addresses, tuple(map(_SHAPE, next(iter(operands.values()))))


def _addresses(tensors: list) -> list:
    """The tensors' addresses, 0 for None."""
    try:
        return list(map(torch.Tensor.data_ptr, tensors))  # C-level calls, when every entry is a tensor
    except TypeError:  # a None among them (an absent operand)
        return [0 if t is None else t.data_ptr() for t in tensors]


def readdress(table, operands: dict, device: torch.device, where=None, key: tuple | None = None):
    """A copy of ``table`` (a TensorTable or TileTable) for ``operands``, whose params have the shapes ``table`` was
    built for (the same ``storage_key(operands)[1]``) and whose tensors moved (new grads after
    ``zero_grad(set_to_none=True)``, state loaded): new address tables, the same map, scratch buffers and
    counters (the old table is dropped). Checks the operands as a build does. Costs one small host-to-device copy
    instead of cutting the map again (a TileTable of GPT-2's params takes about 5 ms to build on the host).
    ``key``: ``storage_key(operands)``, when the caller has it."""
    key = key or storage_key(operands)
    if list(operands) != list(table.ptrs):
        raise ValueError("readdress needs operands of the table's names; build a new table")
    check_operands(operands, table.expect, device, where)
    return with_addresses(table, key, device)


def with_addresses(table, key: tuple, device: torch.device):
    """:func:`readdress` for a caller that has checked the tensors itself (the step plan, csrc/plan.cpp): ``key`` is
    their ``storage_key``, the addresses in the table's operand order."""
    if key[1] != table.key[1] or len(key[0]) != len(table.ptrs) * table.n_tensors:
        raise ValueError("new addresses need the table's param shapes and one address per operand and tensor; "
                         "build a new table")
    host, dev = _upload(torch.tensor(key[0], dtype=torch.int64), device)
    n = table.n_tensors
    return dataclasses.replace(table, key=key, ptrs={name: dev[k * n:(k + 1) * n] for k, name in enumerate(table.ptrs)},
                               aligned=all(a % 16 == 0 for a in key[0]), _host=host)


def _upload(host: torch.Tensor, device: torch.device) -> tuple:
    """``(staging, on_device)``: ``host`` copied to ``device`` without blocking the host; ``staging`` is the pinned
    buffer the copy reads from, to keep alive with the result (None off CUDA)."""
    if device.type == "cuda":
        host = host.pin_memory()
        return host, host.to(device, non_blocking=True)
    return None, host.to(device)


SCALAR_OPERANDS = ("step",)  # one element per tensor
# TileTable operands with one element per row / column of each matrix (Adafactor's factored statistics)
COMPACT_OPERANDS = {"exp_avg_sq_row": "row", "exp_avg_sq_col": "col"}
# Every operand but the params and grads is optimizer state, which both engines read and write as fp32 (the
# params' and grads' dtypes are the launch group's, compile-time arguments of the kernels).
STATE_DTYPE = torch.float32
NOT_STATE = ("param", "grad")
# Operands whose presence decides whether a launch reads them at all (the kernels take "has master weights" per
# launch): every tensor of a launch group has one, or none has; a mix would have the kernels read a null address.
ALL_OR_NONE = ("master_param",)
_NUMEL, _CONTIGUOUS = torch.Tensor.numel, torch.Tensor.is_contiguous
_DTYPE, _DEVICE, _SHAPE = attrgetter("dtype"), attrgetter("device"), attrgetter("shape")


def dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its memory exactly once, with no gaps (torch's "non-overlapping and dense"): contiguous,
    or with its dimensions permuted in memory (``torch.channels_last``, a transposed matrix). Its ``numel()``
    elements then lie from ``data_ptr()`` on, in some order, which is all an elementwise kernel needs."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def laid_out_like(t: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether ``t`` keeps its elements in the order ``like`` does, so that a kernel walking both memories in step
    pairs equal indices: both contiguous (in flat order, whatever their shapes), or the same shape and the same
    strides in every dimension of more than one element (a dimension of one element moves nothing). The same
    check as csrc/layout.h's."""
    if t.is_contiguous() and like.is_contiguous():
        return True
    return t.shape == like.shape and all(a == b for a, b, n in zip(t.stride(), like.stride(), like.shape) if n != 1)


def check_operands(operands: dict, expect: dict, device: torch.device | None = None, where=None) -> None:
    """Every tensor of every operand but the first (the params, which the caller checks: :func:`dense`, and for
    row and column rules contiguous) is what the kernels read and write through a table: ``expect[name][i]``
    elements (None: not read); where that is its param's element count (grads, moments, master weights) laid out
    like its param (:func:`laid_out_like`), for the kernels pair the two memories element by element, else
    contiguous (step counters, Adafactor's row and column statistics); for optimizer state a STATE_DTYPE tensor;
    with ``device``, on that device; an ALL_OR_NONE operand held by every tensor or by none. Raises ValueError
    naming the first that is not (its param as ``where(i)`` says, e.g. "param 3 of param group 1"), before
    anything is written: the kernels would read and write it out of bounds or misread it. Runs whenever a table is
    built or reused with operand lists read afresh; the all-good case costs about 0.25 us a tensor."""
    if device is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # "cuda" is the current device, as torch reads it
    params = next(iter(operands.values()))
    flat = all(map(_CONTIGUOUS, params))  # then "laid out like its param" is "contiguous"
    for name, tensors in list(operands.items())[1:]:
        want, state = expect[name], name not in NOT_STATE
        present = list(map(is_not, tensors, repeat(None)))  # (list.count(None) would call Tensor.__eq__)
        if not any(present):
            continue
        if name in ALL_OR_NONE and not all(present):
            i, j = present.index(True), present.index(False)
            name_of = (lambda k: where(k)) if where is not None else (lambda k: f"tensor {k} of a launch group")
            raise ValueError(f"{name_of(i)} has optimizer state {name!r} but {name_of(j)} of the same launch group "
                             f"has none; the kernels take {name!r} for every tensor of a launch or for none: "
                             "delete the entries, or let the optimizer create them (its master_weights option)")
        if all(present) and None not in want:  # the common case, in bulk (C-level map calls)
            if (list(map(_NUMEL, tensors)) == want
                    and (not state or all(map(is_, map(_DTYPE, tensors), repeat(STATE_DTYPE))))
                    and (all(map(_CONTIGUOUS, tensors)) if flat or name in SCALAR_OPERANDS
                         else all(map(laid_out, tensors, params)))
                    and (device is None or all(map(device.__eq__, map(_DEVICE, tensors))))):
                continue
        elif all(t is None or ((n is None or t.numel() == n)
                               and (not state or t.dtype is STATE_DTYPE)
                               and laid_out(t, p)
                               and (device is None or t.device == device))
                 for t, n, p in zip(tensors, want, params)):
            continue
        # find the first offender and name it
        for i, (t, n, p) in enumerate(zip(tensors, want, params)):
            if t is None:
                continue
            what = "the grad" if name == "grad" else f"optimizer state {name!r}"
            at = f"{what} of {where(i) if where is not None else f'tensor {i} of a launch group'}"
            fix = ("state must match its param (load a state_dict saved for these params, or delete the entry to let "
                   "the optimizer create it)" if state else "assign the param a grad of its own shape")
            if n is not None and t.numel() != n:
                raise ValueError(f"{at} has {t.numel()} elements, expected {n} for its param; {fix}")
            if state and t.dtype is not STATE_DTYPE:
                raise ValueError(f"{at} has dtype {t.dtype}, expected {STATE_DTYPE}; {fix}")
            if not laid_out(t, p):
                if t.numel() != p.numel():
                    raise ValueError(f"{at} is not contiguous (strides {tuple(t.stride())}); {fix}")
                if state:
                    fix = ("the kernels pair state and param element by element; a param converted with "
                           ".to(memory_format=...) after its state was made: save and load the optimizer's "
                           "state_dict (loading lays state out as its param), or convert the model before creating "
                           "the optimizer")
                else:
                    fix = ("the kernels pair grad and param element by element: assign a grad laid out like its "
                           "param (torch.empty_like(param).copy_(grad))")
                raise ValueError(f"{at} is laid out unlike its param (shape {tuple(t.shape)}, strides "
                                 f"{tuple(t.stride())}; the param's: {tuple(p.shape)}, {tuple(p.stride())}); {fix}")
            if device is not None and t.device != device:
                raise ValueError(f"{at} is on {t.device}, its param on {device}; {fix}")


def laid_out(t: torch.Tensor, param: torch.Tensor) -> bool:
    """The layout :func:`check_operands` asks of an operand tensor ``t`` of ``param``: laid out like the param when
    the kernels pair the two element by element (``t`` has the param's element count), else contiguous."""
    return laid_out_like(t, param) if t.numel() == param.numel() else t.is_contiguous()


def _expect(names: list, numels: list, compact: dict | None = None) -> dict:
    """``expect`` of a table: the elements the kernels read and write of each operand's tensors (None: not read):
    one per SCALAR_OPERANDS entry, ``compact[kind]`` for a COMPACT_OPERANDS one, else its param's numel."""
    return {name: ([1] * len(numels) if name in SCALAR_OPERANDS
                   else compact[COMPACT_OPERANDS[name]] if compact is not None and name in COMPACT_OPERANDS
                   else list(numels))
            for name in names[1:]}


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
    expect: dict = field(default_factory=dict)  # operand name -> elements read per tensor (``check_operands``)
    _host: torch.Tensor | None = None  # the pinned staging buffer, kept alive until the async copy is done

    @classmethod
    def build(cls, operands: dict, device: torch.device, block: int | None = None, where=None) -> "TensorTable":
        """``operands`` maps a name to a list of tensors (or ``None``s for an absent operand); every list has one
        entry per tensor of the group, and the first list gives the element counts. ``where``: names tensor i in
        errors (:func:`check_operands`)."""
        block = block or DEFAULT_BLOCK
        names = list(operands)
        lists = [operands[n] for n in names]
        count = len(lists[0])
        if any(len(lst) != count for lst in lists):
            raise ValueError("every operand list of a TensorTable needs one entry per tensor")
        numels = [t.numel() for t in lists[0]]
        expect = _expect(names, numels)
        check_operands(operands, expect, device, where)
        # The block map, with tensor ops (a Python loop over GPT-2's 30,000 blocks took most of a build's 6 ms).
        i64 = dict(dtype=torch.int64)
        numels_h = torch.tensor(numels, **i64)
        blocks_per = torch.clamp((numels_h + (block - 1)) // block, min=1)  # a zero-size tensor gets one empty block
        first_block = torch.cat([torch.zeros(1, **i64), torch.cumsum(blocks_per, 0)])
        n_blocks = int(first_block[-1])
        block_tensor = torch.repeat_interleave(torch.arange(count, **i64), blocks_per)
        block_start = (torch.arange(n_blocks, **i64) - first_block[block_tensor]) * block

        # One int64 host buffer, one host->device copy; the device tables are views into it.
        key = storage_key(operands)
        pieces = [torch.tensor(key[0], **i64), numels_h, block_start, block_tensor, first_block,
                  torch.zeros(count, **i64)]
        staging, dev = _upload(torch.cat(pieces), device)
        views, at = [dev[k * count:(k + 1) * count] for k in range(len(names))], len(names) * count
        for piece in pieces[1:]:
            views.append(dev[at:at + piece.numel()])
            at += piece.numel()
        ptrs = dict(zip(names, views[: len(names)]))
        numels_t, start_t, btensor_t, first_t, arrivals_t = views[len(names):]
        return cls(
            key=key,
            ptrs=ptrs,
            numels=numels_t,
            block_tensor=btensor_t.to(torch.int32),
            block_start=start_t,
            first_block=first_t.to(torch.int32),
            arrivals=arrivals_t.to(torch.int32),
            n_tensors=count,
            n_blocks=n_blocks,
            block=block,
            aligned=all(a % 16 == 0 for a in key[0]),
            expect=expect,
            _host=staging,
        )


# ================================================================================================================
# 2-D tile map: row and column statistics of matrices (Adafactor's factored second moments).
#
# The block map above cuts every tensor into contiguous 1-D blocks, which is what elementwise rules need. Row and
# column statistics need tiles that know their rows and columns. TileTable views each tensor as a batch of
# matrices and cuts each matrix into TILE_R x TILE_C tiles; one program of a tile kernel owns one tile.
# ================================================================================================================
DEFAULT_TILE = (32, 128)  # 4096 elements, as DEFAULT_BLOCK; 128 fp32 columns = 512 contiguous bytes per tile row

# Per-tensor fields of TileTable.meta (int64 [n_tensors, len(TILE_META_FIELDS)]), in this order; the Triton
# helpers in kernels/engine.py ("2-D tile map" section) read them by these positions.
TILE_META_FIELDS = (
    "numel",          # elements of the tensor
    "batches",        # B: product of the leading dims of a matrix tensor; 1 for a flat tensor
    "rows",           # n: rows of each matrix (a flat tensor: ceil(numel / TILE_C) rows of TILE_C)
    "cols",           # m: columns of each matrix (a flat tensor: TILE_C)
    "row_tiles",      # ceil(n / TILE_R), at least 1
    "col_tiles",      # ceil(m / TILE_C), at least 1
    "tiles",          # B * row_tiles * col_tiles, at least 1 (a zero-size tensor gets one empty tile)
    "first_tile",     # index of the tensor's first tile in the tile map
    "row_base",       # offset of the tensor's B * n row statistics in the statistics vector
    "col_base",       # offset of its B * m column statistics (after all rows of all tensors)
    "batch_base",     # index of its first matrix among all matrices (per-matrix sums)
    "row_part_base",  # offset of its row partial sums: (b * n + r) * col_tiles + col_tile
    "col_part_base",  # offset of its column partial sums: (b * m + c) * row_tiles + row_tile
    "matrix",         # 1: viewed as B matrices of n x m with row/column statistics; 0: flat
)


@dataclass
class TileTable:
    """Device tables of a 2-D tile map, for rules that keep row and column statistics of matrices.

    Each tensor is either a *matrix* tensor, viewed as B = prod(shape[:-2]) matrices of n x m (its last two dims;
    the caller says which tensors, e.g. Adafactor: rank >= 2), or *flat*: ``ceil(numel / TILE_C)`` rows of TILE_C
    elements, so that one tile is TILE_R * TILE_C contiguous elements. Tile ``k`` of tensor ``t`` is
    ``(batch b, row tile rt, column tile ct)`` with ``k - first_tile = (b * row_tiles + rt) * col_tiles + ct``.
    A zero-size tensor is flat with one empty tile (its step still advances).

    Statistics. The row statistics of all matrices, then their column statistics, form one vector of
    ``n_stats = n_rows + n_cols`` floats; ``stat_tensor`` names the tensor of each entry. A pass writes per-tile
    partial sums into one buffer, laid out as: every row's partials (one per column tile), then every column's
    (one per row tile), then one partial per tile (per-tensor sums such as RMS). ``stat_seg`` holds the
    segment starts of that buffer (``n_stats + n_tensors + 1``), so that one segment sum finishes row sums, column
    sums and per-tensor sums at once, in a fixed order. ``batch_seg`` splits the row statistics by matrix (a
    per-matrix sum over its rows, e.g. mean(R)); ``tile_seg`` splits per-tile partials by tensor.

    ``work`` holds the scratch buffers a launcher keeps between steps (allocated once, reused: no allocation in a
    captured CUDA graph).
    """

    key: tuple
    ptrs: dict  # operand name -> int64 device tensor [n_tensors] of addresses (0 for an absent operand)
    meta: torch.Tensor  # int64 [n_tensors, len(TILE_META_FIELDS)]
    tile_tensor: torch.Tensor  # int32 [n_tiles]
    stat_tensor: torch.Tensor  # int32 [n_stats]
    stat_seg: torch.Tensor  # int64 [n_stats + n_tensors + 1]
    batch_seg: torch.Tensor  # int64 [n_batches + 1], row ranges of each matrix within the row statistics
    tile_seg: torch.Tensor  # int64 [n_tensors + 1], tile ranges of each tensor
    arrivals: torch.Tensor  # int32 [n_tensors], zeroed (the step protocol of kernels/engine.py)
    n_tensors: int
    n_tiles: int
    n_rows: int  # row statistics of all matrices (sum of B * n)
    n_cols: int  # column statistics (sum of B * m)
    n_batches: int  # matrices (sum of B)
    n_partials: int  # row and column partial sums (the per-tile partials follow them)
    longest: dict  # longest segment of stat_seg, batch_seg, tile_seg (launch heuristics of the segment sums)
    tile: tuple  # (TILE_R, TILE_C)
    aligned: bool  # every address is a multiple of 16 bytes
    col_multiple: int  # every matrix's m (and TILE_C) is a multiple of this power of two (<= 16)
    matrices: tuple = ()  # indices of the matrix tensors (row and column statistics), in tensor order
    flats: tuple = ()  # indices of the flat tensors with elements (a zero-size tensor has nothing to update)
    work: dict = field(default_factory=dict)
    expect: dict = field(default_factory=dict)  # operand name -> elements read per tensor (``check_operands``)
    _host: torch.Tensor | None = None

    @property
    def n_stats(self) -> int:
        return self.n_rows + self.n_cols

    def scratch(self) -> dict:
        """The reductions' buffers of an Adafactor step on this table (both backends' layout), allocated on the first
        step and kept with the table (zeroed once, so that a step skipped by GradScaler never reads uninitialized
        memory)."""
        if not self.work:
            zeros = lambda n: torch.zeros(n, dtype=torch.float32, device=self.meta.device)  # noqa: E731
            self.work.update(
                partials=zeros(self.n_partials + self.n_tiles),  # row | column partials | Σθ² per tile
                stats=zeros(self.n_stats + self.n_tensors),  # row sums -> R_t | column sums -> C_t | Σθ² per tensor
                batch_sums=zeros(self.n_batches),  # ΣR_t per matrix
                usq_partials=zeros(self.n_tiles),  # ΣU² per tile
                usq_sums=zeros(self.n_tensors),  # ΣU² per tensor
            )
        return self.work

    @classmethod
    def factored(cls, operands: dict, device: torch.device, where=None) -> "TileTable":
        """Adafactor's map (both backends): params of rank >= 2 are batches of matrices over their last two dims
        (factored second moments), the others flat; DEFAULT_TILE tiles, which the native engines are compiled for."""
        return cls.build(operands, device, matrix=[p.dim() >= 2 for p in operands["param"]], where=where)

    @classmethod
    def build(cls, operands: dict, device: torch.device, matrix, tile: tuple | None = None,
              where=None) -> "TileTable":
        """``operands``: name -> list of tensors (or ``None``s), one entry per tensor, the first list giving the
        shapes. ``matrix``: one bool per tensor, True to view it as a batch of matrices over its last two dims.
        ``where``: names tensor i in errors (:func:`check_operands`)."""
        tile_r, tile_c = tile or DEFAULT_TILE
        names = list(operands)
        lists = [operands[n] for n in names]
        count = len(lists[0])
        if any(len(lst) != count for lst in lists) or len(matrix) != count:
            raise ValueError("every operand list of a TileTable, and matrix, need one entry per tensor")

        meta, row_lens, col_lens, batch_lens, stat_owner, matrices, flats = [], [], [], [], [], [], []
        tiles_total = rows_total = cols_total = batches_total = rowp_total = colp_total = 0
        col_multiple = 16
        for i, t in enumerate(lists[0]):
            numel = t.numel()
            is_matrix = bool(matrix[i]) and t.dim() >= 2 and numel > 0
            if is_matrix:
                n, m = t.shape[-2], t.shape[-1]
                b = numel // (n * m)
                col_multiple = math.gcd(col_multiple, m)
            else:
                b, n, m = 1, -(-numel // tile_c), tile_c
            rt, ct = max(1, -(-n // tile_r)), max(1, -(-m // tile_c))
            tiles = b * rt * ct
            meta.append([numel, b, n, m, rt, ct, tiles, tiles_total, rows_total, cols_total, batches_total,
                         rowp_total, colp_total, int(is_matrix)])
            tiles_total += tiles
            (matrices if is_matrix else flats if numel > 0 else []).append(i)
            if is_matrix:
                row_lens.append(torch.full((b * n,), ct, dtype=torch.int64))
                col_lens.append(torch.full((b * m,), rt, dtype=torch.int64))
                batch_lens.append(torch.full((b,), n, dtype=torch.int64))
                stat_owner.append((i, b * n, b * m))
                rows_total += b * n
                cols_total += b * m
                batches_total += b
                rowp_total += b * n * ct
                colp_total += b * m * rt
        # A factored state (COMPACT_OPERANDS) holds a statistic per row or per column of every matrix of a batch
        # (None: not read, as the row statistics of a flat or zero-size param).
        f = {name: k for k, name in enumerate(TILE_META_FIELDS)}
        expect = _expect(names, [r[f["numel"]] for r in meta],
                         {"row": [r[f["batches"]] * r[f["rows"]] if r[f["matrix"]] else None for r in meta],
                          "col": [r[f["batches"]] * r[f["cols"]] if r[f["matrix"]] else None for r in meta]})
        check_operands(operands, expect, device, where)
        for row in meta:  # columns and column partials follow all rows and row partials
            row[f["col_base"]] += rows_total
            row[f["col_part_base"]] += rowp_total

        i64 = dict(dtype=torch.int64)
        tiles_per = torch.tensor([row[f["tiles"]] for row in meta], **i64)
        tile_seg = torch.cat([torch.zeros(1, **i64), torch.cumsum(tiles_per, 0)])
        seg_lens = torch.cat(row_lens + col_lens + [tiles_per])
        stat_seg = torch.cat([torch.zeros(1, **i64), torch.cumsum(seg_lens, 0)])
        batch_len = torch.cat(batch_lens) if batch_lens else torch.zeros(0, **i64)
        batch_seg = torch.cat([torch.zeros(1, **i64), torch.cumsum(batch_len, 0)])
        owners = [torch.full((nr,), i, **i64) for i, nr, _ in stat_owner]
        owners += [torch.full((nc,), i, **i64) for i, _, nc in stat_owner]
        stat_tensor = torch.cat(owners) if owners else torch.zeros(0, **i64)
        tile_tensor = torch.repeat_interleave(torch.arange(count, **i64), tiles_per)
        longest = {name: int(lens.max()) if lens.numel() else 0
                   for name, lens in (("stat_seg", seg_lens), ("batch_seg", batch_len), ("tile_seg", tiles_per))}

        # One int64 host buffer, one host->device copy; the device tables are views into it.
        addrs = [torch.tensor([0 if x is None else x.data_ptr() for x in lst], **i64) for lst in lists]
        pieces = addrs + [torch.tensor(meta, **i64).reshape(-1), tile_tensor, stat_tensor, stat_seg, batch_seg,
                          tile_seg, torch.zeros(count, **i64)]
        staging, dev = _upload(torch.cat(pieces), device)
        views, at = [], 0
        for piece in pieces:
            views.append(dev[at:at + piece.numel()])
            at += piece.numel()
        meta_t, tile_t, stat_t, stat_seg_t, batch_seg_t, tile_seg_t, arrivals_t = views[len(names):]
        return cls(
            key=storage_key(operands),
            ptrs=dict(zip(names, views[: len(names)])),
            meta=meta_t.reshape(count, len(TILE_META_FIELDS)),
            tile_tensor=tile_t.to(torch.int32),
            stat_tensor=stat_t.to(torch.int32),
            stat_seg=stat_seg_t,
            batch_seg=batch_seg_t,
            tile_seg=tile_seg_t,
            arrivals=arrivals_t.to(torch.int32),
            n_tensors=count,
            n_tiles=tiles_total,
            n_rows=rows_total,
            n_cols=cols_total,
            n_batches=batches_total,
            n_partials=rowp_total + colp_total,
            longest=longest,
            tile=(tile_r, tile_c),
            aligned=all(int(v) % 16 == 0 for a in addrs for v in a.tolist()),
            col_multiple=math.gcd(col_multiple, tile_c),
            matrices=tuple(matrices),
            flats=tuple(flats),
            expect=expect,
            _host=staging,
        )
