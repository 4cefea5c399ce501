"""The program ``python -m profiles ncu`` runs under Nsight Compute: one op, one backend, one shape.

    python -m profiles.ncu_launch <op> <backend> <shape k=v,...> [--iters N] [--info PATH]

Builds the op's inputs as its benchmark does, calls it ``WARMUP_CALLS`` times outside any range
(Triton compiles and autotunes there, so those kernels are not profiled), then ``--iters`` times
inside the NVTX range ``ncu_targets.range_name(...)``, which ncu's --nvtx-include selects. Writes
the builder's info (experts hit, ...) as JSON to ``--info`` for the summary. Also runs without ncu
(a smoke test of the inputs and the range).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from profiles import ncu_targets

WARMUP_CALLS = 3


def parse_shape(text: str) -> dict[str, str]:
    """``"b=64,s=4096"`` -> ``{"b": "64", "s": "4096"}``."""
    out = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--shape: expected key=value[,key=value...], got {text!r}")
        out[key.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m profiles.ncu_launch", description=__doc__.splitlines()[0])
    p.add_argument("op", choices=sorted(ncu_targets.TARGETS))
    p.add_argument("backend")
    p.add_argument("shape", help="k=v,... (the full shape; missing keys take the headline values)")
    p.add_argument("--iters", type=int, default=1, help="calls inside the profiled range (default 1)")
    p.add_argument("--info", type=Path, help="write the builder's info here as JSON")
    args = p.parse_args(argv)
    if args.iters < 1:
        p.error(f"--iters: expected >= 1, got {args.iters}")

    import torch

    from pykernels.profiling import enable_nvtx, nvtx_range

    backend = ncu_targets.check_backend(args.op, args.backend)
    shape = ncu_targets.resolve_shape(args.op, parse_shape(args.shape))
    if not torch.cuda.is_available():
        print("profiles.ncu_launch: no CUDA device", file=sys.stderr)
        return 2
    call, info = ncu_targets.build(args.op, backend, shape)
    for _ in range(WARMUP_CALLS):
        call()
    torch.cuda.synchronize()
    enable_nvtx(True)
    with nvtx_range(ncu_targets.range_name(args.op, backend, shape)):
        for _ in range(args.iters):
            call()
        torch.cuda.synchronize()
    enable_nvtx(False)
    if args.info:
        args.info.write_text(json.dumps(dict(info, iters=args.iters, device=torch.cuda.get_device_name())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
