"""Device ceilings measured in the same run as the ops, so "% of ceiling" compares like with like.

- copy: device-to-device ``dst.copy_(src)`` of a buffer far larger than the L2; bandwidth counts
  the bytes read plus the bytes written (2 × buffer). This is the achievable HBM bandwidth
  (4.28 TB/s on an H200 against 4.8 on the datasheet). Warm-up: CEILING_WARMUP_S of copies first,
  so the clocks have left their idle state whatever ran before.
- mm_bf16: ``torch.mm`` of bf16 8192 × 8192 × 8192 (2·8192³ FLOPs), products back to back for the
  run's budget (0.5 s in a full run) after CEILING_WARMUP_S of them: the *sustained* tensor-core
  rate, which is what ``frac_mm_rate`` divides by (kernels are timed back to back too). Under that
  load the H200 holds ~680 TFLOP/s.
- mm_bf16_burst: the same product after BURST_IDLE_S of idle, BURST_WARMUP products, then
  BURST_CALLS products each timed alone; the median. The rate a short burst reaches before power
  and clocks settle (~790 TFLOP/s on an H200: the figure FACTS and the device notes quote).
  Recorded for comparison; no fraction uses it.
- Two GPUs or more: NVLink peer copy bandwidth (GPU 0 → GPU 1, one way, ``copy_``: a copy-engine
  cudaMemcpyAsync under peer access) and NCCL ``all_to_all_single`` at a few sizes, in spawned
  processes (one per GPU). Both are GPU times with the CPU ahead (harness.hold_stream; the NCCL ranks
  meet on the stream again after the hold, so neither waits for the other's late start): the link's
  ceiling. At 1 MiB the host takes longer to issue a call than the GPU to run it (an all_to_all_single:
  12.8 µs on the GPU, 35.8 µs back to back from Python, ceilings.json @d77dfcb), so the back-to-back
  time is recorded beside it (``eager_time_us``), not used. NVLink multicast stays off:
  NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 are set
  (setdefault) before NCCL starts.

On the CPU the copy and the matmul are measured the same way at small sizes (labelled as CPU runs).
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.harness import FULL, QUICK, hold_stream, record_name, time_cuda

# 1 GiB per buffer on a GPU: > 16× the largest L2 we meet (60 MiB on H200), so no reuse.
GPU_COPY_BYTES = 2**30
CPU_COPY_BYTES = 64 * 2**20
GPU_MM_N = 8192
# bf16 matmul on a CPU without bf16 instructions runs at a few GFLOP/s: 512³ takes ~40 ms.
CPU_MM_N = 512
# Warm-up before the copy and the sustained matmul on a GPU: long enough for the SM clock to ramp up
# from idle (345 MHz idle, ~1980 MHz under load on an H200) and for the first-use costs to pass.
CEILING_WARMUP_S = 0.25
# The burst: idle this long (the power and clock state recovers), a few products to leave the idle
# clocks, then products timed one by one. CPU runs skip the idle gap and time fewer products.
BURST_IDLE_S = 2.0
BURST_WARMUP = 3
BURST_CALLS = 10
CPU_BURST_CALLS = 3
# NVLink/NCCL message sizes: latency-bound, middle, bandwidth-bound.
LINK_SIZES = (2**20, 16 * 2**20, 256 * 2**20)
QUICK_LINK_SIZES = (2**20, 64 * 2**20)
# Give up on a hung NCCL run after this long (processes are killed, an error is reported).
NCCL_TIMEOUT_S = 180
NVLINK_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
              "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class Ceilings:
    device: str
    copy_gbps: float
    copy_time_us: float
    copy_buffer_bytes: int    # one buffer; the copy moves twice this
    mm_tflops: float          # sustained: what frac_mm_rate divides by
    mm_time_us: float
    mm_n: int
    mm_burst_tflops: float    # a short burst after an idle gap (reported, not used in fractions)
    mm_burst_time_us: float
    warmup_s: float           # warm-up before the copy and the sustained matmul


_CACHE: dict[str, Ceilings] = {}


def measure(ctx) -> Ceilings:
    """The ceilings of ``ctx.device``, measured on first use and cached for the process."""
    key = str(ctx.device)
    if key not in _CACHE:
        _CACHE[key] = _measure(ctx)
    return _CACHE[key]


def _measure(ctx) -> Ceilings:
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    budget = ctx.budget
    if ctx.on_gpu:
        budget = dataclasses.replace(budget, warmup_s=max(budget.warmup_s, CEILING_WARMUP_S))
    nbytes = GPU_COPY_BYTES if ctx.on_gpu else CPU_COPY_BYTES
    copy_us = _time_copy(ctx, nbytes, gen, budget)
    n = GPU_MM_N if ctx.on_gpu else CPU_MM_N
    mm_us, burst_us = _time_mm(ctx, n, gen, budget)
    if ctx.on_gpu:
        torch.cuda.empty_cache()
    return Ceilings(device=ctx.device_name, copy_gbps=2 * nbytes / (copy_us * 1e3), copy_time_us=copy_us,
                    copy_buffer_bytes=nbytes, mm_tflops=2 * n**3 / (mm_us * 1e6), mm_time_us=mm_us, mm_n=n,
                    mm_burst_tflops=2 * n**3 / (burst_us * 1e6), mm_burst_time_us=burst_us,
                    warmup_s=budget.warmup_s)


def _time_copy(ctx, nbytes: int, gen: torch.Generator, budget) -> float:
    src = torch.rand(nbytes // 4, device=ctx.device, generator=gen)
    dst = torch.empty_like(src)
    return ctx.time(lambda i: dst.copy_(src), budget=budget,
                    name=record_name("ceiling.copy", "torch", {"bytes": nbytes}))


def _time_mm(ctx, n: int, gen: torch.Generator, budget) -> tuple[float, float]:
    """µs of one product: sustained (back to back), then in a burst after an idle gap."""
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16, generator=gen)
    c = torch.empty(n, n, device=ctx.device, dtype=torch.bfloat16)
    shape = {"m": n, "n": n, "k": n}
    sustained = ctx.time(lambda i: torch.mm(a, b, out=c), budget=budget,
                         name=record_name("ceiling.mm_bf16", "torch", shape))
    burst = _time_burst(ctx, lambda: torch.mm(a, b, out=c), record_name("ceiling.mm_bf16_burst", "torch", shape))
    return sustained, burst


def _time_burst(ctx, fn, name: str) -> float:
    """Median µs of ``fn()`` timed call by call right after an idle gap (see the module doc)."""
    from pykernels.profiling import nvtx_range

    if not ctx.on_gpu:
        fn()
        times = []
        for _ in range(CPU_BURST_CALLS):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)
    with torch.cuda.device(ctx.device):
        torch.cuda.synchronize()
        time.sleep(BURST_IDLE_S)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(BURST_CALLS)]
        with nvtx_range(name):
            for _ in range(BURST_WARMUP):
                fn()
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) * 1e3 for start, end in events)


# ---------------------------------------------------------------------------------------------
# NVLink and NCCL (two GPUs or more).


def peer_copy(sizes: tuple[int, ...], quick: bool, src: int = 0, dst: int = 1) -> list[dict[str, Any]]:
    """One-way copy GPU ``src`` → GPU ``dst`` (copy engine, peer access when the driver allows it).
    Returns [{"bytes", "time_us", "gbps", "eager_time_us", "p2p"}]: the GPU time with the CPU ahead,
    and the time of copies issued back to back; bandwidth counts the bytes that cross once."""
    p2p = torch.cuda.can_device_access_peer(src, dst)
    budget = QUICK if quick else FULL
    out = []
    for size in sizes:
        a = torch.rand(size // 4, device=f"cuda:{src}")
        b = torch.empty(size // 4, device=f"cuda:{dst}")
        name = record_name("ceiling.nvlink_peer_copy", "torch", {"bytes": size})
        t, eager = (time_cuda(lambda i: b.copy_(a), budget=budget, device=torch.device("cuda", src), name=name,
                              cpu_ahead=ahead).median_us for ahead in (True, False))
        out.append({"bytes": size, "time_us": t, "gbps": size / (t * 1e3), "eager_time_us": eager, "p2p": p2p})
    return out


def nccl_all_to_all(sizes: tuple[int, ...], quick: bool, world_size: int | None = None,
                    timeout_s: float = NCCL_TIMEOUT_S, backend: str = "nccl") -> list[dict[str, Any]]:
    """``all_to_all_single`` of a ``size``-byte bf16 buffer per rank, equal splits, one process per
    GPU. Returns [{"bytes", "ranks", "time_us", "gbps", "remote_bytes"}] where gbps counts the bytes
    each rank sends to the OTHER ranks, size·(W−1)/W, per second (the slowest rank's median time).
    ``backend="gloo"`` runs the same plumbing on CPU processes (for tests; wall-clock timing)."""
    import torch.multiprocessing as mp

    if world_size is None:
        world_size = torch.cuda.device_count()
    for k, v in NVLINK_ENV.items():
        os.environ.setdefault(k, v)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = Path(tmp) / "all_to_all.json"
        pctx = mp.start_processes(_all_to_all_worker,
                                  args=(world_size, _free_port(), list(sizes), quick, backend, str(out_file)),
                                  nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not pctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in pctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{backend} all_to_all_single did not finish in {timeout_s:.0f} s")
        return json.loads(out_file.read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Fixed sample counts: every rank must issue the same number of collectives.
_A2A_WARMUP = 5
_A2A_REPS, _A2A_QUICK_REPS = 30, 8
_A2A_SMALL = 16 * 2**20      # at or below: 10 calls per sample so launch gaps are amortised
_A2A_INNER_SMALL = 10


def _all_to_all_worker(rank: int, world_size: int, port: int, sizes: list[int], quick: bool, backend: str,
                       out_file: str) -> None:
    import torch.distributed as dist

    for k, v in NVLINK_ENV.items():
        os.environ.setdefault(k, v)
    on_gpu = backend == "nccl"
    if on_gpu:
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size)
    try:
        results = []
        for size in sizes:
            results.append(_time_all_to_all(size, world_size, dev, quick, on_gpu))
        if rank == 0:
            Path(out_file).write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _time_all_to_all(size: int, world_size: int, dev: torch.device, quick: bool, on_gpu: bool) -> dict:
    import torch.distributed as dist

    n = size // 2 // world_size * world_size   # bf16 elements, divisible into equal splits
    x = torch.randn(n, device=dev).to(torch.bfloat16)
    y = torch.empty_like(x)
    inner = _A2A_INNER_SMALL if size <= _A2A_SMALL else 1
    reps = _A2A_QUICK_REPS if quick else _A2A_REPS

    def sample() -> None:
        for _ in range(inner):
            dist.all_to_all_single(y, x)

    for _ in range(_A2A_WARMUP):
        dist.all_to_all_single(y, x)
    eager = _slowest_median(_time_samples(sample, reps, on_gpu), inner, dev)
    t = _slowest_median(_time_samples(sample, reps, on_gpu, cpu_ahead=True), inner, dev) if on_gpu else eager
    sent = n * 2 * (world_size - 1) // world_size
    return {"bytes": n * 2, "ranks": world_size, "time_us": t, "gbps": sent / (t * 1e3), "remote_bytes": sent,
            "eager_time_us": eager}


def _slowest_median(samples: list[float], inner: int, dev: torch.device) -> float:
    """µs per call: the median of this rank's samples, the largest over the ranks."""
    import torch.distributed as dist

    median = torch.tensor([statistics.median(samples) / inner], device=dev, dtype=torch.float64)
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return float(median.item())


def _time_samples(sample, reps: int, on_gpu: bool, cpu_ahead: bool = False) -> list[float]:
    """µs of each of ``reps`` calls of ``sample``: CUDA events (back to back, or ``cpu_ahead``: the ranks
    meet, the stream is held, the ranks meet again on the stream, then the sample), or the wall clock."""
    import torch.distributed as dist

    if on_gpu:
        torch.cuda.synchronize()
        flag = torch.zeros(1, device="cuda")
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            if cpu_ahead:
                dist.barrier()
                torch.cuda.synchronize()
                hold_stream()
                dist.all_reduce(flag)   # completes when every rank's hold has ended
            start.record()
            sample()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) * 1e3 for start, end in events]
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sample()
        out.append((time.perf_counter() - t0) * 1e6)
    return out
