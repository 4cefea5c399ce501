"""``python -m profiles <command>``.

Commands:
    gpus      the hardware table (HBM, bf16/fp8 rates, NVLink and NIC per GPU) with sources
    detect    what NVML reports about the GPUs here (name, theoretical bandwidth, NVLink links)
    report    reserved: the profiling report (not written yet)
"""
from __future__ import annotations

import sys

from profiles import hardware

COMMANDS = ("gpus", "detect", "report")


def _gpus() -> int:
    print(f"{'key':<10} {'name':<14} {'HBM GB/s':>9} {'bf16 TF/s':>10} {'fp8 TF/s':>9} "
          f"{'NVLink GB/s':>12} {'NIC GB/s':>9}")
    for key, g in hardware.GPUS.items():
        fp8 = "-" if g.fp8_tflops is None else f"{g.fp8_tflops:.0f}"
        print(f"{key:<10} {g.name:<14} {g.hbm_gbps:>9.0f} {g.bf16_tflops:>10.0f} {fp8:>9} "
              f"{g.nvlink_gbps:>12.0f} {g.nic_gbps:>9.0f}")
    print("\nNVLink and NIC: one way per GPU. Sources:")
    for key, g in hardware.GPUS.items():
        for s in g.sources:
            print(f"  {key}: {s}")
    return 0


def _detect() -> int:
    i, found = 0, False
    while (g := hardware.detect(i)) is not None:
        found = True
        bw = "-" if g.theoretical_gbps is None else f"{g.theoretical_gbps:.0f} GB/s"
        print(f"GPU {i}: {g.name} ({g.slug}); theoretical HBM {bw}; NVLink links {g.nvlink_links}; "
              f"table entry: {g.spec.name if g.spec else 'none'}")
        i += 1
    if not found:
        print("no GPU found through NVML (nvidia-ml-py missing, no driver, or a CPU machine)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else None
    if cmd == "gpus":
        return _gpus()
    if cmd == "detect":
        return _detect()
    if cmd == "report":
        print("`python -m profiles report` is reserved for the profiling report; it is not written yet.")
        return 2
    print(__doc__.strip())
    return 0 if cmd in (None, "-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
