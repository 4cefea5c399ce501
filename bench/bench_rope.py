"""RoPE: pk.apply_rotary and pk.rope_and_cache (Triton and CUDA backends) against eager torch.

    python -m bench rope [--quick] [--shapes T=64,h=128]

Shapes (DeepSeek-V2: rotary_dim 64, kv_lora_rank 512, interleaved pairs, bf16):
  decode   T = 1, 16, 64, 256 tokens, h = 16 (Lite) and 128 (236B); q is the absorbed [T, h, 576].
           Timed as CUDA-graph replays, with an empty kernel launch timed the same way in the same run:
           the bar is one launch within 1.5x of it (extra: empty_launch_us, x_empty_launch).
  prefill  T = 16384, h = 16 and 128; q is the naive [T, h, 192] (128 nope + 64 rope). Timed as CUDA-
           graph replays as well (the Python side of one eager call is comparable to the h16 kernel); the
           bar is >= 80 % of the measured copy bandwidth over the cost model's bytes.
Every shape: the peer is eager torch (rotate in the input dtype, cat, index_put: what a user writes
without a kernel); the bar is >= 4x of it. Bytes and FLOPs: profiles.cost_model.apply_rotary /
rope_and_cache. The empty launch is ``pykernels._C.empty_kernel`` (<<<1, 32>>>) when the extension is
built, else a one-program Triton kernel (extra: empty_launch says which).

Input sets are rotated (ctx.sets_for) so the timed bytes come from HBM, not from the L2; cache slots are
a random permutation over a cache of 4096 rows or T rows, whichever is larger (no -1: the eager peer
has no skip).
"""
from __future__ import annotations

import torch

import pykernels as pk
from profiles import cost_model
from pykernels import _backend, _ext

SUITE = "rope"

ROTARY_DIM, KV_LORA_RANK, NOPE_DIM = 64, 512, 128
DECODE_T = (1, 16, 64, 256)
PREFILL_T = 16384
HEADS = (16, 128)
MIN_CACHE_ROWS = 4096
CPU_SHAPES = (("decode", 1, 16), ("decode", 16, 16), ("prefill", 64, 16))
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
PEER_NAME = "eager torch rotate+cat+index_put"


def eager_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotation in x's dtype: what an eager implementation does (vLLM's native path)."""
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)


def peer_apply_rotary(q_pe, k_pe, positions, cos_sin):
    cos, sin = cos_sin[positions].to(q_pe.dtype).chunk(2, dim=-1)  # [T, d/2] each
    return eager_rotate(q_pe, cos[:, None], sin[:, None]), eager_rotate(k_pe, cos, sin)


def peer_rope_and_cache(q, kv_latent, k_pe, positions, cos_sin, k_cache, slots):
    cos, sin = cos_sin[positions].to(q.dtype).chunk(2, dim=-1)
    q_pe = q[..., -ROTARY_DIM:]
    q_pe.copy_(eager_rotate(q_pe, cos[:, None], sin[:, None]))
    rows = torch.cat((kv_latent, eager_rotate(k_pe, cos, sin)), dim=-1)  # [T, 576]
    k_cache.view(-1, k_cache.shape[-1])[slots] = rows


def make_set(T: int, h: int, q_dim: int, dtype, device, seed: int, max_position: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(T, h, q_dim, generator=g).to(device=device, dtype=dtype)
    kv = torch.randn(T, KV_LORA_RANK + ROTARY_DIM, generator=g).to(device=device, dtype=dtype)  # kv_a_proj output
    rows = max(MIN_CACHE_ROWS, T)
    k_cache = torch.randn(rows // 64 + 1, 64, 1, KV_LORA_RANK + ROTARY_DIM, generator=g).to(device=device, dtype=dtype)
    slots = torch.randperm(k_cache.shape[0] * 64, generator=g)[:T].to(device)
    positions = torch.randint(0, max_position, (T,), generator=g).to(device)
    return dict(q=q, kv_latent=kv[:, :KV_LORA_RANK], k_pe=kv[:, KV_LORA_RANK:], positions=positions,
                k_cache=k_cache, slot_mapping=slots)


def empty_launch(ctx) -> tuple[float, str]:
    """Median µs of one empty kernel launch replayed in a CUDA graph, and which kernel it was."""
    if _ext.available() and hasattr(_ext.require(), "empty_kernel"):
        ext = _ext.require()
        return ctx.time(lambda i: ext.empty_kernel(torch.cuda.current_stream().cuda_stream), graph=True), \
            "cuda _C.empty_kernel<<<1, 32>>>"
    import triton

    @triton.jit
    def _empty(ptr):  # one program that does nothing with its argument
        pass

    flag = torch.zeros(1, dtype=torch.int32, device=ctx.device)
    return ctx.time(lambda i: _empty[(1,)](flag), graph=True), "triton one-program kernel"


def backends_for(ctx) -> list[str]:
    if not ctx.on_gpu:
        return ["torch"]
    out = ["triton"] if _backend.triton_usable(ctx.device) else []
    if _ext.available() and hasattr(_ext.require(), "rope_rows"):
        out.append("cuda")
    return out


def run(ctx) -> None:
    dtype = torch.bfloat16 if ctx.on_gpu else torch.float32
    max_position = 163840 if ctx.on_gpu else 8192
    rope = pk.YarnRotary(max_position=max_position, device=ctx.device)
    empty = None
    if ctx.on_gpu:
        empty = empty_launch(ctx)
        ctx.note(f"  empty kernel launch (CUDA-graph replay): {empty[0]:.3f} µs [{empty[1]}]")
    shapes = ([("decode", T, h) for h in HEADS for T in DECODE_T] + [("prefill", PREFILL_T, h) for h in HEADS]
              if ctx.on_gpu else list(CPU_SHAPES))
    for phase, T, h in shapes:
        if ctx.want({"T": T, "h": h}):
            bench_shape(ctx, rope, phase, T, h, dtype, empty)
            pk.rope.check_errors(ctx.device)
            if ctx.on_gpu:
                torch.cuda.empty_cache()


def bench_shape(ctx, rope: pk.YarnRotary, phase: str, T: int, h: int, dtype: torch.dtype,
                empty: tuple[float, str] | None) -> None:
    """Time the peer and every backend at one shape; one record per (op, backend)."""
    decode = phase == "decode"
    graph = ctx.on_gpu  # prefill too: h16 is ~25 µs of HBM time, less than the Python side of one call
    elem = torch.tensor([], dtype=dtype).element_size()
    q_dim = KV_LORA_RANK + ROTARY_DIM if decode else NOPE_DIM + ROTARY_DIM
    costs = {"apply_rotary": cost_model.apply_rotary(T, h, ROTARY_DIM, elem_bytes=elem),
             "rope_and_cache": cost_model.rope_and_cache(T, h, KV_LORA_RANK, ROTARY_DIM, elem_bytes=elem)}
    n_sets = ctx.sets_for(costs["rope_and_cache"].bytes)
    sets = [make_set(T, h, q_dim, dtype, ctx.device, seed=i, max_position=rope.max_position) for i in range(n_sets)]
    q_pes = [s["q"][..., -ROTARY_DIM:].contiguous() for s in sets]  # apply_rotary's standalone q_pe
    cos_sin = rope.cos_sin_cache

    def peer_ar(i):
        return peer_apply_rotary(q_pes[i], sets[i]["k_pe"], sets[i]["positions"], cos_sin)

    def peer_rc(i):
        s = sets[i]
        return peer_rope_and_cache(s["q"], s["kv_latent"], s["k_pe"], s["positions"], cos_sin, s["k_cache"],
                                   s["slot_mapping"])

    peers = {"apply_rotary": ctx.time(peer_ar, n_sets=n_sets, graph=graph),
             "rope_and_cache": ctx.time(peer_rc, n_sets=n_sets, graph=graph)}
    extra = {"phase": phase, "q_head_dim": q_dim, "n_sets": n_sets, "graph": graph}
    if empty is not None and decode:
        extra.update(empty_launch_us=round(empty[0], 4), empty_launch=empty[1])
    for backend in backends_for(ctx):
        def ours_ar(i, backend=backend):
            return pk.apply_rotary(q_pes[i], sets[i]["k_pe"], sets[i]["positions"], rope, backend=backend)

        def ours_rc(i, backend=backend):
            return pk.rope_and_cache(rope=rope, backend=backend, **sets[i])

        times = {"apply_rotary": ctx.time(ours_ar, n_sets=n_sets, graph=graph),
                 "rope_and_cache": ctx.time(ours_rc, n_sets=n_sets, graph=graph)}
        for op, t in times.items():
            rec_extra = dict(extra)
            if empty is not None and decode:
                rec_extra["x_empty_launch"] = round(t / empty[0], 3)
            ctx.record(op=op, backend=backend, shape={"T": T, "h": h}, dtype=DTYPE_NAMES[dtype], time_us=t,
                       bytes=costs[op].bytes, flops=costs[op].flops, peer=(PEER_NAME, peers[op]), extra=rec_extra)
