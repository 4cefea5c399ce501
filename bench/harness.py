"""The benchmark harness: the ``Context`` a suite is given, and the timers behind ``ctx.time``.

A suite (bench/bench_<suite>.py) defines ``SUITE = "<name>"`` and ``run(ctx)``; inside it:

    n = ctx.sets_for(bytes_per_set)              # input sets to rotate so they exceed the L2
    t = ctx.time(lambda i: op(*inputs[i]), n_sets=n, graph=False,     # median µs of one call
                 name=record_name("mla_decode", "triton", shape))     # its NVTX range
    peer = ctx.time_peer("torch bmm", lambda i: peer_op(*inputs[i]), n_sets=n)  # or missing, with why
    ctx.record(op="mla_decode", backend="triton", shape=shape, dtype="bf16", time_us=t,
               bytes=cost.bytes, flops=cost.flops, peer=peer)

Timing on a GPU: CUDA events around each sample of ``inner`` consecutive calls (``inner`` chosen so
a sample lasts ≥ ~100 µs and the event overhead vanishes), inputs rotated over ``n_sets`` sets, a
warm-up of ≥ 25 ms first (clocks ramp up, Triton compiles and autotunes), then the median over many
samples. ``graph=True`` captures ``inner`` calls in one CUDA graph and times its replays: the honest
measure of a small decode-path launch, which runs inside a graph in a serving engine. On the CPU the
same loop runs with a wall clock (``time.perf_counter``), and records say ``"timer": "cpu-wall"``;
there is no CPU graph, so ``graph=True`` times plain calls there. ``cpu_ahead=True`` (GPU) holds the
stream in a sleep kernel before each sample's start event (``hold_stream``), so the whole sample is
queued when it starts: the time is the GPU's alone, without the host's cost of issuing each call
(``"timer": "cuda-events, CPU ahead"``). It is how the link ceilings are timed: NCCL and peer copies
of a few MiB take the host longer to issue than the GPU to run.

Nsight: the timed samples of every ``ctx.time`` run inside an NVTX range (pykernels.profiling,
emitted only with ``PYKERNELS_NVTX=1``), named by ``name=`` as its record is named:
``record_name(op, backend, shape)`` = ``"mla_decode triton b=64 q_len=1 h=16 s=4096"``, a peer as
``"mla_decode peer torch bmm+softmax b=64 ..."``. Without a name it is ``"<suite> <function>"``.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import math
import os
import platform
import statistics
import subprocess
import sys
import time as _time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import results as _results
from profiles import hardware
from profiles.nvml import NvmlSampler

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS_DIR = REPO_ROOT / "bench" / "results"


@dataclass(frozen=True)
class Budget:
    """How long one ``ctx.time`` may spend: warm-up, then between min_reps and max_reps samples
    until about ``seconds`` of samples are taken."""

    warmup_s: float
    min_reps: int
    max_reps: int
    seconds: float


# Full runs: 25 ms of warm-up lets the SM clock settle after idle; 20..200 samples give a stable
# median (run-to-run spread < 1 % on an idle H200 for kernels ≥ 10 µs).
FULL = Budget(warmup_s=0.025, min_reps=20, max_reps=200, seconds=0.5)
# --quick: a smoke test of every code path, numbers indicative only.
QUICK = Budget(warmup_s=0.005, min_reps=5, max_reps=20, seconds=0.05)

# A sample should last this long so that event and timer overhead (~1-5 µs) is < 2 % of it.
GPU_SAMPLE_TARGET_US = 100.0
CPU_SAMPLE_TARGET_US = 1000.0
# Upper bound on calls per sample (and per captured graph): bounds the graph's size.
MAX_INNER = 64
# Warm-up batches double up to this many calls between synchronisations.
MAX_WARMUP_BATCH = 256
# Rotated input sets should span this many times the L2 so a set is evicted before its next use.
L2_SPAN = 2
MAX_SETS = 16
# The CPU has no reported last-level cache size in torch; 32 MiB covers the server parts we meet.
CPU_CACHE_BYTES = 32 * 2**20
# What ``frac_mm_rate`` (and ``ideal_us``) divide by: the sustained bf16 matmul rate (ceiling.mm_bf16,
# products back to back for a FULL budget), not the higher rate of a short burst after an idle gap
# (ceiling.mm_bf16_burst, recorded beside it): kernels are timed the sustained way too.
MM_RATE_USED = "ceiling.mm_bf16 (sustained)"
# GPU cycles ``hold_stream`` sleeps (~10 ms at 2 GHz): far longer than the host takes to queue a sample.
CPU_AHEAD_CYCLES = 20_000_000


@dataclass(frozen=True)
class Timing:
    """The statistics of one ``ctx.time`` call, per call of ``fn``, in microseconds."""

    median_us: float
    min_us: float
    p10_us: float
    p90_us: float
    reps: int        # samples taken
    inner: int       # calls per sample
    n_sets: int
    timer: str       # "cuda-events" | "cuda-events, CPU ahead" | "cuda-graph" | "cpu-wall"
    # Every sample's µs per call, in the order taken (not in records: the pytest-benchmark route
    # makes its entries' statistics from them, see bench/conftest.py).
    samples_us: tuple[float, ...] = field(default=(), repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"min_us": _round(self.min_us, 6), "p10_us": _round(self.p10_us, 6),
                "p90_us": _round(self.p90_us, 6), "reps": self.reps, "inner": self.inner,
                "n_sets": self.n_sets, "timer": self.timer}


def _percentile(sorted_vals: list[float], q: float) -> float:
    idx = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[idx]


def _stats(samples_us: list[float], inner: int, n_sets: int, timer: str) -> Timing:
    s = sorted(samples_us)
    return Timing(median_us=statistics.median(s), min_us=s[0], p10_us=_percentile(s, 0.1),
                  p90_us=_percentile(s, 0.9), reps=len(s), inner=inner, n_sets=n_sets, timer=timer,
                  samples_us=tuple(samples_us))


def _plan(per_call_us: float, budget: Budget, target_us: float) -> tuple[int, int]:
    """(inner, reps) for a call of ``per_call_us``."""
    inner = max(1, min(MAX_INNER, math.ceil(target_us / max(per_call_us, 1e-3))))
    reps = int(budget.seconds * 1e6 / max(per_call_us * inner, 1e-3))
    return inner, max(budget.min_reps, min(budget.max_reps, reps))


def _warm_up(fn: Callable[[int], Any], n_sets: int, budget: Budget, sync: Callable[[], None]) -> float:
    """Call ``fn`` in doubling batches (each set at least once) until ``budget.warmup_s`` has passed;
    return µs per call of the last batch. The first call (compilation, autotuning, lazy init) is
    not counted."""
    fn(0)
    sync()
    calls, start, batch = 0, _time.perf_counter(), 1
    while True:
        t0 = _time.perf_counter()
        for j in range(batch):
            fn((calls + j) % n_sets)
        sync()
        per_call_us = (_time.perf_counter() - t0) * 1e6 / batch
        calls += batch
        if calls >= n_sets and _time.perf_counter() - start >= budget.warmup_s:
            return per_call_us
        batch = min(2 * batch, MAX_WARMUP_BATCH)


def _nvtx(name: str | None):
    """The NVTX range the timed samples run in (a shared no-op object while profiling is off)."""
    # Imported here: `python -m bench table` does not need pykernels.
    from pykernels.profiling import nvtx_range

    return nvtx_range(name or "bench")


def time_cpu(fn: Callable[[int], Any], n_sets: int = 1, budget: Budget = FULL, name: str | None = None) -> Timing:
    """Median wall-clock µs per call of ``fn(i)``, i rotating over range(n_sets)."""
    per_call = _warm_up(fn, n_sets, budget, lambda: None)
    inner, reps = _plan(per_call, budget, CPU_SAMPLE_TARGET_US)
    samples, i = [], 0
    with _nvtx(name):
        for _ in range(reps):
            t0 = _time.perf_counter()
            for _ in range(inner):
                fn(i % n_sets)
                i += 1
            samples.append((_time.perf_counter() - t0) * 1e6 / inner)
    return _stats(samples, inner, n_sets, "cpu-wall")


def hold_stream() -> None:
    """Queue a sleep of CPU_AHEAD_CYCLES on the current stream: the host gets ahead of the GPU."""
    torch.cuda._sleep(CPU_AHEAD_CYCLES)


def time_cuda(fn: Callable[[int], Any], n_sets: int = 1, graph: bool = False, budget: Budget = FULL,
              device: torch.device | None = None, name: str | None = None, cpu_ahead: bool = False) -> Timing:
    """Median µs per call of ``fn(i)`` on the current stream of ``device``, timed with CUDA events
    around samples of ``inner`` calls; with ``graph=True`` the ``inner`` calls are captured once in
    a CUDA graph and each sample is one replay; with ``cpu_ahead=True`` the stream is held before each
    sample (``hold_stream``). The timed samples run in the NVTX range ``name``."""
    device = device or torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(device):
        sync = torch.cuda.synchronize
        per_call = _warm_up(fn, n_sets, budget, sync)
        inner, reps = _plan(per_call, budget, GPU_SAMPLE_TARGET_US)
        if graph:
            # NOTES: a graph holds a multiple of n_sets calls, so each replay reads every set once
            # (a graph of fewer calls would replay the same sets and measure the L2).
            inner = _graph_calls(inner, n_sets)
            g = _capture(fn, n_sets, inner)
            # A graph removes launch gaps, so a call may be much shorter than eager timing said:
            # re-plan from the replay time, and capture again if samples would be too short.
            per_call = _replay_us(g, inner, sync)
            inner2, reps = _plan(per_call, budget, GPU_SAMPLE_TARGET_US)
            inner2 = _graph_calls(inner2, n_sets)
            if inner2 > inner:
                del g
                inner = inner2
                g = _capture(fn, n_sets, inner)

            def sample(_: int) -> None:
                g.replay()
        else:
            def sample(k: int) -> None:
                for j in range(inner):
                    fn((k * inner + j) % n_sets)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        with _nvtx(name):
            for k, (start, end) in enumerate(events):
                if cpu_ahead:
                    hold_stream()
                start.record()
                sample(k)
                end.record()
            sync()
        samples = [start.elapsed_time(end) * 1e3 / inner for start, end in events]
    timer = "cuda-graph" if graph else "cuda-events, CPU ahead" if cpu_ahead else "cuda-events"
    return _stats(samples, inner, n_sets, timer)


def _graph_calls(inner: int, n_sets: int) -> int:
    """``inner`` rounded up to a multiple of ``n_sets``."""
    return math.ceil(inner / n_sets) * n_sets


def _capture(fn: Callable[[int], Any], n_sets: int, inner: int) -> torch.cuda.CUDAGraph:
    """``inner`` calls of ``fn`` (sets rotating) captured in one CUDA graph, replayed once."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for j in range(inner):
            fn(j % n_sets)
    g.replay()
    torch.cuda.synchronize()
    return g


# Replays timed to re-plan a graph's samples.
_GRAPH_PROBE_REPLAYS = 5


def _replay_us(g: torch.cuda.CUDAGraph, inner: int, sync: Callable[[], None]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(_GRAPH_PROBE_REPLAYS):
        g.replay()
    end.record()
    sync()
    return start.elapsed_time(end) * 1e3 / (_GRAPH_PROBE_REPLAYS * inner)


# ---------------------------------------------------------------------------------------------
# The run's environment: what every record carries.


@functools.cache
def git_commit() -> str:
    """``git rev-parse --short HEAD`` of the repository, + "-dirty" when tracked files changed.
    $PYKERNELS_GIT_COMMIT, when set, is used instead (a tree copied to a GPU machine without .git)."""
    if os.environ.get("PYKERNELS_GIT_COMMIT"):
        return os.environ["PYKERNELS_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, check=True,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               check=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def parse_shape_filters(filters: Iterable[str] | None) -> list[dict[str, str]]:
    """``["b=64,s=4096", "T=128"]`` -> ``[{"b": "64", "s": "4096"}, {"T": "128"}]``."""
    out = []
    for f in filters or ():
        pairs = {}
        for part in filter(None, f.split(",")):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--shapes: expected key=value[,key=value...], got {f!r}")
            pairs[key.strip()] = value.strip()
        out.append(pairs)
    return out


def shape_matches(shape: dict[str, Any], filters: list[dict[str, str]]) -> bool:
    """True when there are no filters or every key=value of one filter equals the shape's value."""
    if not filters:
        return True
    return any(all(k in shape and str(shape[k]) == v for k, v in f.items()) for f in filters)


class Context:
    """What a suite sees: the device, the run's mode, the timer, the ceilings and ``record``.

    ``quick``: small sweeps and short timings (a smoke test). ``shapes``: filters such as
    ``"b=64,s=4096"``; ``ctx.want(shape)`` says whether a shape passes them, and ``record`` drops
    records that do not. ``results_dir``: where ``<device-slug>/<suite>.json`` are written (None:
    write nothing). ``echo``: print a line per record as it comes.
    """

    def __init__(self, *, device: str | torch.device | None = None, quick: bool = False,
                 shapes: Iterable[str] | None = None, results_dir: str | Path | None = DEFAULT_RESULTS_DIR,
                 echo: bool = True):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.on_gpu = device.type == "cuda"
        self.quick = quick
        self.budget = QUICK if quick else FULL
        self.shape_filters = parse_shape_filters(shapes)
        self.results_dir = Path(results_dir) if results_dir is not None else None
        self.echo = echo
        if self.on_gpu:
            self.device_name = torch.cuda.get_device_name(device)
            self.gpu = hardware.detect(_nvml_index(device))
        else:
            self.device_name = _cpu_name()
            self.gpu = None
        self.slug = hardware.device_slug(self.device_name) if self.on_gpu else "cpu"
        self.records: list[dict[str, Any]] = []       # every record of the suites that finished
        self.suite: str | None = None
        self._pending: list[dict[str, Any]] = []      # records of the suite in progress
        self._timings: list[Timing] = []
        self._record_timings: dict[int, Timing] = {}  # id(record) -> the Timing its time_us came from
        self._sampler = NvmlSampler(_nvml_index(device)) if self.on_gpu else None
        self._window_start = _time.monotonic()

    # -- what suites call ---------------------------------------------------------------------

    @property
    def ceilings(self):
        """Device-to-device copy GB/s and bf16 matmul TFLOP/s, measured once per process and device."""
        from bench.ceilings import measure

        return measure(self)

    def sets_for(self, bytes_per_set: int) -> int:
        """How many input sets to rotate so that together they span L2_SPAN × the last-level cache
        (1..16): a set is then evicted before it is used again, and timings see HBM, not L2."""
        if bytes_per_set <= 0:
            raise ValueError(f"bytes_per_set: expected a positive byte count, got {bytes_per_set}")
        if self.on_gpu:
            cache = torch.cuda.get_device_properties(self.device).L2_cache_size
        else:
            cache = CPU_CACHE_BYTES
        return max(1, min(MAX_SETS, math.ceil(L2_SPAN * cache / bytes_per_set)))

    def time(self, fn: Callable[[int], Any], n_sets: int = 1, graph: bool = False, *, name: str | None = None,
             budget: Budget | None = None) -> float:
        """Median µs of one call of ``fn(i)``, i rotating over range(n_sets) (see the module doc).

        ``name``: the NVTX range of the timed samples, best ``record_name(op, backend, shape)`` of
        the record the time goes to (default ``"<suite> <function>"``). ``budget``: instead of the
        run's (FULL, or QUICK with --quick)."""
        if n_sets < 1:
            raise ValueError(f"n_sets: expected >= 1, got {n_sets}")
        name = name or f"{self.suite or 'bench'} {getattr(fn, '__qualname__', type(fn).__name__)}"
        budget = budget or self.budget
        if self.on_gpu:
            t = time_cuda(fn, n_sets, graph, budget, self.device, name=name)
        else:
            t = time_cpu(fn, n_sets, budget, name=name)
        self._timings.append(t)
        return t.median_us

    def time_peer(self, peer: str, fn: Callable[[int], Any], n_sets: int = 1, graph: bool = False, *,
                  name: str | None = None) -> tuple:
        """A peer's ``record(peer=...)`` argument: ``(peer, µs)``, or ``(peer, None, reason)`` when it
        cannot run here (out of memory, or any error: the record then reports it missing, with why)."""
        try:
            return peer, self.time(fn, n_sets, graph, name=name)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return peer, None, "out of memory"
        except Exception as e:  # noqa: BLE001 - a peer that fails is reported missing, not fatal
            return peer, None, f"{type(e).__name__}: {e}"[:300]

    def want(self, shape: dict[str, Any]) -> bool:
        """Whether ``shape`` passes the run's --shapes filters (a suite may skip the work when not)."""
        return shape_matches(shape, self.shape_filters)

    def progress(self, iterable: Iterable, desc: str | None = None, total: int | None = None) -> Iterator:
        """``iterable`` with a tqdm progress bar (shown on a terminal only)."""
        from tqdm.auto import tqdm

        return iter(tqdm(iterable, desc=desc or self.suite, total=total, leave=False,
                         disable=None if self.echo else True))

    def note(self, text: str) -> None:
        """Print a line of the run's output (above any progress bar)."""
        if self.echo:
            _write(text)

    def record(self, *, op: str, backend: str, shape: dict[str, Any], dtype: str, time_us: float,
               bytes: int | None = None, flops: int | None = None,
               peer: tuple | dict | None = None, extra: dict[str, Any] | None = None,
               bandwidth: str | None = None) -> dict[str, Any]:
        """Make, print and keep one results record; returns it (see bench/results.py for the fields).

        ``peer``: ``(name, time_us)`` of the alternative measured in the same run, or
        ``(name, None, reason)`` when it is missing on this machine (reported as missing).
        ``bandwidth``: which link the bytes cross, for the H800 projection: "hbm" (default),
        "nvlink" (default for ep.* and the NVLink/NCCL ceilings) or "nic".
        """
        if self.suite is None:
            raise RuntimeError("record() called outside a suite: wrap the run in ctx.suite_run(name)")
        if not isinstance(shape, dict):
            raise TypeError(f"shape: expected a dict of sizes, got {type(shape).__name__}")
        if not shape_matches(shape, self.shape_filters):
            return {}
        rec = self._make_record(op, backend, shape, dtype, float(time_us), bytes, flops, peer, extra,
                                bandwidth)
        timing = self._timing_of(float(time_us))
        if timing is not None:
            self._record_timings[id(rec)] = timing
        self._pending.append(rec)
        if self.echo:
            _write(_results.format_row(rec))
        return rec

    # -- what the runner calls ----------------------------------------------------------------

    @contextlib.contextmanager
    def suite_run(self, name: str) -> Iterator[Context]:
        """Run one suite: its records are kept and written only if the body finishes."""
        self.suite, self._pending = name, []
        if self._sampler is not None:
            self._sampler.start()
        self._window_start = _time.monotonic()
        ok = False
        try:
            yield self
            ok = True
        finally:
            if self._sampler is not None:
                self._sampler.stop()
            if ok:
                self.records.extend(self._pending)
                if self.results_dir is not None and self._pending:
                    _results.write_suite(self.results_dir / self.slug / f"{name}.json", self._pending)
            else:
                for rec in self._pending:
                    self._record_timings.pop(id(rec), None)
            self.suite, self._pending = None, []

    def suite_records(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["suite"] == name]

    def samples_of(self, rec: dict[str, Any]) -> tuple[float, ...]:
        """The µs per call of every timed sample behind a kept record's ``time_us`` (its median);
        empty when the suite measured that time otherwise (a generate run, spawned processes)."""
        timing = self._record_timings.get(id(rec))
        return timing.samples_us if timing is not None else ()

    @property
    def timer_label(self) -> str:
        return "CUDA events" if self.on_gpu else "CPU timings (wall clock)"

    # -- record composition -------------------------------------------------------------------

    def _timing_of(self, time_us: float) -> Timing | None:
        for t in reversed(self._timings):
            if t.median_us == time_us:
                return t
        return None

    def _make_record(self, op, backend, shape, dtype, time_us, nbytes, flops, peer, extra,
                     bandwidth) -> dict[str, Any]:
        c = self.ceilings
        gbps = nbytes / (time_us * 1e3) if nbytes is not None and time_us > 0 else None
        tflops = flops / (time_us * 1e6) if flops is not None and time_us > 0 else None
        ideal_us = None
        if nbytes is not None or flops is not None:
            ideal_us = max((nbytes or 0) / (c.copy_gbps * 1e3), (flops or 0) / (c.mm_tflops * 1e6))
        peer_rec, speedup = _peer(peer, time_us)
        timing = self._timing_of(time_us)
        now = _time.monotonic()
        nvml = self._sampler.summary(since=self._window_start) if self._sampler is not None else \
            {"available": False, "reason": "CPU run"}
        self._window_start = now
        return {
            "suite": self.suite,
            "op": op,
            "backend": backend,
            "shape": dict(shape),
            "dtype": dtype,
            "time_us": _round(time_us, 6),
            "bytes": nbytes,
            "flops": flops,
            "gbps": _round(gbps, 4),
            "tflops": _round(tflops, 4),
            "frac_copy_bw": _round(gbps / c.copy_gbps if gbps is not None else None, 4),
            "frac_mm_rate": _round(tflops / c.mm_tflops if tflops is not None else None, 4),
            "ideal_us": _round(ideal_us, 4),
            "peer": peer_rec,
            "speedup_vs_peer": _round(speedup, 4),
            "h800_projected_us": _round(self._project(op, dtype, nbytes, flops, time_us, bandwidth), 4),
            "device": self.device_name,
            "device_slug": self.slug,
            "timer": timing.timer if timing else ("cuda-events" if self.on_gpu else "cpu-wall"),
            "timing": timing.as_dict() if timing else None,
            "ceilings": {"copy_gbps": _round(c.copy_gbps, 4), "mm_tflops": _round(c.mm_tflops, 4),
                         "mm_tflops_burst": _round(c.mm_burst_tflops, 4), "frac_mm_rate_of": MM_RATE_USED},
            "nvml": nvml,
            "torch": torch.__version__,
            "triton": _triton_version(),
            "python": platform.python_version(),
            "git_commit": git_commit(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "extra": extra or {},
        }

    def _project(self, op, dtype, nbytes, flops, time_us, bandwidth) -> float | None:
        """Time on an H800 at the fraction of its limits this op reaches here (None on the CPU)."""
        if not self.on_gpu or self.gpu is None:
            return None
        spec = self.gpu.effective_spec(self.ceilings.mm_tflops)
        if spec is None:
            return None
        if bandwidth is None:
            link_ops = ("ep.", "ceiling.nvlink", "ceiling.nccl")
            bandwidth = "nvlink" if op.startswith(link_ops) else "hbm"
        kind = "fp8" if "fp8" in dtype or "e4m3" in dtype else "bf16"
        if kind == "fp8" and spec.fp8_tflops is None:
            return None
        t = hardware.project(nbytes or 0, flops or 0, time_us * 1e-6, on=spec, to=hardware.H800,
                             flops_kind=kind, bandwidth=bandwidth)
        return t * 1e6 if t is not None else None


def record_name(op: str, backend: str, shape: dict[str, Any]) -> str:
    """``"op backend k=v k=v"``: how a record is named on a timeline (the NVTX range of its timing). No "/":
    Nsight Compute's ``--nvtx-include`` reads "/" as range nesting, so such a name could not be selected."""
    return f"{op} {backend} {_results.format_shape(shape)}"


def _nvml_index(device: torch.device) -> int:
    """NVML's index of a CUDA device (they differ under CUDA_VISIBLE_DEVICES)."""
    if device.type != "cuda":
        return 0
    try:
        return torch.cuda._get_nvml_device_index(device)
    except Exception:  # noqa: BLE001 - private helper: fall back to CUDA's numbering
        return device.index or 0


def peer_entry(peer: tuple | dict) -> dict[str, Any]:
    """A peer as records hold it: ``{"name", "time_us"}``, or ``{"name", "time_us": None, "missing":
    True, "reason"}``, from ``(name, time_us)``, ``(name, None, reason)`` or such a dict. For the
    record's ``peer`` and for further peers a suite keeps in ``extra``."""
    if isinstance(peer, dict):
        name, peer_us, reason = peer.get("name"), peer.get("time_us"), peer.get("reason")
    else:
        if len(peer) not in (2, 3):
            raise ValueError(f"peer: expected (name, time_us) or (name, None, reason), got {peer!r}")
        name, peer_us, reason = peer[0], peer[1], peer[2] if len(peer) == 3 else None
    if peer_us is None:
        return {"name": name, "time_us": None, "missing": True, "reason": reason or "not available on this machine"}
    return {"name": name, "time_us": _round(float(peer_us), 6)}


def _peer(peer, time_us: float) -> tuple[dict[str, Any] | None, float | None]:
    if peer is None:
        return None, None
    entry = peer_entry(peer)
    if entry["time_us"] is None:
        return entry, None
    return entry, (entry["time_us"] / time_us if time_us > 0 else None)


def _round(x: float | None, digits: int) -> float | None:
    """``x`` to ``digits`` significant digits (diff-friendly files; ≥ 3 digits say all there is)."""
    if x is None or x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


def _write(text: str) -> None:
    try:
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stdout)
    except ImportError:
        print(text, flush=True)
