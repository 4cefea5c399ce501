"""DeepseekV2Config: presets reproduce the released config.json tables (FACTS.md), both config.json forms
parse to the same config, derived values (softmax scale, MoE layers), parameter counts on the meta device."""
from __future__ import annotations

import json
import math

import pytest
import torch

import pykernels as pk
from model import DeepseekV2, DeepseekV2Config

# FACTS.md's table, one column per preset (values shared by all three are checked once below).
TABLE = {
    "lite": dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
                 num_attention_heads=16, q_lora_rank=None, n_routed_experts=64, topk_method="greedy", n_group=1,
                 topk_group=1, routed_scaling_factor=1.0, mscale=0.707, softmax_scale=0.11472,
                 params=15_706_484_224),
    "coder-v2-236b": dict(hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
                          num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536, n_routed_experts=160,
                          topk_method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0,
                          mscale=1.0, softmax_scale=0.13523, params=235_741_434_880),
    "v2-236b": dict(hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=60,
                    num_attention_heads=128, q_lora_rank=1536, n_routed_experts=160,
                    topk_method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0,
                    mscale=0.707, softmax_scale=0.11472, params=235_741_434_880),
}
COMMON = dict(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_shared_experts=2,
              num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False,
              max_position_embeddings=163840, rms_norm_eps=1e-6, vocab_size=102400, bos_token_id=100000,
              eos_token_id=100001, tie_word_embeddings=False, rope_theta=10000.0)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_presets_reproduce_the_table(name):
    cfg = DeepseekV2Config.from_preset(name)
    want = dict(TABLE[name])
    mscale, scale, params = want.pop("mscale"), want.pop("softmax_scale"), want.pop("params")
    for key, value in {**want, **COMMON}.items():
        assert getattr(cfg, key) == value, key
    assert cfg.rope_scaling == {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                "beta_fast": 32, "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale}
    if scale is not None:
        assert round(cfg.softmax_scale, 5) == scale
    assert cfg.kv_cache_dim == 576 and cfg.qk_head_dim == 192
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, True]
    meta = DeepseekV2(cfg, device="meta")  # no memory: the 236B shapes can be inspected
    assert meta.num_parameters() == params
    assert meta.layers[1].mlp.w13.shape == (cfg.n_routed_experts, 2 * cfg.moe_intermediate_size, cfg.hidden_size)
    assert meta.layers[1].mlp.w13.device.type == "meta"


def test_lite_parameter_count_matches_transformers():
    """15.71 B for Lite: transformers' own model of the same config, built on the meta device, agrees."""
    from transformers import DeepseekV2Config as HFConfig
    from transformers import DeepseekV2ForCausalLM

    cfg = DeepseekV2Config.from_preset("lite")
    rs = cfg.rope_scaling
    hf_cfg = HFConfig(**{k: v for k, v in cfg.to_dict().items() if k not in ("rope_scaling", "rope_theta")},
                      rope_parameters={"rope_type": "yarn", "rope_theta": cfg.rope_theta,
                                       **{k: v for k, v in rs.items() if k != "type"}})
    with torch.device("meta"):
        hf = DeepseekV2ForCausalLM(hf_cfg)
    ours = DeepseekV2(cfg, device="meta").num_parameters()
    assert ours == sum(p.numel() for p in hf.parameters()) == 15_706_484_224
    assert round(ours / 1e9, 2) == 15.71


def test_softmax_scale_and_rope_factor_agree():
    """The model multiplies (qk_nope + qk_rope)^-0.5 by pk.YarnRotary's attention_scale_factor."""
    for name in ("tiny", "lite", "coder-v2-236b"):
        cfg = DeepseekV2Config.from_preset(name)
        rope = pk.YarnRotary.from_config(cfg)
        assert math.isclose(cfg.qk_head_dim ** -0.5 * rope.attention_scale_factor, cfg.softmax_scale, rel_tol=1e-12)
    plain = DeepseekV2Config.from_preset("lite")
    plain.rope_scaling = None
    assert plain.softmax_scale == 192 ** -0.5


# DeepSeek-V2-Lite's config.json as released (DeepSeek's original form: rope_scaling with "type": "yarn").
DEEPSEEK_LITE_JSON = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
    "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}


def test_from_json_original_form(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_LITE_JSON))
    assert DeepseekV2Config.from_json(tmp_path) == DeepseekV2Config.from_preset("lite")
    assert DeepseekV2Config.from_json(tmp_path / "config.json") == DeepseekV2Config.from_preset("lite")


def test_from_json_transformers5_form(tmp_path):
    """transformers 5 writes rope_parameters (rope_type, rope_theta inside) and null n_group for greedy."""
    from transformers import DeepseekV2Config as HFConfig

    d = dict(DEEPSEEK_LITE_JSON)
    for key in ("rope_scaling", "rope_theta", "auto_map", "aux_loss_alpha", "seq_aux", "scoring_func",
                "transformers_version", "torch_dtype"):
        d.pop(key)
    rope = {k: v for k, v in DEEPSEEK_LITE_JSON["rope_scaling"].items() if k != "type"}
    HFConfig(**d, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **rope}).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in saved and "rope_scaling" not in saved
    assert DeepseekV2Config.from_json(tmp_path) == DeepseekV2Config.from_preset("lite")


def test_from_dict_plain_rope_and_round_trip(tmp_path):
    d = dict(DEEPSEEK_LITE_JSON, rope_scaling=None)
    assert DeepseekV2Config.from_dict(d).rope_scaling is None
    d = dict(DEEPSEEK_LITE_JSON)
    d.pop("rope_scaling")
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000.0}
    cfg = DeepseekV2Config.from_dict(d)
    assert cfg.rope_scaling is None and cfg.rope_theta == 5000.0
    cfg = DeepseekV2Config.from_preset("v2-236b")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert DeepseekV2Config.from_json(tmp_path) == cfg


def test_presets_are_independent_copies():
    a = DeepseekV2Config.from_preset("lite")
    a.rope_scaling["factor"] = 1
    assert DeepseekV2Config.from_preset("lite").rope_scaling["factor"] == 40


@pytest.mark.parametrize("change, match", [
    (dict(topk_method="noaux_tc"), "topk_method"),
    (dict(n_group=3), "n_group"),
    (dict(topk_group=9), "topk_group"),
    (dict(num_experts_per_tok=65), "num_experts_per_tok"),
    (dict(qk_rope_head_dim=63), "qk_rope_head_dim"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling"),
    (dict(rope_scaling={"type": "yarn"}), "rope_scaling"),
    (dict(rope_scaling={"type": "yarn", "factor": 2, "original_max_position_embeddings": 8, "alpha": 1}),
     "rope_scaling"),
])
def test_bad_config(change, match):
    with pytest.raises(ValueError, match=match):
        DeepseekV2Config(**change)


def test_bad_json(tmp_path):
    with pytest.raises(ValueError, match="name"):
        DeepseekV2Config.from_preset("v3")
    with pytest.raises(FileNotFoundError, match="config.json"):
        DeepseekV2Config.from_json(tmp_path)
    with pytest.raises(ValueError, match="hidden_act"):
        DeepseekV2Config.from_dict(dict(DEEPSEEK_LITE_JSON, hidden_act="gelu"))
    with pytest.raises(ValueError, match="scoring_func"):
        DeepseekV2Config.from_dict(dict(DEEPSEEK_LITE_JSON, scoring_func="sigmoid"))


def test_random_is_seeded_and_typed():
    cfg = DeepseekV2Config.from_preset("tiny")
    a, b = DeepseekV2.random(cfg, seed=1), DeepseekV2.random(cfg, seed=1)
    c = DeepseekV2.random(cfg, seed=2, dtype=torch.bfloat16)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.layers[1].mlp.w13, c.layers[1].mlp.w13.float())
    assert c.layers[1].mlp.w13.dtype == torch.bfloat16 and c.layers[1].mlp.gate.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in c.parameters())
