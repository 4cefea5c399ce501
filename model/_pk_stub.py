"""TEMPORARY stand-ins for the pykernels ops while their owners land them (same signatures, torch math).

Removed as soon as pykernels' torch references exist; the model then calls pykernels directly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _mscale(s, m=1.0):
    return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0


class YarnRotary:
    def __init__(self, rotary_dim=64, base=10000.0, factor=40.0, original_max_position=4096, beta_fast=32.0,
                 beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, max_position=163840, interleaved=True, device=None):
        d = rotary_dim
        pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)

        def corr(rot):
            return d * math.log(original_max_position / (rot * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(corr(beta_fast)), 0)
        high = min(math.ceil(corr(beta_slow)), d - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        mask = 1 - ramp
        inv_freq = inter * (1 - mask) + extra * mask
        if factor <= 1:
            inv_freq = extra
        m = _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        self.cos = (freqs.cos() * m).to(device)
        self.sin = (freqs.sin() * m).to(device)
        self.attention_scale_factor = _mscale(factor, mscale_all_dim) ** 2
        self.interleaved = interleaved

    @classmethod
    def from_config(cls, cfg, device=None):
        rs = cfg.rope_scaling or {}
        return cls(rotary_dim=cfg.qk_rope_head_dim, base=cfg.rope_theta, factor=rs.get("factor", 1.0),
                   original_max_position=rs.get("original_max_position_embeddings", cfg.max_position_embeddings),
                   beta_fast=rs.get("beta_fast", 32), beta_slow=rs.get("beta_slow", 1), mscale=rs.get("mscale", 1),
                   mscale_all_dim=rs.get("mscale_all_dim", 0), max_position=cfg.max_position_embeddings,
                   device=device)


def _rot(x, positions, rope):
    cos = rope.cos[positions]  # [T, d/2]
    sin = rope.sin[positions]
    if x.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    a, b = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


def apply_rotary(q_pe, k_pe, positions, rope, *, backend=None):
    return _rot(q_pe, positions, rope), _rot(k_pe, positions, rope)


def rope_and_cache(q, kv_latent, k_pe, positions, rope, k_cache, slot_mapping, *, backend=None):
    d = k_pe.shape[-1]
    q[..., -d:] = _rot(q[..., -d:], positions, rope)
    row = torch.cat((kv_latent, _rot(k_pe, positions, rope)), dim=-1).to(k_cache.dtype)
    flat = k_cache.view(-1, k_cache.shape[-1])
    keep = slot_mapping >= 0
    flat[slot_mapping[keep]] = row[keep]


def mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v=512, softmax_scale=None, causal=False, *,
               backend=None):
    B, S, H, D = q.shape
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    out = q.new_zeros(B, S, H, head_dim_v)
    lse = torch.full((B, H, S), -math.inf, dtype=torch.float32)
    bs = k_cache.shape[1]
    for b in range(B):
        n = int(cache_seqlens[b])
        if n == 0:
            continue
        nb = (n + bs - 1) // bs
        kv = k_cache[block_table[b, :nb].long()].reshape(-1, D)[:n].float()  # [n, D]
        s = torch.einsum("shd,nd->hsn", q[b].float(), kv) * scale
        if causal:
            i = torch.arange(S)[:, None]
            j = torch.arange(n)[None, :]
            s = s.masked_fill(j > n - S + i, -math.inf)
        lse[b] = torch.logsumexp(s, -1)
        p = torch.softmax(s, -1)
        out[b] = torch.einsum("hsn,nv->shv", p, kv[:, :head_dim_v]).to(q.dtype)
    return out, lse


def moe_route(router_logits, top_k, *, method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
              norm_topk_prob=False):
    scores = router_logits.float().softmax(-1)
    T, E = scores.shape
    if method == "group_limited_greedy":
        g = scores.view(T, n_group, -1).max(-1).values
        idx = g.topk(topk_group, -1).indices
        gm = torch.zeros_like(g).scatter_(1, idx, 1.0)
        scores = scores.masked_fill(gm.repeat_interleave(E // n_group, -1) == 0, 0.0)
    w, ids = scores.topk(top_k, -1)
    if top_k > 1 and norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    else:
        w = w * routed_scaling_factor
    return w, ids.int()


def moe_ffn(x, w13, w2, topk_weights, topk_ids, *, backend=None):
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            gu = w13[e].float() @ x[t].float()
            g, u = gu.chunk(2)
            out[t] += topk_weights[t, k] * (w2[e].float() @ (F.silu(g) * u))
    return out.to(x.dtype)
