"""DeepSeek-V2 layers: RMSNorm, multi-head latent attention (naive and absorbed forms), dense MLP, MoE.

Shapes: T tokens (flattened batch), H heads, D hidden size, C kv_lora_rank (512), R qk_rope_head_dim (64),
N qk_nope_head_dim (128), V v_head_dim (128), E routed experts, I moe_intermediate_size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import pykernels as pk
from model.cache import CacheStep
from model.config import DeepseekV2Config

# q_a_layernorm and kv_a_layernorm use RMSNorm's default eps in DeepSeek's code, not config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)); the normalisation in float32, the product in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MLP(nn.Module):
    """SiLU-gated MLP: down(silu(gate(x)) * up(x)). The dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Routed experts (DeepSeek's softmax gate, top-k) plus shared experts added unweighted.

    NOTES: the gate weight is kept in float32 and the router logits computed in float32 (as transformers 5
    does); the expert weights are fused: w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I].
    """

    def __init__(self, cfg: DeepseekV2Config, backend: str | None):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.cfg = cfg
        self.backend = backend
        self.gate = nn.Linear(D, E, bias=False, dtype=torch.float32)
        self.w13 = nn.Parameter(torch.empty(E, 2 * I, D))
        self.w2 = nn.Parameter(torch.empty(E, D, I))
        self.shared_experts = MLP(D, I * cfg.n_shared_experts) if cfg.n_shared_experts > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, D]
        cfg = self.cfg
        router_logits = F.linear(x.float(), self.gate.weight.float())  # [T, E]
        topk_weights, topk_ids = pk.moe_route(
            router_logits, cfg.num_experts_per_tok, method=cfg.topk_method, n_group=cfg.n_group,
            topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor,
            norm_topk_prob=cfg.norm_topk_prob, backend=self.backend)  # float32 [T, k], int32 [T, k]
        y = pk.moe_ffn(x, self.w13, self.w2, topk_weights, topk_ids, backend=self.backend)  # [T, D]
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y


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

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D] -> q [T, H, N + R] (rope part not rotated), latent [T, C] (normalised), k_pe [T, R]."""
        cfg = self.cfg
        if cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(x.shape[0], self.n_heads, cfg.qk_head_dim)  # [T, H, N + R]
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        return q, self.kv_a_layernorm(latent), k_pe

    def w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj.weight as W_UK [H, N, C] and W_UV [H, V, C]."""
        cfg = self.cfg
        w = self.kv_b_proj.weight.view(self.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        return w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]

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

    def prefill(self, x: torch.Tensor, step: CacheStep, k_cache: torch.Tensor, rope: pk.YarnRotary,
                softmax_scale: float) -> torch.Tensor:
        """Naive form over new tokens of several sequences, keys read back from the cache.

        x [T, D] (sequence b's new tokens are rows step.starts[b]:step.starts[b+1]) -> [T, D]. Writes the
        new cache rows first, so a sequence's earlier context (chunked prefill) is seen as well.
        """
        q, latent, k_pe = self.project(x)
        pk.rope_and_cache(q, latent, k_pe, step.positions, rope, k_cache, step.slot_mapping,
                          backend=self.backend)  # q's rope part rotated in place
        C = self.cfg.kv_lora_rank
        out = torch.empty(x.shape[0], self.n_heads, self.cfg.v_head_dim, dtype=x.dtype, device=x.device)
        for b, (lo, hi) in enumerate(zip(step.starts[:-1], step.starts[1:])):
            if hi == lo:
                continue
            rows = step.context_rows(b, k_cache)  # [L, C + R]
            out[lo:hi] = self.attend_naive(q[None, lo:hi], rows[None, :, :C], rows[None, :, C:], softmax_scale)[0]
        return self.o_proj(out.view(x.shape[0], -1))

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


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x)); mlp is dense or MoE."""

    def __init__(self, cfg: DeepseekV2Config, layer: int, backend: str | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, backend) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:  # x [..., D]
        h = self.post_attention_layernorm(x)
        return x + self.mlp(h.reshape(-1, h.shape[-1])).view(x.shape)
