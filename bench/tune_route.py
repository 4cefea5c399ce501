"""Tuning sweep for the Triton routing kernel of pk.moe_route (GPU only, about 3 minutes).

    python -m bench.tune_route --out tune-route.json [--budget-s 240] [--only lite|236b]
    python -m bench.tune_route --out compile.json --compile-only    # no GPU: registers, spills, shuffles

At bench_moe's routing rows (float32 router logits, top-6: Lite E 64 greedy, 236B E 160 in 8 groups keeping
3; T = 64 and 8192), timed as bench_moe times them: CUDA-graph replays over ``ctx.sets_for`` rotated input
sets, against the same peer (bench_moe.eager_gate, also as graph replays; the bar is >= 5x that peer).

1. Every code variant (pykernels.triton.moe_route.Variant: ranking method, row max from round 0, scattered
   stores, descending tile) at the launch the kernel takes by default (rows per program, one warp).
2. The launch shapes (rows per program x warps per program) with the best variant of part 1 for the shape.

"before" is the kernel as it was (int64 keys, a float row-max reduction, a [T, K] output tile, ascending
tile, the default launch), timed first and again last per shape: the gap between the two says how far the
machine drifted meanwhile. Each candidate is first checked against moe_route_reference on one set and on
a tie-heavy input (small integers: equal logits everywhere), ids exactly and weights to 1e-5; a wrong one
is reported, never timed. Results go to the JSON after every shape; the end prints per shape the fastest
candidate and the speed-up over the peer, and per variant the geometric mean (over shapes) of its time at
the default launch over "before".
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
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
ROUTE_T = bench_moe.ROUTE_T
# (rows per program, warps per program) tried in part 2; rows that leave a warp's lanes idle or hold more
# than MAX_ELEMENTS_PER_THREAD logits a thread are skipped.
LAUNCHES = [(1, 1), (2, 1), (4, 1), (8, 1), (16, 1), (2, 2), (4, 4), (8, 2)]
MAX_ELEMENTS_PER_THREAD = 32


def variants():
    """Every valid Variant (RANK_DISTINCT finds no ids to put in a tile, so it always scatters)."""
    from pykernels.triton import moe_route as route

    out = []
    for ranking, max_from_top, scatter, reverse in itertools.product(
            (route.RANK_INT64.value, route.RANK_VALUE_ID.value, route.RANK_DISTINCT.value),
            (False, True), (False, True), (False, True)):
        if ranking == route.RANK_DISTINCT.value and not scatter:
            continue
        out.append(route.Variant(ranking, max_from_top, scatter, reverse))
    return out


def before_variant():
    from pykernels.triton import moe_route as route

    return route.Variant(route.RANK_INT64.value, max_from_top=False, scatter=False, reverse=False)


def name_of(variant) -> str:
    ranking = ("int64", "value-id", "distinct")[variant.ranking]
    return (f"{ranking}{' max0' if variant.max_from_top else ''}{' scatter' if variant.scatter else ' tile'}"
            f"{' rev' if variant.reverse else ''}")


def launches_for(T: int, E: int, n_group: int):
    """Part 2's launch shapes for a shape: (block_t, num_warps) that fit (see LAUNCHES)."""
    import triton

    tile = triton.next_power_of_2(n_group) * triton.next_power_of_2(E // n_group)
    out = []
    for block_t, warps in LAUNCHES:
        per_thread = block_t * tile / (32 * warps)
        if per_thread >= 1 and per_thread <= MAX_ELEMENTS_PER_THREAD and block_t <= max(1, T):
            out.append((block_t, warps))
    return out


def shapes(only: str | None):
    """(model, T, E, method, n_group, topk_group, scale) of bench_moe's routing rows."""
    out = []
    for T in ROUTE_T:  # T = 64 first: the bar at stake is Lite's decode row
        for model, (E, _, _, method, n_group, topk_group, scale) in bench_moe.MODELS.items():
            if only and only not in model:
                continue
            if method == "greedy":
                n_group, topk_group = 1, 1
            out.append((model, T, E, method, n_group, topk_group, scale))
    return out


class Sweep:
    def __init__(self, args):
        self.args = args
        self.ctx = Context(quick=True, results_dir=None, echo=False)
        self.device = self.ctx.device
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.results: list[dict] = []
        self.dead = False  # a CUDA error that poisons the context: stop timing
        self.meta = {"device": self.ctx.device_name, "torch": torch.__version__,
                     "triton": __import__("triton").__version__, "bar_x_peer": BAR}

    def write(self, summary=None) -> None:
        with open(self.args.out, "w") as f:
            json.dump({"meta": self.meta, "results": self.results, "summary": summary}, f, indent=1)

    def over(self) -> bool:
        return self.dead or time.monotonic() > self.deadline

    def run_shape(self, model, T, E, method, n_group, topk_group, scale) -> None:
        from pykernels.moe_route import moe_route_reference
        from pykernels.triton import moe_route as route

        cost = cost_model.moe_route(T, E, TOP_K, logit_bytes=4)
        n_sets = self.ctx.sets_for(cost.bytes)
        g = torch.Generator(device=self.device).manual_seed(T * 1000 + E)
        logits = [torch.randn(T, E, generator=g, device=self.device) for _ in range(n_sets)]
        ties = torch.randint(-2, 3, (T, E), generator=g, device=self.device).float()  # equal logits everywhere
        refs = [moe_route_reference(x, TOP_K, n_group, topk_group, scale, False) for x in (logits[0], ties)]
        peer = time_cuda(lambda i: bench_moe.eager_gate(logits[i], TOP_K, method, n_group, topk_group, scale),
                         n_sets, graph=True, budget=SWEEP_BUDGET, device=self.device).median_us
        default = route.default_launch(T, E, n_group)
        base = dict(model=model, T=T, E=E, n_sets=n_sets, peer_us=peer)
        print(f"\n== {model} T={T} E={E} ({method}): peer (eager gate) {peer:.2f} µs, bar {BAR:g}x -> "
              f"<= {peer / BAR:.2f} µs; default launch {default.block_t} rows x {default.num_warps} warp",
              flush=True)

        def measure(part, variant, block_t, warps):
            launch = route.Launch(block_t, warps, default.block_g, default.block_s, variant)
            rec = dict(base, part=part, variant=variant._asdict(), name=name_of(variant), block_t=block_t,
                       num_warps=warps, default_launch=(block_t, warps) == (default.block_t, default.num_warps))
            if self.over():
                rec["error"] = "skipped: CUDA context lost" if self.dead else "skipped: time budget"
                return rec

            def call(i, x=None):
                return route.moe_route_triton(logits[i] if x is None else x, TOP_K, n_group, topk_group, scale,
                                              False, launch)
            try:
                for x, (ref_w, ref_ids) in zip((logits[0], ties), refs):
                    w, ids = call(0, x)
                    if not torch.equal(ids, ref_ids):
                        raise AssertionError("ids differ from moe_route_reference")
                    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-7)
                t = time_cuda(call, n_sets, graph=True, budget=SWEEP_BUDGET, device=self.device).median_us
            except Exception as e:  # noqa: BLE001 - a compile failure, a wrong result or a launch error: go on
                msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                rec["error"] = msg
                print(f"  .. {rec['name']} {block_t}x{warps}: {msg}", flush=True)
                if "illegal" in msg.lower() or "unspecified launch failure" in msg.lower():
                    self.dead = True
                return rec
            rec.update(time_us=t, x_peer=peer / t)
            print(f"  .. {part:7} {rec['name']:<30} {block_t:>2} rows x {warps} warps: {t:7.3f} µs "
                  f"{peer / t:5.2f}x peer  [{time.monotonic() - self.start:.0f} s]", flush=True)
            return rec

        rows = [measure("before", before_variant(), default.block_t, default.num_warps)]
        rows += [measure("variant", v, default.block_t, default.num_warps) for v in variants()]
        timed = [r for r in rows if "time_us" in r and r["part"] == "variant"]
        if timed:
            best = min(timed, key=lambda r: r["time_us"])
            best_variant = route.Variant(**best["variant"])
            rows += [measure("launch", best_variant, bt, w) for bt, w in launches_for(T, E, n_group)
                     if (bt, w) != (default.block_t, default.num_warps)]
        rows.append(measure("after", before_variant(), default.block_t, default.num_warps))
        self.results.extend(rows)
        self.write()

    def summarise(self) -> dict:
        timed = [r for r in self.results if "time_us" in r]
        summary = {"shapes": [], "variants": []}
        cases = sorted({(r["model"], r["T"]) for r in timed}, key=lambda c: (c[1], c[0]))
        before = {}
        for model, T in cases:
            mine = [r for r in timed if (r["model"], r["T"]) == (model, T)]
            b = [r["time_us"] for r in mine if r["part"] in ("before", "after")]
            if not b:
                continue
            before[(model, T)] = b[0]
            best = min((r for r in mine if r["part"] in ("variant", "launch")), key=lambda r: r["time_us"],
                       default=None)
            if best is None:
                continue
            summary["shapes"].append({
                "model": model, "T": T, "E": best["E"], "peer_us": best["peer_us"], "before_us": b,
                "best": {k: best[k] for k in ("name", "variant", "block_t", "num_warps", "time_us", "x_peer")},
                "bar_met": best["x_peer"] >= BAR})
        for name in dict.fromkeys(r["name"] for r in timed if r["part"] == "variant"):
            ratios = {f"{r['model']} T={r['T']}": r["time_us"] / before[(r["model"], r["T"])]
                      for r in timed if r["part"] == "variant" and r["name"] == name and (r["model"], r["T"]) in before}
            if len(ratios) == len(before):
                summary["variants"].append({"name": name, "geomean_vs_before": statistics.geometric_mean(
                    list(ratios.values())), "vs_before": ratios})
        summary["variants"].sort(key=lambda v: v["geomean_vs_before"])
        return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop starting new timings after this long")
    parser.add_argument("--only", help="only the model whose name contains this (lite, 236b)")
    parser.add_argument("--compile-only", action="store_true",
                        help="no GPU needed: compile every candidate for sm_90a; registers, spills, shuffles, barriers")
    args = parser.parse_args(argv)
    if args.compile_only:
        return compile_report(args.out, args.only)
    if not torch.cuda.is_available():
        print("tune_route: needs a CUDA GPU; nothing to do")
        with open(args.out, "w") as f:
            json.dump({"meta": {"skipped": "no CUDA GPU"}, "results": [], "summary": None}, f)
        return 0
    sweep = Sweep(args)
    print(f"tune_route: {sweep.meta['device']}, torch {sweep.meta['torch']}, triton {sweep.meta['triton']}", flush=True)
    for shape in shapes(args.only):
        if sweep.over():
            break
        try:
            sweep.run_shape(*shape)
        except Exception:  # noqa: BLE001 - a broken shape must not lose the others' results
            traceback.print_exc()
    summary = sweep.summarise()
    sweep.write(summary)
    print(f"\n== summary ({time.monotonic() - sweep.start:.0f} s)")
    print_summary(summary)
    return 0


def print_summary(summary: dict) -> None:
    print(f"best per shape (bar: {BAR:g}x the eager gate):")
    for s in summary["shapes"]:
        b = s["best"]
        print(f"  {s['model']:4} T={s['T']:<5} before {min(s['before_us']):6.2f} µs; best {b['name']}, "
              f"{b['block_t']} rows x {b['num_warps']} warps: {b['time_us']:6.2f} µs = {b['x_peer']:5.2f}x "
              f"{'(bar met)' if s['bar_met'] else '(bar NOT met)'}")
    from pykernels.triton import moe_route as route

    default = next((v for v in summary["variants"] if v["name"] == name_of(route.DEFAULT_VARIANT)), None)
    if default:
        print(f"default variant ({default['name']}): {default['geomean_vs_before']:.3f} of before (geometric mean)")
    print("variants at the default launch, time / before: geometric mean over the shapes, then per shape:")
    for v in summary["variants"][:8]:
        print(f"  {v['name']:<30} {v['geomean_vs_before']:.3f}  "
              + "  ".join(f"{case} {r:.2f}" for case, r in v["vs_before"].items()))


def compile_report(out_path: str, only: str | None) -> int:
    """Compile every candidate (variant x launch) at each routing row for sm_90a without a GPU; write and print
    registers, stack and local bytes (spills: exit 1 when a default launch spills), shared bytes, and the SASS
    counts of warp shuffles, redux.sync reductions and barriers."""
    import collections
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pykernels.triton import moe_route as route

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    kernel = route._moe_route_kernel
    rows, bad = [], 0
    for model, T, E, _, n_group, topk_group, _ in shapes(only):
        default = route.default_launch(T, E, n_group)
        candidates = [(v, default.block_t, default.num_warps) for v in dict.fromkeys([before_variant()] + variants())]
        candidates += [(v, bt, w) for v in (route.DEFAULT_VARIANT,) for bt, w in launches_for(T, E, n_group)
                       if (bt, w) != (default.block_t, default.num_warps)]
        for variant, block_t, warps in candidates:
            consts = dict(NUM_EXPERTS=E, GROUP_SIZE=E // n_group, TOP_K=TOP_K, N_GROUP=n_group, TOPK_GROUP=topk_group,
                          NORM=False, BLOCK_T=block_t, BLOCK_G=default.block_g, BLOCK_S=default.block_s, BLOCK_K=8,
                          RANKING=variant.ranking, MAX_FROM_TOP=variant.max_from_top, SCATTER=variant.scatter,
                          REVERSE=variant.reverse)
            sig = {n: "constexpr" for n in consts}
            sig.update(logits_ptr="*fp32", weights_ptr="*fp32", ids_ptr="*i32", num_tokens="i32", stride_t="i32",
                       scale="fp32")
            attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]]
                     for n in ("logits_ptr", "weights_ptr", "ids_ptr", "stride_t")}
            entry = {"model": model, "T": T, "E": E, "name": name_of(variant), "variant": variant._asdict(),
                     "block_t": block_t, "num_warps": warps,
                     "default_launch": (block_t, warps) == (default.block_t, default.num_warps)}
            try:
                compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
                with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
                    f.write(compiled.asm["cubin"])
                usage = subprocess.run([f"{bindir}/cuobjdump", "-res-usage", f.name], capture_output=True,
                                       text=True).stdout
                sass = subprocess.run([f"{bindir}/cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
                os.unlink(f.name)
                fields = dict(item.split(":", 1) for line in usage.splitlines() if "REG:" in line
                              for item in line.split())
                ops = collections.Counter(re.findall(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass))
                entry.update(registers=int(fields["REG"]), stack=int(fields["STACK"]), local=int(fields["LOCAL"]),
                             shared=compiled.metadata.shared,
                             instructions=sum(n for op, n in ops.items() if op not in ("NOP", "BRA")),
                             shuffles=sum(n for op, n in ops.items() if op.startswith("SHFL")),
                             redux=sum(n for op, n in ops.items() if op.startswith("REDUX")),
                             barriers=sum(n for op, n in ops.items() if op.startswith("BAR")))
                entry["ok"] = entry["stack"] == 0 and entry["local"] == 0
            except Exception as e:  # noqa: BLE001 - reported per candidate
                entry.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            bad += not entry["ok"] and entry["default_launch"]
            rows.append(entry)
            print(f"{model:4} T={T:<5} {entry['name']:<30} {block_t:>2} rows x {warps} warps: "
                  + (f"{entry['instructions']:5d} instr {entry['shuffles']:4d} shfl {entry['redux']:3d} redux "
                     f"{entry['barriers']:3d} bar  reg {entry['registers']:3d} stack {entry['stack']} "
                     f"local {entry['local']} shared {entry['shared']}" if "registers" in entry
                     else entry["error"][:150]) + ("" if entry["ok"] else "   <-- NOT OK"), flush=True)
    with open(out_path, "w") as f:
        json.dump({"triton": triton.__version__, "target": "sm_90a", "kernels": rows}, f, indent=1)
    print(f"{len(rows)} kernels, {bad} at a default launch not ok; wrote {out_path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
