"""MLA decode: pk.mla_decode (Triton split-KV) against the eager torch peer, at the issue's shapes.

    python -m bench mla_decode [--quick] [--shapes b=64,s=4096,h=16]

Every sequence of a batch holds ``s`` keys in shuffled blocks of 64 rows. Bytes and FLOPs are
FlashMLA's count (profiles.cost_model.mla_decode): the cache rows once, q and out; q.k over 576
dims and p.v over 512. Both sides are timed inside CUDA graphs (how a serving engine replays a
decode step), with enough input sets rotated that the cache is read from HBM, not the L2.

The peer is what a user would write in eager torch: gather the sequence's pages into one
``[b, P, 576]`` tensor, ``bmm`` against the absorbed queries, mask, float32 softmax, ``bmm`` with
the first 512 columns.
"""
from __future__ import annotations

import math

import torch

import pykernels as pk
from pykernels import _backend
from profiles import cost_model

SUITE = "mla_decode"

HEAD_DIM, HEAD_DIM_V, BLOCK_SIZE = 576, 512, 64
# (q_len, heads, batch, seqlen): the performance bar's shapes, then the 236B model at b = 1 and MTP q_len 4.
GPU_SHAPES = (
    (1, 16, 64, 4096),
    (1, 16, 128, 8192),
    (1, 16, 32, 32768),
    (1, 16, 1, 32768),
    (1, 128, 64, 4096),
    (2, 16, 64, 4096),
    (1, 128, 1, 32768),
    (4, 16, 64, 4096),
)
CPU_SHAPES = ((1, 16, 2, 256), (2, 16, 2, 256))
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def make_inputs(q_len: int, heads: int, batch: int, seqlen: int, *, dtype=torch.bfloat16, device="cuda",
                block_size: int = BLOCK_SIZE, seed: int = 0):
    """q, a paged cache holding ``seqlen`` keys for each of ``batch`` sequences in shuffled blocks,
    the block table and the lengths."""
    g = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = math.ceil(seqlen / block_size)
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, block_size, 1, HEAD_DIM, generator=g, device=device).to(dtype)
    perm = torch.randperm(num_blocks, generator=g, device=device)
    block_table = perm.view(batch, blocks_per_seq).to(torch.int32)
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=device)
    q = torch.randn(batch, q_len, heads, HEAD_DIM, generator=g, device=device).to(dtype)
    return q, k_cache, block_table, seqlens


def torch_peer(q, k_cache, block_table, cache_seqlens, softmax_scale, causal, head_dim_v=HEAD_DIM_V):
    """Eager absorbed MLA decode over gathered pages: bmm, masked float32 softmax, bmm."""
    batch, q_len, heads, head_dim = q.shape
    kv = k_cache[block_table.long()].view(batch, -1, head_dim)  # [b, P, 576] gathered pages
    positions = kv.shape[1]
    s = torch.bmm(q.view(batch, q_len * heads, head_dim), kv.transpose(1, 2))  # [b, q_len*h, P]
    s = s.float().view(batch, q_len, heads, positions) * softmax_scale
    limit = cache_seqlens.view(batch, 1).expand(batch, q_len)  # [b, q_len]
    if causal:
        limit = limit - (q_len - 1 - torch.arange(q_len, device=q.device))
    hidden = torch.arange(positions, device=q.device) >= limit[..., None]  # [b, q_len, P]
    s = s.masked_fill(hidden[:, :, None], -math.inf)
    lse = torch.logsumexp(s, dim=-1).transpose(1, 2)  # [b, h, q_len]
    p = torch.softmax(s, dim=-1).to(q.dtype).view(batch, q_len * heads, positions)
    out = torch.bmm(p, kv[..., :head_dim_v]).view(batch, q_len, heads, head_dim_v)
    return out, lse


def run(ctx) -> None:
    device = ctx.device
    dtype = torch.bfloat16 if ctx.on_gpu else torch.float32
    backend = "triton" if _backend.triton_usable(device) else "torch"
    shapes = GPU_SHAPES if ctx.on_gpu else CPU_SHAPES
    for q_len, heads, batch, seqlen in shapes:
        shape = {"b": batch, "q_len": q_len, "h": heads, "s": seqlen}
        if not ctx.want(shape):
            continue
        causal = q_len > 1
        scale = HEAD_DIM**-0.5
        cache_bytes = batch * seqlen * HEAD_DIM * (2 if ctx.on_gpu else 4)
        n_sets = ctx.sets_for(cache_bytes)
        sets = [make_inputs(q_len, heads, batch, seqlen, dtype=dtype, device=device, seed=i) for i in range(n_sets)]

        def ours(i):
            return pk.mla_decode(*sets[i], HEAD_DIM_V, scale, causal, backend=backend)

        def peer(i):
            return torch_peer(*sets[i], scale, causal)

        t_ours = ctx.time(ours, n_sets=n_sets, graph=True)
        try:
            t_peer = ctx.time(peer, n_sets=n_sets, graph=True)
            peer_arg = ("torch bmm+softmax", t_peer)
        except torch.OutOfMemoryError:
            peer_arg = ("torch bmm+softmax", None, "out of memory")
            torch.cuda.empty_cache()
        cost = cost_model.mla_decode(batch, q_len, heads, batch * seqlen, HEAD_DIM, HEAD_DIM_V,
                                     elem_bytes=sets[0][0].element_size())
        extra = {"causal": causal, "block_size": BLOCK_SIZE, "n_sets": n_sets}
        if backend == "triton":
            from pykernels.triton import mla_decode as tmla

            config = tmla.default_config(q_len * heads, sets[0][0].element_size())
            config = tmla._REPLACED.get(config, config)  # what ran, if the table's config failed here
            row_blocks = math.ceil(q_len * heads / config.block_m)
            extra["num_splits"] = tmla.choose_num_splits(batch, row_blocks, math.ceil(seqlen / BLOCK_SIZE) * BLOCK_SIZE,
                                                         config, tmla.num_sms(device))
            extra["config"] = vars(config)
        ctx.record(op="mla_decode", backend=backend, shape=shape, dtype=DTYPE_NAMES[dtype],
                   time_us=t_ours, bytes=cost.bytes, flops=cost.flops, peer=peer_arg, extra=extra)
        sets.clear()  # free this shape's inputs before the next one is built
        if ctx.on_gpu:
            torch.cuda.empty_cache()
