"""Block maps of the sparse kinds (``attnswap/kernels/block_map.py``): compact lists and regridding between tiles,
against element-level brute force."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnswap.kernels.block_map import NO_WEIGHT, OUTSIDE, WEIGHT, block_lists, plan, regrid


def test_block_lists_are_the_active_entries_in_order():
    g = torch.Generator().manual_seed(0)
    bmap = torch.randint(0, 3, (5, 7, 11), generator=g).to(torch.int8)
    order, count = block_lists(bmap == 1)
    for p in range(5):
        for r in range(7):
            want = torch.nonzero(bmap[p, r] == 1).flatten().to(torch.int32)
            assert int(count[p, r]) == want.numel()
            assert torch.equal(order[p, r, :want.numel()], want)
    t_order, t_count = block_lists(bmap.transpose(1, 2) == 1)
    assert t_order.shape == (5, 11, 7) and torch.equal(t_count, (bmap == 1).sum(1, dtype=torch.int32))


def _elements(bmap, tiles, n, m):
    """The level of every (query, key) element: its block's."""
    return bmap.repeat_interleave(tiles[0], 1)[:, :n].repeat_interleave(tiles[1], 2)[:, :, :m]


POW2 = st.sampled_from([16, 32, 64, 128])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), m=st.integers(1, 300), src=st.tuples(POW2, POW2), dst=st.tuples(POW2, POW2),
       seed=st.integers(0, 1000))
def test_regrid_takes_the_largest_level_a_block_overlaps(n, m, src, dst, seed):
    g = torch.Generator().manual_seed(seed)
    bmap = torch.randint(0, 3, (2, -(-n // src[0]), -(-m // src[1])), generator=g).to(torch.int8)
    out = regrid(bmap, src, dst, n, m)
    assert out.shape == (2, -(-n // dst[0]), -(-m // dst[1])) and out.dtype == torch.int8
    elements = _elements(bmap, src, n, m).long()
    padded = torch.zeros(2, out.shape[1] * dst[0], out.shape[2] * dst[1], dtype=torch.long)
    padded[:, :n, :m] = elements
    want = padded.view(2, out.shape[1], dst[0], out.shape[2], dst[1]).amax((2, 4))
    assert torch.equal(out.long(), want)


def test_regrid_rejects_tiles_that_are_not_powers_of_two():
    with pytest.raises(ValueError, match="powers of two"):
        regrid(torch.zeros(1, 2, 2, dtype=torch.int8), (16, 16), (48, 16), 32, 32)


def test_plan_lists_the_blocks_with_weight_per_query_block_and_per_key_block():
    levels = torch.tensor([[[WEIGHT, NO_WEIGHT, OUTSIDE, WEIGHT],
                            [NO_WEIGHT, WEIGHT, WEIGHT, OUTSIDE]]], dtype=torch.int8)  # 2 x 4 blocks of 16 x 16
    rows = plan(levels, (16, 16), (16, 16, 1, 1), 32, 64)
    assert rows.count.tolist() == [[2, 2]] and rows.order[0, 0, :2].tolist() == [0, 3]
    assert rows.order[0, 1, :2].tolist() == [1, 2] and rows.launch == dict(BLOCK_M=16, BLOCK_N=16, num_warps=1,
                                                                            num_stages=1)
    cols = plan(levels, (16, 16), (16, 16, 1, 1), 32, 64, by_key=True)
    assert cols.count.tolist() == [[1, 1, 1, 1]] and cols.order[0, :, 0].tolist() == [0, 1, 1, 0]
    coarse = plan(levels, (16, 16), (32, 32, 1, 1), 32, 64)  # one query block, two key blocks: both with weight
    assert coarse.levels.tolist() == [[[WEIGHT, WEIGHT]]] and coarse.count.tolist() == [[2]]
