"""Loading a Hugging Face checkpoint directory into ``DeepseekV2``.

The directory holds ``config.json`` and ``*.safetensors`` files, with ``model.safetensors.index.json``
(``{"weight_map": {key: file}}``) when sharded. Keys are the model's parameter names with a ``model.``
prefix (``lm_head.weight`` without), except the routed experts, in one of two layouts:

- ``original`` (DeepSeek's release; what transformers 5's ``save_pretrained`` writes back):
  ``model.layers.N.mlp.experts.E.{gate_proj,up_proj}.weight [I, D]`` and ``...down_proj.weight [D, I]``
- ``fused`` (transformers 5's in-memory names): ``model.layers.N.mlp.experts.gate_up_proj [E, 2I, D]``
  (gate rows then up rows) and ``model.layers.N.mlp.experts.down_proj [E, D, I]``

both loaded into ``layers.N.mlp.w13 [E, 2I, D]`` / ``layers.N.mlp.w2 [E, D, I]``. Every key and shape is
checked from the file headers before any tensor is read; a missing, mis-shaped or unexpected tensor
raises ``CheckpointError`` naming it.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters save that the model recomputes.
IGNORED_KEY = re.compile(r"\.rotary_emb\.inv_freq$")
ORIGINAL_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
FUSED_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.")


class CheckpointError(ValueError):
    """A checkpoint that does not match the config: missing, mis-shaped or unexpected tensors."""


@dataclass
class _Target:
    """Where one checkpoint tensor goes: ``param[index]`` (index None: the whole parameter)."""
    param: torch.Tensor
    index: tuple | None
    shape: tuple[int, ...]


def checkpoint_keys(path: str | Path) -> dict[str, Path]:
    """Every tensor key of the checkpoint directory -> the safetensors file that holds it."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: expected a 'weight_map' object mapping keys to files")
        files = {name: path / name for name in set(weight_map.values())}
        for name, file in files.items():
            if not file.is_file():
                raise CheckpointError(f"{index} names shard {name!r}, which is not in {path}")
        return {key: files[name] for key, name in weight_map.items()}
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"path: no *.safetensors files (and no {INDEX_FILE}) in {path}")
    keys: dict[str, Path] = {}
    for file in shards:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                keys[key] = file
    return keys


def detect_layout(keys, moe_layers: list[int]) -> str | None:
    """"original" or "fused" from the expert keys; None when the config has no MoE layer."""
    original = next((k for k in keys if ORIGINAL_EXPERT_KEY.match(k)), None)
    fused = next((k for k in keys if FUSED_EXPERT_KEY.match(k)), None)
    if original and fused:
        raise CheckpointError(f"unknown key layout: both original per-expert keys ({original!r}) and fused "
                              f"keys ({fused!r}) are present")
    if original or fused:
        return "original" if original else "fused"
    if not moe_layers:
        return None
    n = moe_layers[0]
    odd = next((k for k in keys if EXPERT_KEY.match(k)), None)
    found = f"found {odd!r}" if odd else f"no key starts with 'model.layers.{n}.mlp.experts.'"
    raise CheckpointError(
        f"unknown key layout for the routed experts: expected 'model.layers.{n}.mlp.experts.0.gate_proj.weight' "
        f"(original) or 'model.layers.{n}.mlp.experts.gate_up_proj' (fused, transformers 5); {found}")


def _targets(model, layout: str | None) -> dict[str, _Target]:
    """Checkpoint key -> where it goes and the shape it must have."""
    cfg = model.cfg
    out: dict[str, _Target] = {}
    for name, p in model.named_parameters():
        m = re.match(r"^layers\.(\d+)\.mlp\.(w13|w2)$", name)
        if m is None:
            key = name if name.startswith("lm_head.") else "model." + name
            out[key] = _Target(p, None, tuple(p.shape))
            continue
        n, which = int(m.group(1)), m.group(2)
        prefix = f"model.layers.{n}.mlp.experts"
        if layout == "fused":
            key = f"{prefix}.gate_up_proj" if which == "w13" else f"{prefix}.down_proj"
            out[key] = _Target(p, None, tuple(p.shape))
            continue
        I = cfg.moe_intermediate_size
        for e in range(cfg.n_routed_experts):
            if which == "w13":
                out[f"{prefix}.{e}.gate_proj.weight"] = _Target(p, (e, slice(0, I)), (I, p.shape[2]))
                out[f"{prefix}.{e}.up_proj.weight"] = _Target(p, (e, slice(I, 2 * I)), (I, p.shape[2]))
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = _Target(p, (e,), tuple(p.shape[1:]))
    if model.cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def load_checkpoint(model, path: str | Path) -> None:
    """Copy every tensor of the checkpoint at ``path`` into ``model``'s (materialised) parameters."""
    path = Path(path)
    keys = checkpoint_keys(path)
    moe_layers = [i for i in range(model.cfg.num_hidden_layers) if model.cfg.is_moe_layer(i)]
    layout = detect_layout(keys, moe_layers)
    targets = _targets(model, layout)
    for key in targets:
        if key not in keys:
            raise CheckpointError(f"missing tensor {key!r} in checkpoint {path} "
                                  f"(expert layout {layout!r}, {len(keys)} tensors found)")
    for key in keys:
        if key not in targets and not IGNORED_KEY.search(key):
            raise CheckpointError(f"unexpected tensor {key!r} in checkpoint {path}: not a parameter of this "
                                  f"config (expert layout {layout!r})")
    by_file: dict[Path, list[str]] = defaultdict(list)
    for key in targets:
        by_file[keys[key]].append(key)
    for file, file_keys in by_file.items():
        with safe_open(file, framework="pt") as f:
            for key in file_keys:
                shape = tuple(f.get_slice(key).get_shape())
                if shape != targets[key].shape:
                    raise CheckpointError(f"tensor {key!r} in {file.name} has shape {shape}, expected "
                                          f"{targets[key].shape} for this config")
    for file, file_keys in by_file.items():
        with safe_open(file, framework="pt") as f, torch.no_grad():
            for key in file_keys:
                t = targets[key]
                dst = t.param if t.index is None else t.param[t.index]
                dst.copy_(f.get_tensor(key))
