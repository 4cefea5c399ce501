"""Minimal bytes and FLOPs of each op as a function of its shape: the roofline's numerators.

"Minimal" means what any correct implementation must move to or from device memory (each input
read once, each output written once, intermediates kept on chip) and the multiply-adds it must do
(2 FLOPs each; elementwise work is counted only where an op is nothing but elementwise work).
The benchmarks divide these by the measured time to get GB/s and TFLOP/s, and the profiling
reports divide them by the hardware limits to get the ideal time.

Every function returns ``OpCost(bytes, flops)`` in plain integers. ``elem_bytes`` is the size of one
activation / weight / cache element (2 for bf16 and fp16, 1 for fp8, 4 for fp32).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

# Routing outputs: float32 weights and int32 expert ids, one of each per (token, k).
_ROUTE_OUT_BYTES = 4 + 4
# Positions and cache slots are int64 per token.
_INDEX_BYTES = 8


class OpCost(NamedTuple):
    bytes: int
    flops: int

    def __add__(self, other: OpCost) -> OpCost:  # type: ignore[override]
        return OpCost(self.bytes + other.bytes, self.flops + other.flops)

    @property
    def intensity(self) -> float:
        """FLOPs per byte (0 for an op that moves no bytes)."""
        return self.flops / self.bytes if self.bytes else 0.0


def expected_experts_hit(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts hit by ``tokens`` tokens under uniform routing.

    Each token picks ``top_k`` distinct experts of ``num_experts``; a given expert is missed by one
    token with probability ``1 - top_k / num_experts``, by all of them with that to the power
    ``tokens``:  E · (1 − (1 − k/E)^T). One token hits exactly k; many tokens hit all E.
    """
    if tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def mla_decode(b: int, q_len: int, h: int, total_seqlen: int, head_dim: int = 576,
               head_dim_v: int = 512, elem_bytes: int = 2) -> OpCost:
    """Absorbed MLA decode over a latent cache, counted as FlashMLA counts it.

    bytes = elem · (Σseqlen·head_dim          the cache rows, read once per sequence (shared by heads)
                    + b·q_len·h·head_dim      q
                    + b·q_len·h·head_dim_v)   out
    flops = 2 · q_len · Σseqlen · h · (head_dim + head_dim_v)    q·kᵀ over 576 dims, p·v over 512
    ``total_seqlen`` is Σ cache_seqlens over the batch. The float32 LSE output and the block table
    are not counted (FlashMLA does not count them either; they are < 0.1 % at real sizes).
    """
    nbytes = elem_bytes * (total_seqlen * head_dim + b * q_len * h * head_dim + b * q_len * h * head_dim_v)
    flops = 2 * q_len * total_seqlen * h * (head_dim + head_dim_v)
    return OpCost(nbytes, flops)


def moe_gate(T: int, E: int, H: int, x_bytes: int = 2) -> OpCost:
    """Router logits: float32(x [T, H]) @ weight [E, H].T with a float32 weight, float32 out.

    bytes = T·H·x_bytes (x read) + E·H·4 (weight read) + T·E·4 (logits written)
    flops = 2·T·E·H
    """
    return OpCost(T * H * x_bytes + E * H * 4 + T * E * 4, 2 * T * E * H)


def moe_route(T: int, E: int, top_k: int, logit_bytes: int = 2) -> OpCost:
    """DeepSeek's gate: softmax over E logits per token, then top-k.

    bytes = T·E·logit_bytes (logits read) + T·top_k·(4 + 4) (float32 weights, int32 ids written)
    flops = 5·T·E: per logit one max-compare, subtract, exp, add to the sum and divide; the top-k
    selection's compares are not counted.
    """
    return OpCost(T * E * logit_bytes + T * top_k * _ROUTE_OUT_BYTES, 5 * T * E)


def grouped_ffn(rows: int, experts_hit: float, H: int, I: int, elem_bytes: int = 2) -> OpCost:
    """SiLU-gated expert FFNs over expert-contiguous rows (rows = tokens × top_k).

    bytes = elem · (experts_hit · 3·H·I       w13 [2I, H] and w2 [H, I] of each expert that has rows
                    + 2 · rows·H)             x read, y written
    flops = 2·rows·H·2I (gate and up) + 2·rows·I·H (down) = 6·rows·H·I
    ``experts_hit`` may be an expectation (see ``expected_experts_hit``); bytes are rounded. The
    intermediate [rows, 2I] stays on chip in the minimal count; the offsets array is not counted.
    """
    weight_bytes = round(experts_hit * 3 * H * I * elem_bytes)
    return OpCost(weight_bytes + 2 * rows * H * elem_bytes, 6 * rows * H * I)


def moe_ffn(T: int, top_k: int, experts_hit: float, H: int, I: int, elem_bytes: int = 2) -> OpCost:
    """The whole routed-expert step: gather, expert FFNs, weighted sum back to tokens.

    bytes = elem · (experts_hit · 3·H·I + 2·T·H)    weights of the experts hit, x read, y written
            + T·top_k·(4 + 4)                       routing weights and ids read
    flops = 6·T·top_k·H·I + 2·T·top_k·H             the FFNs, then the weighted sum (multiply-add)
    """
    weight_bytes = round(experts_hit * 3 * H * I * elem_bytes)
    nbytes = weight_bytes + 2 * T * H * elem_bytes + T * top_k * _ROUTE_OUT_BYTES
    return OpCost(nbytes, 6 * T * top_k * H * I + 2 * T * top_k * H)


def apply_rotary(T: int, h: int, rotary_dim: int = 64, elem_bytes: int = 2) -> OpCost:
    """Rotate q_pe [T, h, rotary_dim] and k_pe [T, rotary_dim] into new tensors.

    bytes = elem · 2 · T·(h + 1)·rotary_dim (read and write) + 8·T (int64 positions)
    flops = 3 · T·(h + 1)·rotary_dim: each pair takes 4 multiplies and 2 adds.
    cos/sin are not counted: a minimal kernel computes them or hits them in cache.
    """
    n = T * (h + 1) * rotary_dim
    return OpCost(2 * n * elem_bytes + _INDEX_BYTES * T, 3 * n)


def rope_and_cache(T: int, h: int, kv_lora_rank: int = 512, rotary_dim: int = 64,
                   elem_bytes: int = 2) -> OpCost:
    """Rotate q's rope part in place and write cat(kv_latent, rotate(k_pe)) into the cache.

    bytes = elem · (2·T·h·rotary_dim              q[..., -rotary_dim:] read and written back
                    + T·(kv_lora_rank + rotary_dim)   kv_latent and k_pe read
                    + T·(kv_lora_rank + rotary_dim))  the cache rows written
            + 16·T                                int64 positions and slot_mapping
    flops = 3 · T·(h + 1)·rotary_dim, as in ``apply_rotary``.
    """
    row = kv_lora_rank + rotary_dim
    nbytes = elem_bytes * (2 * T * h * rotary_dim + 2 * T * row) + 2 * _INDEX_BYTES * T
    return OpCost(nbytes, 3 * T * (h + 1) * rotary_dim)


def ep_dispatch(rows_to_remote: int, H: int, elem_bytes: int = 2) -> OpCost:
    """Expert-parallel dispatch: only the bytes that cross to other ranks count.

    bytes = rows_to_remote · H · elem — the hidden rows sent to other ranks (a token goes once to
    each destination rank that owns one of its experts). Routing metadata is not counted.
    """
    return OpCost(rows_to_remote * H * elem_bytes, 0)


def ep_combine(rows_from_remote: int, H: int, elem_bytes: int = 2) -> OpCost:
    """Expert-parallel combine: the expert outputs that come back from other ranks.

    bytes = rows_from_remote · H · elem; the weighted sum is not counted (it is < 1 FLOP per byte).
    """
    return OpCost(rows_from_remote * H * elem_bytes, 0)


# ---------------------------------------------------------------------------------------------
# Whole-model costs.  The config is any object with the HF DeepseekV2 field names.


@dataclass(frozen=True)
class ModelParams:
    """Parameter counts of one DeepSeek-V2 config, split by how a forward step uses them."""

    attention_per_layer: int   # q (or q_a/q_b), kv_a, kv_b, o projections and the layer's norms
    norms_per_layer: int       # of which norm weights (elementwise: read, not multiplied)
    dense_mlp: int             # one dense SiLU-gated MLP (layers < first_k_dense_replace)
    router: int                # gate [E, H] of one MoE layer
    shared_experts: int        # the shared experts of one MoE layer, as one MLP
    expert: int                # one routed expert
    embedding: int             # vocab × H
    lm_head: int               # vocab × H
    final_norm: int
    hidden: int                # H
    vocab: int
    num_layers: int
    num_dense_layers: int
    num_experts: int
    top_k: int

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    @property
    def total(self) -> int:
        """Every parameter (untied embedding and lm_head)."""
        moe = self.router + self.shared_experts + self.num_experts * self.expert
        return (self.num_layers * self.attention_per_layer + self.num_dense_layers * self.dense_mlp
                + self.num_moe_layers * moe + self.embedding + self.lm_head + self.final_norm)

    def matmul_per_token(self) -> int:
        """Parameters one token multiplies with (its top_k experts; norms and the embedding lookup
        excluded)."""
        moe = self.router + self.shared_experts + self.top_k * self.expert
        return (self.num_layers * (self.attention_per_layer - self.norms_per_layer) + self.num_dense_layers * self.dense_mlp
                + self.num_moe_layers * moe + self.lm_head)

    def read_for(self, tokens: int) -> float:
        """Expected parameters read by one step over ``tokens`` tokens under uniform routing.

        Every non-expert weight once, the expected distinct experts per MoE layer, and one
        embedding row per distinct token (at most vocab rows).
        """
        hit = expected_experts_hit(self.num_experts, self.top_k, tokens)
        moe = self.router + self.shared_experts + hit * self.expert
        return (self.num_layers * self.attention_per_layer + self.num_dense_layers * self.dense_mlp
                + self.num_moe_layers * moe + min(tokens, self.vocab) * self.hidden
                + self.lm_head + self.final_norm)


def _cfg(cfg: Any, name: str) -> Any:
    if not hasattr(cfg, name):
        raise ValueError(f"cfg: expected a DeepseekV2 config with field {name!r}, got {type(cfg).__name__}")
    return getattr(cfg, name)


def model_params(cfg: Any) -> ModelParams:
    """Count the parameters of a DeepSeek-V2 config (HF field names), by role.

    Attention per layer: q_proj [h·(nope+rope), H], or q_a_proj [q_lora, H] + q_a_layernorm +
    q_b_proj [h·(nope+rope), q_lora] when q_lora_rank is set; kv_a_proj_with_mqa [kv_lora+rope, H];
    kv_a_layernorm; kv_b_proj [h·(nope+v), kv_lora]; o_proj [H, h·v]; the two layer norms [H].
    MLPs are SiLU-gated (gate, up, down): 3·H·width. Layer i is MoE when i >= first_k_dense_replace
    and i % moe_layer_freq == 0 (moe_layer_freq defaults to 1, as in every shipped config).
    """
    H = _cfg(cfg, "hidden_size")
    nh = _cfg(cfg, "num_attention_heads")
    q_lora = _cfg(cfg, "q_lora_rank")
    kv_lora = _cfg(cfg, "kv_lora_rank")
    nope, rope, v = _cfg(cfg, "qk_nope_head_dim"), _cfg(cfg, "qk_rope_head_dim"), _cfg(cfg, "v_head_dim")
    q_out = nh * (nope + rope)
    q = H * q_out if not q_lora else H * q_lora + q_lora + q_lora * q_out
    norms = (q_lora or 0) + kv_lora + 2 * H      # q_a_layernorm, kv_a_layernorm, the two layer norms
    attention = q + H * (kv_lora + rope) + kv_lora + kv_lora * nh * (nope + v) + nh * v * H + 2 * H
    E = _cfg(cfg, "n_routed_experts")
    vocab = _cfg(cfg, "vocab_size")
    # Layer i is MoE when i >= first_k_dense_replace and i % moe_layer_freq == 0 (modeling_deepseek).
    layers, first_dense = _cfg(cfg, "num_hidden_layers"), _cfg(cfg, "first_k_dense_replace")
    freq = getattr(cfg, "moe_layer_freq", 1) or 1
    return ModelParams(
        attention_per_layer=attention,
        norms_per_layer=norms,
        dense_mlp=3 * H * _cfg(cfg, "intermediate_size"),
        router=E * H,
        shared_experts=3 * H * _cfg(cfg, "moe_intermediate_size") * (_cfg(cfg, "n_shared_experts") or 0),
        expert=3 * H * _cfg(cfg, "moe_intermediate_size"),
        embedding=vocab * H,
        lm_head=vocab * H,
        final_norm=H,
        hidden=H,
        vocab=vocab,
        num_layers=layers,
        num_dense_layers=layers - sum(1 for i in range(layers) if i >= first_dense and i % freq == 0),
        num_experts=E,
        top_k=_cfg(cfg, "num_experts_per_tok"),
    )


def _cache_row(cfg: Any) -> int:
    """Latent cache entries per token per layer: kv_lora_rank + qk_rope_head_dim (576)."""
    return _cfg(cfg, "kv_lora_rank") + _cfg(cfg, "qk_rope_head_dim")


def model_decode_step(cfg: Any, batch: int, context: int, elem_bytes: int = 2) -> OpCost:
    """One decode step of ``batch`` sequences that each attend ``context`` cached positions.

    Assumptions (the minimal traffic of a bandwidth-bound step):
    - weights: every attention, dense-MLP, router, shared-expert, final-norm and lm_head weight is
      read once; of the routed experts, the expected number of distinct experts hit by ``batch``
      tokens under uniform routing, E·(1 − (1 − k/E)^batch), per MoE layer; one embedding row per
      sequence. All weights are ``elem_bytes`` wide (norms included).
    - KV cache: per layer, the absorbed MLA read of batch·context·(kv_lora + rope) entries, plus the
      write of the new token's entry (batch·(kv_lora + rope)).
    - activations, logits and routing metadata are not counted (≪ 1 % at these sizes).
    FLOPs: 2 per multiply-add of each sequence's matmuls (its own top_k experts, not the batch's hit
    set; absorbed attention's W_UK/W_UV cost the same as kv_b_proj), plus per layer the attention
    itself counted as FlashMLA does, 2·context·h·(kv_lora + rope + kv_lora) per sequence.
    """
    p = model_params(cfg)
    row = _cache_row(cfg)
    layers = p.num_layers
    weight_bytes = round(p.read_for(batch) * elem_bytes)
    kv_bytes = layers * batch * (context + 1) * row * elem_bytes
    nh, kv_lora = _cfg(cfg, "num_attention_heads"), _cfg(cfg, "kv_lora_rank")
    attention_flops = layers * batch * 2 * context * nh * (row + kv_lora)
    return OpCost(weight_bytes + kv_bytes, 2 * batch * p.matmul_per_token() + attention_flops)


def model_prefill(cfg: Any, tokens: int, elem_bytes: int = 2, *, seq_len: int | None = None) -> OpCost:
    """Prefill of ``tokens`` prompt tokens, in sequences of ``seq_len`` (default: one sequence).

    Assumptions:
    - weights: as in ``model_decode_step`` with ``tokens`` tokens routing (all experts are hit once
      tokens ≫ E/k), one embedding row per token.
    - KV cache: the write of tokens·(kv_lora + rope) entries per layer; attention within the prompt
      reads nothing back from memory in the minimal count.
    - logits only for the last token of each sequence (what generation needs).
    FLOPs: 2 per multiply-add of every token's matmuls except lm_head (counted once per sequence),
    plus causal attention in the non-absorbed form per layer and sequence of length S:
    2·h·S(S+1)/2·((nope + rope) + v).
    """
    if seq_len is None:
        seq_len = tokens
    if seq_len <= 0 or tokens % seq_len:
        raise ValueError(f"seq_len: expected a positive divisor of tokens={tokens}, got {seq_len}")
    sequences = tokens // seq_len
    p = model_params(cfg)
    layers = p.num_layers
    weight_bytes = round(p.read_for(tokens) * elem_bytes)
    kv_bytes = layers * tokens * _cache_row(cfg) * elem_bytes
    nh = _cfg(cfg, "num_attention_heads")
    qk = _cfg(cfg, "qk_nope_head_dim") + _cfg(cfg, "qk_rope_head_dim")
    v = _cfg(cfg, "v_head_dim")
    attention_flops = layers * sequences * 2 * nh * (seq_len * (seq_len + 1) // 2) * (qk + v)
    matmul_flops = 2 * tokens * (p.matmul_per_token() - p.lm_head) + 2 * sequences * p.lm_head
    return OpCost(weight_bytes + kv_bytes, matmul_flops + attention_flops)
