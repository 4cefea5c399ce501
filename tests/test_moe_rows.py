"""Rows into and out of the expert-sorted order (pykernels/triton/moe_rows.py) against torch indexing."""
import pytest
import torch

from pykernels import _backend
from pykernels.triton import moe_permute, moe_rows

TRITON_ON_CPU = _backend.triton_usable(torch.device("cpu"))


def _cases():
    # (device, dtype): bf16 is broken in the Triton interpreter, so the CPU runs fp16 and fp32
    out = [pytest.param("cpu", d, id=f"cpu-{d}".replace("torch.", "")) for d in (torch.float16, torch.float32)
           if TRITON_ON_CPU]
    return out + [pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.gpu)]


def _routes(T, E, k, device, bad):
    g = torch.Generator().manual_seed(T * 31 + E)
    ids = torch.rand(T, E, generator=g).topk(k, dim=-1).indices.to(torch.int32)
    if bad:  # ids outside [0, E): no position, no row
        ids[0, 1] = E
        ids[T - 1, 0] = -2
    weights = torch.rand(T, k, generator=g)
    return ids.to(device), weights.to(device)


# (T, E, top_k, H): odd hidden sizes past one column step, one token, many chunks of routes
CASES = [(1, 8, 2, 72), (13, 16, 6, 1040), (300, 64, 6, 2056)]


@pytest.mark.parametrize("device,dtype", _cases())
@pytest.mark.parametrize("T,E,k,H", CASES)
@pytest.mark.parametrize("bad", [False, True], ids=["ids-in-range", "bad-ids"])
def test_gather_sorted_and_combine_match_torch(device, dtype, T, E, k, H, bad):
    ids, weights = _routes(T, E, k, device, bad)
    x = torch.randn(T, H, device=device).to(dtype)
    offsets, sorted_pair, position = moe_permute.permute_with_positions(ids, E)
    valid = int(offsets[-1])

    x_sorted = moe_rows.gather_sorted(x, sorted_pair, offsets, k)
    assert x_sorted.shape == (T * k, H)
    assert torch.equal(x_sorted[:valid], x[sorted_pair[:valid].long() // k])

    out = torch.randn(T * k, H, device=device).to(dtype)  # expert outputs in sorted order
    y = torch.full((T, H), float("nan"), device=device, dtype=dtype)
    moe_rows.combine(out, position, weights, y)
    has = position >= 0
    rows = torch.where(has[:, None], out[position.clamp(min=0).long()].float(), 0.0)  # [N, H]
    want = (rows.view(T, k, H) * weights.float()[:, :, None]).sum(1)
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_combine_is_bit_identical_across_runs():
    ids, weights = _routes(257, 64, 6, "cuda", bad=False)
    offsets, sorted_pair, position = moe_permute.permute_with_positions(ids, 64)
    out = torch.randn(257 * 6, 2048, device="cuda").bfloat16()
    y1, y2 = (moe_rows.combine(out, position, weights, torch.empty(257, 2048, device="cuda").bfloat16())
              for _ in range(2))
    assert torch.equal(y1, y2)
