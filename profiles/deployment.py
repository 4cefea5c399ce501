"""DeepSeek-V2 236B decode throughput on one 8-GPU H800 node with expert parallelism 8: a roofline
projection, set beside DeepSeek's published figure.

The model of one decode step (every GPU in lockstep, one new token per sequence):

    layouts  "dp": attention data-parallel: each GPU serves its own B sequences with a full copy of
                   every non-expert weight (attention, dense layer, shared experts, router, embedding,
                   lm_head) and the latent cache of its sequences only;
             "tp": attention tensor-parallel over the 8 GPUs: each GPU holds 1/8 of every non-expert
                   weight and 16 of the 128 heads, and, the latent being shared by all heads, the
                   latent cache of EVERY sequence of the node;
             routed experts: EP = 8 in both, 20 of the 160 experts on each GPU.
    phases   each phase runs at max(bytes / HBM bandwidth, FLOPs / tensor rate), one after another:
             attention projections, the absorbed MLA core (reads the latent cache; FLOPs at the bf16
             rate whatever the weight format), routed experts (the local experts hit by the node's
             tokens under uniform routing, expected_experts_hit), shared experts + router, the dense
             first layer, lm_head; matmuls with fp8 weights at the fp8 rate.
    comm     dp: per MoE layer each token goes to the ranks its experts live on and comes back
             (dispatch in the weight format, combine in bf16) over NVLink, one way per GPU; with
             group-limited routing (8 groups = 8 ranks, topk_group 3) a token reaches at most 3 ranks,
             7/8 of them remote on average. tp: two ring all-reduces of the bf16 hidden state per layer.
             Communication is added to the step (``overlap=False``) or hidden behind it (``True``).
    memory   weights and cache must fit in ``MEMORY_FRACTION`` of the GPU's memory (the rest for
             activations, workspace, CUDA graphs); the batch is the most sequences that fit.

Efficiencies: ``Efficiency.roofline()`` runs every phase at 100 % of the datasheet limits; the report
also uses the fractions this repository's kernels reach on the measured GPU (profiles/report.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from profiles import cost_model, hardware

# DeepSeek-V2 paper (arXiv 2405.04434), section 3.2.3: on one node of 8 H800 GPUs, with FP8 weights
# and a KV cache quantised to ~6 bits per element on average, generation throughput exceeds 50K
# tokens/s (prompt throughput exceeds 100K tokens/s), measured on the prompt and generation length
# distribution of their DeepSeek 67B service.
PUBLISHED_TOKENS_PER_S = 50_000
PUBLISHED_SOURCE = ("DeepSeek-V2 technical report (arXiv 2405.04434), sec. 3.2.3: > 50K generated tokens/s "
                    "on one 8 x H800 node, FP8 weights, KV cache quantised to ~6 bits per element")

GPUS = 8
# vLLM's default gpu_memory_utilization: weights and KV cache get 90 % of the memory.
MEMORY_FRACTION = 0.9


@dataclass(frozen=True)
class Scenario:
    """One deployment: weight and KV-cache element sizes, attention layout, cached context."""

    weights: str          # "bf16" | "fp8"
    kv: str               # "bf16" | "fp8"
    layout: str           # "dp" | "tp" (attention; routed experts are EP = 8 in both)
    context: int          # cached tokens per sequence (the mean over the generation)

    @property
    def weight_bytes(self) -> int:
        return _ELEM[self.weights]

    @property
    def kv_bytes(self) -> int:
        return _ELEM[self.kv]

    def label(self) -> str:
        return (f"{self.weights} weights, {self.kv} KV, {self.layout.upper()}{GPUS} attention + EP{GPUS}, "
                f"context {self.context}")


_ELEM = {"bf16": 2, "fp8": 1}


@dataclass(frozen=True)
class Efficiency:
    """Fraction of the datasheet limit each phase reaches (1.0: the roofline)."""

    mla: float = 1.0            # the MLA core (fraction of its roofline)
    experts: float = 1.0        # routed experts (fraction of their roofline)
    other_memory: float = 1.0   # other phases when memory-bound (fraction of HBM bandwidth)
    other_compute: float = 1.0  # other phases when compute-bound (fraction of the tensor rate)
    comm: float = 1.0           # NVLink (fraction of the one-way datasheet bandwidth)
    sources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def roofline(cls) -> Efficiency:
        return cls(sources={"all": "100 % of the H800 datasheet limits"})


@dataclass(frozen=True)
class Projection:
    scenario: Scenario
    fits: bool
    weights_gb_per_gpu: float
    kv_gb_per_sequence: float       # per GPU that holds the sequence's cache
    sequences: int                  # decoded in one step by the node
    step_s: float | None            # None when nothing fits
    phases_s: dict[str, float]      # per step, summed over layers
    comm_s: float
    tokens_per_s: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario.label(), "fits": self.fits, "weights_gb_per_gpu": self.weights_gb_per_gpu,
                "kv_gb_per_sequence": self.kv_gb_per_sequence, "sequences": self.sequences, "step_s": self.step_s,
                "phases_s": self.phases_s, "comm_s": self.comm_s, "tokens_per_s": self.tokens_per_s}


def remote_ranks_per_token(cfg: Any, gpus: int = GPUS) -> float:
    """Expected number of OTHER ranks a token's routed experts live on (experts placed contiguously).

    With group-limited routing whose groups are the ranks (n_group == gpus), a token's experts sit in
    ``topk_group`` groups, so on at most topk_group ranks; else under uniform routing the expected
    distinct ranks are gpus·(1 − C(E − E/gpus, k) / C(E, k)). Either way (gpus − 1)/gpus of them are
    remote on average.
    """
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    if getattr(cfg, "topk_method", "greedy") == "group_limited_greedy" and cfg.n_group == gpus:
        ranks = float(cfg.topk_group)
    else:
        per_rank = E // gpus
        ranks = gpus * (1.0 - math.comb(E - per_rank, k) / math.comb(E, k))
    return ranks * (gpus - 1) / gpus


def _phase(nbytes: float, flops: float, bw: float, rate: float, eff_mem: float, eff_compute: float) -> float:
    return max(nbytes / (bw * eff_mem), flops / (rate * eff_compute))


def project(cfg: Any, scenario: Scenario, eff: Efficiency | None = None, spec: hardware.GpuSpec = hardware.H800,
            overlap: bool = False) -> Projection:
    """Decode throughput of ``scenario`` on one node of ``GPUS`` × ``spec`` (see the module doc)."""
    if scenario.layout not in ("dp", "tp"):
        raise ValueError(f"scenario.layout: expected 'dp' or 'tp', got {scenario.layout!r}")
    if scenario.context <= 0:
        raise ValueError(f"scenario.context: expected a positive token count, got {scenario.context}")
    eff = eff or Efficiency.roofline()
    p = cost_model.model_params(cfg)
    wb, kvb = scenario.weight_bytes, scenario.kv_bytes
    dp = scenario.layout == "dp"
    split = 1 if dp else GPUS                       # how many ways non-expert weights are divided
    row = cfg.kv_lora_rank + cfg.qk_rope_head_dim   # 576 latent entries per token per layer
    L, H = p.num_layers, p.hidden

    non_expert = p.total - p.num_moe_layers * p.num_experts * p.expert
    experts_local = p.num_moe_layers * p.num_experts * p.expert / GPUS
    weights = (non_expert / split + experts_local) * wb
    kv_per_seq = L * scenario.context * row * kvb
    free = spec.memory_gib * 2**30 * MEMORY_FRACTION - weights
    per_gpu = max(0, int(free // kv_per_seq))       # sequences whose cache one GPU holds
    node_seqs = per_gpu * GPUS if dp else per_gpu
    if node_seqs == 0:
        return Projection(scenario, False, weights / 1e9, kv_per_seq / 1e9, 0, None, {}, 0.0, None)

    bw, bf16 = spec.hbm_gbps * 1e9, spec.flops_rate("bf16")
    rate = spec.flops_rate(scenario.weights)
    tokens = per_gpu if dp else node_seqs           # tokens whose attention one GPU computes
    heads = cfg.num_attention_heads // split

    def other(nbytes, flops):
        return _phase(nbytes, flops, bw, rate, eff.other_memory, eff.other_compute)

    attn_params = (p.attention_per_layer - p.norms_per_layer) / split
    phases = {
        "attention projections": L * other(attn_params * wb, 2 * tokens * attn_params),
        "MLA core": L * _phase(tokens * scenario.context * row * kvb, 2 * tokens * scenario.context * heads *
                               (row + cfg.kv_lora_rank), bw, bf16, eff.mla, eff.mla),
    }
    hit_local = cost_model.expected_experts_hit(p.num_experts, p.top_k, node_seqs) / GPUS
    routed_rows = node_seqs * p.top_k / GPUS
    phases["routed experts"] = p.num_moe_layers * _phase(hit_local * p.expert * wb, 2 * routed_rows * p.expert,
                                                         bw, rate, eff.experts, eff.experts)
    shared = (p.shared_experts + p.router) / split
    phases["shared experts + router"] = p.num_moe_layers * other(shared * wb, 2 * tokens * shared)
    dense = p.dense_mlp / split
    phases["dense layers"] = p.num_dense_layers * other(dense * wb, 2 * tokens * dense)
    head = p.lm_head / split
    phases["lm_head"] = other(head * wb, 2 * tokens * head)

    link = spec.nvlink_gbps * 1e9 * eff.comm
    if dp:   # dispatch in the weight format, combine in bf16, per MoE layer
        per_layer = per_gpu * remote_ranks_per_token(cfg) * H * (wb + 2)
        comm = p.num_moe_layers * per_layer / link
    else:    # two ring all-reduces of [node_seqs, H] bf16 per layer
        comm = L * 2 * (2 * (GPUS - 1) / GPUS * node_seqs * H * 2) / link
    compute = sum(phases.values())
    step = max(compute, comm) if overlap else compute + comm
    return Projection(scenario, True, weights / 1e9, kv_per_seq / 1e9, node_seqs, step, phases, comm,
                      node_seqs / step)


# The scenarios the report tabulates: fp8 weights fit with data-parallel attention (a full copy of
# the ~13 B non-expert parameters per GPU); bf16 weights do not (~81 GB a GPU before any cache), so
# they are shown DP (not fitting) and TP.
CONTEXTS = (1024, 4096)
SCENARIOS: tuple[Scenario, ...] = tuple(
    Scenario(w, kv, layout, ctx)
    for w, kv, layout in (("fp8", "fp8", "dp"), ("fp8", "bf16", "dp"), ("bf16", "bf16", "dp"),
                          ("bf16", "bf16", "tp"), ("bf16", "fp8", "tp"))
    for ctx in CONTEXTS)


def model_config():
    """DeepSeek-V2 236B's config (model/config.py's preset)."""
    from model.config import DeepseekV2Config

    return DeepseekV2Config.from_preset("v2-236b")
