"""Parity of model/ with transformers' own DeepseekV2ForCausalLM (float32, CPU) and with a direct
transcription of DeepSeek's original gate.

What is compared (transformers as pinned in CI, 5.24.0):
- transformers 5.24's DeepseekV2Attention multiplies its softmax scale by yarn_get_mscale(factor,
  mscale_all_dim)**2 (``yarn_apply_mscale``, the fix of 2026-07): the same scale as DeepSeek's code and
  ours, so the logits are compared as they are. ``test_transformers_softmax_scale`` records that; were an
  older transformers installed (no mscale**2, FACTS.md), ``make_hf_model`` would set DeepSeek's scale on
  transformers' attention layers and ``SCALE_BEHAVIOUR`` says so.
- transformers rotates interleaved pairs (x[2i], x[2i+1]) with complex numbers and multiplies cos/sin by
  yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim); the tests use mscale 1.0 and
  mscale_all_dim 0.8 so that ratio is not 1.
- transformers' router runs "greedy" and "group_limited_greedy" but ignores ``norm_topk_prob`` (it always
  multiplies by routed_scaling_factor); the model-level comparisons use norm_topk_prob=False, and
  ``test_moe_matches_deepseek_gate`` compares our MoE layer (both methods, norm_topk_prob both ways)
  against a transcription of DeepSeek's MoEGate/DeepseekV2MoE (modeling_deepseek.py).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import DeepseekV2Config as HFConfig
from transformers import DeepseekV2ForCausalLM

from model import DeepseekV2, DeepseekV2Config
from model.config import yarn_get_mscale
from model.layers import MoE
from model_cases import rel_err

MAX_REL_ERR = 1e-4  # float32 logits, the bound

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}


def hf_config(*, q_lora_rank: int | None = 24, topk_method: str = "group_limited_greedy",
              rope: dict | None = YARN, **overrides) -> HFConfig:
    """A tiny transformers config: 3 layers (1 dense, 2 MoE), 4 heads, odd widths, v_head_dim != qk_nope."""
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
              num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=3,
              first_k_dense_replace=1, q_lora_rank=q_lora_rank, kv_lora_rank=32, qk_nope_head_dim=16,
              qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=512, rms_norm_eps=1e-6,
              topk_method=topk_method, routed_scaling_factor=2.5, norm_topk_prob=False,
              rope_parameters=dict(rope) if rope else {"rope_type": "default", "rope_theta": 10000.0})
    if topk_method == "group_limited_greedy":
        kw.update(n_group=4, topk_group=2)
    kw.update(overrides)
    return HFConfig(**kw)


def make_hf_model(cfg: HFConfig, seed: int = 0) -> DeepseekV2ForCausalLM:
    """transformers' model with weights that make every part matter: std fan_in^-0.5, norms near 1."""
    torch.manual_seed(seed)
    cfg._attn_implementation = "eager"
    hf = DeepseekV2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            r = torch.randn(p.shape)
            if p.dim() == 1:
                p.copy_(1 + 0.1 * r)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(r)
            else:
                p.copy_(r * p.shape[-1] ** -0.5)
    want = deepseek_softmax_scale(cfg)
    for layer in hf.model.layers:
        if not math.isclose(layer.self_attn.scaling, want, rel_tol=1e-12):
            layer.self_attn.scaling = want  # transformers before PR 47435: no mscale**2 (see module doc)
    return hf


def deepseek_softmax_scale(cfg: HFConfig) -> float:
    """modeling_deepseek.py: q_head_dim^-0.5, times yarn_get_mscale(factor, mscale_all_dim)^2 with YaRN."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    rp = cfg.rope_parameters
    if rp.get("rope_type") == "yarn" and rp.get("mscale_all_dim"):
        scale *= yarn_get_mscale(rp["factor"], rp["mscale_all_dim"]) ** 2
    return scale


def scale_behaviour() -> str:
    """Which softmax scale the installed transformers uses (checked, not assumed)."""
    hf = DeepseekV2ForCausalLM(hf_config()).eval()
    ok = math.isclose(hf.model.layers[0].self_attn.scaling, deepseek_softmax_scale(hf.config), rel_tol=1e-12)
    return (f"transformers {transformers.__version__} " +
            ("includes yarn_get_mscale(factor, mscale_all_dim)**2: compared as is" if ok else
             "omits the mscale**2 factor (pre-fix): DeepSeek's scale was set on its attention layers"))


def test_transformers_softmax_scale():
    """CI pins transformers 5.24.0, which has the mscale**2 factor; say so, and fail loudly if that changes."""
    behaviour = scale_behaviour()
    print(behaviour)
    assert "includes" in behaviour, behaviour


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_logits_match_transformers(tmp_path, topk_method, q_lora_rank):
    """save_pretrained (original per-expert keys) -> DeepseekV2.from_pretrained: same logits, YaRN on."""
    hf = make_hf_model(hf_config(q_lora_rank=q_lora_rank, topk_method=topk_method))
    hf.save_pretrained(tmp_path)
    ours = DeepseekV2.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    assert ours.cfg.rope_scaling["type"] == "yarn" and ours.cfg.topk_method == topk_method
    assert math.isclose(ours.softmax_scale(), deepseek_softmax_scale(hf.config), rel_tol=1e-12)
    ids = torch.randint(0, hf.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    err = rel_err(out, ref)
    assert err <= MAX_REL_ERR, f"{scale_behaviour()}; relative error {err:.2e}"


def test_logits_match_transformers_plain_rope(tmp_path):
    """No rope scaling: plain RoPE and the plain softmax scale."""
    hf = make_hf_model(hf_config(rope=None, topk_method="greedy"), seed=3)
    hf.save_pretrained(tmp_path)
    ours = DeepseekV2.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    assert ours.cfg.rope_scaling is None
    ids = torch.randint(0, hf.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = rel_err(ours(ids), hf(ids).logits)
    assert err <= MAX_REL_ERR, err


def deepseek_moe_reference(x, gate_w, w13, w2, shared, cfg: DeepseekV2Config) -> torch.Tensor:
    """DeepSeek-V2's MoEGate + DeepseekV2MoE (inference path), transcribed step by step; float64."""
    T, H = x.shape
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    logits = x.double() @ gate_w.double().t()
    scores = logits.softmax(dim=-1)  # [T, E]
    if cfg.topk_method == "greedy":
        topk_weight, topk_idx = torch.topk(scores, k=k, dim=-1, sorted=False)
    else:
        group_scores = scores.view(T, cfg.n_group, -1).max(dim=-1).values  # [T, n_group]
        group_idx = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(T, cfg.n_group, E // cfg.n_group).reshape(T, -1)
        tmp_scores = scores.masked_fill(~score_mask.bool(), 0.0)
        topk_weight, topk_idx = torch.topk(tmp_scores, k=k, dim=-1, sorted=False)
    if k > 1 and cfg.norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        topk_weight = topk_weight * cfg.routed_scaling_factor
    I = cfg.moe_intermediate_size
    y = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = int(topk_idx[t, j])
            gate, up = w13[e, :I].double(), w13[e, I:].double()
            h = F.silu(gate @ x[t].double()) * (up @ x[t].double())
            y[t] += topk_weight[t, j] * (w2[e].double() @ h)
    xs = x.double()
    h = F.silu(xs @ shared.gate_proj.weight.double().t()) * (xs @ shared.up_proj.weight.double().t())  # [T, 2I]
    y += h @ shared.down_proj.weight.double().t()
    return y


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_moe_matches_deepseek_gate(topk_method, norm_topk_prob):
    """Our MoE layer vs DeepSeek's original gate algorithm (transformers ignores norm_topk_prob)."""
    cfg = DeepseekV2Config(vocab_size=32, hidden_size=48, intermediate_size=64, moe_intermediate_size=20,
                           num_hidden_layers=2, num_attention_heads=2, n_shared_experts=2, n_routed_experts=12,
                           num_experts_per_tok=4, topk_method=topk_method, n_group=4, topk_group=2,
                           routed_scaling_factor=16.0, norm_topk_prob=norm_topk_prob, kv_lora_rank=16,
                           qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64)
    m = DeepseekV2.random(cfg, seed=5)
    moe = m.layers[1].mlp
    assert isinstance(moe, MoE)
    x = torch.randn(37, cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = moe(x)
        ref = deepseek_moe_reference(x, moe.gate.weight, moe.w13, moe.w2, moe.shared_experts, cfg)
    assert rel_err(out, ref) <= 1e-5
