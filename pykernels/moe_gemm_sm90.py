"""The MoE prefill's grouped GEMMs in CUDA for Hopper (``csrc/moe/grouped_gemm_sm90.cu``): persistent,
warp specialized (a producer warp group loading by TMA, two wgmma consumer warp groups), 128 x 256 tiles;
and the ``backend="cuda"`` of ``moe_ffn`` / ``grouped_ffn`` built on them (``moe_ffn_sm90``,
``grouped_ffn_sm90``).

Rows are expert-sorted: expert e owns rows ``[offsets[e-1], offsets[e])`` (``offsets``: int32 [E]
cumulative ends, as ``moe_permute.permute`` returns them). gate_up reads them in place; down writes them in
place, or scatters them back to route order with the routing weights. bf16 only; H and I multiples of 8.
Rows no expert owns are not written.
"""
from __future__ import annotations

import torch

from pykernels import _ext
from pykernels._checks import check_same_device, check_tensor


def available(device: torch.device) -> bool:
    """Whether the kernels run on ``device``: the extension is built and the GPU is a Hopper (9.x)."""
    return device.type == "cuda" and _ext.available() and torch.cuda.get_device_capability(device)[0] == 9


def supports(hidden: int, inter: int) -> bool:
    """Whether the shape fits the kernels (16-byte rows for TMA, column pairs in the epilogue)."""
    return hidden % 8 == 0 and inter % 8 == 0


def _check(a_name: str, a: torch.Tensor, w_name: str, w: torch.Tensor, offsets: torch.Tensor) -> None:
    check_tensor(a_name, a, dtype=(torch.bfloat16,), ndim=2)
    check_tensor(w_name, w, dtype=(torch.bfloat16,), ndim=3)
    check_tensor("offsets", offsets, dtype=(torch.int32,), shape=(w.shape[0],))
    check_same_device((a_name, w_name, "offsets"), (a, w, offsets))
    if not (a.is_contiguous() and w.is_contiguous() and offsets.is_contiguous()):
        raise ValueError(f"{a_name}, {w_name}, offsets: expected contiguous tensors")
    if a.shape[1] != w.shape[2]:
        raise ValueError(f"{w_name}: expected dimension 2 = {a.shape[1]} ({a_name} dimension 1), got {w.shape[2]}")
    if not available(a.device):
        raise RuntimeError(f"{a_name}: the sm_90 grouped GEMM needs the CUDA extension and a Hopper GPU, got {a.device}")


def gate_up(a: torch.Tensor, w13: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """h [R, I] = silu(a @ gate_e.T) * (a @ up_e.T) on each expert's rows of ``a`` [R, H], w13 [E, 2I, H]."""
    _check("a", a, "w13", w13, offsets)
    inter = w13.shape[1] // 2
    h = torch.empty((a.shape[0], inter), dtype=a.dtype, device=a.device)
    if a.shape[0]:
        _ext.require().grouped_gemm_sm90(a.data_ptr(), a.shape[1], w13.data_ptr(), w13.shape[0], w13.shape[1],
                                         h.data_ptr(), inter, offsets.data_ptr(), a.shape[0], 0, 0, True,
                                         _ext.stream_of(a))
    return h


def down(h: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor,
         pair: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """out[r] = h[r] @ w2_e.T per expert's rows; with ``pair`` [R] int32 and ``weights`` [N] float32:
    out[pair[r]] = weights[pair[r]] * (h[r] @ w2_e.T) (the route order of moe_ffn). h [R, I], w2 [E, H, I]."""
    _check("h", h, "w2", w2, offsets)
    rows = h.shape[0]
    hidden = w2.shape[1]
    check_tensor("out", out, dtype=(torch.bfloat16,), ndim=2)
    if out.shape[1] != hidden or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous [*, {hidden}] tensor, got {list(out.shape)}")
    if (pair is None) != (weights is None):
        raise ValueError("pair, weights: give both or neither")
    if pair is not None:
        check_tensor("pair", pair, dtype=(torch.int32,), shape=(rows,))
        check_tensor("weights", weights, dtype=(torch.float32,), shape=(out.shape[0],))
    elif out.shape[0] < rows:
        raise ValueError(f"out: expected >= {rows} rows, got {out.shape[0]}")
    if rows:
        _ext.require().grouped_gemm_sm90(h.data_ptr(), h.shape[1], w2.data_ptr(), w2.shape[0], hidden,
                                         out.data_ptr(), hidden, offsets.data_ptr(), rows,
                                         0 if pair is None else pair.contiguous().data_ptr(),
                                         0 if weights is None else weights.contiguous().data_ptr(), False,
                                         _ext.stream_of(h))
    return out


def grouped_ffn_sm90(x_sorted: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``pykernels.grouped_ffn`` with the sm_90 GEMMs; rows no expert owns come out 0."""
    y = torch.zeros_like(x_sorted)  # [R, H]
    if x_sorted.shape[0]:
        down(gate_up(x_sorted.contiguous(), w13, offsets), w2, offsets, y)
    return y


def moe_ffn_sm90(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor) -> torch.Tensor:
    """``pykernels.moe_ffn`` with the sm_90 GEMMs, every row tile in expert-sorted order (moe_permute): the
    token rows gathered into it, gate_up, down in place, and the weighted top-k sum gathering each token's
    rows back (moe_rows). (Measured slower: a gate_up gathering its own rows by cp.async in the producer warp
    group, tune/moe_sm90_gather.json; the down GEMM scattering its rows to route order, then a top-k sum over
    those, tune/moe_sm90.json.)"""
    from pykernels.triton.moe_permute import permute_with_positions
    from pykernels.triton.moe_rows import combine, gather_sorted

    num_tokens, top_k = topk_ids.shape
    y = torch.empty_like(x)  # [T, H]
    if num_tokens == 0:
        return y
    offsets, sorted_pair, position = permute_with_positions(topk_ids, w13.shape[0])  # [E], [N], [N]
    x_sorted = gather_sorted(x.contiguous(), sorted_pair, offsets, top_k)  # [N, H]
    out = torch.empty_like(x_sorted)  # [N, H]; rows past offsets[E-1] are not written, nor read
    down(gate_up(x_sorted, w13, offsets), w2, offsets, out)
    return combine(out, position, topk_weights.contiguous(), y)
