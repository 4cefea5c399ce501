"""Launch-shape sweep for the Triton routing kernel of pk.moe_route (GPU only, about a minute).

    python -m bench.tune_route --out tune-route.json [--budget-s 240] [--only lite|236b]
    python -m bench.tune_route --out compile.json --compile-only    # no GPU: registers, spills, shuffles

At bench_moe's routing rows (float32 router logits, top-6: Lite E 64 greedy, 236B E 160 in 8 groups keeping
3; T = 64 and 8192) every launch shape (rows per program x warps per program) is timed as bench_moe times
the kernel: CUDA-graph replays over ``ctx.sets_for`` rotated input sets, against the same peer
(bench_moe.eager_gate, also as graph replays; the bar is >= 5x that peer). Each shape is first checked
against moe_route_reference on one set and on a tie-heavy input (small integers: equal logits everywhere),
ids exactly and weights to 1e-5; a wrong one is reported, never timed. Results go to the JSON after every
routing row; the end prints per row the default launch (pykernels.triton.moe_route.launch_shape, one
warp) and the fastest one, as µs and x the peer.

(The kernel's code variants were swept the same way and folded into one:
bench/results/nvidia-h200/tune/route.json.)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch

from bench import bench_moe
from bench.harness import Budget, Context, time_cuda
from profiles import cost_model

# A sweep compares candidates a few percent apart at ~2 µs: a few hundred graph replays each.
SWEEP_BUDGET = Budget(warmup_s=0.02, min_reps=20, max_reps=100, seconds=0.15)
BAR = 5.0  # the routing bar: x the eager torch gate
TOP_K = bench_moe.TOP_K
# (rows per program, warps per program); shapes that leave a warp's lanes idle or hold more than
# MAX_ELEMENTS_PER_THREAD logits a thread are skipped.
LAUNCHES = [(1, 1), (2, 1), (4, 1), (8, 1), (16, 1), (2, 2), (4, 4), (8, 2)]
MAX_ELEMENTS_PER_THREAD = 32


def shapes(only: str | None):
    """(model, T, E, method, n_group, topk_group, scale) of bench_moe's routing rows."""
    out = []
    for T in bench_moe.ROUTE_T:  # T = 64 first: the bar at stake is Lite's decode row
        for model, (E, _, _, method, n_group, topk_group, scale) in bench_moe.MODELS.items():
            if only and only not in model:
                continue
            if method == "greedy":
                n_group, topk_group = 1, 1
            out.append((model, T, E, method, n_group, topk_group, scale))
    return out


def launches_for(T: int, E: int, n_group: int) -> list[tuple[int, int, bool]]:
    """(block_t, num_warps, is the default) of the launch shapes that fit (see LAUNCHES), the default first."""
    from pykernels.triton import moe_route as route

    block_t, block_g, block_s = route.launch_shape(T, E, n_group)
    default = (block_t, route.NUM_WARPS)
    out = [(*default, True)]
    for bt, warps in LAUNCHES:
        per_thread = bt * block_g * block_s / (32 * warps)
        if (bt, warps) != default and 1 <= per_thread <= MAX_ELEMENTS_PER_THREAD and bt <= max(1, T):
            out.append((bt, warps, False))
    return out


def sweep_row(ctx: Context, model, T, E, method, n_group, topk_group, scale) -> list[dict]:
    """Time every launch shape of one routing row (and the peer); a wrong or failing shape is reported."""
    from pykernels.moe_route import moe_route_reference
    from pykernels.triton.moe_route import moe_route_triton

    n_sets = ctx.sets_for(cost_model.moe_route(T, E, TOP_K, logit_bytes=4).bytes)
    g = torch.Generator(device=ctx.device).manual_seed(T * 1000 + E)
    logits = [torch.randn(T, E, generator=g, device=ctx.device) for _ in range(n_sets)]
    ties = torch.randint(-2, 3, (T, E), generator=g, device=ctx.device).float()  # equal logits everywhere
    refs = [moe_route_reference(x, TOP_K, n_group, topk_group, scale, False) for x in (logits[0], ties)]
    peer = time_cuda(lambda i: bench_moe.eager_gate(logits[i], TOP_K, method, n_group, topk_group, scale),
                     n_sets, graph=True, budget=SWEEP_BUDGET, device=ctx.device).median_us
    print(f"\n== {model} T={T} E={E} ({method}): peer (eager gate) {peer:.2f} µs, bar {BAR:g}x -> "
          f"<= {peer / BAR:.2f} µs", flush=True)
    rows = []
    for block_t, warps, default in launches_for(T, E, n_group):
        rec = dict(model=model, T=T, E=E, n_sets=n_sets, peer_us=peer, block_t=block_t, num_warps=warps,
                   default_launch=default)

        def call(i, x=None):
            return moe_route_triton(logits[i] if x is None else x, TOP_K, n_group, topk_group, scale, False,
                                    block_t=block_t, num_warps=warps)
        try:
            for x, (ref_w, ref_ids) in zip((logits[0], ties), refs):
                w, ids = call(0, x)
                if not torch.equal(ids, ref_ids):
                    raise AssertionError("ids differ from moe_route_reference")
                torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-7)
            t = time_cuda(call, n_sets, graph=True, budget=SWEEP_BUDGET, device=ctx.device).median_us
        except Exception as e:  # noqa: BLE001 - a compile failure or a wrong result: report it, time the others
            rec["error"] = f"{type(e).__name__}: {str(e).strip()[:200]}"
            print(f"  .. {block_t} rows x {warps} warps: {rec['error']}", flush=True)
        else:
            rec.update(time_us=t, x_peer=peer / t)
            print(f"  .. {block_t:>2} rows x {warps} warps{' (default)' if default else '          '}: {t:7.3f} µs "
                  f"{peer / t:5.2f}x peer", flush=True)
        rows.append(rec)
    return rows


def summarise(results: list[dict]) -> list[dict]:
    """Per routing row: the default launch and the fastest, with x the peer and whether the bar is met."""
    out = []
    for model, T in dict.fromkeys((r["model"], r["T"]) for r in results):
        timed = [r for r in results if (r["model"], r["T"]) == (model, T) and "time_us" in r]
        default = next((r for r in timed if r["default_launch"]), None)
        if default is None:
            continue
        best = min(timed, key=lambda r: r["time_us"])
        out.append({"model": model, "T": T, "peer_us": default["peer_us"],
                    **{k: {f: r[f] for f in ("block_t", "num_warps", "time_us", "x_peer")}
                       for k, r in (("default", default), ("best", best))},
                    "bar_met": default["x_peer"] >= BAR})
    return out


def compile_kernel(T: int, E: int, n_group: int, topk_group: int, block_t: int | None = None,
                   num_warps: int | None = None, cuobjdump: str | None = None) -> dict:
    """Compile the routing kernel for sm_90a as moe_route_triton launches it (float32 logits, top-6, not
    normalised; default launch unless given) without a GPU. Returns registers, stack and local bytes (spills),
    shared bytes, the SASS instruction count and its warp shuffles, redux.sync reductions and barriers; ``ok``
    means no spills. A compile failure is returned as ``error``. ``cuobjdump``: default, triton's own."""
    import collections
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pykernels.triton import moe_route as route

    default_block_t, block_g, block_s = route.launch_shape(T, E, n_group)
    block_t, num_warps = block_t or default_block_t, num_warps or route.NUM_WARPS
    kernel = route._moe_route_kernel
    consts = dict(GROUP_SIZE=E // n_group, TOP_K=TOP_K, N_GROUP=n_group, TOPK_GROUP=topk_group, NORM=False,
                  BLOCK_T=block_t, BLOCK_G=block_g, BLOCK_S=block_s)
    sig = {n: "constexpr" for n in consts}
    sig.update(logits_ptr="*fp32", weights_ptr="*fp32", ids_ptr="*i32", num_tokens="i32", stride_t="i32",
               scale="fp32")
    # The launch's specialisation: 16-byte aligned pointers, and the integers that are multiples of 16.
    aligned = ["logits_ptr", "weights_ptr", "ids_ptr"] + ["stride_t"] * (E % 16 == 0) + ["num_tokens"] * (T % 16 == 0)
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    entry = {"T": T, "E": E, "n_group": n_group, "block_t": block_t, "num_warps": num_warps,
             "default_launch": (block_t, num_warps) == (default_block_t, route.NUM_WARPS)}
    cuobjdump = cuobjdump or os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
        usage, sass = (subprocess.run([cuobjdump, flag, f.name], capture_output=True, text=True).stdout
                       for flag in ("-res-usage", "-sass"))
        os.unlink(f.name)
    except Exception as e:  # noqa: BLE001 - reported per kernel
        return dict(entry, ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    fields = dict(item.split(":", 1) for line in usage.splitlines() if "REG:" in line for item in line.split())
    ops = collections.Counter(re.findall(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass))
    entry.update(registers=int(fields["REG"]), stack=int(fields["STACK"]), local=int(fields["LOCAL"]),
                 shared=compiled.metadata.shared,
                 instructions=sum(n for op, n in ops.items() if op not in ("NOP", "BRA")),
                 shuffles=sum(n for op, n in ops.items() if op.startswith("SHFL")),
                 redux=sum(n for op, n in ops.items() if op.startswith("REDUX")),
                 barriers=sum(n for op, n in ops.items() if op.startswith("BAR")))
    entry["ok"] = entry["stack"] == 0 and entry["local"] == 0
    return entry


def describe(entry: dict) -> str:
    """One line of a compile_kernel entry."""
    head = (f"moe_route T={entry['T']:<5} E={entry['E']:<4} {entry['block_t']:>2} rows x {entry['num_warps']} warps"
            f"{' (default)' if entry['default_launch'] else ''}: ")
    if "error" in entry:
        return head + entry["error"][:150] + "   <-- NOT OK"
    return head + (f"{entry['instructions']:5d} instr {entry['shuffles']:4d} shfl {entry['redux']:3d} redux "
                   f"{entry['barriers']:3d} bar  reg {entry['registers']:3d} stack {entry['stack']} "
                   f"local {entry['local']} shared {entry['shared']}") + ("" if entry["ok"] else "   <-- NOT OK")


def compile_report(out_path: str, only: str | None) -> int:
    """compile_kernel at every launch shape of each routing row; exit 1 when a default launch is not ok."""
    import triton

    rows = []
    for _, T, E, _, n_group, topk_group, _ in shapes(only):
        for block_t, warps, _ in launches_for(T, E, n_group):
            rows.append(compile_kernel(T, E, n_group, topk_group, block_t, warps))
            print(describe(rows[-1]), flush=True)
    bad = sum(not r["ok"] and r["default_launch"] for r in rows)
    with open(out_path, "w") as f:
        json.dump({"triton": triton.__version__, "target": "sm_90a", "kernels": rows}, f, indent=1)
    print(f"{len(rows)} kernels, {bad} at a default launch not ok; wrote {out_path}")
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--budget-s", type=float, default=240.0, help="start no routing row after this long")
    parser.add_argument("--only", help="only the model whose name contains this (lite, 236b)")
    parser.add_argument("--compile-only", action="store_true",
                        help="no GPU needed: compile every launch shape for sm_90a; registers, spills, shuffles")
    args = parser.parse_args(argv)
    if args.compile_only:
        return compile_report(args.out, args.only)
    meta = {"torch": torch.__version__, "triton": __import__("triton").__version__, "bar_x_peer": BAR}
    if not torch.cuda.is_available():
        print("tune_route: needs a CUDA GPU; nothing to do")
        with open(args.out, "w") as f:
            json.dump({"meta": dict(meta, skipped="no CUDA GPU"), "results": [], "summary": None}, f)
        return 0
    ctx = Context(quick=True, results_dir=None, echo=False)
    meta["device"] = ctx.device_name
    print(f"tune_route: {ctx.device_name}, torch {meta['torch']}, triton {meta['triton']}", flush=True)
    start, results = time.monotonic(), []

    def write(summary=None):
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results, "summary": summary}, f, indent=1)
    for shape in shapes(args.only):
        if time.monotonic() - start > args.budget_s:
            break
        try:
            results += sweep_row(ctx, *shape)
        except Exception:  # noqa: BLE001 - a broken routing row must not lose the others' results
            traceback.print_exc()
        write()
    summary = summarise(results)
    write(summary)
    print(f"\n== summary ({time.monotonic() - start:.0f} s; bar: {BAR:g}x the eager gate)")
    for s in summary:
        d, b = s["default"], s["best"]
        print(f"  {s['model']:4} T={s['T']:<5} default {d['block_t']} rows x {d['num_warps']} warps: "
              f"{d['time_us']:6.2f} µs = {d['x_peer']:5.2f}x {'(bar met)' if s['bar_met'] else '(bar NOT met)'}; "
              f"fastest {b['block_t']} rows x {b['num_warps']} warps: {b['time_us']:6.2f} µs = {b['x_peer']:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
