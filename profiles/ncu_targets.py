"""What ``python -m profiles ncu`` can profile: each op's backends, its headline shape, how its
inputs are built (as its benchmark builds them) and its minimal bytes from the cost model.

The module imports nothing heavy at import time: the ncu driver reads ``TARGETS`` and
``range_name`` on a machine without torch's CUDA; ``build`` (torch, pykernels, the benchmark's input
makers) runs only in the launcher, on the GPU.

Headline shapes (one per op, the issues' performance bars):
    mla_decode      b=64 q_len=1 h=16 s=4096   the first bandwidth bar of issue 4
    moe_ffn         T=128 E=160 H=5120 I=1536 top_k=6   DeepSeek-V2 236B decode step
    rope_and_cache  T=16384 h=128              the prefill bandwidth bar of issue 6 (q [T, h, 192])
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from profiles import cost_model


@dataclass(frozen=True)
class Target:
    """One profiled op: its backends (the first is the default) and headline shape."""

    op: str
    backends: tuple[str, ...]
    shape: dict[str, int]          # the headline shape; --shape k=v overrides single keys
    doc: str


TARGETS: dict[str, Target] = {
    "mla_decode": Target("mla_decode", ("triton", "torch"), {"b": 64, "q_len": 1, "h": 16, "s": 4096},
                         "absorbed MLA decode over a paged latent cache, blocks of 64"),
    "moe_ffn": Target("moe_ffn", ("triton",), {"T": 128, "E": 160, "H": 5120, "I": 1536, "top_k": 6},
                      "routed expert FFNs (permute, gate_up, down, weighted sum)"),
    "rope_and_cache": Target("rope_and_cache", ("triton", "cuda"), {"T": 16384, "h": 128},
                             "YaRN rope of q in place + latent-cache write"),
}

# The runs of `python -m profiles ncu all`: every backend of every target at its headline shape.
ALL_RUNS: tuple[tuple[str, str], ...] = tuple((t.op, b) for t in TARGETS.values() for b in t.backends)


def target(op: str) -> Target:
    if op not in TARGETS:
        raise ValueError(f"op: expected one of {sorted(TARGETS)} or 'all', got {op!r}")
    return TARGETS[op]


def resolve_shape(op: str, overrides: dict[str, str] | None = None) -> dict[str, int]:
    """The headline shape of ``op`` with ``overrides`` (``{"b": "32"}``) applied; keys must exist."""
    shape = dict(target(op).shape)
    for key, value in (overrides or {}).items():
        if key not in shape:
            raise ValueError(f"--shape: {op} has keys {sorted(shape)}, got {key!r}")
        try:
            shape[key] = int(value)
        except ValueError:
            raise ValueError(f"--shape: expected an integer for {key}, got {value!r}") from None
        if shape[key] <= 0:
            raise ValueError(f"--shape: expected a positive {key}, got {shape[key]}")
    return shape


def check_backend(op: str, backend: str | None) -> str:
    backends = target(op).backends
    if backend is None:
        return backends[0]
    if backend not in backends:
        raise ValueError(f"--backend: {op} is profiled with {list(backends)}, got {backend!r}")
    return backend


def format_shape(shape: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def range_name(op: str, backend: str, shape: dict[str, Any]) -> str:
    """The NVTX push/pop range the launcher opens around the profiled calls.

    NOTES: no "/" in the name: ncu's --nvtx-include reads "/" as the separator of nested push/pop
    ranges ("outer/inner/"), so a name with one could not be matched as a single range.
    """
    return f"profiles {op} {backend} {format_shape(shape)}"


def nvtx_include(op: str, backend: str, shape: dict[str, Any]) -> str:
    """ncu's --nvtx-include expression for that range: a push/pop range ends with "/"."""
    return range_name(op, backend, shape) + "/"


def minimal_cost(op: str, shape: dict[str, int], elem_bytes: int = 2, experts_hit: float | None = None):
    """The cost model's ``OpCost`` of one call at ``shape`` (bf16: ``elem_bytes`` 2).

    moe_ffn needs ``experts_hit`` (the distinct experts its routing hit); without it the uniform-
    routing expectation is used.
    """
    if op == "mla_decode":
        return cost_model.mla_decode(shape["b"], shape["q_len"], shape["h"], shape["b"] * shape["s"],
                                     elem_bytes=elem_bytes)
    if op == "moe_ffn":
        hit = experts_hit if experts_hit is not None else cost_model.expected_experts_hit(
            shape["E"], shape["top_k"], shape["T"])
        return cost_model.moe_ffn(shape["T"], shape["top_k"], hit, shape["H"], shape["I"], elem_bytes=elem_bytes)
    if op == "rope_and_cache":
        return cost_model.rope_and_cache(shape["T"], shape["h"], elem_bytes=elem_bytes)
    raise ValueError(f"op: no cost model for {op!r}")


# ---------------------------------------------------------------------------------------------
# Input builders: run on the GPU by the launcher. Each returns (call, info): ``call()`` runs the op
# once; ``info`` holds what the summary needs beyond the shape (experts_hit for moe_ffn).


def build(op: str, backend: str, shape: dict[str, int], device: str = "cuda") -> tuple[Callable[[], Any], dict]:
    builders = {"mla_decode": _build_mla_decode, "moe_ffn": _build_moe_ffn, "rope_and_cache": _build_rope_and_cache}
    return builders[target(op).op](backend, shape, device)


def _build_mla_decode(backend, shape, device):
    import pykernels as pk
    from bench.bench_mla_decode import HEAD_DIM, HEAD_DIM_V, make_inputs

    q, k_cache, block_table, seqlens = make_inputs(shape["q_len"], shape["h"], shape["b"], shape["s"],
                                                   device=device)
    causal = shape["q_len"] > 1

    def call():
        return pk.mla_decode(q, k_cache, block_table, seqlens, HEAD_DIM_V, HEAD_DIM**-0.5, causal, backend=backend)

    return call, {"causal": causal}


# Routing of the two model sizes, as the MoE benchmark runs them: method, n_group, topk_group, scale.
_ROUTING = {64: ("greedy", 1, 1, 1.0), 160: ("group_limited_greedy", 8, 3, 16.0)}


def _build_moe_ffn(backend, shape, device):
    import torch

    import pykernels as pk

    T, E, H, I, top_k = shape["T"], shape["E"], shape["H"], shape["I"], shape["top_k"]
    method, n_group, topk_group, scale = _ROUTING.get(E, ("greedy", 1, 1, 1.0))
    g = torch.Generator(device=device).manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, generator=g, device=device) / H**0.5).to(torch.bfloat16)  # [E, 2I, H]
    w2 = (torch.randn(E, H, I, generator=g, device=device) / I**0.5).to(torch.bfloat16)  # [E, H, I]
    x = torch.randn(T, H, generator=g, device=device).to(torch.bfloat16)  # [T, H]
    logits = torch.randn(T, E, generator=g, device=device)  # float32 [T, E], as the model's router
    weights, ids = pk.moe_route(logits, top_k, method=method, n_group=n_group, topk_group=topk_group,
                                routed_scaling_factor=scale)  # [T, k] each

    def call():
        return pk.moe_ffn(x, w13, w2, weights, ids, backend=backend)

    return call, {"experts_hit": int(torch.unique(ids).numel()), "routing": method}


def _build_rope_and_cache(backend, shape, device):
    import torch

    import pykernels as pk
    from bench.bench_rope import KV_LORA_RANK, NOPE_DIM, ROTARY_DIM, make_set

    rope = pk.YarnRotary(max_position=163840, device=device)
    # The benchmark's q: the absorbed [T, h, 576] for decode sizes, the naive [T, h, 192] for prefill.
    q_dim = NOPE_DIM + ROTARY_DIM if shape["T"] > 256 else KV_LORA_RANK + ROTARY_DIM
    inputs = make_set(shape["T"], shape["h"], q_dim, torch.bfloat16, device, seed=0, max_position=rope.max_position)

    def call():
        return pk.rope_and_cache(rope=rope, backend=backend, **inputs)

    return call, {"q_head_dim": q_dim}
