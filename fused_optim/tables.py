"""Device tables for the multi-tensor engines (Triton and native): addresses, sizes and a block map.

For one launch group (tensors sharing device and dtypes), :class:`TensorTable` holds device tensors:

* ``ptrs[name]``: int64 ``[n_tensors]``, the address of each tensor of one operand (0 where absent);
* ``numels``: int64 ``[n_tensors]``;
* ``block_tensor`` (int32) and ``block_start`` (int64, element offset) ``[n_blocks]``: the block map, each tensor
  cut into ``block``-element blocks, a zero-size tensor given one empty block (so that its step advances);
* ``first_block``: int32 ``[n_tensors + 1]``, each tensor's block range (per-tensor reductions read it);
* ``arrivals``: int32 ``[n_tensors]`` zeros, the per-tensor counters of the step protocol (kernels/engine.py).

Built once on the host and copied in one transfer; the caller caches it and rebuilds only when
:func:`storage_key` changes (new params, grads re-allocated after ``zero_grad(set_to_none=True)``, state loaded).
A table holds nothing but addresses and sizes, so equal keys mean an identical table.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Elements per block. 4096 fp32 elements = 16 KB per operand: large enough to hide DRAM latency with a few blocks
# per SM, small enough that a 4,096-element tensor is exactly one block. Triton's interpreter (CI) runs one
# Python call per block, with numpy doing the elements, so the same size keeps CPU tests fast.
DEFAULT_BLOCK = 4096


def storage_key(operands: dict) -> tuple:
    """What a cached table depends on: every operand's addresses (0 for an absent operand) and the first operand's
    (the params') sizes, from which the block map is cut. Computed at every step: one ``data_ptr()`` call per
    tensor and operand, about 0.1 us each. (A state tensor replaced by one of another size at the very same address
    would go unnoticed; the optimizer creates its state, and ``load_state_dict`` drops every table.)"""
    addresses = tuple(0 if t is None else t.data_ptr() for lst in operands.values() for t in lst)
    return addresses, tuple(t.numel() for t in next(iter(operands.values())))


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
    def build(cls, operands: dict, device: torch.device, block: int | None = None) -> "TensorTable":
        """``operands`` maps a name to a list of tensors (or ``None``s for an absent operand); every list has one
        entry per tensor of the group, and the first list gives the element counts."""
        block = block or DEFAULT_BLOCK
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
            key=storage_key(operands),
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


