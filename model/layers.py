"""DeepSeek-V2 layers: RMSNorm, multi-head latent attention (naive and absorbed forms), dense MLP, MoE.

Shapes: T tokens (flattened batch), H heads, D hidden size, C kv_lora_rank (512), R qk_rope_head_dim (64),
N qk_nope_head_dim (128), V v_head_dim (128), E routed experts, I moe_intermediate_size.

Two kinds of glue around the pykernels ops. The reference glue (``fused=False``, the default) is plain torch
written as the math reads. The fused glue (``fused=True``: the fast path of model/model.py) computes the
same values with fewer kernels: ``F.rms_norm``, one GEMM for gate and up projections, residual adds folded
into the GEMM that produces them (``addmm_``), W_UK/W_UV prepared once as contiguous per-head matrices, and
prefill attention batched over sequences of equal shape on the fastest SDPA backend (model/attention.py).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import pykernels as pk
from model import attention
from model.cache import CacheStep
from model.config import DeepseekV2Config
from pykernels.profiling import nvtx_range

# q_a_layernorm and kv_a_layernorm use RMSNorm's default eps in DeepSeek's code, not config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)); the normalisation in float32, the product in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused:  # one kernel on CUDA; the same math (float32 statistics)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def derived(module: nn.Module, name: str, sources: Sequence[torch.Tensor],
            make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A tensor computed from parameters (``make()``), kept on ``module`` and computed again only when a
    source was replaced or changed in place (its storage or version counter moved)."""
    key = tuple((p.data_ptr(), p._version) for p in sources)
    kept = module.__dict__.get(name)
    if kept is None or kept[0] != key:
        with torch.no_grad():
            kept = (key, make())
        module.__dict__[name] = kept
    return kept[1]


def share_storage(module: nn.Module, name: str, linears: Sequence[nn.Linear]) -> None:
    """Make the weights of ``linears`` (same input width) consecutive row blocks of one allocation, kept on
    ``module`` as ``name``, so that ``stacked_weight`` is that allocation (values are not kept)."""
    ws = [lin.weight for lin in linears]
    both = torch.empty((sum(w.shape[0] for w in ws), ws[0].shape[1]), dtype=ws[0].dtype, device=ws[0].device)
    start = 0
    for lin, w in zip(linears, ws):
        lin.weight = nn.Parameter(both[start:start + w.shape[0]], requires_grad=False)
        start += w.shape[0]
    module.__dict__[name + "_storage"] = both


def stacked_weight(module: nn.Module, name: str, linears: Sequence[nn.Linear]) -> torch.Tensor:
    """The weights of ``linears`` (one input, several outputs) stacked as one [sum of N, K] matrix, so the
    fast path runs them as one GEMM: the allocation they are row blocks of after ``share_storage``, else a
    copy made once (``derived``)."""
    ws = [lin.weight for lin in linears]
    both = module.__dict__.get(name + "_storage")
    if both is not None:
        starts = [0]
        for w in ws[:-1]:
            starts.append(starts[-1] + w.shape[0])
        if all(w.data_ptr() == both[s:].data_ptr() for w, s in zip(ws, starts)):
            return both
    return derived(module, name, ws, lambda: torch.cat(ws))


class MLP(nn.Module):
    """SiLU-gated MLP: down(silu(gate(x)) * up(x)). The dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    @nvtx_range("mlp")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def gate_up(self) -> torch.Tensor:
        """gate_proj.weight and up_proj.weight as one [2I, D] matrix (see ``stacked_weight``)."""
        return stacked_weight(self, "_gate_up", (self.gate_proj, self.up_proj))

    def fuse_storage(self) -> None:
        """Make gate_proj.weight and up_proj.weight the two halves of one allocation (values are not kept)."""
        share_storage(self, "_gate_up", (self.gate_proj, self.up_proj))

    @nvtx_range("mlp")
    def add_forward_to(self, out: torch.Tensor, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """Fused glue: out += mlp(x), or out = base + mlp(x) with ``base``; the down projection accumulates
        (one addmm) (x, out, base [T, D])."""
        I = self.gate_proj.weight.shape[0]
        h = F.linear(x, self.gate_up())  # [T, 2I]
        act = F.silu(h[:, :I]) * h[:, I:]  # [T, I]
        if base is None:
            return out.addmm_(act, self.down_proj.weight.t())
        return torch.addmm(base, act, self.down_proj.weight.t(), out=out)


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One extra stream per device for work that overlaps the main stream's (MoE.add_forward_to)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class MoE(nn.Module):
    """Routed experts (DeepSeek's softmax gate, top-k) plus shared experts added unweighted.

    NOTES: the gate weight is kept in float32 and the router logits computed in float32 (as transformers 5
    does); the expert weights are fused: w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I].

    Expert parallelism (``ep_size`` > 1): this rank holds experts ``[rank * E / ep_size, (rank + 1) * E /
    ep_size)`` in w13/w2, and the routed part runs through ``pk.ep.moe_ffn_expert_parallel`` over the
    ``pk.ep.Buffer`` given to ``set_expert_parallel`` (the gate and the shared experts stay local). Every rank
    must then run the same sequence of MoE calls.
    """

    def __init__(self, cfg: DeepseekV2Config, backend: str | None, ep_size: int = 1):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        if E % ep_size:
            raise ValueError(f"ep_size: expected a divisor of n_routed_experts ({E}), got {ep_size}")
        self.cfg = cfg
        self.backend = backend
        self.ep_size = ep_size
        self.gate = nn.Linear(D, E, bias=False, dtype=torch.float32)
        self.w13 = nn.Parameter(torch.empty(E // ep_size, 2 * I, D))
        self.w2 = nn.Parameter(torch.empty(E // ep_size, D, I))
        self.shared_experts = MLP(D, I * cfg.n_shared_experts) if cfg.n_shared_experts > 0 else None
        self.ep: pk.ep.Buffer | None = None         # dispatch/combine of prefill (and of decode without ep_decode)
        self.ep_decode: pk.ep.Buffer | None = None  # decode steps: an nvlink buffer runs its low-latency mode

    def set_expert_parallel(self, buffer: pk.ep.Buffer, decode_buffer: pk.ep.Buffer | None = None) -> None:
        for name, buf in (("buffer", buffer), ("decode_buffer", decode_buffer)):
            if buf is None:
                continue
            if (buf.world_size != self.ep_size or buf.num_experts != self.cfg.n_routed_experts
                    or buf.hidden != self.cfg.hidden_size or buf.dtype != self.w13.dtype):
                raise ValueError(f"{name}: expected a pk.ep.Buffer over {self.ep_size} ranks for "
                                 f"{self.cfg.n_routed_experts} experts, hidden {self.cfg.hidden_size}, "
                                 f"{self.w13.dtype}; got {buf.world_size} ranks, {buf.num_experts} experts, "
                                 f"hidden {buf.hidden}, {buf.dtype}")
        self.ep, self.ep_decode = buffer, decode_buffer

    def routed(self, x: torch.Tensor, decode: bool = False) -> torch.Tensor:
        """The routed experts' weighted sum for x [T, D] -> [T, D]."""
        cfg = self.cfg
        with nvtx_range("moe route"):
            router_logits = pk.moe_gate(x, self.gate.weight, backend=self.backend)  # float32 [T, E]
            topk_weights, topk_ids = pk.moe_route(
                router_logits, cfg.num_experts_per_tok, method=cfg.topk_method, n_group=cfg.n_group,
                topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor,
                norm_topk_prob=cfg.norm_topk_prob, backend=self.backend)  # float32 [T, k], int32 [T, k]
        if self.ep_size == 1:
            with nvtx_range("moe experts"):
                return pk.moe_ffn(x, self.w13, self.w2, topk_weights, topk_ids, backend=self.backend)  # [T, D]
        if self.ep is None:
            raise RuntimeError(f"an expert-parallel MoE layer ({self.ep_size} ranks) needs set_expert_parallel")
        buf = self.ep_decode if decode and self.ep_decode is not None else self.ep
        return pk.ep.moe_ffn_expert_parallel(buf, x, self.w13, self.w2, topk_weights, topk_ids,
                                             low_latency=buf is self.ep_decode and buf.backend == "nvlink",
                                             backend=self.backend)

    @nvtx_range("moe")
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, D]
        y = self.routed(x)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y

    @nvtx_range("moe")
    def add_forward_to(self, out: torch.Tensor, x: torch.Tensor, decode: bool = False) -> torch.Tensor:
        """Fused glue: out += moe(x) (x [T, D]).

        On CUDA the shared experts run on a side stream, beside the routed ones: neither fills the GPU's
        bandwidth at decode sizes (a Lite decode step at batch 1 spends ~19 µs a layer in the shared
        experts' three GEMV-sized kernels and ~45 µs in the routed path), so overlapping them hides most
        of the shorter one. The side stream computes ``out + shared(x)`` into a buffer allocated on the
        main stream before the fork; after the join the main stream adds the routed output into ``out``.
        """
        if self.shared_experts is None:
            return out.add_(self.routed(x, decode))
        if not x.is_cuda:
            y = self.routed(x, decode)  # [T, D]
            self.shared_experts.add_forward_to(y, x)
            return out.add_(y)
        main, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
        with_shared = torch.empty_like(out)  # allocated on the main stream: no cross-stream reuse
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self.shared_experts.add_forward_to(with_shared, x, base=out)  # out + shared(x)
        y = self.routed(x, decode)  # [T, D]
        main.wait_stream(side)
        return torch.add(with_shared, y, out=out)


class MLA(nn.Module):
    """Multi-head latent attention.

    Per token: q = q_proj(x) (or q_b_proj(q_a_layernorm(q_a_proj(x)))) -> [H, N + R];
    kv_a_proj_with_mqa(x) -> [C + R] = latent c (then kv_a_layernorm) and the shared k_pe; rope on q_pe, k_pe.
    Naive form (prefill): kv_b_proj(c) -> per head k_nope [N], v [V]; k = (k_nope, k_pe);
        o_h = softmax(scale * q_h . k_h) v_h.
    Absorbed form (decode): kv_b_proj.weight = [H, N + V, C] = (W_UK, W_UV) per head;
        q_h . k_h = (W_UK_h^T q_nope_h) . c + q_pe_h . k_pe, so attention runs on the 576-wide cache rows
        (c, k_pe) with q_abs_h = (W_UK_h^T q_nope_h, q_pe_h); o_h = W_UV_h (softmax(...) c).
    Both use DeepSeek's scale (N + R)^-0.5 * yarn_get_mscale(factor, mscale_all_dim)^2.
    """

    def __init__(self, cfg: DeepseekV2Config, backend: str | None):
        super().__init__()
        D, H, C = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
        self.cfg = cfg
        self.backend = backend
        self.n_heads = H
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, C + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(C, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(C, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=False)

    # ---- pieces shared by both forms ------------------------------------------------------------------

    def project(self, x: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D] -> q [T, H, N + R] (rope part not rotated), latent [T, C] (normalised), k_pe [T, R]."""
        cfg = self.cfg
        q_lin, kv_lin = self.input_projections()
        if fused:  # q (or q_a) and kv_a from one GEMM over x
            q, kv = F.linear(x, self.input_projection()).split([q_lin.out_features, kv_lin.out_features], dim=-1)
        else:
            q, kv = q_lin(x), kv_lin(x)
        if cfg.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q, fused))
        q = q.view(x.shape[0], self.n_heads, cfg.qk_head_dim)  # [T, H, N + R]
        latent, k_pe = kv.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        return q, self.kv_a_layernorm(latent, fused), k_pe

    def input_projections(self) -> tuple[nn.Linear, nn.Linear]:
        """The two linear layers over the attention input: q_proj (q_a_proj with a q LoRA) and kv_a_proj_with_mqa."""
        q = self.q_proj if self.cfg.q_lora_rank is None else self.q_a_proj
        return q, self.kv_a_proj_with_mqa

    def input_projection(self) -> torch.Tensor:
        """``input_projections``' weights stacked as one matrix (see ``stacked_weight``)."""
        return stacked_weight(self, "_q_kv_a", self.input_projections())

    def fuse_storage(self) -> None:
        """Make ``input_projections``' weights row blocks of one allocation (values are not kept)."""
        share_storage(self, "_q_kv_a", self.input_projections())

    def w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj.weight as W_UK [H, N, C] and W_UV [H, V, C]."""
        cfg = self.cfg
        w = self.kv_b_proj.weight.view(self.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        return w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]

    def absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, N, C] and W_UV^T [H, C, V], contiguous: the right-hand sides of the absorbed form's two
        batched products, prepared once (again only if kv_b_proj.weight changes)."""
        w = self.kv_b_proj.weight

        def make() -> tuple[torch.Tensor, torch.Tensor]:
            w_uk, w_uv = self.w_uk_uv()
            return w_uk.contiguous(), w_uv.transpose(1, 2).contiguous()

        return derived(self, "_absorbed", (w,), make)

    # ---- naive form: decompress K/V ---------------------------------------------------------------------

    def attend_naive(self, q: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                     softmax_scale: float) -> torch.Tensor:
        """Causal attention of S queries over L >= S keys, query i at key position L - S + i.

        q [B, S, H, N + R] (rotated); latent [B, L, C]; k_pe [B, L, R] (rotated) -> out [B, S, H, V].
        """
        cfg = self.cfg
        B, S, H, _ = q.shape
        L = latent.shape[1]
        kv = self.kv_b_proj(latent).view(B, L, H, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)  # [B, L, H, N], [B, L, H, V]
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, L, H, cfg.qk_rope_head_dim)), dim=-1)
        visible = torch.ones(S, L, dtype=torch.bool, device=q.device).tril(L - S)  # key j <= L - S + i
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=visible, scale=softmax_scale)
        return out.transpose(1, 2)  # [B, S, H, V]

    @nvtx_range("attention")
    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: pk.YarnRotary,
                softmax_scale: float) -> torch.Tensor:
        """No cache: x [B, S, D], positions int64 [B * S] -> [B, S, D] (naive form)."""
        cfg = self.cfg
        B, S, D = x.shape
        q, latent, k_pe = self.project(x.reshape(B * S, D))
        q_pe, k_pe = pk.apply_rotary(q[..., cfg.qk_nope_head_dim:], k_pe, positions, rope, backend=self.backend)
        q = torch.cat((q[..., : cfg.qk_nope_head_dim], q_pe), dim=-1)  # [T, H, N + R]
        out = self.attend_naive(q.view(B, S, self.n_heads, -1), latent.view(B, S, -1), k_pe.view(B, S, -1),
                                softmax_scale)
        return self.o_proj(out.reshape(B, S, -1))

    # ---- with the paged latent cache --------------------------------------------------------------------

    @nvtx_range("attention")
    def prefill(self, x: torch.Tensor, step: CacheStep, k_cache: torch.Tensor, rope: pk.YarnRotary,
                softmax_scale: float, fused: bool = False,
                groups: list[attention.Group] | None = None) -> torch.Tensor:
        """Naive form over new tokens of several sequences, keys read back from the cache.

        x [T, D] (sequence b's new tokens are rows step.starts[b]:step.starts[b+1]) -> [T, D]. Writes the
        new cache rows first, so a sequence's earlier context (chunked prefill) is seen as well. The
        reference glue attends one sequence at a time; the fused glue attends each group of sequences
        with the same (new tokens, length) in one call of ``attention.causal`` (``groups``: the step's
        ``attention.plan``, made here when not given).
        """
        q, latent, k_pe = self.project(x, fused)
        pk.rope_and_cache(q, latent, k_pe, step.positions, rope, k_cache, step.slot_mapping,
                          backend=self.backend)  # q's rope part rotated in place
        if fused:
            out = self._attend_groups(q, step, k_cache, softmax_scale,
                                      groups if groups is not None else attention.plan(step))
            return self.o_proj(out.view(x.shape[0], -1))
        C = self.cfg.kv_lora_rank
        out = torch.empty(x.shape[0], self.n_heads, self.cfg.v_head_dim, dtype=x.dtype, device=x.device)
        for b, (lo, hi) in enumerate(zip(step.starts[:-1], step.starts[1:])):
            if hi == lo:
                continue
            rows = step.context_rows(b, k_cache)  # [L, C + R]
            out[lo:hi] = self.attend_naive(q[None, lo:hi], rows[None, :, :C], rows[None, :, C:], softmax_scale)[0]
        return self.o_proj(out.view(x.shape[0], -1))

    def _attend_groups(self, q: torch.Tensor, step: CacheStep, k_cache: torch.Tensor, softmax_scale: float,
                       groups: list[attention.Group]) -> torch.Tensor:
        """q [T, H, N + R] (rotated) -> out [T, H, V], one batched attention call per group."""
        cfg = self.cfg
        H, N, V, C = self.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        out = torch.empty(q.shape[0], H, V, dtype=q.dtype, device=q.device)
        for g in groups:
            G, S, L = g.size, g.new_tokens, g.length
            rows = k_cache[g.block_ids].view(G, -1, k_cache.shape[-1])[:, :L]  # [G, L, C + R]
            kv = self.kv_b_proj(rows[..., :C]).view(G, L, H, N + V)
            k = torch.cat((kv[..., :N], rows[:, :, None, C:].expand(G, L, H, cfg.qk_rope_head_dim)), dim=-1)
            q_g = q[g.lo:g.hi] if g.token_index is None else q[g.token_index]
            o = attention.causal(q_g.view(G, S, H, -1), k, kv[..., N:], softmax_scale)  # [G, S, H, V]
            if g.token_index is None:
                out[g.lo:g.hi] = o.reshape(G * S, H, V)
            else:
                out[g.token_index] = o.reshape(G * S, H, V)
        return out

    @nvtx_range("attention")
    def decode(self, x: torch.Tensor, step: CacheStep, k_cache: torch.Tensor, rope: pk.YarnRotary,
               softmax_scale: float) -> torch.Tensor:
        """Absorbed form: x [B * q_len, D] (q_len new tokens of each of B sequences) -> [B * q_len, D]."""
        cfg = self.cfg
        T = x.shape[0]
        B = step.block_table.shape[0]
        q, latent, k_pe = self.project(x)
        w_uk, w_uv = self.w_uk_uv()
        q_latent = torch.einsum("thn,hnc->thc", q[..., : cfg.qk_nope_head_dim], w_uk)  # [T, H, C]
        q_abs = torch.cat((q_latent, q[..., cfg.qk_nope_head_dim:]), dim=-1)  # [T, H, C + R]
        pk.rope_and_cache(q_abs, latent, k_pe, step.positions, rope, k_cache, step.slot_mapping,
                          backend=self.backend)  # q_abs's rope part rotated in place
        out_latent, _ = pk.mla_decode(
            q_abs.view(B, T // B, self.n_heads, cfg.kv_cache_dim), k_cache, step.block_table,
            step.cache_seqlens, head_dim_v=cfg.kv_lora_rank, softmax_scale=softmax_scale, causal=True,
            backend=self.backend)  # [B, q_len, H, C]
        out = torch.einsum("thc,hvc->thv", out_latent.reshape(T, self.n_heads, -1), w_uv)  # [T, H, V]
        return self.o_proj(out.reshape(T, -1))

    @nvtx_range("attention")
    def decode_fused(self, x: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                     block_table: torch.Tensor, cache_seqlens: torch.Tensor, k_cache: torch.Tensor,
                     rope: pk.YarnRotary, softmax_scale: float) -> torch.Tensor:
        """Absorbed form, one new token per sequence, fused glue: x [B, D] -> attention output [B, H * V]
        before o_proj (the caller folds o_proj and the residual add into one ``addmm_``).

        positions, slot_mapping int64 [B]; block_table int32 [B, M]; cache_seqlens int32 [B] (lengths
        with the new token). Padding rows: slot -1 (nothing written) and length 0 (output 0).
        """
        cfg = self.cfg
        B, H, N, C = x.shape[0], self.n_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank
        q, latent, k_pe = self.project(x, fused=True)
        w_uk, w_uv_t = self.absorbed()
        # NOTES: the products write straight into [B, H, ...] buffers through transposed views (strided
        # batched GEMM output), so no copy rearranges heads and tokens.
        q_abs = torch.empty(B, H, cfg.kv_cache_dim, dtype=x.dtype, device=x.device)  # [B, H, C + R]
        torch.bmm(q[..., :N].transpose(0, 1), w_uk, out=q_abs[..., :C].transpose(0, 1))  # [H, B, C]
        q_abs[..., C:] = q[..., N:]
        pk.rope_and_cache(q_abs, latent, k_pe, positions, rope, k_cache, slot_mapping, backend=self.backend)
        out_latent, _ = pk.mla_decode(
            q_abs.view(B, 1, H, cfg.kv_cache_dim), k_cache, block_table, cache_seqlens, head_dim_v=C,
            softmax_scale=softmax_scale, causal=True, backend=self.backend)  # [B, 1, H, C]
        out = torch.empty(B, H, cfg.v_head_dim, dtype=x.dtype, device=x.device)  # [B, H, V]
        torch.bmm(out_latent.view(B, H, C).transpose(0, 1), w_uv_t, out=out.transpose(0, 1))  # [H, B, V]
        return out.view(B, -1)


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x)); mlp is dense or MoE."""

    def __init__(self, cfg: DeepseekV2Config, layer: int, backend: str | None, ep_size: int = 1):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (MoE(cfg, backend, ep_size) if cfg.is_moe_layer(layer)
                    else MLP(cfg.hidden_size, cfg.intermediate_size))

    def ffn(self, x: torch.Tensor) -> torch.Tensor:  # x [..., D]
        h = self.post_attention_layernorm(x)
        return x + self.mlp(h.reshape(-1, h.shape[-1])).view(x.shape)

    def ffn_fused(self, x: torch.Tensor, decode: bool = False) -> torch.Tensor:
        """x [T, D] += mlp(norm(x)), in place (fused glue); ``decode``: a decode step (the expert-parallel
        decode buffer)."""
        h = self.post_attention_layernorm(x, fused=True)
        if isinstance(self.mlp, MoE):
            return self.mlp.add_forward_to(x, h, decode)
        return self.mlp.add_forward_to(x, h)
