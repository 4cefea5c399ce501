"""MoE: pk.moe_gate, pk.moe_route, pk.moe_ffn and pk.grouped_ffn against what a user would run instead.

    python -m bench moe [--quick] [--shapes T=8192,E=160]

Shapes (DeepSeek-V2, top-6, bf16 weights and activations, float32 router logits as the model computes them):
  Lite  E 64,  H 2048, I 1408, greedy routing
  236B  E 160, H 5120, I 1536, group_limited_greedy (8 groups, keep 3)
  T = 1, 8, 64, 128 (decode: timed as CUDA-graph replays) and 8192 (prefill: CUDA events).

Records (shape {T, E, H, I, top_k}; moe_gate {T, E, H}):
  moe_gate     router logits float32(x) @ gate.T (x bf16 [T, H], gate float32 [E, H]) at T = 1, 64 (decode) and
               8192 (prefill); peer: the eager F.linear(x.float(), gate) the model runs. Cost:
               profiles.cost_model.moe_gate (x + gate + logits bytes, 2·T·E·H FLOPs). Both timed as CUDA-graph
               replays at every T (eager timings in extra, as for moe_route). backend "triton" is forced at every
               T (at 8192 the dot kernel, which backend=None does not take: extra.default_backend says what it
               takes). NOTES: the harness rotates at most 16 sets, whose gate weights (8 MB Lite, 53 MB 236B) fit
               in the 60 MB L2 of an H200, so decode timings read the weight from L2; in a model step the other
               layers' weights evict it and it comes from HBM.
  moe_route    peer: eager torch gate (DeepSeek's MoEGate code: softmax, group max, topk, scatter mask,
               topk, scale). Bar: one launch, >= 5x the peer. Cost: profiles.cost_model.moe_route.
               Both timed as CUDA-graph replays at every T, i.e. GPU time: at T = 8192 the kernel runs a
               few µs, and CUDA events around eager calls would time the Python launch path instead
               (in a prefill the host runs ahead of the GPU, so that path is hidden). The eager timings
               (CUDA events, launch path included) are kept in extra.eager_us / extra.peer_eager_us.
  moe_ffn      peer: the torch._grouped_mm pipeline (argsort permute, gather, grouped gate_up GEMM,
               silu * up, grouped down GEMM, scatter back, weighted sum over top-k), no host sync;
               extra.loop_us: a per-expert loop (one host sync for the counts, then F.linear per expert).
               Cost: profiles.cost_model.moe_ffn with experts_hit = the experts the routing actually hits.
               Bars: prefill >= 1.15x the peer and >= 75 % of the bf16 matmul rate; decode >= 80 % of
               copy bandwidth over those bytes (read ``frac_copy_bw``).
               backend "triton" is the default row layout (extra.layout: direct at T = 1 where the table has
               direct tiles, sorted otherwise);
               "triton-<layout>" rows time the other layouts at the same shape: "triton-padded" (vLLM's
               align layout) at every T against the default's unpadded masked tiles, "triton-sorted" /
               "triton-direct" at T <= 8 (where the direct layout's limit is decided).
  grouped_ffn  rows already sorted by expert (T x top_k rows); peer: the two _grouped_mm GEMMs with
               silu * up between them; extra.loop_us as above. Cost: profiles.cost_model.grouped_ffn.
  backend "cuda" (moe_ffn and grouped_ffn at prefill, on a Hopper GPU): the sm_90 warp-specialized GEMMs
               of pykernels/moe_gemm_sm90.py, forced, against the same peer measured for "triton".
Prefill records also carry the gate_up GEMM alone (ours, _grouped_mm's, and a per-expert F.linear loop's) in
extra, for diagnosis.

Input sets: one copy of the weights; ``ctx.sets_for`` sets of (x, logits, routing) rotate so that a
decode step finds its experts' weights outside the L2 (different sets hit different experts; at
T >= 64 nearly every expert is hit and the weights exceed the L2 anyway).
torch._grouped_mm needs a CUDA GPU (bf16, 16-byte aligned strides); elsewhere the peer is reported missing.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

import pykernels as pk
from pykernels import _backend, moe_gemm_sm90
from profiles import cost_model

SUITE = "moe"

TOP_K = 6
# name: (E, H, I, method, n_group, topk_group, routed_scaling_factor)
MODELS = {
    "lite": (64, 2048, 1408, "greedy", 1, 1, 1.0),
    "236b": (160, 5120, 1536, "group_limited_greedy", 8, 3, 16.0),
}
DECODE_T = (1, 8, 64, 128)
PREFILL_T = (8192,)
ROUTE_T = (64, 8192)
GATE_T = (1, 64, 8192)
CPU_MODELS = {"tiny": (16, 64, 48, "group_limited_greedy", 4, 2, 1.0)}
CPU_T = (1, 16)
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
PIPELINE = "torch._grouped_mm pipeline"
LOOP = "per-expert loop"
GATE = "eager torch gate"
GATE_LINEAR = "eager F.linear(x.float(), gate)"


# ------------------------------------------------------------------------------------------ peers


def eager_gate(logits, top_k, method, n_group, topk_group, scale):
    """DeepSeek-V2's MoEGate after the router matmul, as its modeling code writes it."""
    scores = logits.softmax(dim=-1, dtype=torch.float32)  # [T, E]
    n, e = scores.shape
    if method == "group_limited_greedy":
        group_scores = scores.view(n, n_group, -1).max(dim=-1).values  # [T, G]
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(n, n_group, e // n_group).reshape(n, -1)
        scores = scores.masked_fill(~score_mask.bool(), 0.0)
    weights, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    return weights * scale, ids


def _sort_routes(topk_ids, num_experts):
    """Sync-free expert-sorted order of the routes and the cumulative row ends (int32 [E])."""
    flat = topk_ids.reshape(-1).long()  # [N]
    order = torch.argsort(flat, stable=True)  # [N] sorted position -> route
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return order, counts.cumsum(0, dtype=torch.int32)


def grouped_mm_ffn(x_sorted, w13_t, w2_t, offsets):
    """Expert FFNs on sorted rows with torch._grouped_mm: gate_up, silu * up, down."""
    inter = w2_t.shape[1]
    gate_up = torch._grouped_mm(x_sorted, w13_t, offs=offsets)  # [R, 2I]
    h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [R, I]
    return torch._grouped_mm(h, w2_t, offs=offsets)  # [R, H]


def grouped_mm_pipeline(x, w13_t, w2_t, topk_weights, topk_ids):
    """moe_ffn with torch ops only: permute, grouped FFN, scatter back, weighted sum over top-k."""
    num_tokens, top_k = topk_ids.shape
    order, offsets = _sort_routes(topk_ids, w13_t.shape[0])
    out_sorted = grouped_mm_ffn(x[order // top_k], w13_t, w2_t, offsets)  # [N, H]
    out = torch.empty_like(out_sorted)
    out[order] = out_sorted  # route order
    w = topk_weights.to(x.dtype)[..., None]  # [T, k, 1]
    return (out.view(num_tokens, top_k, -1) * w).sum(dim=1)


def loop_ffn(x_sorted, w13, w2, counts):
    """Per-expert loop over host-known row counts (what an eager implementation does)."""
    inter = w2.shape[2]
    out = torch.empty_like(x_sorted)
    start = 0
    for e, n in enumerate(counts):
        if n:
            rows = x_sorted[start:start + n]
            gate_up = F.linear(rows, w13[e])  # [n, 2I]
            out[start:start + n] = F.linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2[e])
            start += n
    return out


def loop_pipeline(x, w13, w2, topk_weights, topk_ids):
    num_tokens, top_k = topk_ids.shape
    order, offsets = _sort_routes(topk_ids, w13.shape[0])
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()  # one host sync
    out_sorted = loop_ffn(x[order // top_k], w13, w2, counts)
    out = torch.empty_like(out_sorted)
    out[order] = out_sorted
    return (out.view(num_tokens, top_k, -1) * topk_weights.to(x.dtype)[..., None]).sum(dim=1)


def grouped_mm_available(device) -> tuple[bool, str]:
    if not hasattr(torch, "_grouped_mm"):
        return False, "torch._grouped_mm does not exist in this torch"
    if device.type != "cuda":
        return False, "torch._grouped_mm runs on CUDA GPUs only here"
    try:
        a = torch.randn(32, 64, device=device, dtype=torch.bfloat16)
        b = torch.randn(2, 64, 32, device=device, dtype=torch.bfloat16)
        torch._grouped_mm(a, b, offs=torch.tensor([16, 32], dtype=torch.int32, device=device))
    except Exception as e:  # noqa: BLE001 - any failure means the peer is missing here
        return False, f"torch._grouped_mm failed: {type(e).__name__}: {e}"
    return True, ""


# ------------------------------------------------------------------------------------------- run


def _make_weights(E, H, I, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, generator=g, device=device) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g, device=device) / I**0.5).to(dtype)
    return w13, w2


def _make_set(T, E, H, model, dtype, device, seed):
    _, _, _, method, n_group, topk_group, scale = model
    g = torch.Generator(device=device).manual_seed(1000 + seed)
    x = torch.randn(T, H, generator=g, device=device).to(dtype)
    logits = torch.randn(T, E, generator=g, device=device)  # float32, as the model's router computes them
    weights, ids = pk.moe_route(logits, TOP_K, method=method, n_group=n_group, topk_group=topk_group,
                                routed_scaling_factor=scale)
    order, offsets = _sort_routes(ids, E)
    return dict(x=x, logits=logits, weights=weights, ids=ids, x_sorted=x[order // TOP_K].contiguous(),
                offsets=offsets, hit=int(torch.unique(ids).numel()))


def _time_or_missing(ctx, name, fn, n_sets, graph):
    """(name, µs) of a peer, or (name, None, reason) when it cannot run; decode peers fall back to events."""
    try:
        return name, ctx.time(fn, n_sets=n_sets, graph=graph)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return name, None, "out of memory"
    except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
        if graph:
            try:
                return name, ctx.time(fn, n_sets=n_sets, graph=False)
            except Exception:  # noqa: BLE001
                pass
        return name, None, f"{type(e).__name__}: {str(e)[:200]}"


def _configs_extra(H, I, rows, E, layout="sorted"):
    from pykernels.triton import moe_configs

    direct = layout == "direct"
    return {"gate_up_config": moe_configs.pick("gate_up", H, I, rows, E, direct=direct)._asdict(),
            "down_config": moe_configs.pick("down", H, I, rows, E, direct=direct)._asdict(),
            "bucket": "direct" if direct else moe_configs.bucket_of(rows, E), "layout": layout}


def _gate_up_alone(ctx, w13, w13_t, n_sets, sets, have_peer):
    """Our gate_up GEMM (routes already permuted) and _grouped_mm's on sorted rows, µs each."""
    from pykernels.triton import grouped_gemm, moe_configs
    from pykernels.triton.moe_permute import permute

    E, two_i, H = w13.shape
    perms = [permute(st["ids"], E) for st in sets]
    rows = sets[0]["ids"].numel()
    cfg = moe_configs.pick("gate_up", H, two_i // 2, rows, E)
    ours = ctx.time(lambda i: grouped_gemm._gate_up(sets[i]["x"], w13, cfg, "gather", perms[i][0], pair=perms[i][1],
                                                    num_rows=rows, top_k=TOP_K), n_sets=n_sets)
    out = {"gate_up_us": round(ours, 3), "gate_up_tflops": round(2 * rows * H * two_i / ours / 1e6, 1)}
    if have_peer:
        peer = ctx.time(lambda i: torch._grouped_mm(sets[i]["x_sorted"], w13_t, offs=sets[i]["offsets"]), n_sets=n_sets)
        out.update(peer_gate_up_us=round(peer, 3), peer_gate_up_tflops=round(2 * rows * H * two_i / peer / 1e6, 1))
    counts = [torch.diff(st["offsets"], prepend=st["offsets"].new_zeros(1)).tolist() for st in sets]
    loop = ctx.time(lambda i: loop_gate_up(sets[i]["x_sorted"], w13, counts[i]), n_sets=n_sets)
    out.update(loop_gate_up_us=round(loop, 3), loop_gate_up_tflops=round(2 * rows * H * two_i / loop / 1e6, 1))
    return out


def loop_gate_up(x_sorted, w13, counts) -> list[torch.Tensor]:
    """The gate_up GEMM as a per-expert loop over host-known row counts: ``[n_e, 2I]`` per expert hit."""
    ends = itertools.accumulate(counts)
    return [F.linear(x_sorted[end - n:end], w13[e]) for e, (n, end) in enumerate(zip(counts, ends)) if n]


def _other_layouts(ctx, sets, w13, w2, n_sets, graph, default, shape, cost, peer, extra, dtype_name) -> None:
    """moe_ffn in the row layouts the default did not take: padded at every T, sorted/direct at T <= 8."""
    from pykernels.triton.grouped_gemm import LAYOUTS, moe_ffn_triton

    E, two_i, H = w13.shape
    T = shape["T"]
    for layout in LAYOUTS:
        if layout == default or (layout != "padded" and T > 8):
            continue
        t = ctx.time(lambda i: moe_ffn_triton(sets[i]["x"], w13, w2, sets[i]["weights"], sets[i]["ids"],
                                              layout=layout), n_sets=n_sets, graph=graph)
        ctx.record(op="moe_ffn", backend=f"triton-{layout}", shape=shape, dtype=dtype_name, time_us=t,
                   bytes=cost.bytes, flops=cost.flops, peer=peer,
                   extra=dict(extra, **_configs_extra(H, two_i // 2, T * TOP_K, E, layout)))


def _bench_gate(ctx, name, T, E, H, dtype, backend) -> None:
    """One moe_gate record: ours (forced backend) and the eager F.linear peer over rotated (x, gate) sets."""
    from pykernels.moe_gate import TRITON_DEFAULT_MAX_TOKENS

    shape = {"T": T, "E": E, "H": H}
    if not ctx.want(shape):
        return
    elem = torch.tensor([], dtype=dtype).element_size()
    cost = cost_model.moe_gate(T, E, H, x_bytes=elem)
    n_sets = ctx.sets_for(cost.bytes)
    g = torch.Generator(device=ctx.device).manual_seed(T)
    xs = [torch.randn(T, H, generator=g, device=ctx.device).to(dtype) for _ in range(n_sets)]
    gates = [torch.randn(E, H, generator=g, device=ctx.device) / H**0.5 for _ in range(n_sets)]
    graph = ctx.on_gpu

    def ours(i):
        return pk.moe_gate(xs[i], gates[i], backend=backend)

    def peer_fn(i):
        return F.linear(xs[i].float(), gates[i])

    t_ours = ctx.time(ours, n_sets=n_sets, graph=graph)
    peer = _time_or_missing(ctx, GATE_LINEAR, peer_fn, n_sets, graph)
    default = backend if backend == "torch" or T <= TRITON_DEFAULT_MAX_TOKENS else "torch"
    extra = {"model": name, "graph": graph, "n_sets": n_sets, "default_backend": default}
    if backend == "triton":
        from pykernels.triton.moe_gate import launch_config

        extra["config"] = launch_config(T, E, H)._asdict()
    if graph:  # the eager launch path too (CUDA events around plain calls)
        extra.update(eager_us=round(ctx.time(ours, n_sets=n_sets), 3),
                     peer_eager_us=_time_or_missing(ctx, GATE_LINEAR, peer_fn, n_sets, False)[1])
    ctx.record(op="moe_gate", backend=backend, shape=shape, dtype=DTYPE_NAMES[dtype], time_us=t_ours,
               bytes=cost.bytes, flops=cost.flops, peer=peer, extra=extra)


def run(ctx) -> None:
    device = ctx.device
    dtype = torch.bfloat16 if ctx.on_gpu else torch.float32
    elem = torch.tensor([], dtype=dtype).element_size()
    backend = "triton" if _backend.triton_usable(device) else "torch"
    have_peer, why_missing = grouped_mm_available(device)
    models = MODELS if ctx.on_gpu else CPU_MODELS
    ffn_t = (DECODE_T + PREFILL_T) if ctx.on_gpu else CPU_T
    route_t = ROUTE_T if ctx.on_gpu else CPU_T
    gate_t = GATE_T if ctx.on_gpu else CPU_T

    for name, model in models.items():
        E, H, I, method, n_group, topk_group, scale = model
        # ---- router logits
        for T in gate_t:
            _bench_gate(ctx, name, T, E, H, dtype, backend)
        # ---- routing
        for T in route_t:
            shape = {"T": T, "E": E, "H": H, "I": I, "top_k": TOP_K}
            if not ctx.want(shape):
                continue
            cost = cost_model.moe_route(T, E, TOP_K, logit_bytes=4)
            n_sets = ctx.sets_for(cost.bytes)
            logits = [torch.randn(T, E, device=device) for _ in range(n_sets)]
            graph = ctx.on_gpu

            def ours(i):
                return pk.moe_route(logits[i], TOP_K, method=method, n_group=n_group, topk_group=topk_group,
                                    routed_scaling_factor=scale, backend=backend)

            def gate(i):
                return eager_gate(logits[i], TOP_K, method, n_group, topk_group, scale)

            t_ours = ctx.time(ours, n_sets=n_sets, graph=graph)
            peer = _time_or_missing(ctx, GATE, gate, n_sets, graph)
            extra = {"model": name, "method": method, "graph": graph, "n_sets": n_sets}
            if graph:  # the eager launch path too (CUDA events around plain calls)
                extra.update(eager_us=round(ctx.time(ours, n_sets=n_sets), 3),
                             peer_eager_us=_time_or_missing(ctx, GATE, gate, n_sets, False)[1])
            ctx.record(op="moe_route", backend=backend, shape=shape, dtype="fp32", time_us=t_ours, bytes=cost.bytes,
                       flops=cost.flops, peer=peer, extra=extra)

        # ---- expert FFNs
        if not any(ctx.want({"T": T, "E": E, "H": H, "I": I, "top_k": TOP_K}) for T in ffn_t):
            continue
        w13, w2 = _make_weights(E, H, I, dtype, device)
        w13_t, w2_t = w13.transpose(1, 2), w2.transpose(1, 2)  # [E, H, 2I], [E, I, H]: _grouped_mm's B
        sm90 = dtype == torch.bfloat16 and moe_gemm_sm90.supports(H, I) and moe_gemm_sm90.available(device)
        for T in ffn_t:
            shape = {"T": T, "E": E, "H": H, "I": I, "top_k": TOP_K}
            if not ctx.want(shape):
                continue
            rows = T * TOP_K
            hit_expected = cost_model.expected_experts_hit(E, TOP_K, T)
            per_set = round(hit_expected * 3 * H * I * elem) + 2 * T * H * elem
            n_sets = ctx.sets_for(per_set)
            sets = [_make_set(T, E, H, model, dtype, device, seed=i) for i in range(n_sets)]
            hit = sum(s["hit"] for s in sets) / n_sets
            graph = ctx.on_gpu and T <= 128
            extra = {"model": name, "experts_hit": hit, "graph": graph, "n_sets": n_sets}
            layout = None
            if backend == "triton":
                from pykernels.triton.moe_configs import layout_for

                layout = layout_for(T, H, I)
                extra.update(_configs_extra(H, I, rows, E, layout))

            # moe_ffn
            t_ours = ctx.time(lambda i: pk.moe_ffn(sets[i]["x"], w13, w2, sets[i]["weights"], sets[i]["ids"],
                                                   backend=backend), n_sets=n_sets, graph=graph)
            if have_peer:
                peer = _time_or_missing(ctx, PIPELINE, lambda i: grouped_mm_pipeline(
                    sets[i]["x"], w13_t, w2_t, sets[i]["weights"], sets[i]["ids"]), n_sets, graph)
            else:
                peer = (PIPELINE, None, why_missing)
            loop = _time_or_missing(ctx, LOOP, lambda i: loop_pipeline(sets[i]["x"], w13, w2, sets[i]["weights"],
                                                                       sets[i]["ids"]), n_sets, False)
            rec_extra = dict(extra, loop_us=loop[1], x_loop=round(loop[1] / t_ours, 3) if loop[1] else None)
            if ctx.on_gpu and backend == "triton" and T in PREFILL_T:
                rec_extra.update(_gate_up_alone(ctx, w13, w13_t, n_sets, sets, have_peer))
            cost = cost_model.moe_ffn(T, TOP_K, hit, H, I, elem_bytes=elem)
            ctx.record(op="moe_ffn", backend=backend, shape=shape, dtype=DTYPE_NAMES[dtype], time_us=t_ours,
                       bytes=cost.bytes, flops=cost.flops, peer=peer, extra=rec_extra)
            if sm90 and T in PREFILL_T:
                t = ctx.time(lambda i: pk.moe_ffn(sets[i]["x"], w13, w2, sets[i]["weights"], sets[i]["ids"],
                                                  backend="cuda"), n_sets=n_sets, graph=graph)
                ctx.record(op="moe_ffn", backend="cuda", shape=shape, dtype=DTYPE_NAMES[dtype], time_us=t,
                           bytes=cost.bytes, flops=cost.flops, peer=peer, extra=extra)
            if layout is not None:
                _other_layouts(ctx, sets, w13, w2, n_sets, graph, layout, shape, cost, peer, extra, DTYPE_NAMES[dtype])

            # grouped_ffn
            t_ours = ctx.time(lambda i: pk.grouped_ffn(sets[i]["x_sorted"], w13, w2, sets[i]["offsets"],
                                                       backend=backend), n_sets=n_sets, graph=graph)
            if have_peer:
                peer = _time_or_missing(ctx, "torch._grouped_mm", lambda i: grouped_mm_ffn(
                    sets[i]["x_sorted"], w13_t, w2_t, sets[i]["offsets"]), n_sets, graph)
            else:
                peer = ("torch._grouped_mm", None, why_missing)
            counts = [torch.diff(s["offsets"], prepend=s["offsets"].new_zeros(1)).tolist() for s in sets]
            loop = _time_or_missing(ctx, LOOP, lambda i: loop_ffn(sets[i]["x_sorted"], w13, w2, counts[i]), n_sets, False)
            rec_extra = dict(extra, loop_us=loop[1], x_loop=round(loop[1] / t_ours, 3) if loop[1] else None)
            if layout is not None:  # grouped_ffn's rows are sorted already: its tiles, not moe_ffn's layout
                rec_extra.update(_configs_extra(H, I, rows, E))
            cost = cost_model.grouped_ffn(rows, hit, H, I, elem_bytes=elem)
            ctx.record(op="grouped_ffn", backend=backend, shape=shape, dtype=DTYPE_NAMES[dtype], time_us=t_ours,
                       bytes=cost.bytes, flops=cost.flops, peer=peer, extra=rec_extra)
            if sm90 and T in PREFILL_T:
                t = ctx.time(lambda i: pk.grouped_ffn(sets[i]["x_sorted"], w13, w2, sets[i]["offsets"],
                                                      backend="cuda"), n_sets=n_sets, graph=graph)
                ctx.record(op="grouped_ffn", backend="cuda", shape=shape, dtype=DTYPE_NAMES[dtype], time_us=t,
                           bytes=cost.bytes, flops=cost.flops, peer=peer, extra=extra)
            del sets
            if ctx.on_gpu:
                torch.cuda.empty_cache()
        del w13, w2, w13_t, w2_t
        if ctx.on_gpu:
            torch.cuda.empty_cache()
