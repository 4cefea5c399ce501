"""Shared by the model tests: a small config that exercises every feature, and the error measure."""
import torch

from model import DeepseekV2Config


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def small_cfg(**overrides) -> DeepseekV2Config:
    """3 layers (1 dense, 2 MoE), odd widths, q_lora_rank, group-limited gate, YaRN: fast on a CPU."""
    kw = dict(vocab_size=101, hidden_size=48, intermediate_size=72, moe_intermediate_size=20, num_hidden_layers=3,
              num_attention_heads=3, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
              routed_scaling_factor=2.0, topk_method="group_limited_greedy", n_group=4, topk_group=2,
              q_lora_rank=24, kv_lora_rank=40, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
              max_position_embeddings=1024,
              rope_scaling={"type": "yarn", "factor": 8, "original_max_position_embeddings": 64, "beta_fast": 32,
                            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8})
    kw.update(overrides)
    return DeepseekV2Config(**kw)
