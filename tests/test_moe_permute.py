"""The route permutation of moe_ffn's Triton backend: both layouts against a stable argsort."""
import pytest
import torch

from pykernels import _backend
from pykernels.triton import moe_permute

TRITON_ON_CPU = _backend.triton_usable(torch.device("cpu"))


def _devices():
    out = [pytest.param("cpu", id="cpu")] if TRITON_ON_CPU else []
    return out + [pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _ids(T, E, k, seed, bad=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=g).topk(k, dim=-1).indices.to(torch.int32)
    if bad:  # out-of-range ids get no position
        ids[0, 0] = E
        ids[T // 2, k - 1] = -3
    return ids


def _expected(ids, E):
    """Routes grouped by expert in increasing route order, and the per-expert counts (valid ids only)."""
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < E)
    order = torch.argsort(torch.where(valid, flat, E), stable=True)[: int(valid.sum())]
    return order.to(torch.int32), torch.bincount(flat[valid], minlength=E)


# (T, E, top_k): one chunk (decode), several small chunks with a partial last one, an expert with no
# route, and past SMALL_CHUNK_MAX_PAIRS routes (chunks of CHUNK)
CASES = [(1, 64, 6), (9, 16, 4), (50, 20, 6), (70, 160, 6), (700, 64, 6)]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("T,E,k", CASES)
@pytest.mark.parametrize("bad", [False, True], ids=["ids-in-range", "bad-ids"])
def test_unpadded(device, T, E, k, bad):
    ids = _ids(T, E, k, seed=T, bad=bad).to(device)
    offsets, sorted_pair = moe_permute.permute(ids, E)
    order, counts = _expected(ids.cpu(), E)
    assert torch.equal(offsets.cpu(), counts.cumsum(0).to(torch.int32))
    assert torch.equal(sorted_pair[: order.numel()].cpu(), order)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("T,E,k", CASES)
@pytest.mark.parametrize("bad", [False, True], ids=["ids-in-range", "bad-ids"])
def test_positions_invert_the_order(device, T, E, k, bad):
    ids = _ids(T, E, k, seed=T + 2, bad=bad).to(device)
    offsets, sorted_pair, position = moe_permute.permute_with_positions(ids, E)
    order, counts = _expected(ids.cpu(), E)
    assert torch.equal(offsets.cpu(), counts.cumsum(0).to(torch.int32))
    assert torch.equal(sorted_pair[: order.numel()].cpu(), order)
    want = torch.full((ids.numel(),), -1, dtype=torch.int32)
    want[order.long()] = torch.arange(order.numel(), dtype=torch.int32)
    assert torch.equal(position.cpu(), want)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("T,E,k", CASES)
@pytest.mark.parametrize("pad", [1, 16, 64])
def test_padded(device, T, E, k, pad):
    ids = _ids(T, E, k, seed=T + 1, bad=pad == 16).to(device)
    N = ids.numel()
    block_expert, sorted_pair = moe_permute.permute_padded(ids, E, pad)
    num_blocks = moe_permute.padded_blocks(N, E, pad)
    assert block_expert.shape == (num_blocks,) and sorted_pair.shape == (num_blocks * pad,)
    order, counts = _expected(ids.cpu(), E)
    block_expert, sorted_pair = block_expert.cpu(), sorted_pair.cpu()
    segments = (counts + pad - 1) // pad * pad
    ends = segments.cumsum(0)
    used_blocks = int(ends[-1]) // pad
    expect_expert = torch.searchsorted(ends, torch.arange(num_blocks) * pad, right=True).to(torch.int32)
    assert torch.equal(block_expert, expect_expert)
    assert bool((block_expert[used_blocks:] == E).all())
    first = 0
    for e in range(E):
        start, n = int(ends[e] - segments[e]), int(counts[e])
        assert torch.equal(sorted_pair[start:start + n], order[first:first + n])
        assert bool((sorted_pair[start + n:int(ends[e])] == N).all())  # padding rows: no route
        first += n


def test_pad_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="pad"):
        moe_permute.permute_padded(torch.zeros(2, 2, dtype=torch.int32), 4, 24)
