"""Ceilings: device-to-device copy bandwidth, bf16 matmul rate (sustained, and a burst after an idle
gap) and, on two GPUs or more, NVLink peer copy and NCCL all_to_all_single. ``python -m bench ceilings``.

``frac_mm_rate`` in every record divides by the sustained rate (ceiling.mm_bf16); see bench/ceilings.py."""
from __future__ import annotations

import torch

from bench import ceilings

SUITE = "ceilings"


def run(ctx) -> None:
    c = ctx.ceilings
    ctx.record(op="ceiling.copy", backend="torch", shape={"bytes": c.copy_buffer_bytes}, dtype="fp32",
               time_us=c.copy_time_us, bytes=2 * c.copy_buffer_bytes,
               extra={"what": "dst.copy_(src); bytes read + written", "warmup_s": c.warmup_s})
    mm_shape = {"m": c.mm_n, "n": c.mm_n, "k": c.mm_n}
    ctx.record(op="ceiling.mm_bf16", backend="torch", shape=mm_shape, dtype="bf16", time_us=c.mm_time_us,
               flops=2 * c.mm_n**3,
               extra={"what": "torch.mm back to back (sustained); the rate frac_mm_rate divides by",
                      "warmup_s": c.warmup_s})
    burst = {"idle_gap_s": ceilings.BURST_IDLE_S, "warmup_calls": ceilings.BURST_WARMUP,
             "timed_calls": ceilings.BURST_CALLS} if ctx.on_gpu else \
        {"idle_gap_s": 0, "warmup_calls": 1, "timed_calls": ceilings.CPU_BURST_CALLS}
    ctx.record(op="ceiling.mm_bf16_burst", backend="torch", shape=mm_shape, dtype="bf16",
               time_us=c.mm_burst_time_us, flops=2 * c.mm_n**3,
               extra={"what": "torch.mm, median of products timed one by one after an idle gap (burst); "
                              "reported only, no fraction uses it", **burst})
    gpus = torch.cuda.device_count() if ctx.on_gpu else 0
    if gpus < 2:
        ctx.note(f"  NVLink/NCCL ceilings: not measured, they need 2 GPUs and this run has {gpus}")
        return
    sizes = ceilings.QUICK_LINK_SIZES if ctx.quick else ceilings.LINK_SIZES
    ahead = "GPU time with the CPU ahead (the link's ceiling); eager_time_us: calls issued back to back"
    for r in ceilings.peer_copy(sizes, ctx.quick):
        ctx.record(op="ceiling.nvlink_peer_copy", backend="torch", shape={"bytes": r["bytes"]},
                   dtype="fp32", time_us=r["time_us"], bytes=r["bytes"],
                   extra={"what": "GPU 0 -> GPU 1 copy_ (copy engine), bytes crossing once", "timed_as": ahead,
                          "eager_time_us": round(r["eager_time_us"], 3), "p2p": r["p2p"]})
    for r in ceilings.nccl_all_to_all(sizes, ctx.quick):
        ctx.record(op="ceiling.nccl_all_to_all", backend="nccl",
                   shape={"bytes": r["bytes"], "ranks": r["ranks"]}, dtype="bf16", time_us=r["time_us"],
                   bytes=r["remote_bytes"],
                   extra={"what": "all_to_all_single, equal splits; bytes sent to other ranks, "
                                  "slowest rank's median", "timed_as": ahead,
                          "eager_time_us": round(r["eager_time_us"], 3)})
