"""DeepSeek-V2 configuration: the fields of a checkpoint's ``config.json``, presets, and the formulas
derived from them (softmax scale, which layers are MoE).

Field names are Hugging Face's. ``rope_scaling`` is kept in DeepSeek's original form
(``{"type": "yarn", "factor": ..., "original_max_position_embeddings": ..., "beta_fast": ...,
"beta_slow": ..., "mscale": ..., "mscale_all_dim": ...}`` or ``None``); transformers 5 writes the
same values as ``rope_parameters`` (``"rope_type"``, ``"rope_theta"`` inside), which ``from_dict``
converts.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOPK_METHODS = ("greedy", "group_limited_greedy")
ROPE_SCALING_KEYS = (
    "type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 1 for no scaling, else 0.1 * mscale * ln(scale) + 1 (DeepSeek's formula)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@dataclass
class DeepseekV2Config:
    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944           # dense MLP (layers before first_k_dense_replace)
    moe_intermediate_size: int = 1408        # one routed expert; shared experts are n_shared_experts times wider
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    n_shared_experts: int = 2
    n_routed_experts: int = 64
    num_experts_per_tok: int = 6
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    q_lora_rank: int | None = None           # None: a plain q_proj
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived values -------------------------------------------------------------------------------

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width of the naive form: nope part then rope part (192)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Width of one latent cache row: normalised kv latent then rotated k_pe (576)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """DeepSeek's softmax scale: qk_head_dim^-0.5 * yarn_get_mscale(factor, mscale_all_dim)^2.

        The factor is 1 without YaRN or when ``mscale_all_dim`` is 0/absent (modeling_deepseek.py).
        """
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.get("mscale_all_dim"):
            scale *= yarn_get_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        """Layer ``layer`` has routed experts (DeepSeek: i >= first_k_dense_replace and i % moe_layer_freq == 0)."""
        return (self.n_routed_experts > 0 and layer >= self.first_k_dense_replace
                and layer % self.moe_layer_freq == 0)

    # ---- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str) -> DeepseekV2Config:
        """One of ``PRESETS``: "tiny", "lite", "v2-236b", "coder-v2-236b"."""
        if name not in PRESETS:
            raise ValueError(f"name: expected one of {', '.join(map(repr, PRESETS))}, got {name!r}")
        return dataclasses.replace(PRESETS[name], rope_scaling=_copy(PRESETS[name].rope_scaling))

    @classmethod
    def from_json(cls, path: str | Path) -> DeepseekV2Config:
        """Read a ``config.json`` file, or the ``config.json`` of a checkpoint directory."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"path: no config.json at {path}")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeepseekV2Config:
        """Build from a config.json dict (DeepSeek's original form or transformers 5's).

        Keys that are not fields (``architectures``, ``hidden_act``, ...) are ignored. transformers 5's
        ``rope_parameters`` becomes ``rope_theta`` + ``rope_scaling``; a ``"default"`` rope type means no scaling.
        """
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act: expected 'silu', got {d['hidden_act']!r}")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag, False):
                raise ValueError(f"{flag}: expected false (DeepSeek-V2 has no biases), got {d[flag]!r}")
        if d.get("scoring_func", "softmax") != "softmax":
            raise ValueError(f"scoring_func: expected 'softmax', got {d['scoring_func']!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        rope_parameters = d.get("rope_parameters")
        if rope_parameters is not None:
            kwargs.update(_from_rope_parameters(rope_parameters))
        # config.json writes null for "not set"; fall back to the dataclass default for these.
        for key in ("n_group", "topk_group", "num_experts_per_tok"):
            if kwargs.get(key, 0) is None:
                kwargs.pop(key)
        for key in ("n_routed_experts", "n_shared_experts"):     # null: a model without experts
            if key in kwargs and kwargs[key] is None:
                kwargs[key] = 0
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The config.json form (DeepSeek's original ``rope_scaling``)."""
        return dataclasses.asdict(self)

    # ---- validation -----------------------------------------------------------------------------------

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "max_position_embeddings", "moe_layer_freq"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ValueError(f"q_lora_rank: expected a positive integer or None, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim: expected an even number, got {self.qk_rope_head_dim}")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method: expected one of {TOPK_METHODS}, got {self.topk_method!r}")
        if self.n_routed_experts > 0:
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise ValueError(f"num_experts_per_tok: expected 1..n_routed_experts ({self.n_routed_experts}), "
                                 f"got {self.num_experts_per_tok}")
            if self.n_group <= 0 or self.n_routed_experts % self.n_group:
                raise ValueError(f"n_group: expected a positive divisor of n_routed_experts ({self.n_routed_experts}),"
                                 f" got {self.n_group}")
            if not 0 < self.topk_group <= self.n_group:
                raise ValueError(f"topk_group: expected 1..n_group ({self.n_group}), got {self.topk_group}")
            if self.topk_method == "group_limited_greedy":
                reachable = self.topk_group * (self.n_routed_experts // self.n_group)
                if reachable < self.num_experts_per_tok:
                    raise ValueError(f"topk_group: {self.topk_group} groups of "
                                     f"{self.n_routed_experts // self.n_group} experts hold fewer than "
                                     f"num_experts_per_tok ({self.num_experts_per_tok})")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if rs.get("type") != "yarn":
                raise ValueError(f"rope_scaling: expected type 'yarn' or no scaling, got {rs.get('type')!r}")
            unknown = sorted(set(rs) - set(ROPE_SCALING_KEYS))
            if unknown:
                raise ValueError(f"rope_scaling: unknown keys {unknown}; expected a subset of {ROPE_SCALING_KEYS}")
            for key in ("factor", "original_max_position_embeddings"):
                if key not in rs:
                    raise ValueError(f"rope_scaling: missing {key!r} (got {rs})")


def _copy(d: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if d is None else dict(d)


def _from_rope_parameters(rp: dict[str, Any]) -> dict[str, Any]:
    """transformers 5's ``rope_parameters`` -> ``rope_theta`` and DeepSeek's ``rope_scaling``."""
    out: dict[str, Any] = {}
    if "rope_theta" in rp:
        out["rope_theta"] = rp["rope_theta"]
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind == "default":
        out["rope_scaling"] = None
    else:
        scaling = {"type": kind}
        scaling.update({k: v for k, v in rp.items() if k in ROPE_SCALING_KEYS and k != "type" and v is not None})
        out["rope_scaling"] = scaling
    return out


def _yarn(mscale: float) -> dict[str, Any]:
    return {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale}


# config.json values of the released checkpoints (FACTS.md); "tiny" is ours: the real attention widths
# (kv_lora_rank 512, rope 64, so every kernel backend runs it) with a small hidden size, few layers and
# experts, q_lora_rank and the group-limited gate, for tests and CPU smoke runs.
PRESETS: dict[str, DeepseekV2Config] = {
    "tiny": DeepseekV2Config(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, n_shared_experts=2, n_routed_experts=16, num_experts_per_tok=4,
        routed_scaling_factor=2.5, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        first_k_dense_replace=1, q_lora_rank=128, max_position_embeddings=16384,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        bos_token_id=0, eos_token_id=1),
    "lite": DeepseekV2Config(rope_scaling=_yarn(0.707)),
    "v2-236b": DeepseekV2Config(
        hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=60,
        num_attention_heads=128, n_routed_experts=160, routed_scaling_factor=16.0,
        topk_method="group_limited_greedy", n_group=8, topk_group=3, q_lora_rank=1536, rope_scaling=_yarn(0.707)),
    "coder-v2-236b": DeepseekV2Config(
        hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=60,
        num_attention_heads=128, n_routed_experts=160, routed_scaling_factor=16.0,
        topk_method="group_limited_greedy", n_group=8, topk_group=3, q_lora_rank=1536, rope_scaling=_yarn(1.0)),
}
