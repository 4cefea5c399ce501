"""Tuning sweep for the rope kernels (Triton and CUDA) at the performance bar's shapes (GPU only).

    python -m bench.tune_rope --out tune-rope.json [--budget-s 170] [--only prefill|decode]

For both ops (apply_rotary, rope_and_cache) and every shape of the bar (prefill T = 16384 at h16 and h128,
decode T = 1, 16, 64, 256 at h16 and h128; inputs as bench/bench_rope.py makes them), every launch variant
of both backends is first checked against the torch reference (a wrong variant is reported, never timed),
then timed as CUDA-graph replays over rotated input sets. Printed per shape, fastest first: µs, TB/s and
% of the measured copy bandwidth over the cost model's bytes; for decode also the multiple of an empty
kernel launch (the bar: <= 1.5x) and of the floor (the empty launch plus the bytes at copy bandwidth: no
launch can beat it). The default launch of each backend is marked "default".

The summary gives, per phase and backend, the variant with the best geometric mean over the phase's
shapes and ops (time relative to the best variant of that backend per shape) and what it costs against
the default; and per shape which backend is faster at its best and at its default (what ``backend=None``
should pick). Results are written to the JSON file after every shape, so a run stopped by the time
budget still leaves what it measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
import traceback

import torch
import triton

import pykernels as pk
from bench import bench_rope
from bench.harness import Budget, Context, time_cuda
from profiles import cost_model
from pykernels import _backend, _ext
from pykernels import rope as rope_mod
from pykernels.rope import CudaLaunch, cuda_launch_for
from pykernels.triton.rope import TritonLaunch, launch_for

# Short timings: a sweep compares variants, it does not publish numbers (bench_rope does).
SWEEP_BUDGET = Budget(warmup_s=0.005, min_reps=5, max_reps=30, seconds=0.03)
# A variant further than this from the torch reference (relative, bf16) is wrong.
MAX_REL_ERR = 1e-2
PREFILL_T = bench_rope.PREFILL_T
DECODE_T = bench_rope.DECODE_T
HEADS = bench_rope.HEADS
OPS = ("apply_rotary", "rope_and_cache")


def cuda_variants(phase: str):
    if phase == "prefill":
        return [CudaLaunch(threads=t, units_per_thread=u, streaming=s)
                for t in (64, 128, 256) for u in (1, 2, 4, 8) for s in (False, True)]
    return [CudaLaunch(threads=t, units_per_thread=u) for t in (32, 64, 128, 256) for u in (1, 2)]


def triton_variants(phase: str):
    # Each variant is a compile (~1-2 s) per op and specialisation: the lists are kept short.
    if phase == "prefill":
        shapes = [(8, 16, 4), (16, 16, 4), (16, 16, 8), (32, 16, 8), (16, 8, 4), (32, 8, 8), (8, 32, 4), (8, 8, 2)]
        evict = [(16, 16, 4), (16, 16, 8), (32, 16, 8)]
        return [TritonLaunch(*s) for s in shapes] + [TritonLaunch(*s, evict_first=True) for s in evict]
    shapes = [(1, 16, 4), (1, 16, 2), (1, 32, 4), (1, 64, 4), (2, 16, 4), (4, 16, 4), (16, 16, 4)]
    return [TritonLaunch(*s) for s in shapes]


def launch_name(launch) -> str:
    if hasattr(launch, "threads"):
        return f"t{launch.threads}/u{launch.units_per_thread}{'/cs' if launch.streaming else ''}"
    return f"T{launch.block_t}/H{launch.block_h}/w{launch.num_warps}{'/ef' if launch.evict_first else ''}"


def default_launch(backend: str, T: int, h: int, device: torch.device):
    """The launch the op takes when none is given (pykernels' defaults), for the bench's bf16 shapes."""
    if backend == "cuda":
        return cuda_launch_for(T, h, bench_rope.ROTARY_DIM, bench_rope.KV_LORA_RANK, 2, device)
    return launch_for(T, h, device)


def effective(backend: str, launch, h: int):
    """The launch as the kernel sees it (Triton clamps block_h to the heads), to drop duplicates."""
    if backend == "triton":
        return dataclasses.replace(launch, block_h=min(launch.block_h, triton.next_power_of_2(h)))
    return launch


class Sweep:
    def __init__(self, args):
        self.args = args
        self.ctx = Context(quick=True, results_dir=None, echo=False)
        self.device = self.ctx.device
        self.copy_gbps = self.ctx.ceilings.copy_gbps
        self.empty_us, empty_kind = bench_rope.empty_launch(self.ctx)
        self.backends = [b for b in ("triton", "cuda")
                         if (b == "triton" and _backend.triton_usable(self.device))
                         or (b == "cuda" and _ext.available() and hasattr(_ext.require(), "rope_rows"))]
        self.rope = pk.YarnRotary(max_position=163840, device=self.device)
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.results: list[dict] = []
        self.dead = False  # a CUDA error that poisons the context: stop timing
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.meta = {"device": self.ctx.device_name, "sms": sms,
                     "torch": torch.__version__, "triton": triton.__version__,
                     "copy_gbps": self.copy_gbps, "empty_launch_us": self.empty_us, "empty_launch": empty_kind,
                     "backends": self.backends}
        print(f"tune_rope: {self.ctx.device_name}, copy {self.copy_gbps:.0f} GB/s, empty launch "
              f"{self.empty_us:.3f} µs [{empty_kind}], backends {self.backends}", flush=True)

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def write(self, summary=None) -> None:
        with open(self.args.out, "w") as f:
            json.dump({"meta": self.meta, "results": self.results, "summary": summary}, f, indent=1)

    def run_shape(self, phase: str, T: int, h: int) -> None:
        dtype = torch.bfloat16
        q_dim = bench_rope.KV_LORA_RANK + bench_rope.ROTARY_DIM if phase == "decode" else \
            bench_rope.NOPE_DIM + bench_rope.ROTARY_DIM
        costs = {"apply_rotary": cost_model.apply_rotary(T, h, bench_rope.ROTARY_DIM, elem_bytes=2),
                 "rope_and_cache": cost_model.rope_and_cache(T, h, bench_rope.KV_LORA_RANK, bench_rope.ROTARY_DIM,
                                                             elem_bytes=2)}
        n_sets = self.ctx.sets_for(costs["rope_and_cache"].bytes)
        sets = [bench_rope.make_set(T, h, q_dim, dtype, self.device, seed=i, max_position=self.rope.max_position)
                for i in range(n_sets)]
        q_pes = [s["q"][..., -bench_rope.ROTARY_DIM:].contiguous() for s in sets]
        rope, flag = self.rope, rope_mod.error_flag(self.device)
        table = (rope.cos_sin_cache, rope.inv_freq, rope.cos_sin_scale)

        def call(op, i, backend, launch):
            s = sets[i]
            if op == "apply_rotary":
                return rope_mod._apply_rotary_impl(q_pes[i], s["k_pe"], s["positions"], *table, flag,
                                                   rope.interleaved, backend, launch)
            return rope_mod._rope_and_cache_impl(s["q"], s["kv_latent"], s["k_pe"], s["positions"], *table,
                                                 s["k_cache"], s["slot_mapping"], flag, rope.interleaved, backend,
                                                 launch)

        q0, cache0 = sets[0]["q"].clone(), sets[0]["k_cache"].clone()  # set 0 before any timing rotates it

        def outputs(op, backend, launch) -> tuple[torch.Tensor, ...]:
            """The op's outputs on set 0 (rope_and_cache: on copies of set 0's first q and cache)."""
            s = sets[0]
            if op == "apply_rotary":
                return call(op, 0, backend, launch)
            q, cache = q0.clone(), cache0.clone()
            rope_mod._rope_and_cache_impl(q, s["kv_latent"], s["k_pe"], s["positions"], *table, cache,
                                          s["slot_mapping"], flag, rope.interleaved, backend, launch)
            return q, cache

        references = {op: outputs(op, "torch", None) for op in OPS}

        def check(op, backend, launch) -> float:
            """Relative error of the variant's outputs against the torch backend's."""
            return max(_rel(g, r) for g, r in zip(outputs(op, backend, launch), references[op]))

        for op in OPS:
            cost = costs[op]
            rows = []
            for backend in self.backends:
                default = effective(backend, default_launch(backend, T, h, self.device), h)
                variants = (cuda_variants if backend == "cuda" else triton_variants)(phase)
                seen = []
                for launch in [default] + variants:
                    launch = effective(backend, launch, h)
                    if launch in seen:
                        continue
                    seen.append(launch)
                    rec = {"phase": phase, "op": op, "shape": {"T": T, "h": h}, "backend": backend,
                           "launch": launch_name(launch), "default": launch == default,
                           "launch_fields": dataclasses.asdict(launch)}
                    rows.append(rec)
                    if self.dead or self.out_of_time():
                        rec["error"] = "skipped: CUDA context lost" if self.dead else "skipped: time budget"
                        continue
                    try:
                        err = check(op, backend, launch)
                        rec["rel_err"] = err
                        if not err <= MAX_REL_ERR:
                            rec["error"] = f"wrong: relative error {err:.2e}"
                            continue
                        t = time_cuda(lambda i, op=op, b=backend, lch=launch: call(op, i, b, lch), n_sets, graph=True,
                                      budget=SWEEP_BUDGET, device=self.device).median_us
                    except Exception as e:  # noqa: BLE001 - compile failure, bad launch: report, go on
                        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                        rec["error"] = msg
                        if "illegal" in msg.lower() or "unspecified launch failure" in msg.lower():
                            self.dead = True
                        continue
                    gbps = cost.bytes / (t * 1e3)
                    rec.update(time_us=t, gbps=gbps, frac_copy=gbps / self.copy_gbps, bytes=cost.bytes)
                    if phase == "decode":
                        floor = self.empty_us + cost.bytes / (self.copy_gbps * 1e3)
                        rec.update(x_empty_launch=t / self.empty_us, floor_us=floor, x_floor=t / floor)
            rope_mod.check_errors(self.device)
            self.results.extend(rows)
            self.print_rows(phase, op, T, h, cost.bytes, rows)
            self.write()

    def print_rows(self, phase, op, T, h, nbytes, rows) -> None:
        ideal = nbytes / (self.copy_gbps * 1e3)
        head = f"\n== {op} T={T} h={h}  ({nbytes / 1e6:.2f} MB; {ideal:.2f} µs at copy {self.copy_gbps:.0f} GB/s"
        if phase == "decode":
            head += f"; empty launch {self.empty_us:.3f} µs, floor {self.empty_us + ideal:.3f} µs, bar " \
                    f"{1.5 * self.empty_us:.3f} µs"
        print(head + ")")
        cols = f"  {'backend':<7} {'launch':<16} {'µs':>9} {'TB/s':>6} {'%copy':>6}"
        print(cols + (f" {'xempty':>7} {'xfloor':>7}" if phase == "decode" else ""))
        for r in sorted(rows, key=lambda r: r.get("time_us", math.inf)):
            mark = "  default" if r["default"] else ""
            if "time_us" not in r:
                print(f"  {r['backend']:<7} {r['launch']:<16}  {r['error']}{mark}")
                continue
            line = (f"  {r['backend']:<7} {r['launch']:<16} {r['time_us']:>9.3f} {r['gbps'] / 1e3:>6.2f}"
                    f" {100 * r['frac_copy']:>6.1f}")
            if phase == "decode":
                line += f" {r['x_empty_launch']:>7.2f} {r['x_floor']:>7.2f}"
            print(line + mark)
        sys.stdout.flush()

    def summarise(self) -> dict:
        """Per phase and backend: the variant with the best geometric mean (relative to that backend's best
        per shape and op) over the phase's cases; per case: the faster backend at its best and at its default."""
        out = {"best_variant": [], "backend_per_case": []}
        timed = [r for r in self.results if "time_us" in r]
        for phase in ("prefill", "decode"):
            cases = sorted({(r["op"], r["shape"]["T"], r["shape"]["h"]) for r in timed if r["phase"] == phase})
            for backend in self.backends:
                mine = [r for r in timed if r["phase"] == phase and r["backend"] == backend]
                per_case = {c: [r for r in mine if (r["op"], r["shape"]["T"], r["shape"]["h"]) == c] for c in cases}
                per_case = {c: v for c, v in per_case.items() if v}
                if not per_case:
                    continue
                best = {c: min(r["time_us"] for r in v) for c, v in per_case.items()}
                scores = {}
                for name in {r["launch"] for r in mine}:
                    ratios = [next((r["time_us"] for r in v if r["launch"] == name), math.inf) / best[c]
                              for c, v in per_case.items()]
                    if all(math.isfinite(x) for x in ratios):
                        scores[name] = statistics.geometric_mean(ratios)
                defaults = [next((r["time_us"] for r in v if r["default"]), math.inf) / best[c]
                            for c, v in per_case.items()]
                if not scores:
                    continue
                name = min(scores, key=scores.get)
                fields = next(r["launch_fields"] for r in mine if r["launch"] == name)
                out["best_variant"].append({
                    "phase": phase, "backend": backend, "launch": name, "fields": fields,
                    "slowdown_vs_best_per_case": scores[name],
                    "default_slowdown_vs_best_per_case": statistics.geometric_mean(defaults)
                    if all(math.isfinite(x) for x in defaults) else None})
            for c in cases:
                rows = [r for r in timed if r["phase"] == phase and (r["op"], r["shape"]["T"], r["shape"]["h"]) == c]
                at_best = {b: min((r for r in rows if r["backend"] == b), key=lambda r: r["time_us"], default=None)
                           for b in self.backends}
                at_default = {b: next((r for r in rows if r["backend"] == b and r["default"]), None)
                              for b in self.backends}
                entry = {"phase": phase, "op": c[0], "T": c[1], "h": c[2]}
                for label, picks in (("best", at_best), ("default", at_default)):
                    picks = {b: r for b, r in picks.items() if r is not None}
                    if picks:
                        b, r = min(picks.items(), key=lambda kv: kv[1]["time_us"])
                        entry[label] = {"backend": b, "launch": r["launch"], "time_us": r["time_us"],
                                        "frac_copy": r["frac_copy"], "x_empty_launch": r.get("x_empty_launch"),
                                        "others": {ob: orr["time_us"] for ob, orr in picks.items() if ob != b}}
                out["backend_per_case"].append(entry)
        return out

    def print_summary(self, summary: dict) -> None:
        print(f"\n== summary ({time.monotonic() - self.start:.0f} s; copy {self.copy_gbps:.0f} GB/s, empty launch "
              f"{self.empty_us:.3f} µs)")
        for s in summary["best_variant"]:
            d = s["default_slowdown_vs_best_per_case"]
            default = "-" if d is None else f"x{d:.3f}"
            print(f"  {s['phase']:<7} {s['backend']:<6} best overall {s['launch']:<16} "
                  f"x{s['slowdown_vs_best_per_case']:.3f} of the per-case best (default: {default})  {s['fields']}")
        print(f"  {'phase':<7} {'op':<14} {'T':>6} {'h':>4}  {'fastest at best':<36} {'fastest at default':<36}")
        for e in summary["backend_per_case"]:
            cells = []
            for label in ("best", "default"):
                r = e.get(label)
                if r is None:
                    cells.append("-")
                    continue
                if e["phase"] == "prefill":
                    extra = f"{100 * r['frac_copy']:.1f}%"
                else:
                    extra = f"x{r['x_empty_launch']:.2f} empty"
                others = ",".join(f"{b} {t:.2f}" for b, t in r["others"].items())
                cells.append(f"{r['backend']} {r['launch']} {r['time_us']:.2f}µs {extra}"
                             + (f" ({others})" if others else ""))
            print(f"  {e['phase']:<7} {e['op']:<14} {e['T']:>6} {e['h']:>4}  {cells[0]:<36} {cells[1]:<36}")
        sys.stdout.flush()


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().nan_to_num(), ref.float().nan_to_num()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--budget-s", type=float, default=170.0, help="stop starting new timings after this long")
    parser.add_argument("--only", choices=("prefill", "decode"), default=None, help="one phase only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_rope: needs a CUDA GPU; nothing to do")
        with open(args.out, "w") as f:
            json.dump({"meta": {"skipped": "no CUDA GPU"}, "results": [], "summary": None}, f)
        return 0
    sweep = Sweep(args)
    shapes = [("prefill", PREFILL_T, h) for h in HEADS] + [("decode", T, h) for h in HEADS for T in DECODE_T]
    for phase, T, h in shapes:
        if args.only and phase != args.only:
            continue
        try:
            sweep.run_shape(phase, T, h)
        except Exception:  # noqa: BLE001 - a broken shape must not lose the others' results
            traceback.print_exc()
        torch.cuda.empty_cache()
    summary = sweep.summarise()
    sweep.print_summary(summary)
    sweep.write(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
