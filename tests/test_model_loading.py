"""Loading Hugging Face checkpoint directories: both expert key layouts, sharded with an index, dtypes,
and clear errors naming the tensor for a missing, mis-shaped or unexpected key."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_model_parity import hf_config, make_hf_model, rel_err

from model import CheckpointError, DeepseekV2

MAX_REL_ERR = 1e-4


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model(hf_config(q_lora_rank=24, topk_method="group_limited_greedy"), seed=11)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(12))


@pytest.fixture(scope="module")
def reference_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(ids).logits


def read_all(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def write_checkpoint(path, hf_model, tensors: dict[str, torch.Tensor]):
    """config.json of hf_model and one safetensors file holding ``tensors``."""
    path.mkdir(parents=True, exist_ok=True)
    hf_model.config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def original_dir(tmp_path_factory, hf_model):
    """save_pretrained: transformers 5.24 writes the original per-expert keys."""
    path = tmp_path_factory.mktemp("original")
    hf_model.save_pretrained(path)
    return path


def test_original_layout(original_dir, reference_logits, ids):
    keys = read_all(original_dir)
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in keys
    m = DeepseekV2.from_pretrained(original_dir, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        assert rel_err(m(ids), reference_logits) <= MAX_REL_ERR


def test_fused_layout(tmp_path, hf_model, reference_logits, ids):
    """transformers 5's in-memory names: mlp.experts.gate_up_proj [E, 2I, H] and mlp.experts.down_proj [E, H, I]."""
    state = hf_model.state_dict()
    assert state["model.layers.1.mlp.experts.gate_up_proj"].shape == (8, 48, 64)
    write_checkpoint(tmp_path, hf_model, state)
    m = DeepseekV2.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        assert rel_err(m(ids), reference_logits) <= MAX_REL_ERR
    assert torch.equal(m.layers[2].mlp.w2, state["model.layers.2.mlp.experts.down_proj"])


def test_sharded_with_index(tmp_path, hf_model, reference_logits, ids):
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    m = DeepseekV2.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        assert rel_err(m(ids), reference_logits) <= MAX_REL_ERR


def test_bfloat16(original_dir, reference_logits, ids):
    m = DeepseekV2.from_pretrained(original_dir, dtype=torch.bfloat16, device="cpu")
    assert m.layers[1].mlp.w13.dtype == torch.bfloat16 and m.embed_tokens.weight.dtype == torch.bfloat16
    assert m.layers[1].mlp.gate.weight.dtype == torch.float32  # the router stays float32
    with torch.no_grad():
        out = m(ids)
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    assert rel_err(out.float(), reference_logits) <= 5e-2  # bf16 weights and activations through 3 layers


def test_tied_embeddings(tmp_path):
    hf = make_hf_model(hf_config(tie_word_embeddings=True, topk_method="greedy"), seed=13)
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    write_checkpoint(tmp_path, hf, state)
    m = DeepseekV2.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    assert m.lm_head.weight is m.embed_tokens.weight
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert rel_err(m(ids), hf(ids).logits) <= MAX_REL_ERR


def edited(tmp_path, original_dir, hf_model, edit):
    tensors = read_all(original_dir)
    edit(tensors)
    return write_checkpoint(tmp_path / "edited", hf_model, tensors)


def test_missing_tensor(tmp_path, original_dir, hf_model):
    key = "model.layers.2.mlp.experts.5.up_proj.weight"
    path = edited(tmp_path, original_dir, hf_model, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"missing tensor '{key}'"):
        DeepseekV2.from_pretrained(path, dtype=torch.float32, device="cpu")
    path = edited(tmp_path, original_dir, hf_model, lambda t: t.pop("model.layers.0.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.0.self_attn.kv_b_proj.weight'"):
        DeepseekV2.from_pretrained(path, dtype=torch.float32, device="cpu")


def test_wrong_shape(tmp_path, original_dir, hf_model):
    key = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"

    def edit(t):
        t[key] = t[key][:-1]
    path = edited(tmp_path, original_dir, hf_model, edit)
    with pytest.raises(CheckpointError, match=rf"'{key}'.*shape \(39, 64\), expected \(40, 64\)"):
        DeepseekV2.from_pretrained(path, dtype=torch.float32, device="cpu")


def test_unknown_expert_layout(tmp_path, original_dir, hf_model):
    """Expert tensors under names of neither layout (e.g. Mixtral-style w1/w2/w3)."""
    def edit(t):
        for k in [k for k in t if ".mlp.experts." in k]:
            v = t.pop(k)
            t[k.replace("gate_proj", "w1").replace("down_proj", "w2").replace("up_proj", "w3")] = v
    path = edited(tmp_path, original_dir, hf_model, edit)
    with pytest.raises(CheckpointError, match=r"unknown key layout.*'model\.layers\.1\.mlp\.experts\.0\.gate_proj"
                                              r"\.weight'.*found 'model\.layers\.1\.mlp\.experts\.0\.w1\.weight'"):
        DeepseekV2.from_pretrained(path, dtype=torch.float32, device="cpu")


def test_mixed_layouts_and_unexpected_key(tmp_path, original_dir, hf_model):
    def mixed(t):
        t["model.layers.2.mlp.experts.gate_up_proj"] = torch.zeros(8, 48, 64)
    with pytest.raises(CheckpointError, match="both original per-expert keys .* and fused keys "
                                              r"\('model\.layers\.2\.mlp\.experts\.gate_up_proj'\)"):
        DeepseekV2.from_pretrained(edited(tmp_path, original_dir, hf_model, mixed), dtype=torch.float32,
                                   device="cpu")
    shutil.rmtree(tmp_path / "edited")

    def extra(t):
        t["model.layers.1.self_attn.q_norm.weight"] = torch.ones(4)
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.1.self_attn.q_norm.weight'"):
        DeepseekV2.from_pretrained(edited(tmp_path, original_dir, hf_model, extra), dtype=torch.float32,
                                   device="cpu")


def test_missing_files(tmp_path, original_dir, hf_model):
    with pytest.raises(FileNotFoundError, match="config.json"):
        DeepseekV2.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    hf_model.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        DeepseekV2.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    index = {"weight_map": {"lm_head.weight": "x.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="x.safetensors"):
        DeepseekV2.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
