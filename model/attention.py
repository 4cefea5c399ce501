"""Causal attention of MLA's naive form for prefill, on the fastest torch SDPA backend that runs its shapes.

    groups = plan(step)                              # sequences of a cache step grouped by shape
    out = causal(q, k, v, softmax_scale)             # q [G, S, H, Dqk], k [G, L, H, Dqk], v [G, L, H, Dv]

Query i of S sits at key position L - S + i and sees keys 0 .. L - S + i (bottom-right causal: the last S
keys are the queries' own tokens, the first L - S an earlier chunk of the same sequence).

DeepSeek-V2's naive form has q/k 192 wide and v 128 wide. Which SDPA backend runs that, and how fast,
depends on the torch build, so the candidates are measured, not assumed:

    flash_pad_v   FlashAttention (needs equal head dims): v zero-padded to Dqk, the output sliced back
    efficient     the memory-efficient kernel (accepts Dv != Dqk)
    cudnn         cuDNN's fused attention
    math          torch's unfused math path (always runs; the slowest)

On the first call for a (device, dtype, heads, Dqk, Dv) every candidate is checked against ``reference``
(an explicit boolean mask, float32) on a small input with S == L and with S < L, and the ones that pass
are timed at S = L = ``PROBE_LEN``; the fastest is used from then on. ``report`` returns what was measured
(µs or why a candidate failed); ``force`` pins a candidate. On the CPU there is nothing to choose:
``default`` (torch's own dispatch) runs.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from model.cache import CacheStep

CANDIDATES = ("flash_pad_v", "efficient", "cudnn", "math")
# Timing shape of the choice: one sequence of PROBE_LEN tokens (prefill chunks are this size or larger).
PROBE_LEN = 1024
PROBE_REPS = 5
# A candidate must match the float32 reference this closely on the check inputs (relative L2 error).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


# ---- grouping the sequences of a step ------------------------------------------------------------------

@dataclass
class Group:
    """Sequences of one step with equal new-token count S and length L (new tokens included).

    Their tokens are rows ``lo:hi`` of the step when contiguous (``token_index`` None), else the rows
    ``token_index`` (int64 [G * S]) in group order. ``block_ids`` int64 [G, ceil(L / block_size)].
    """
    size: int
    new_tokens: int
    length: int
    lo: int
    hi: int
    token_index: torch.Tensor | None
    block_ids: torch.Tensor


def plan(step: CacheStep) -> list[Group]:
    """Group the step's sequences that have new tokens by (S, L), keeping their order."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for b, (lo, hi) in enumerate(zip(step.starts[:-1], step.starts[1:])):
        if hi > lo:
            by_shape.setdefault((hi - lo, step.lengths[b]), []).append(b)
    device = step.block_table.device
    groups = []
    for (S, L), seqs in by_shape.items():
        contiguous = all(step.starts[a + 1] == step.starts[b] for a, b in zip(seqs, seqs[1:]))
        token_index = None if contiguous else torch.tensor(
            [t for b in seqs for t in range(step.starts[b], step.starts[b + 1])], dtype=torch.int64, device=device)
        blocks = math.ceil(L / step.block_size)
        if seqs == list(range(seqs[0], seqs[0] + len(seqs))):
            ids = step.block_table[seqs[0]: seqs[0] + len(seqs), :blocks]
        else:
            ids = step.block_table[torch.tensor(seqs, device=device), :blocks]
        groups.append(Group(size=len(seqs), new_tokens=S, length=L, lo=step.starts[seqs[0]],
                            hi=step.starts[seqs[-1] + 1], token_index=token_index, block_ids=ids.long()))
    return groups


# ---- the attention ---------------------------------------------------------------------------------------

def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """The oracle, in float32 with an explicit mask: q [G, S, H, Dqk], k [G, L, H, Dqk], v [G, L, H, Dv]
    -> [G, S, H, Dv] in q's dtype."""
    S, L = q.shape[1], k.shape[1]
    visible = torch.ones(S, L, dtype=torch.bool, device=q.device).tril(L - S)  # key j <= L - S + i
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                         v.float().transpose(1, 2), attn_mask=visible, scale=softmax_scale)
    return out.transpose(1, 2).to(q.dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
          backends: list[SDPBackend] | None) -> torch.Tensor:
    """[G, H, S, D] layouts; bottom-right causal; restricted to ``backends`` (None: torch's choice)."""
    S, L = q.shape[-2], k.shape[-2]
    mask = None if S == L else causal_lower_right(S, L)

    def run() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=S == L, scale=softmax_scale)

    if backends is None:
        return run()
    with sdpa_kernel(backends):
        return run()


def _flash_pad_v(q, k, v, softmax_scale):
    pad = q.shape[-1] - v.shape[-1]
    out = _sdpa(q, k, F.pad(v, (0, pad)) if pad > 0 else v, softmax_scale, [SDPBackend.FLASH_ATTENTION])
    return out[..., : v.shape[-1]]


_RUN: dict[str, Callable[..., torch.Tensor]] = {
    "flash_pad_v": _flash_pad_v,
    "efficient": lambda q, k, v, s: _sdpa(q, k, v, s, [SDPBackend.EFFICIENT_ATTENTION]),
    "cudnn": lambda q, k, v, s: _sdpa(q, k, v, s, [SDPBackend.CUDNN_ATTENTION]),
    "math": lambda q, k, v, s: _sdpa(q, k, v, s, [SDPBackend.MATH]),
    "default": lambda q, k, v, s: _sdpa(q, k, v, s, None),
}


def run(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Candidate ``name`` on q [G, S, H, Dqk], k [G, L, H, Dqk], v [G, L, H, Dv] -> [G, S, H, Dv]."""
    if name not in _RUN:
        raise ValueError(f"name: expected one of {', '.join(map(repr, _RUN))}, got {name!r}")
    out = _RUN[name](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale)
    return out.transpose(1, 2)


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Bottom-right causal attention with the chosen candidate (see the module doc) -> [G, S, H, Dv]."""
    return run(choose(q.device, q.dtype, q.shape[2], q.shape[3], v.shape[3], softmax_scale), q, k, v,
               softmax_scale)


# ---- the choice ------------------------------------------------------------------------------------------

_CHOSEN: dict[tuple, str] = {}
_REPORTS: dict[tuple, dict[str, float | str]] = {}
_FORCED: str | None = None


def force(name: str | None) -> None:
    """Use candidate ``name`` everywhere (None: measure and choose again)."""
    global _FORCED
    if name is not None and name not in _RUN:
        raise ValueError(f"name: expected one of {', '.join(map(repr, _RUN))} or None, got {name!r}")
    _FORCED = name


def _key(device: torch.device, dtype: torch.dtype, heads: int, dqk: int, dv: int) -> tuple:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return (str(device), dtype, heads, dqk, dv)


def choose(device: torch.device, dtype: torch.dtype, heads: int, dqk: int, dv: int,
           softmax_scale: float = 1.0) -> str:
    """The candidate for these shapes on ``device``: measured once (CUDA), ``default`` elsewhere."""
    if _FORCED is not None:
        return _FORCED
    if device.type != "cuda":
        return "default"
    key = _key(device, dtype, heads, dqk, dv)
    if key not in _CHOSEN:
        report = _measure(device, dtype, heads, dqk, dv, softmax_scale)
        _REPORTS[key] = report
        timed = {name: us for name, us in report.items() if isinstance(us, float)}
        _CHOSEN[key] = min(timed, key=timed.get) if timed else "math"
    return _CHOSEN[key]


def report(device: torch.device, dtype: torch.dtype, heads: int, dqk: int, dv: int) -> dict[str, float | str]:
    """What ``choose`` measured: candidate -> µs at S = L = PROBE_LEN, or why it was not eligible."""
    return dict(_REPORTS.get(_key(device, dtype, heads, dqk, dv), {}))


def _measure(device, dtype, heads, dqk, dv, softmax_scale) -> dict[str, float | str]:
    g = torch.Generator(device=device).manual_seed(0)

    def inputs(G, S, L):
        def r(*shape):
            return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)
        return r(G, S, heads, dqk), r(G, L, heads, dqk), r(G, L, heads, dv)

    checks = [inputs(2, 96, 96), inputs(2, 40, 136)]  # S == L, and S < L (an earlier chunk)
    refs = [reference(*c, softmax_scale) for c in checks]
    probe = inputs(1, PROBE_LEN, PROBE_LEN)
    out: dict[str, float | str] = {}
    for name in CANDIDATES:
        try:
            for c, ref in zip(checks, refs):
                got = run(name, *c, softmax_scale)
                err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                if not err <= TOLERANCE.get(dtype, 2e-2):
                    raise ValueError(f"relative error {err:.2e} against the reference")
            out[name] = _time_us(lambda name=name: run(name, *probe, softmax_scale))
        except Exception as e:  # noqa: BLE001 - a backend that cannot run these shapes is not eligible
            out[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
    return out


def _time_us(fn: Callable[[], torch.Tensor]) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(PROBE_REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)
