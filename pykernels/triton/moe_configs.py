"""Tile configurations of the grouped-GEMM expert FFN (``pykernels/triton/grouped_gemm.py``): one readable table.

Key: ``(gemm, H, I, bucket)`` with gemm "gate_up" (x @ w13[e].T, fused silu * up) or "down" (h @ w2[e].T),
and the bucket from the average rows per expert ``rows / E`` (rows = tokens x top_k)::

    "decode"   <= 4 rows per expert    T = 1 ... ~40 at top-6 on 64 experts: one 16-row tile per hit expert
    "small"    <= 32                   T up to ~340 at top-6 on 64 experts
    "medium"   <= 128
    "large"    >  128                  prefill (8192 tokens at top-6: 768 rows per expert on 64, 307 on 160)

plus the pseudo-bucket "direct": moe_ffn's one-launch direct layout (up to ``DIRECT_MAX_TOKENS`` tokens, see
``layout_for``), whose slice items run both GEMMs of one route's I tile: the "gate_up" entry is that
tile (block_n = the I tile), num_warps and num_stages of the kernel; the "down" entry gives block_n, the
H-rows of w2 per step of the item's down GEMM, and tma (its other fields are unused).

Shapes not in the table use ``DEFAULTS[(gemm, bucket)]``. To update after a sweep: run
``python -m bench.tune_moe --out tune.json`` on the GPU, then copy each shape's ``best`` entry from the JSON
into ``TABLE`` below (the sweep prints them as ready-to-paste lines).
"""
from __future__ import annotations

from typing import NamedTuple


class GemmConfig(NamedTuple):
    block_m: int  # rows of one tile (one expert's rows; 16 is tl.dot's minimum)
    block_n: int  # output columns of one tile (gate_up: this many gate AND this many up columns)
    block_k: int  # reduction step
    group_m: int  # M tiles that run next to each other over the N tiles (L2 reuse of the weights)
    num_warps: int
    num_stages: int
    tma: bool = False  # weight tiles through TMA descriptors (needs H and I rows 16-byte aligned, else pointers)
    single_dot: bool = False  # gate_up with pointer loads: gate and up as one [BK, 2*BN] operand (down ignores it)
    # An expert's last M tile, when it holds <= block_m / 2 rows, runs at half height (block_m >= 32; the
    # unpadded layouts only): at 307 rows per expert (236B prefill) 128-row tiles compute 384 rows, with
    # the split 320.
    split_tail: bool = False


BUCKETS = (("decode", 4.0), ("small", 32.0), ("medium", 128.0), ("large", float("inf")))

# moe_ffn takes the direct layout (no permutation, no top-k sum kernel: 1 launch) up to this many tokens,
# on the shapes whose direct tiles the table holds (measured winners; see layout_for). One token's top_k
# routes are distinct experts, so route-major items read each hit expert once; with more tokens, routes
# share experts and a route-major item would read a shared expert once per route. bench/tune_moe.py times
# the layouts at T = 1, 2, 4, 8, 64, 128 and prints the crossing.
DIRECT_MAX_TOKENS = 1

# Starting points by bucket, before any sweep (Hopper, bf16). Decode tiles are thin in M and N so that
# many programs stream each hit expert's weights once, with deep K steps and stages to keep loads in flight.
DEFAULTS: dict[tuple[str, str], GemmConfig] = {
    ("gate_up", "decode"): GemmConfig(16, 32, 256, 1, 4, 4),
    ("gate_up", "small"): GemmConfig(32, 64, 128, 1, 4, 4),
    ("gate_up", "medium"): GemmConfig(64, 64, 64, 8, 4, 4),
    ("gate_up", "large"): GemmConfig(128, 64, 64, 8, 8, 4),
    ("down", "decode"): GemmConfig(16, 32, 256, 1, 4, 4),
    ("down", "small"): GemmConfig(32, 64, 128, 1, 4, 4),
    ("down", "medium"): GemmConfig(64, 128, 64, 8, 4, 4),
    ("down", "large"): GemmConfig(128, 128, 64, 8, 8, 4),
    # Direct layout (one kernel, a program per SM taking work items from a counter), M = one row. Slice items
    # of 64 I-columns: on Lite 6 x 22 = 132 items, each streaming 768 KiB of gate, up and down weights; the
    # down GEMM steps over 128 H-rows of w2 (16 KiB a stage).
    ("gate_up", "direct"): GemmConfig(16, 64, 128, 1, 4, 4, True),
    ("down", "direct"): GemmConfig(16, 128, 64, 1, 4, 4),
}

# Measured winners per shape: (gemm, H, I, bucket) -> config. Lite: H 2048, I 1408; 236B: H 5120, I 1536;
# tensor-parallel shards of the 236B experts: I 768 (TP2), 192 (TP8). Filled from bench/tune_moe.py.
TABLE: dict[tuple[str, int, int, str], GemmConfig] = {
    # H200, triton 3.6, `python -m bench.tune_moe --prefill-only` (2026-11-29, two sweeps, bench/results/
    # nvidia-h200/tune/moe_prefill.json is the second): split tails + TMA weights; Lite gate_up 1029 -> 977 µs,
    # down 538 -> 491; 236B gate_up 3180 -> 2896 (4 stages), down 1811 -> 1501
    ("gate_up", 2048, 1408, "large"): GemmConfig(128, 128, 64, 8, 8, 4, True, False, True),
    ("down", 2048, 1408, "large"): GemmConfig(128, 256, 64, 8, 8, 4, True, False, True),
    ("gate_up", 5120, 1536, "large"): GemmConfig(128, 128, 64, 8, 8, 4, True, False, True),
    ("down", 5120, 1536, "large"): GemmConfig(128, 256, 64, 8, 8, 4, True, False, True),
    # H200, triton 3.6, `python -m bench.tune_moe --decode-only --only lite` (2026-11-29, the slice-item direct
    # kernel at T = 1; bench/results/nvidia-h200/tune/moe_direct.json): Lite 33.1 µs; in bench/results/
    # nvidia-h200/moe.json (52e1dd8) moe_ffn takes 33.5 µs, the sorted layout 41.7.
    ("gate_up", 2048, 1408, "direct"): GemmConfig(16, 64, 128, 1, 4, 4, True),
    ("down", 2048, 1408, "direct"): GemmConfig(16, 128, 64, 1, 4, 4),
    # 236B: 144 (route, I tile) units, 132 whole and 12 split (h pieces, down chunks). H200, triton 3.6,
    # `python -m bench.tune_moe --decode-only --only 236b` (e763637, 2026-11-29; bench/results/nvidia-h200/tune/
    # moe_direct_236b.json): 80.7 µs at 6 stages, 81.9 at 4; in moe.json (same commit) moe_ffn takes 80.4 µs,
    # the sorted layout 91.5.
    ("gate_up", 5120, 1536, "direct"): GemmConfig(16, 64, 128, 1, 4, 6, True),
    ("down", 5120, 1536, "direct"): GemmConfig(16, 128, 64, 1, 4, 4),
    # H200, triton 3.6, `python -m bench.tune_moe` (2026-11-28; 107 s budget, best of each bucket's candidates)
    ("gate_up", 2048, 1408, "decode"): GemmConfig(16, 64, 128, 1, 4, 4, True, False),
    ("down", 2048, 1408, "decode"): GemmConfig(16, 64, 128, 1, 4, 4, False, False),
    ("gate_up", 2048, 1408, "small"): GemmConfig(16, 64, 128, 1, 4, 4, False, False),
    ("down", 2048, 1408, "small"): GemmConfig(16, 64, 128, 1, 4, 4, False, False),
    ("gate_up", 5120, 1536, "decode"): GemmConfig(16, 64, 128, 1, 4, 4, True, False),
    ("down", 5120, 1536, "decode"): GemmConfig(16, 64, 128, 1, 4, 4, False, False),
    ("gate_up", 5120, 1536, "small"): GemmConfig(16, 64, 128, 1, 4, 4, False, False),
    ("down", 5120, 1536, "small"): GemmConfig(16, 64, 128, 1, 4, 4, False, False),
    ("gate_up", 5120, 768, "large"): GemmConfig(128, 128, 64, 8, 8, 3, True, False),
    ("down", 5120, 768, "large"): GemmConfig(128, 256, 64, 8, 8, 3, True, False),
    ("gate_up", 5120, 192, "large"): GemmConfig(64, 64, 64, 8, 4, 4, False, False),
    ("down", 5120, 192, "large"): GemmConfig(128, 256, 64, 8, 8, 3, True, False),
    ("gate_up", 5120, 768, "decode"): GemmConfig(16, 64, 128, 1, 4, 4, True, False),
    ("down", 5120, 768, "decode"): GemmConfig(16, 64, 128, 1, 4, 4, False, False),
    ("gate_up", 5120, 192, "decode"): GemmConfig(16, 32, 256, 1, 4, 4, False, True),
    ("down", 5120, 192, "decode"): GemmConfig(16, 64, 128, 1, 4, 4, True, False),
}


def bucket_of(rows: int, num_experts: int) -> str:
    per_expert = rows / max(num_experts, 1)
    for name, limit in BUCKETS:
        if per_expert <= limit:
            return name
    return BUCKETS[-1][0]


def layout_for(num_tokens: int, hidden: int, inter: int) -> str:
    """moe_ffn's row layout for ``num_tokens`` tokens of the (H, I) experts: "direct" up to DIRECT_MAX_TOKENS
    where the table holds the shape's direct tiles (the direct layout was measured faster there), else
    "sorted"."""
    tuned = ("gate_up", hidden, inter, "direct") in TABLE
    return "direct" if num_tokens <= DIRECT_MAX_TOKENS and tuned else "sorted"


def pick(gemm: str, hidden: int, inter: int, rows: int, num_experts: int, elem_bytes: int = 2,
         direct: bool = False) -> GemmConfig:
    """The tile configuration for one GEMM of the expert FFN (``direct``: of moe_ffn's direct layout).

    The table is tuned for 2-byte elements; wider ones (fp32) take a proportionally shorter K step so
    that each pipeline stage keeps the same shared-memory footprint (fp32 with bf16 tiles overflows
    Hopper's 227 KiB).
    """
    bucket = "direct" if direct else bucket_of(rows, num_experts)
    config = TABLE.get((gemm, hidden, inter, bucket), DEFAULTS[(gemm, bucket)])
    if elem_bytes > 2:
        config = config._replace(block_k=max(16, config.block_k * 2 // elem_bytes))
    return config
