"""Cost models against hand-computed values (profiles/cost_model.py)."""
import types

import pytest

from profiles import cost_model as cm

# Field values of the shipped configs (shared/FACTS.md), so these tests do not depend on model/.
LITE = dict(hidden_size=2048, num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None,
            kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            n_routed_experts=64, n_shared_experts=2, moe_intermediate_size=1408, intermediate_size=10944,
            num_experts_per_tok=6, first_k_dense_replace=1, vocab_size=102400)
BIG = dict(LITE, hidden_size=5120, num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536,
           n_routed_experts=160, moe_intermediate_size=1536, intermediate_size=12288)
# A toy config small enough to count by hand (see test_model_costs_by_hand).
TOY = dict(hidden_size=4, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=3,
           qk_nope_head_dim=2, qk_rope_head_dim=1, v_head_dim=2, n_routed_experts=4, n_shared_experts=1,
           moe_intermediate_size=2, intermediate_size=5, num_experts_per_tok=2, first_k_dense_replace=1,
           vocab_size=10)


def cfg(**fields):
    return types.SimpleNamespace(**fields)


def test_mla_decode_flashmla_formula():
    # b=2, q_len=1, h=16, Σseqlen=1000: 2·(1000·576 + 2·16·576 + 2·16·512), 2·1·1000·16·1088
    c = cm.mla_decode(2, 1, 16, 1000)
    assert c == cm.OpCost(1_221_632, 34_816_000)
    # FlashMLA's benchmark shape b=64, s=4096, h=128, q_len=2, in its own words.
    b, s, h, q = 64, 4096, 128, 2
    c = cm.mla_decode(b, q, h, b * s)
    assert c.bytes == 2 * (b * s * 576 + b * q * h * 576 + b * q * h * 512)
    assert c.flops == 2 * q * b * s * h * (576 + 512)
    assert cm.mla_decode(1, 1, 1, 10, head_dim=8, head_dim_v=4, elem_bytes=1) == cm.OpCost(92, 240)


def test_moe_route():
    assert cm.moe_route(4, 8, 2) == cm.OpCost(4 * 8 * 2 + 4 * 2 * 8, 160)
    assert cm.moe_route(4, 8, 2, logit_bytes=4).bytes == 4 * 8 * 4 + 64


def test_moe_gate():
    # x 3·5·2 B, weight 4·5·4 B (float32), logits 3·4·4 B; 2·3·4·5 FLOPs
    assert cm.moe_gate(3, 4, 5) == cm.OpCost(30 + 80 + 48, 120)
    assert cm.moe_gate(3, 4, 5, x_bytes=4).bytes == 60 + 80 + 48
    # Lite decode at T = 1: the 0.5 MB float32 gate weight is nearly all of it.
    assert cm.moe_gate(1, 64, 2048) == cm.OpCost(2048 * 2 + 64 * 2048 * 4 + 64 * 4, 2 * 64 * 2048)


def test_grouped_and_moe_ffn():
    # weights 3 experts · 3·4·5 · 2 B = 360; activations 2·12·4·2 = 192; flops 6·12·4·5
    assert cm.grouped_ffn(12, 3, 4, 5) == cm.OpCost(552, 1440)
    # + routing 6·2·8 = 96 B; + weighted sum 2·6·2·4 = 96 FLOPs
    assert cm.moe_ffn(6, 2, 3, 4, 5) == cm.OpCost(360 + 96 + 96, 1440 + 96)
    # An expected (fractional) expert count rounds the weight bytes.
    assert cm.grouped_ffn(1, 1.5, 1, 1, elem_bytes=1).bytes == round(1.5 * 3) + 2


def test_rope_costs():
    # n = 3·(2+1)·4 = 36 elements read and written, 8 B positions per token
    assert cm.apply_rotary(3, 2, rotary_dim=4) == cm.OpCost(2 * 36 * 2 + 24, 108)
    # q rope part 2·3·2·4, latent+k_pe read 3·12, cache rows 3·12; positions + slots 16·3
    assert cm.rope_and_cache(3, 2, kv_lora_rank=8, rotary_dim=4) == cm.OpCost(2 * (48 + 72) + 48, 108)


def test_ep_costs():
    assert cm.ep_dispatch(10, 16) == cm.OpCost(320, 0)
    assert cm.ep_combine(10, 16, elem_bytes=4) == cm.OpCost(640, 0)


def test_expected_experts_hit():
    assert cm.expected_experts_hit(64, 6, 0) == 0
    assert cm.expected_experts_hit(64, 6, 1) == pytest.approx(6)
    assert cm.expected_experts_hit(4, 2, 2) == pytest.approx(3)  # 4·(1 − ½²)
    assert cm.expected_experts_hit(64, 6, 4096) == pytest.approx(64)


def test_model_params_match_published_counts():
    # transformers' parameter counts of the same configs (shared/FACTS.md)
    assert cm.model_params(cfg(**LITE)).total == 15_706_484_224
    assert cm.model_params(cfg(**BIG)).total == 235_741_434_880
    assert cm.model_params(cfg(**TOY)).total == 462


def test_model_costs_by_hand():
    toy = cfg(**TOY)
    # attention/layer 24+16+3+24+16+8 = 91 (11 of it norms); dense 60; router 16, shared 24, expert 24;
    # B=1 hits 2 experts: read 2·91 + 60 + (16+24+48) + 1 row·4 + lm_head 40 + norm 4 = 378 params;
    # KV 2 layers · (5+1) · 4 · 2 B = 96.
    # FLOPs 2·(2·80 + 60 + 88 + 40) = 696 + attention 2 layers · 2·5·2·(4+3) = 280.
    assert cm.model_decode_step(toy, 1, 5) == cm.OpCost(378 * 2 + 96, 696 + 280)
    # B=2 hits 3 experts on average: read 406 params; KV doubles; FLOPs double.
    assert cm.model_decode_step(toy, 2, 5) == cm.OpCost(406 * 2 + 192, 2 * (696 + 280))
    # 4 tokens in 2 sequences of 2: 3.75 experts hit -> 432 params, KV write 2·4·4·2 = 64 B;
    # FLOPs 2·4·(348−40) + 2·2·40 (lm_head on the last token only) + attention 2·2·(2·2·3·5) = 240.
    assert cm.model_prefill(toy, 4, seq_len=2) == cm.OpCost(432 * 2 + 64, 2464 + 160 + 240)
    with pytest.raises(ValueError, match="seq_len"):
        cm.model_prefill(toy, 5, seq_len=2)


def test_lite_decode_step_is_about_2_45b_activated_params():
    lite = cfg(**LITE)
    params = cm.model_params(lite).read_for(1)
    assert 2.40e9 < params < 2.50e9
    step = cm.model_decode_step(lite, 1, 0)
    assert 2.40e9 < step.bytes / 2 < 2.50e9
    # With a 4096-token context the KV read adds 27 layers · 4096 · 576 · 2 B ≈ 127 MB.
    extra = cm.model_decode_step(lite, 1, 4096).bytes - step.bytes
    assert extra == 27 * 4096 * 576 * 2
    # At a large batch every expert is read: ~31 GB of weights (shared/FACTS.md).
    assert 30e9 < cm.model_decode_step(lite, 1024, 0).bytes - 27 * 1024 * 576 * 2 < 32e9


def test_model_config_object_from_model_package():
    model = pytest.importorskip("model")
    for preset, fields in (("lite", LITE), ("coder-v2-236b", BIG)):
        c = model.DeepseekV2Config.from_preset(preset)
        assert cm.model_params(c) == cm.model_params(cfg(**fields))
    tiny = model.DeepseekV2Config.from_preset("tiny")
    m = model.DeepseekV2.random(tiny, seed=0)
    assert cm.model_params(tiny).total == sum(p.numel() for p in m.parameters())


def test_missing_config_field_is_named():
    fields = dict(LITE)
    del fields["kv_lora_rank"]
    with pytest.raises(ValueError, match="kv_lora_rank"):
        cm.model_params(cfg(**fields))
