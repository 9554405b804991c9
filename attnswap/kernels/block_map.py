"""Block maps of the sparse kinds, on the host: which key blocks of each query block an attention pass visits.

A block map is an integer tensor (programs, query blocks, key blocks) of one tile grid (BLOCK_M x BLOCK_N).
The threshold passes of a kind write it; ``block_lists`` turns it into the compact per-row lists the output and
backward kernels loop over (no per-block test in their inner loops), and ``regrid`` carries a map from the
threshold kernel's tiles to the tiles of another kernel, so each kernel keeps tiles of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def block_lists(active: torch.Tensor):
    """A bool map (programs, rows, cols) -> its True entries as compact lists: (programs, rows, cols) int32 with
    each row's active column indices first, in order, and (programs, rows) int32 counts (no host sync)."""
    order = torch.sort((~active).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    return order.contiguous(), active.sum(-1, dtype=torch.int32).contiguous()


def _regrid_dim(bmap: torch.Tensor, dim: int, src: int, dst: int, length: int) -> torch.Tensor:
    """One axis of ``regrid``: blocks of ``src`` elements -> blocks of ``dst`` (powers of two) over ``length``."""
    n_dst = -(-length // dst)
    if dst == src:
        return bmap
    if dst < src:  # each source block splits into src // dst blocks
        return bmap.repeat_interleave(src // dst, dim=dim).narrow(dim, 0, n_dst)
    factor = dst // src
    pad = n_dst * factor - bmap.shape[dim]
    if pad > 0:  # the last destination block covers fewer source blocks
        shape = list(bmap.shape)
        shape[dim] = pad
        bmap = torch.cat([bmap, bmap.new_zeros(shape)], dim=dim)
    shape = list(bmap.shape)
    shape[dim:dim + 1] = [n_dst, factor]
    return bmap.reshape(shape).amax(dim + 1)


def regrid(bmap: torch.Tensor, src: tuple[int, int], dst: tuple[int, int], n: int, m: int) -> torch.Tensor:
    """A block map (programs, cdiv(n, src_m), cdiv(m, src_n)) of tiles ``src`` = (BLOCK_M, BLOCK_N) -> the map of
    tiles ``dst`` (every size a power of two): a destination block takes the largest value of the source blocks
    it overlaps, so with levels ordered by how much a block must be visited (0 outside the band < 1 in the band
    but without weight < 2 with weight) no block that carries weight is ever dropped."""
    if src[0] & (src[0] - 1) or src[1] & (src[1] - 1) or dst[0] & (dst[0] - 1) or dst[1] & (dst[1] - 1):
        raise ValueError(f"tile sizes must be powers of two, got {src} and {dst}")
    out = _regrid_dim(bmap, 1, src[0], dst[0], n)
    return _regrid_dim(out, 2, src[1], dst[1], m).contiguous()


# levels of a block map (``regrid`` keeps the largest): the order in which a block must be visited
OUTSIDE, NO_WEIGHT, WEIGHT = 0, 1, 2


@dataclass(frozen=True)
class BlockList:
    """The compact block lists of one launch of a listed kernel, and the fixed launch config they were made for:
    ``order`` (programs, rows, cols) int32 and ``count`` (programs, rows) int32 (``block_lists``); rows are the
    kernel's program blocks (query blocks, or key blocks for a kernel that loops over queries); ``levels`` is the
    level map on the launch's tiles (programs, query blocks, key blocks) the lists come from."""

    order: torch.Tensor
    count: torch.Tensor
    levels: torch.Tensor
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def launch(self) -> dict:
        """The launch kwargs: the tiles the lists were made for, warps and stages."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps,
                    num_stages=self.num_stages)


def plan(bmap: torch.Tensor, src: tuple[int, int], config: tuple[int, int, int, int], n: int, m: int, *,
         by_key: bool = False) -> BlockList:
    """The ``BlockList`` of a kernel launched with ``config`` = (BLOCK_M, BLOCK_N, warps, stages), from a map of
    levels (OUTSIDE / NO_WEIGHT / WEIGHT) on tiles ``src``: per query block its key blocks with weight, or with
    ``by_key`` per key block its query blocks with weight."""
    bm, bn, warps, stages = config
    levels = regrid(bmap, src, (bm, bn), n, m)
    weight = levels == WEIGHT
    order, count = block_lists(weight.transpose(1, 2) if by_key else weight)
    return BlockList(order, count, levels, bm, bn, warps, stages)
