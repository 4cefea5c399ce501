"""``python -m profiles <command>``.

Commands:
    gpus      the hardware table (HBM, bf16/fp8 rates, NVLink and NIC per GPU) with sources
    detect    what NVML reports about the GPUs here (name, theoretical bandwidth, NVLink links)
    ncu       Nsight Compute sessions: ``ncu <op>|all [--backend B] [--shape k=v,...]`` (on a GPU with ncu;
              summaries under profiles/results/<device>/ncu/, see profiles/ncu.py)
    step      where a decode step's time goes: the kernels of CUDA-graph steps by part of the model
              (``step [--preset lite] [--batch 1,64] [--context 4096]``, see profiles/decode_step.py)
    report    the roofline report from the committed bench/results: ROOFLINE.md and roofline.png
              under profiles/results/<device>/ (see profiles/report.py)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from profiles import hardware

COMMANDS = ("gpus", "detect", "ncu", "step", "report")


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


def _ncu(argv: list[str]) -> int:
    from profiles import ncu, ncu_targets
    from profiles.ncu_launch import parse_shape

    p = argparse.ArgumentParser(prog="python -m profiles ncu", description="Nsight Compute sessions of one op or all.")
    p.add_argument("op", choices=sorted(ncu_targets.TARGETS) + ["all"])
    p.add_argument("--backend", help="one of the op's backends (default: its first); not with 'all'")
    p.add_argument("--shape", default="", help="k=v,... over the headline shape; not with 'all'")
    p.add_argument("--iters", type=int, default=ncu.DEFAULT_ITERS, help="calls profiled inside the range")
    p.add_argument("--launch-count", type=int, default=ncu.DEFAULT_LAUNCH_COUNT, help="most kernels profiled")
    p.add_argument("--out", type=Path, default=ncu.RESULTS_DIR, help="results root (default profiles/results)")
    p.add_argument("--keep-rep", action="store_true", help="keep the .ncu-rep whatever its size")
    args = p.parse_args(argv)
    if args.op == "all" and (args.backend or args.shape):
        p.error("--backend and --shape apply to one op, not to 'all'")
    if args.iters < 1 or args.launch_count < 1:
        p.error("--iters and --launch-count: expected >= 1")
    try:
        if args.op == "all":
            runs = ncu_targets.ALL_RUNS
        else:
            runs = [(args.op, ncu_targets.check_backend(args.op, args.backend))]
        overrides = parse_shape(args.shape)
        if args.op != "all":
            ncu_targets.resolve_shape(args.op, overrides)
    except ValueError as e:
        p.error(str(e))
    failed = []
    for op, backend in runs:
        print(f"ncu: {op} ({backend}) ...", flush=True)
        try:
            s = ncu.run_session(op, backend, overrides if args.op != "all" else None, out_root=args.out,
                                iters=args.iters, launch_count=args.launch_count, keep_rep=args.keep_rep)
        except RuntimeError as e:
            print(f"ncu: {op} ({backend}) FAILED: {e}", flush=True)
            failed.append(f"{op}/{backend}")
            continue
        dram_mb = (s["dram_read_bytes"] + s["dram_write_bytes"]) / 1e6
        print(f"  {s['kernels_per_call']:g} kernel(s), {s['time_us']:.2f} µs, DRAM {dram_mb:.1f} MB vs minimal "
              f"{s['minimal_bytes'] / 1e6:.1f} MB (over-fetch {s['overfetch']:.3f}x), DRAM {s['dram_pct'] or 0:.1f} %,"
              f" SM {s['sm_pct'] or 0:.1f} %, limit: {s['limit']}; NVTX range seen: {s['nvtx_seen']}", flush=True)
        print(f"  -> {args.out / s['device_slug'] / 'ncu' / (op + '-' + backend)}.md", flush=True)
    if failed:
        print(f"ncu: {len(failed)} session(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


def _report(argv: list[str]) -> int:
    from profiles import report

    p = argparse.ArgumentParser(prog="python -m profiles report", description="The roofline report.")
    p.add_argument("--results", type=Path, default=report.BENCH_RESULTS_DIR, help="bench results root")
    p.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="where <device>/ROOFLINE.md goes")
    p.add_argument("--device", action="append", help="a device slug (default: every device with results)")
    p.add_argument("--no-plot", action="store_true", help="write the Markdown only")
    args = p.parse_args(argv)
    try:
        written = report.write_report(args.results, args.out, args.device, plot=not args.no_plot)
    except FileNotFoundError as e:
        p.error(str(e))
    for path in written:
        print(path)
    if not written:
        print(f"no benchmark records under {args.results}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else None
    if cmd == "gpus":
        return _gpus()
    if cmd == "detect":
        return _detect()
    if cmd == "ncu":
        return _ncu(argv[1:])
    if cmd == "step":
        from profiles import decode_step

        return decode_step.main(argv[1:])
    if cmd == "report":
        return _report(argv[1:])
    print(__doc__.strip())
    return 0 if cmd in (None, "-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
