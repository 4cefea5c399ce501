"""MLA decode: pk.mla_decode (Triton split-KV) against the eager torch peer, at the issue's shapes.

    python -m bench mla_decode [--quick] [--shapes b=64,s=4096,h=16]

Every sequence of a batch holds ``s`` keys in shuffled blocks of 64 rows. Bytes and FLOPs are
FlashMLA's count (profiles.cost_model.mla_decode): the cache rows once, q and out; q.k over 576
dims and p.v over 512. Both sides are timed inside CUDA graphs (how a serving engine replays a
decode step), with enough input sets rotated that the cache is read from HBM, not the L2.

The peer (``peer`` of the record) is the absorbed decode a user writes in eager torch over a cache
laid out contiguously per sequence, ``[b, P, 576]`` (the FACTS baseline "torch bmm+softmax", 197 µs at
b64 s4096 h16): ``bmm`` of the scaled queries against the cache, an additive -inf bias on keys a query
must not see (only when some are hidden: causal q_len > 1 or ragged lengths), ``softmax``, ``bmm`` with
the first 512 columns; the output only, as FACTS times it. Its contiguous cache holds the same rows as
the op's paged cache and is built outside the timing. Recorded beside it: the same peer computing the
lse as well (``logsumexp`` in float32, what pk.mla_decode also returns), ``extra.peer_with_lse``; and the
peer starting from the paged cache, gathering the sequence's pages into ``[b, P, 576]`` inside the
timing, ``extra.peer_with_gather``. On the first input set of every shape the lse peer's out and lse are
compared with the op's (PEER_ATOL); a mismatch stops the suite.
"""
from __future__ import annotations

import math

import torch

import pykernels as pk
from bench.harness import peer_entry, record_name
from profiles import cost_model
from pykernels import _backend

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


def gather_pages(k_cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Each sequence's pages in order, as one contiguous ``[b, P, 576]`` tensor (P = blocks × 64)."""
    return k_cache[block_table.long()].view(block_table.shape[0], -1, k_cache.shape[-1])


def attention_bias(cache_seqlens: torch.Tensor, q_len: int, positions: int, causal: bool,
                   dtype: torch.dtype) -> torch.Tensor | None:
    """``[b, q_len, 1, P]``: 0 where query i sees the key, -inf where it does not (past the
    sequence's length, or after the query's own token when causal); None when every query sees
    every key. Built once per input set, outside the timing (it reads the lengths on the host)."""
    limit = cache_seqlens.long().view(-1, 1).expand(-1, q_len)  # [b, q_len] keys query i sees
    if causal:
        limit = limit - (q_len - 1 - torch.arange(q_len, device=cache_seqlens.device))
    hidden = torch.arange(positions, device=cache_seqlens.device) >= limit[..., None]  # [b, q_len, P]
    if not bool(hidden.any()):
        return None
    return torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill(hidden, -math.inf)[:, :, None]


def torch_peer(q, kv, softmax_scale, bias=None, head_dim_v=HEAD_DIM_V, with_lse=True):
    """Eager absorbed MLA decode over a contiguous cache ``kv`` ``[b, P, 576]``; returns (out, lse)
    as pk.mla_decode does: out ``[b, q_len, h, 512]`` in q's dtype, lse float32 ``[b, h, q_len]``
    (None without ``with_lse``)."""
    batch, q_len, heads, head_dim = q.shape
    positions = kv.shape[1]
    qs = (q * softmax_scale).view(batch, q_len * heads, head_dim)
    s = torch.bmm(qs, kv.transpose(1, 2))  # [b, q_len*h, P] scaled q.k
    if bias is not None:
        s = s.view(batch, q_len, heads, positions).add_(bias).view(batch, q_len * heads, positions)
    lse = torch.logsumexp(s.float(), dim=-1).view(batch, q_len, heads).transpose(1, 2) if with_lse else None
    p = torch.softmax(s, dim=-1)  # float32 inside, q's dtype out
    out = torch.bmm(p, kv[..., :head_dim_v])  # [b, q_len*h, 512]
    return out.view(batch, q_len, heads, head_dim_v), lse


# The in-run check of the peer against the op. In bf16 the peer rounds the scaled q, the scores and
# the probabilities to bf16 where the op keeps float32: against the float32 reference that costs
# ~1e-3 on out (one bf16 step at |out| ~0.2) and ~5e-4 on lse at s = 4096..32768, h = 16..128
# (tests/test_bench_harness.py checks the peer in bf16 on the CPU); the tolerances are ~10x that.
PEER_ATOL = {"out": 1e-2, "lse": 1e-2}
PEER_NAME = "torch bmm+softmax (contiguous cache)"
LSE_PEER_NAME = "torch bmm+softmax+logsumexp (contiguous cache)"
GATHER_PEER_NAME = "torch bmm+softmax with page gather"


def check_peer(ours, peer, what: str) -> dict:
    """Max |difference| of out and lse between the op and the peer; raises when over PEER_ATOL."""
    errors = {k: float((a.float() - b.float()).abs().max()) for k, a, b in zip(("out", "lse"), ours, peer)}
    bad = {k: e for k, e in errors.items() if not e <= PEER_ATOL[k]}  # NaN fails too
    if bad:
        raise RuntimeError(f"mla_decode {what}: the torch peer and pk.mla_decode disagree: max |diff| {bad} "
                           f"over the tolerance {PEER_ATOL}")
    return {f"{k}_max_abs_diff": float(f"{e:.3g}") for k, e in errors.items()}


def run(ctx) -> None:
    device = ctx.device
    dtype = torch.bfloat16 if ctx.on_gpu else torch.float32
    backend = "triton" if _backend.triton_usable(device) else "torch"
    shapes = GPU_SHAPES if ctx.on_gpu else CPU_SHAPES
    for q_len, heads, batch, seqlen in shapes:
        shape = {"b": batch, "q_len": q_len, "h": heads, "s": seqlen}
        if ctx.want(shape):
            bench_shape(ctx, shape, backend, dtype)
            if ctx.on_gpu:
                torch.cuda.empty_cache()


def bench_shape(ctx, shape: dict, backend: str, dtype: torch.dtype) -> None:
    """Time the op, the peer and the peer with page gather at one shape; one record."""
    q_len, heads, batch, seqlen = shape["q_len"], shape["h"], shape["b"], shape["s"]
    causal = q_len > 1
    scale = HEAD_DIM**-0.5
    elem = torch.tensor([], dtype=dtype).element_size()
    n_sets = ctx.sets_for(batch * seqlen * HEAD_DIM * elem)
    sets = [make_inputs(q_len, heads, batch, seqlen, dtype=dtype, device=ctx.device, seed=i) for i in range(n_sets)]
    contiguous = [gather_pages(k_cache, table) for _, k_cache, table, _ in sets]  # [b, P, 576] each
    biases = [attention_bias(lens, q_len, kv.shape[1], causal, dtype) for (_, _, _, lens), kv in zip(sets, contiguous)]

    def ours(i):
        return pk.mla_decode(*sets[i], HEAD_DIM_V, scale, causal, backend=backend)

    def peer(i):
        return torch_peer(sets[i][0], contiguous[i], scale, biases[i], with_lse=False)

    def peer_with_lse(i):
        return torch_peer(sets[i][0], contiguous[i], scale, biases[i])

    def peer_with_gather(i):
        q, k_cache, table, _ = sets[i]
        return torch_peer(q, gather_pages(k_cache, table), scale, biases[i], with_lse=False)

    check = check_peer(ours(0), peer_with_lse(0), f"at {shape}")
    t_ours = ctx.time(ours, n_sets=n_sets, graph=True, name=record_name("mla_decode", backend, shape))
    peer_arg = ctx.time_peer(PEER_NAME, peer, n_sets=n_sets, graph=True,
                             name=record_name("mla_decode", f"peer {PEER_NAME}", shape))
    variants = {"peer_with_lse": ctx.time_peer(LSE_PEER_NAME, peer_with_lse, n_sets=n_sets, graph=True,
                                               name=record_name("mla_decode", f"peer {LSE_PEER_NAME}", shape)),
                "peer_with_gather": ctx.time_peer(GATHER_PEER_NAME, peer_with_gather, n_sets=n_sets, graph=True,
                                                  name=record_name("mla_decode", f"peer {GATHER_PEER_NAME}", shape))}
    cost = cost_model.mla_decode(batch, q_len, heads, batch * seqlen, HEAD_DIM, HEAD_DIM_V, elem_bytes=elem)
    extra = {"causal": causal, "block_size": BLOCK_SIZE, "n_sets": n_sets, "peer_check": check}
    for key, timed in variants.items():
        extra[key] = peer_entry(timed)
        if timed[1] is not None:
            extra["x_" + key] = round(timed[1] / t_ours, 3)
    if backend == "triton":
        extra.update(_triton_launch(batch, q_len, heads, seqlen, elem, ctx.device))
    ctx.record(op="mla_decode", backend=backend, shape=shape, dtype=DTYPE_NAMES[dtype], time_us=t_ours,
               bytes=cost.bytes, flops=cost.flops, peer=peer_arg, extra=extra)


def _triton_launch(batch: int, q_len: int, heads: int, seqlen: int, elem: int, device) -> dict:
    """The config and split count the Triton kernel ran with at this shape."""
    from pykernels.triton import mla_decode as tmla

    config = tmla.default_config(q_len * heads, elem)
    config = tmla._REPLACED.get(config, config)  # what ran, if the table's config failed here
    row_blocks = math.ceil(q_len * heads / config.block_m)
    capacity = math.ceil(seqlen / BLOCK_SIZE) * BLOCK_SIZE
    return {"num_splits": tmla.choose_num_splits(batch, row_blocks, capacity, config, tmla.num_sms(device)),
            "config": vars(config)}
