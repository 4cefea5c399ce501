"""Hardware model: the datacenter GPUs DeepSeek-V2 is served on, detection of the running GPU, and
the projection of a time measured here onto an H800.

All bandwidths are in GB/s (10⁹ bytes/s) and rates in TFLOP/s (10¹² FLOP/s), dense (no 2:4
sparsity). NVLink figures are ONE-WAY per GPU: NVIDIA's datasheets quote the bidirectional total,
so 900 GB/s on the sheet is 450 GB/s out of a GPU. NIC bandwidth is per GPU, one way.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet limits of one GPU model."""

    name: str
    hbm_gbps: float            # HBM bandwidth
    bf16_tflops: float         # dense bf16 tensor-core rate
    fp8_tflops: float | None   # dense fp8 tensor-core rate (None: no fp8 tensor cores)
    nvlink_gbps: float         # NVLink, one way per GPU
    nic_gbps: float            # scale-out network per GPU, one way (400 Gb/s = 50 GB/s)
    memory_gib: float
    sources: tuple[str, ...] = field(default=())

    def flops_rate(self, kind: str = "bf16") -> float:
        """Peak FLOP/s (not TFLOP/s) for ``kind`` in {"bf16", "fp8"}."""
        if kind == "bf16":
            return self.bf16_tflops * 1e12
        if kind == "fp8":
            if self.fp8_tflops is None:
                raise ValueError(f"kind: {self.name} has no fp8 tensor cores, got 'fp8'")
            return self.fp8_tflops * 1e12
        raise ValueError(f"kind: expected 'bf16' or 'fp8', got {kind!r}")


_HOPPER_SHEET = "NVIDIA H100 Tensor Core GPU datasheet (SXM column)"

GPUS: dict[str, GpuSpec] = {
    "h800-sxm": GpuSpec(
        "H800 SXM", hbm_gbps=3350, bf16_tflops=989, fp8_tflops=1979, nvlink_gbps=200, nic_gbps=50,
        memory_gib=80,
        sources=("H100 SXM compute and memory (the H800 differs only in NVLink): " + _HOPPER_SHEET,
                 "NVLink 400 GB/s bidirectional, one 400 Gb/s InfiniBand NIC per GPU: DeepSeek-V3 "
                 "technical report, section 3.1 (compute clusters)")),
    "h100-sxm": GpuSpec(
        "H100 SXM", hbm_gbps=3350, bf16_tflops=989, fp8_tflops=1979, nvlink_gbps=450, nic_gbps=50,
        memory_gib=80,
        sources=(_HOPPER_SHEET + ": 3.35 TB/s, 989 TFLOP/s bf16, 1979 fp8, NVLink 900 GB/s",
                 "DGX H100 user guide: eight ConnectX-7 400 Gb/s ports, one per GPU")),
    "h200": GpuSpec(
        "H200", hbm_gbps=4800, bf16_tflops=989, fp8_tflops=1979, nvlink_gbps=450, nic_gbps=50,
        memory_gib=141,
        sources=("NVIDIA H200 Tensor Core GPU datasheet (SXM): 4.8 TB/s, 141 GB, 989 TFLOP/s bf16, "
                 "NVLink 900 GB/s",
                 "HGX H200: one 400 Gb/s NIC per GPU, as HGX H100")),
    "h20": GpuSpec(
        "H20", hbm_gbps=4000, bf16_tflops=148, fp8_tflops=296, nvlink_gbps=450, nic_gbps=50,
        memory_gib=96,
        sources=("NVIDIA HGX H20 product brief as reported publicly (2023-11): 96 GB HBM3, 4.0 TB/s, "
                 "148 TFLOP/s bf16, 296 fp8, NVLink 900 GB/s",
                 "NIC per GPU assumed as HGX H100 (400 Gb/s); not on the brief")),
    "a100-sxm": GpuSpec(
        "A100 SXM 80GB", hbm_gbps=2039, bf16_tflops=312, fp8_tflops=None, nvlink_gbps=300,
        nic_gbps=25, memory_gib=80,
        sources=("NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): 2039 GB/s, 312 TFLOP/s bf16, "
                 "NVLink 600 GB/s",
                 "DGX A100 user guide: eight ConnectX-6 200 Gb/s ports, one per GPU")),
}

H800 = GPUS["h800-sxm"]

# Patterns on the marketing name NVML/CUDA report ("NVIDIA H100 80GB HBM3", "NVIDIA H200",
# "NVIDIA A100-SXM4-80GB", "NVIDIA H800", "NVIDIA H20"), tried in order: H200 before H20.
_NAME_PATTERNS = (
    (r"\bH800\b", "h800-sxm"),
    (r"\bH100\b(?!.*PCIe)(?!.*NVL)", "h100-sxm"),
    (r"\bH200\b", "h200"),
    (r"\bH20\b", "h20"),
    (r"\bA100\b.*SXM", "a100-sxm"),
)


def spec_for_name(name: str) -> GpuSpec | None:
    """The table entry for a GPU's reported name, or None (PCIe and NVL parts are not in the table)."""
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return GPUS[key]
    return None


def device_slug(name: str) -> str:
    """Lower-case name with dashes: "NVIDIA H200" -> "nvidia-h200"; "cpu" stays "cpu"."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown"


BANDWIDTHS = ("hbm", "nvlink", "nic")


def link_gbps(spec: GpuSpec, bandwidth: str = "hbm") -> float:
    """The bandwidth the op's bytes cross: "hbm", "nvlink" (one way) or "nic" (one way)."""
    if bandwidth == "hbm":
        return spec.hbm_gbps
    if bandwidth == "nvlink":
        return spec.nvlink_gbps
    if bandwidth == "nic":
        return spec.nic_gbps
    raise ValueError(f"bandwidth: expected one of {BANDWIDTHS}, got {bandwidth!r}")


def roofline_time_s(nbytes: float, flops: float, spec: GpuSpec, flops_kind: str = "bf16",
                    bandwidth: str = "hbm") -> float:
    """The ideal time: the larger of bytes / bandwidth and FLOPs / peak rate."""
    gbps = link_gbps(spec, bandwidth)
    t_bytes = nbytes / (gbps * 1e9) if nbytes else 0.0
    if nbytes and gbps <= 0:
        t_bytes = float("inf")
    return max(t_bytes, flops / spec.flops_rate(flops_kind) if flops else 0.0)


def project(nbytes: float, flops: float, time_s: float, on: GpuSpec, to: GpuSpec = H800,
            flops_kind: str = "bf16", bandwidth: str = "hbm") -> float | None:
    """Time the op would take on ``to`` running at the same fraction of its roofline as on ``on``.

    With ideal(g) = max(bytes / bw(g), flops / rate(g)) and the measured time t on ``on``, the op
    reaches f = ideal(on) / t of its limit; at the same f on ``to`` it takes ideal(to) / f, i.e.
        t_to = t · ideal(to) / ideal(on).
    An op that is memory-bound here and compute-bound there (H200 → H20, say) moves to the other
    side of the roofline correctly. ``bandwidth`` names the link the bytes cross (HBM for kernels,
    NVLink for expert-parallel traffic). Returns None for an op with neither bytes nor FLOPs, or
    when ``on``'s bandwidth for that link is unknown (0).
    """
    ideal_on = roofline_time_s(nbytes, flops, on, flops_kind, bandwidth)
    if ideal_on <= 0 or math.isinf(ideal_on):
        return None
    return time_s * roofline_time_s(nbytes, flops, to, flops_kind, bandwidth) / ideal_on


@dataclass(frozen=True)
class DetectedGpu:
    """What NVML reports about one GPU, with the table entry it matches (if any)."""

    index: int
    name: str
    slug: str
    memory_clock_mhz: int | None       # maximum memory clock
    bus_width_bits: int | None
    theoretical_gbps: float | None     # memory clock × 2 (double data rate) × bus width / 8
    nvlink_links: int                  # active NVLink links (0 on PCIe parts or without NVML)
    memory_gib: float | None
    spec: GpuSpec | None

    def effective_spec(self, mm_tflops: float | None = None) -> GpuSpec | None:
        """The table entry; for a GPU not in the table, one built from NVML's theoretical
        bandwidth and ``mm_tflops`` (a measured matmul rate), or None without both."""
        if self.spec is not None:
            return self.spec
        if self.theoretical_gbps is None or mm_tflops is None:
            return None
        return GpuSpec(self.name, hbm_gbps=self.theoretical_gbps, bf16_tflops=mm_tflops,
                       fp8_tflops=None, nvlink_gbps=0.0, nic_gbps=0.0,
                       memory_gib=self.memory_gib or 0.0,
                       sources=("NVML theoretical bandwidth; measured bf16 matmul rate",))


def theoretical_bandwidth_gbps(memory_clock_mhz: float, bus_width_bits: int) -> float:
    """HBM/GDDR peak: clock × 2 transfers per clock × bus width in bytes."""
    return memory_clock_mhz * 1e6 * 2 * bus_width_bits / 8 / 1e9


def detect(index: int = 0) -> DetectedGpu | None:
    """Query NVML for GPU ``index`` (NVML's numbering). None when NVML or the GPU is missing."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
        clock = _nvml_or_none("nvmlDeviceGetMaxClockInfo", handle, pynvml.NVML_CLOCK_MEM)
        width = _nvml_or_none("nvmlDeviceGetMemoryBusWidth", handle)
        memory = _nvml_or_none("nvmlDeviceGetMemoryInfo", handle)
        links = sum(1 for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18))
                    if _nvml_or_none("nvmlDeviceGetNvLinkState", handle, link) == pynvml.NVML_FEATURE_ENABLED)
        return DetectedGpu(
            index=index, name=name, slug=device_slug(name), memory_clock_mhz=clock,
            bus_width_bits=width,
            theoretical_gbps=theoretical_bandwidth_gbps(clock, width) if clock and width else None,
            nvlink_links=links, memory_gib=memory.total / 2**30 if memory is not None else None,
            spec=spec_for_name(name))
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def _nvml_or_none(fn_name: str, *args):
    """``pynvml.<fn_name>(*args)``, or None when the query fails or this nvidia-ml-py lacks it."""
    import pynvml

    fn = getattr(pynvml, fn_name, None)
    if fn is None:
        return None
    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None
