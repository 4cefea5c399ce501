"""Tuning sweep for the grouped-GEMM expert FFN's tile configurations (GPU only, < 4 minutes).

    python -m bench.tune_moe --out tune-moe.json [--budget-s 210] [--only lite]
    python -m bench.tune_moe --out compile.json --compile-only     # no GPU: shared memory, registers, spills

Cases: the performance bar's shapes at top-6 (Lite E 64 / H 2048 / I 1408; 236B E 160 / H 5120 / I 1536;
tensor-parallel shards of the 236B experts, I 768 and 192) at T = 1, 8, 64, 128 (decode) and 8192 (prefill).
Each case belongs to a key ``(gemm, H, I, bucket)`` of pykernels/triton/moe_configs.py (bucket from rows per
expert). For each case and each candidate config of its bucket, the gate_up GEMM (gather + fused silu * up)
and the down GEMM (weighted scatter) are timed alone (weights through pointer loads, TMA descriptors, or gate_up as one wide dot), on a permutation computed beforehand, and checked
against a bf16 torch per-expert loop (relative error <= 1e-2; a wrong config is reported, never chosen).
Every config is guarded: a compile failure or a shared-memory overflow is reported and the sweep goes on.

Decode cases rotate 4 routings (different experts hit, so the weights come from HBM) and are timed as
CUDA-graph replays; prefill cases are timed with CUDA events. The JSON (written after every case, so a run
stopped by the budget keeps what it measured) holds every timing with TFLOP/s and weight TB/s, and per key
the config with the lowest sum over its cases of (time / best time of the case). The run ends by printing
those as lines to paste into ``TABLE`` in pykernels/triton/moe_configs.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from bench.harness import Budget, time_cuda

# Short timings: the sweep compares configs; bench_moe publishes numbers.
SWEEP_BUDGET = Budget(warmup_s=0.003, min_reps=5, max_reps=25, seconds=0.02)
MAX_REL_ERR = 1e-2
TOP_K = 6
DECODE_SETS = 4

# (label, E, H, I, T)
CASES = [
    ("lite", 64, 2048, 1408, 8192),
    ("236b", 160, 5120, 1536, 8192),
    ("lite", 64, 2048, 1408, 1),
    ("lite", 64, 2048, 1408, 8),
    ("lite", 64, 2048, 1408, 64),
    ("lite", 64, 2048, 1408, 128),
    ("236b", 160, 5120, 1536, 1),
    ("236b", 160, 5120, 1536, 8),
    ("236b", 160, 5120, 1536, 64),
    ("236b", 160, 5120, 1536, 128),
    ("tp2", 160, 5120, 768, 8192),
    ("tp8", 160, 5120, 192, 8192),
    ("tp2", 160, 5120, 768, 64),
    ("tp8", 160, 5120, 192, 64),
]


def candidates(gemm: str, bucket: str):
    """Configs tried for a (gemm, bucket): the table's default first, then the alternatives."""
    from pykernels.triton.moe_configs import DEFAULTS, GemmConfig as C

    # Each list: pointer loads first, then TMA weight loads (tma=True), then gate_up as one wide dot.
    if bucket == "large":
        extra = {
            "gate_up": [C(128, 64, 64, 8, 8, 3), C(128, 128, 64, 8, 8, 3), C(64, 128, 64, 8, 4, 4),
                        C(128, 64, 128, 8, 8, 3), C(64, 64, 64, 8, 4, 4),
                        C(128, 64, 64, 8, 8, 3, True), C(128, 128, 64, 8, 8, 3, True),
                        C(128, 64, 64, 8, 8, 3, False, True), C(128, 128, 64, 8, 8, 3, False, True)],
            "down": [C(128, 128, 64, 8, 8, 3), C(128, 256, 64, 8, 8, 3), C(64, 128, 64, 8, 4, 4),
                     C(128, 64, 64, 8, 4, 4), C(128, 128, 128, 8, 8, 2),
                     C(128, 128, 64, 8, 8, 3, True), C(128, 256, 64, 8, 8, 3, True)],
        }[gemm]
    elif bucket == "medium":
        extra = [C(64, 64, 64, 8, 4, 4), C(64, 128, 64, 8, 4, 3), C(32, 64, 128, 4, 4, 4), C(128, 64, 64, 8, 8, 3)]
    elif bucket == "small":
        extra = [C(16, 64, 128, 1, 4, 4), C(32, 32, 256, 1, 4, 4), C(64, 64, 128, 1, 4, 3), C(16, 32, 256, 1, 4, 4),
                 C(32, 64, 128, 1, 4, 4, True)]
        if gemm == "gate_up":
            extra += [C(32, 64, 128, 1, 4, 4, False, True)]
    else:
        extra = [C(16, 32, 256, 1, 4, 3), C(16, 64, 128, 1, 4, 4), C(16, 16, 256, 1, 4, 4), C(16, 32, 128, 1, 4, 6),
                 C(16, 16, 512, 1, 4, 3), C(16, 32, 256, 1, 4, 4, True), C(16, 64, 128, 1, 4, 4, True)]
        if gemm == "gate_up":
            extra += [C(16, 32, 256, 1, 4, 4, False, True)]
    first = DEFAULTS[(gemm, bucket)]
    return [first] + [c for c in dict.fromkeys(extra) if c != first]


def _rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _case_sets(E, H, I, T, w13, w2, n_sets):
    """Routings (x, weights, permutation) and the bf16 torch loop's h and down outputs for checking."""
    import pykernels as pk
    from pykernels.triton.moe_permute import permute

    sets = []
    for s in range(n_sets):
        g = torch.Generator(device="cuda").manual_seed(100 + s)
        x = torch.randn(T, H, generator=g, device="cuda").to(torch.bfloat16)
        weights, ids = pk.moe_route(torch.randn(T, E, generator=g, device="cuda"), TOP_K)
        offsets, sorted_pair = permute(ids, E)
        pair = sorted_pair.long()
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
        xs = x[pair // TOP_K]
        h_ref = torch.empty(T * TOP_K, I, dtype=x.dtype, device="cuda")
        down_ref = torch.empty(T * TOP_K, H, dtype=x.dtype, device="cuda")
        start = 0
        for e, n in enumerate(counts):
            if n:
                gate_up = F.linear(xs[start:start + n], w13[e]).float()
                h_ref[start:start + n] = (F.silu(gate_up[:, :I]) * gate_up[:, I:]).to(x.dtype)
                down_ref[start:start + n] = F.linear(h_ref[start:start + n], w2[e])
                start += n
        w_sorted = weights.reshape(-1)[pair]
        buf_ref = torch.empty_like(down_ref)
        buf_ref[pair] = (down_ref.float() * w_sorted[:, None]).to(x.dtype)
        sets.append(dict(x=x, weights=weights.reshape(-1).contiguous(), offsets=offsets, sorted_pair=sorted_pair,
                         h_ref=h_ref, buf_ref=buf_ref, hit=sum(1 for n in counts if n)))
    return sets


def _try(gemm, cfg, sets, w13, w2, decode):
    """(µs, error) of one config over the rotated sets, or raise."""
    from pykernels.triton import grouped_gemm

    rows = sets[0]["x"].shape[0] * TOP_K
    if gemm == "gate_up":
        def fn(i):
            s = sets[i]
            return grouped_gemm._gate_up(s["x"], w13, s["offsets"], s["sorted_pair"], TOP_K, rows, cfg)

        err = max(_rel(fn(i), sets[i]["h_ref"]) for i in range(len(sets)))
    else:
        bufs = [torch.empty_like(s["buf_ref"]) for s in sets]

        def fn(i):
            s = sets[i]
            grouped_gemm._down(s["h_ref"], w2, s["offsets"], s["sorted_pair"], s["weights"], bufs[i], cfg)

        for i in range(len(sets)):
            fn(i)
        err = max(_rel(bufs[i], sets[i]["buf_ref"]) for i in range(len(sets)))
    t = time_cuda(fn, n_sets=len(sets), graph=decode, budget=SWEEP_BUDGET).median_us
    return t, err


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--budget-s", type=float, default=210.0, help="stop starting new configs after this many seconds")
    p.add_argument("--only", help="run only the cases whose label contains this (lite, 236b, tp2, tp8)")
    p.add_argument("--compile-only", action="store_true",
                   help="no GPU needed: compile every candidate for sm_90a and report shared memory, registers, spills")
    args = p.parse_args(argv)
    if args.compile_only:
        return compile_report(args.out)
    if not torch.cuda.is_available():
        print("tune_moe: needs a CUDA GPU", file=sys.stderr)
        return 2
    from pykernels.triton.moe_configs import bucket_of

    start = time.monotonic()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": [], "best": {}}
    weights = {}
    scores: dict[tuple, dict] = {}  # key -> config -> list of (time / best of case)
    for label, E, H, I, T in CASES:
        if args.only and args.only not in label:
            continue
        if time.monotonic() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: stopping before {label} T={T}")
            break
        if (E, H, I) not in weights:
            weights.clear()
            torch.cuda.empty_cache()
            g = torch.Generator(device="cuda").manual_seed(0)
            weights[(E, H, I)] = ((torch.randn(E, 2 * I, H, generator=g, device="cuda") / H**0.5).to(torch.bfloat16),
                                  (torch.randn(E, H, I, generator=g, device="cuda") / I**0.5).to(torch.bfloat16))
        w13, w2 = weights[(E, H, I)]
        rows = T * TOP_K
        bucket = bucket_of(rows, E)
        decode = T <= 128
        sets = _case_sets(E, H, I, T, w13, w2, DECODE_SETS if decode else 1)
        hit = sum(s["hit"] for s in sets) / len(sets)
        for gemm in ("gate_up", "down"):
            key = (gemm, H, I, bucket)
            case = {"label": label, "E": E, "H": H, "I": I, "T": T, "gemm": gemm, "bucket": bucket,
                    "experts_hit": hit, "results": []}
            flops = 2 * rows * H * (2 * I if gemm == "gate_up" else I)
            weight_bytes = hit * (2 if gemm == "gate_up" else 1) * H * I * 2
            for cfg in candidates(gemm, bucket):
                if time.monotonic() - start > args.budget_s:
                    break
                entry = {"config": cfg._asdict()}
                try:
                    t, err = _try(gemm, cfg, sets, w13, w2, decode)
                    entry.update(us=round(t, 3), rel_err=err, ok=err <= MAX_REL_ERR,
                                 tflops=round(flops / t / 1e6, 1), weight_tbps=round(weight_bytes / t / 1e6, 3))
                except Exception as e:  # noqa: BLE001 - a failing config is reported, the sweep goes on
                    entry.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
                    if not isinstance(e, torch.OutOfMemoryError) and "out of resource" not in str(e):
                        traceback.print_exc(limit=2)
                case["results"].append(entry)
                print(f"{label:5} T={T:<5} {gemm:7} {bucket:7} {tuple(cfg)}: "
                      + (f"{entry['us']:9.1f} µs {entry['tflops']:7.1f} TFLOP/s {entry['weight_tbps']:6.2f} TB/s"
                         f" err {entry['rel_err']:.1e}" if "us" in entry else entry["error"][:120]), flush=True)
            good = [r for r in case["results"] if r.get("ok")]
            if good:
                best_us = min(r["us"] for r in good)
                case["best"] = min(good, key=lambda r: r["us"])["config"]
                for r in good:
                    scores.setdefault(key, {}).setdefault(tuple(r["config"].values()), []).append(r["us"] / best_us)
            report["cases"].append(case)
        del sets
        _summarise(report, scores)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    _summarise(report, scores)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.out} after {time.monotonic() - start:.0f} s; paste into TABLE in pykernels/triton/moe_configs.py:")
    for line in report["best"].values():
        print("    " + line["paste"])
    return 0


# Hopper's opt-in shared memory per block (227 KiB): a config above it fails at launch.
SM90_MAX_SHARED = 232448


def compile_report(out_path: str) -> int:
    """Compile each candidate's gate_up and down kernels (bf16, moe_ffn's gather/scatter variant, H and I
    multiples of 16 as at the model's shapes) for sm_90a without a GPU; write shared bytes, registers and
    stack/local bytes (spills, from the bundled cuobjdump) per config; exit 1 when one overflows shared
    memory or spills."""
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pykernels.triton import grouped_gemm

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    aligned = {"x_ptr", "w13_ptr", "h_ptr", "offsets_ptr", "pair_ptr", "w2_ptr", "out_ptr", "weights_ptr",
               "hidden", "inter", "stride_xm", "stride_we", "stride_wn", "stride_hm", "stride_om", "up_shift"}
    ints = ("num_rows", "hidden", "inter", "num_experts", "top_k", "stride_xm", "stride_wn", "stride_hm",
            "stride_om", "up_shift", "num_m_tiles")
    configs = {(gemm, c) for gemm in ("gate_up", "down") for b in ("decode", "small", "medium", "large")
               for c in candidates(gemm, b)}
    rows, bad = [], 0
    for gemm, cfg in sorted(configs):
        kernel = grouped_gemm._gate_up_kernel if gemm == "gate_up" else grouped_gemm._down_kernel
        desc = f"tensordesc<bf16[{cfg.block_n}, {cfg.block_k}]>" if cfg.tma else "*bf16"
        consts = dict(EVEN_K=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_E=256,
                      GROUP_M=cfg.group_m, DOT_PRECISION="tf32", USE_TMA=cfg.tma)
        if gemm == "gate_up":
            consts.update(GATHER=True, SINGLE_DOT=cfg.single_dot and not cfg.tma)
        else:
            consts.update(SCATTER=True)
        sig = {}
        for name in kernel.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_desc"):
                sig[name] = desc
            elif name == "stride_we":
                sig[name] = "i64"
            elif name in ints:
                sig[name] = "i32"
            else:
                sig[name] = "*fp32" if name == "weights_ptr" else "*bf16"
        sig.update({n: "*i32" for n in ("offsets_ptr", "pair_ptr")})
        attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in sig if n in aligned}
        entry = {"gemm": gemm, "config": cfg._asdict()}
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                                      target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            entry["shared"] = compiled.metadata.shared
            with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
                f.write(compiled.asm["cubin"])
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
            os.unlink(f.name)
            fields = dict(item.split(":", 1) for line in usage.splitlines() if "REG:" in line for item in line.split())
            entry.update(registers=int(fields["REG"]), stack=int(fields["STACK"]), local=int(fields["LOCAL"]))
            entry["ok"] = entry["shared"] <= SM90_MAX_SHARED and entry["stack"] == 0 and entry["local"] == 0
        except Exception as e:  # noqa: BLE001 - reported per config
            entry.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        bad += not entry["ok"]
        rows.append(entry)
        print(f"{gemm:7} {tuple(cfg)}: " + (f"shared {entry['shared']:6d}  registers {entry['registers']:3d}"
                                            f"  stack {entry['stack']}  local {entry['local']}" if "local" in entry
                                            else entry.get("error", "")) + ("" if entry["ok"] else "   <-- NOT OK"), flush=True)
    with open(out_path, "w") as f:
        json.dump({"triton": triton.__version__, "target": "sm_90a", "configs": rows}, f, indent=1)
    print(f"{len(rows)} kernels, {bad} not ok; wrote {out_path}")
    return 1 if bad else 0


def _summarise(report, scores) -> None:
    """Per key, the config with the lowest sum of (time / case best) over the cases where it ran and was right."""
    from pykernels.triton.moe_configs import GemmConfig

    for key, per_config in scores.items():
        cases = max(len(v) for v in per_config.values())
        complete = {c: v for c, v in per_config.items() if len(v) == cases}
        cfg, ratios = min(complete.items(), key=lambda kv: sum(kv[1]))
        gemm, H, I, bucket = key
        report["best"][f"{gemm} H{H} I{I} {bucket}"] = {
            "config": GemmConfig(*cfg)._asdict(), "cases": cases, "mean_ratio_to_case_best": sum(ratios) / cases,
            "paste": f'("{gemm}", {H}, {I}, "{bucket}"): GemmConfig{tuple(cfg)},',
        }


if __name__ == "__main__":
    sys.exit(main())
