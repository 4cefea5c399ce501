"""The sm_90 grouped GEMMs (pykernels/moe_gemm_sm90.py) against grouped_gemm's Triton table kernels, one run
(GPU only, a Hopper):

    python -m bench.tune_moe_sm90 --out tune-moe-sm90.json [--tokens 8192]

At the prefill shapes (Lite E 64 H 2048 I 1408 and 236B E 160 H 5120 I 1536, top-6, random routes, bf16)
it times, on the same expert-sorted rows:
  gate_up   Triton's table kernel; sm_90
  down      Triton's table kernel; sm_90 in place; sm_90 scattered to route order with the routing weights
and the steps around them in moe_ffn, with the whole op (backends "triton" and "cuda"):
  gather    into expert order: x.index_select, and moe_rows.gather_sorted
  combine   the scattered down GEMM + grouped_gemm.sum_topk, and the in-place down GEMM + moe_rows.combine
Every GEMM output is first checked against Triton's (relative
error; a wrong one is reported, not timed). Printed and recorded: µs, TFLOP/s (the routed rows' FLOPs) and %
of torch.mm's bf16 rate at 8192^3 measured in the same run (the moe bar: >= 75 % for the whole FFN).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import pykernels as pk
from bench.harness import Budget, time_cuda
from pykernels import moe_gemm_sm90
from pykernels.triton import grouped_gemm, moe_configs, moe_rows
from pykernels.triton.moe_permute import permute, permute_with_positions

BUDGET = Budget(warmup_s=0.05, min_reps=10, max_reps=50, seconds=0.3)
SHAPES = {"lite": (64, 2048, 1408), "236b": (160, 5120, 1536)}
TOP_K = 6
MAX_REL_ERR = 1e-2  # bf16 outputs of two kernels with float32 accumulation


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _triton_down(h, w2, cfg, offsets, out):
    grouped_gemm._down(h, w2, cfg, "sorted", offsets, out)
    return out


def _mm_tflops() -> float:
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / time_cuda(lambda i: torch.mm(a, b), budget=BUDGET).median_us / 1e6


def _case(label: str, T: int, mm_tflops: float) -> dict:
    E, H, I = SHAPES[label]
    torch.manual_seed(0)
    ids = torch.rand(T, E, device="cuda").argsort(1)[:, :TOP_K].int()  # distinct experts per token
    offsets, pair = permute(ids, E)
    R = T * TOP_K
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    x_sorted = x.index_select(0, (pair // TOP_K).long())
    w13 = (torch.randn(E, 2 * I, H, device="cuda") * H**-0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda") * I**-0.5).bfloat16()
    weights = torch.rand(R, device="cuda")
    cfg_gu, cfg_dn = (moe_configs.pick(g, H, I, R, E, 2) for g in ("gate_up", "down"))
    h = grouped_gemm._gate_up(x_sorted, w13, cfg_gu, "sorted", offsets, num_rows=R)  # the reference outputs
    out = torch.empty(R, H, device="cuda", dtype=torch.bfloat16)
    grouped_gemm._down(h, w2, cfg_dn, "sorted", offsets, out)
    scattered = torch.empty_like(out)
    grouped_gemm._down(h, w2, cfg_dn, "gather", offsets, scattered, pair=pair, weights=weights)
    flops = {"gate_up": 2 * R * H * 2 * I, "down": 2 * R * I * H}

    variants = {  # name: (GEMM, run, reference)
        "gate_up triton": ("gate_up", lambda: grouped_gemm._gate_up(x_sorted, w13, cfg_gu, "sorted", offsets,
                                                                    num_rows=R), h),
        "down triton": ("down", lambda: _triton_down(h, w2, cfg_dn, offsets, torch.empty_like(out)), out),
        "gate_up sm90": ("gate_up", lambda: moe_gemm_sm90.gate_up(x_sorted, w13, offsets), h),
        "down sm90": ("down", lambda: moe_gemm_sm90.down(h, w2, offsets, torch.empty_like(out)), out),
        "down sm90 scatter": ("down", lambda: moe_gemm_sm90.down(h, w2, offsets, torch.empty_like(out), pair=pair,
                                                                  weights=weights), scattered),
    }
    report = {"E": E, "H": H, "I": I, "T": T, "top_k": TOP_K, "results": {}}
    for name, (gemm, run, ref) in variants.items():
        got = run()
        err = _rel(got, ref)
        row = {"rel_err": err, "ok": err <= MAX_REL_ERR}
        if row["ok"]:
            us = time_cuda(lambda i: run(), budget=BUDGET).median_us
            tflops = flops[gemm] / us / 1e6
            row.update(us=round(us, 1), tflops=round(tflops, 1), frac_mm=round(tflops / mm_tflops, 4))
        report["results"][name] = row
        print(f"{label:5} T={T:<5} {name:32} " + (f"{row['us']:9.1f} µs {row['tflops']:6.1f} TFLOP/s "
              f"{100 * row['frac_mm']:5.1f} % of mm" if row["ok"] else f"WRONG (rel err {err:.2e})"), flush=True)
    # the steps around the GEMMs in moe_ffn: into sorted order, and out of it with the top-k sum
    _, _, position = permute_with_positions(ids, E)
    topk_weights = weights.view(T, TOP_K)
    y_scatter, y_combine = (torch.empty(T, H, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    buf, out_sorted = torch.empty_like(out), torch.empty_like(out)
    steps = {
        "gather x_sorted (index_select)": lambda: x.index_select(0, (pair // TOP_K).long()),
        "gather x_sorted (gather_sorted)": lambda: moe_rows.gather_sorted(x, pair, offsets, TOP_K),
        "down scattered + sum_topk": lambda: (moe_gemm_sm90.down(h, w2, offsets, buf, pair=pair, weights=weights),
                                              grouped_gemm.sum_topk(buf, ids.view(-1), y_scatter, E, TOP_K)),
        "down + combine": lambda: (moe_gemm_sm90.down(h, w2, offsets, out_sorted),
                                   moe_rows.combine(out_sorted, position, topk_weights, y_combine)),
        "moe_ffn triton": lambda: pk.moe_ffn(x, w13, w2, topk_weights, ids, backend="triton"),
        "moe_ffn cuda": lambda: pk.moe_ffn(x, w13, w2, topk_weights, ids, backend="cuda"),
    }
    moe_flops = flops["gate_up"] + flops["down"]
    for name, run in steps.items():
        us = time_cuda(lambda i: run(), budget=BUDGET).median_us
        row = {"us": round(us, 1)}
        if name.startswith("moe_ffn"):
            row["frac_mm"] = round(moe_flops / us / 1e6 / mm_tflops, 4)
        report["results"][name] = row
        print(f"{label:5} T={T:<5} {name:32} {us:9.1f} µs" +
              (f" {100 * row['frac_mm']:5.1f} % of mm" if "frac_mm" in row else ""), flush=True)
    report["results"]["down + combine"]["rel_err_vs_scattered"] = _rel(y_combine, y_scatter)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--tokens", default="8192", help="comma-separated token counts (default 8192)")
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() and moe_gemm_sm90.available(torch.device("cuda"))):
        print("tune_moe_sm90: needs a Hopper GPU and the built extension", file=sys.stderr)
        return 2
    mm = _mm_tflops()
    print(f"torch.mm bf16 8192^3: {mm:.1f} TFLOP/s", flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "mm_tflops": round(mm, 1),
              "cases": []}
    for T in (int(t) for t in args.tokens.split(",")):
        for label in SHAPES:
            report["cases"].append(_case(label, T, mm))
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
