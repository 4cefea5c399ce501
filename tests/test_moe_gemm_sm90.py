"""The sm_90 grouped GEMMs (pykernels/moe_gemm_sm90.py) against float32 references, on random routes with
uneven experts (empty ones, one over many tiles, tails of every size); argument errors on the CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pykernels as pk
from pykernels import moe_gemm_sm90

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _offsets(counts: list[int], device) -> torch.Tensor:
    return torch.tensor(counts, device=device).cumsum(0).int()


def _expert_of_row(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.searchsorted(offsets.long(), torch.arange(rows, device=offsets.device), right=True)


def _weights(E, H, I, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, device=device, generator=g) * H ** -0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device=device, generator=g) * I ** -0.5).bfloat16()
    return w13, w2


CASES = [  # (experts' row counts, H, I): last tiles of every size, empty experts, an expert over many tiles,
    # odd and partial column tiles, a partial k step
    ([130, 0, 1, 255, 128, 64, 129, 65], 256, 384),
    ([0, 0, 700, 3, 0], 2048, 1408),
    ([37] * 16 + [0] * 8, 5120, 192),
    ([1], 64, 8),
    ([64, 1, 63, 200, 192, 0, 321, 33], 200, 200),
]


@pytest.mark.gpu
@pytest.mark.parametrize("counts, H, I", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_gate_up_and_down_match_float32(counts, H, I):
    if not moe_gemm_sm90.available(torch.device("cuda")):
        pytest.skip("needs the extension and a Hopper GPU")
    dev = torch.device("cuda")
    E = len(counts)
    offsets = _offsets(counts, dev)
    rows = sum(counts) + 5  # 5 rows past the last expert: owned by none, never written
    w13, w2 = _weights(E, H, I, dev)
    x = torch.randn(rows, H, device=dev).bfloat16()
    expert = _expert_of_row(offsets, rows)  # [R], E past the end
    owned = expert < E
    e = expert.clamp(max=E - 1)

    h = moe_gemm_sm90.gate_up(x, w13, offsets)
    gate_up = torch.einsum("rh,rnh->rn", x.float(), w13[e].float())  # [R, 2I]
    h_ref = F.silu(gate_up[:, :I]) * gate_up[:, I:]
    torch.testing.assert_close(h[owned].float(), h_ref[owned], rtol=2e-2, atol=2e-2)

    out = torch.full((rows, H), 7.0, device=dev, dtype=torch.bfloat16)
    moe_gemm_sm90.down(h, w2, offsets, out)
    out_ref = torch.einsum("ri,rhi->rh", h.float(), w2[e].float())
    torch.testing.assert_close(out[owned].float(), out_ref[owned], rtol=2e-2, atol=2e-2)
    assert (out[~owned] == 7.0).all(), "rows no expert owns were written"

    # scattered into route order with the routing weights
    pair = torch.randperm(rows, device=dev).int()
    weights = torch.rand(rows, device=dev)
    scattered = torch.zeros(rows, H, device=dev, dtype=torch.bfloat16)
    moe_gemm_sm90.down(h, w2, offsets, scattered, pair=pair, weights=weights)
    want = torch.zeros(rows, H, device=dev)
    want[pair[owned].long()] = out_ref[owned] * weights[pair[owned].long(), None]
    torch.testing.assert_close(scattered.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_bit_identical_runs():
    if not moe_gemm_sm90.available(torch.device("cuda")):
        pytest.skip("needs the extension and a Hopper GPU")
    dev = torch.device("cuda")
    offsets = _offsets([300, 5, 0, 1000], dev)
    w13, w2 = _weights(4, 512, 256, dev)
    x = torch.randn(1305, 512, device=dev).bfloat16()
    h1, h2 = (moe_gemm_sm90.gate_up(x, w13, offsets) for _ in range(2))
    assert torch.equal(h1, h2)
    o1, o2 = (moe_gemm_sm90.down(h1, w2, offsets, torch.empty(1305, 512, device=dev, dtype=torch.bfloat16))
              for _ in range(2))
    assert torch.equal(o1, o2)


def test_argument_errors_name_the_argument():
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    w13 = torch.zeros(2, 16, 64, dtype=torch.bfloat16)
    offsets = torch.tensor([2, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match="a: "):
        moe_gemm_sm90.gate_up(x.float(), w13, offsets)
    with pytest.raises(ValueError, match="w13"):
        moe_gemm_sm90.gate_up(x, w13[:, :, :32].contiguous(), offsets)
    with pytest.raises(ValueError, match="offsets"):
        moe_gemm_sm90.gate_up(x, w13, offsets[:1])
    with pytest.raises(RuntimeError, match="Hopper"):
        moe_gemm_sm90.gate_up(x, w13, offsets)  # a CPU tensor


def test_cuda_backend_refuses_the_cpu():
    x = torch.zeros(3, 64, dtype=torch.bfloat16)
    w13 = torch.zeros(2, 16, 64, dtype=torch.bfloat16)
    w2 = torch.zeros(2, 64, 8, dtype=torch.bfloat16)
    ids = torch.zeros(3, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="backend: 'cuda'"):
        pk.moe_ffn(x, w13, w2, torch.ones(3, 1), ids, backend="cuda")
    with pytest.raises(ValueError, match="backend: 'cuda'"):
        pk.grouped_ffn(x, w13, w2, torch.tensor([1, 3], dtype=torch.int32), backend="cuda")
