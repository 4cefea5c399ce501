"""Tuning sweep for the Triton rope kernel's prefill launch (GPU only): tokens per program.

    python -m bench.tune_rope --out tune-rope.json [--tokens 16384,2048] [--heads 16,128] [--budget-s 240]

For pk.apply_rotary and pk.rope_and_cache at the bar's prefill shapes (bench/bench_rope.py's inputs: q
[T, h, 192] with the rope part in its last 64 columns, bf16, interleaved, random positions and cache slots)
every launch choice is checked once against the torch backend (a wrong one is reported, never timed), then
timed as CUDA-graph replays over input sets rotated past the L2. The choices are the values of the knob the
Triton launcher reads for T > 256:

    PYKERNELS_ROPE_TOKENS_PER_PROGRAM  1 (the decode launch: one token a program), 2, 4, 8

(A CUDA variant with 1 to 8 heads or latent units per thread was swept on the H200 and dropped: at h16 it
was 1-12 points below the one-unit-a-thread kernel, at h128 at most 1.6 points above;
bench/results/nvidia-h200/tune/rope.json.)

Printed per shape, fastest first: µs, TB/s and % of the measured copy bandwidth over the cost model's
bytes (the bar: >= 80 %); "table" marks the choice the launcher makes without the knob. The summary gives,
per backend, the choice with the best geometric mean over the ops and shapes of each token count (what
its table should say for that T) and the best % of copy per op and shape. Results are written to the JSON
file after every shape, so a run stopped by the time budget still leaves what it measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

import pykernels as pk
from bench import bench_rope
from bench.harness import Budget, Context, time_cuda
from profiles import cost_model
from pykernels import _backend

# Short timings: a sweep compares launch choices, it does not publish numbers (bench_rope does).
SWEEP_BUDGET = Budget(warmup_s=0.01, min_reps=10, max_reps=50, seconds=0.1)
# A choice further than this from the torch backend (relative, bf16) is wrong.
MAX_REL_ERR = 1e-2
KNOBS = {"triton": ("PYKERNELS_ROPE_TOKENS_PER_PROGRAM", ("1", "2", "4", "8"))}
OPS = ("apply_rotary", "rope_and_cache")
BAR = 0.80  # the prefill bar: fraction of the copy bandwidth


def table_choice(backend: str, T: int) -> str:
    """The choice the launcher makes for T tokens without the knob."""
    from pykernels.triton import rope as triton_rope

    return str(triton_rope.tokens_per_program(T))


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


class Sweep:
    def __init__(self, args):
        self.args = args
        self.ctx = Context(quick=True, results_dir=None, echo=False)
        self.device = self.ctx.device
        self.copy_gbps = self.ctx.ceilings.copy_gbps
        self.backends = ["triton"] if _backend.triton_usable(self.device) else []
        self.rope = pk.YarnRotary(max_position=163840, device=self.device)
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.results: list[dict] = []
        self.dead = False  # a CUDA error that poisons the context: stop timing
        self.meta = {"device": self.ctx.device_name, "torch": torch.__version__,
                     "triton": __import__("triton").__version__, "copy_gbps": self.copy_gbps,
                     "backends": self.backends, "knobs": {b: KNOBS[b][0] for b in self.backends}}
        print(f"tune_rope: {self.ctx.device_name}, copy {self.copy_gbps:.0f} GB/s, backends {self.backends}",
              flush=True)

    def write(self, summary=None) -> None:
        with open(self.args.out, "w") as f:
            json.dump({"meta": self.meta, "results": self.results, "summary": summary}, f, indent=1)

    def run_shape(self, T: int, h: int) -> None:
        dtype, d = torch.bfloat16, bench_rope.ROTARY_DIM
        costs = {"apply_rotary": cost_model.apply_rotary(T, h, d, elem_bytes=2),
                 "rope_and_cache": cost_model.rope_and_cache(T, h, bench_rope.KV_LORA_RANK, d, elem_bytes=2)}
        n_sets = self.ctx.sets_for(costs["rope_and_cache"].bytes)
        q_dim = bench_rope.NOPE_DIM + d
        sets = [bench_rope.make_set(T, h, q_dim, dtype, self.device, seed=i, max_position=self.rope.max_position)
                for i in range(n_sets)]
        q_pes = [s["q"][..., -d:].contiguous() for s in sets]
        calls = {
            "apply_rotary": lambda i, b: pk.apply_rotary(q_pes[i], sets[i]["k_pe"], sets[i]["positions"], self.rope,
                                                         backend=b),
            "rope_and_cache": lambda i, b: pk.rope_and_cache(rope=self.rope, backend=b, **sets[i]),
        }
        rows = []
        for op in OPS:
            for backend in self.backends:
                knob, values = KNOBS[backend]
                for value in values:
                    rows.append(self.measure(op, backend, knob, value, T, h, calls[op], n_sets, sets[0], q_pes[0],
                                             costs[op].bytes))
        self.results.extend(rows)
        self.print_shape(T, h, rows)
        self.write()

    def check(self, op: str, backend: str, s: dict, q_pe: torch.Tensor) -> float:
        """Relative error of ``backend`` against the torch backend on the set's current values (timing
        rotates rope_and_cache's q in place, so the reference is taken now, on copies)."""
        if op == "apply_rotary":
            ref = pk.apply_rotary(q_pe, s["k_pe"], s["positions"], self.rope, backend="torch")
            out = pk.apply_rotary(q_pe, s["k_pe"], s["positions"], self.rope, backend=backend)
        else:
            ref, out = (s["q"].clone(), s["k_cache"].clone()), (s["q"].clone(), s["k_cache"].clone())
            for (q, cache), b in ((ref, "torch"), (out, backend)):
                pk.rope_and_cache(q, s["kv_latent"], s["k_pe"], s["positions"], self.rope, cache, s["slot_mapping"],
                                  backend=b)
        pk.rope.check_errors(self.device)
        return max(rel(a, b) for a, b in zip(out, ref))

    def measure(self, op, backend, knob, value, T, h, call, n_sets, s0, q_pe0, nbytes) -> dict:
        rec = {"op": op, "backend": backend, "shape": {"T": T, "h": h}, "knob": knob, "value": value,
               "table": value == table_choice(backend, T)}
        if self.dead or time.monotonic() > self.deadline:
            rec["error"] = "skipped: CUDA context lost" if self.dead else "skipped: time budget"
            return rec
        old = os.environ.get(knob)
        os.environ[knob] = value
        try:
            err = self.check(op, backend, s0, q_pe0)
            rec["rel_err"] = err
            if not err <= MAX_REL_ERR:
                rec["error"] = f"wrong: relative error {err:.2e} against the torch backend"
                print(f"  .. {op} {backend} {value}: {rec['error']}", flush=True)
                return rec
            t = time_cuda(lambda i: call(i, backend), n_sets, graph=True, budget=SWEEP_BUDGET,
                          device=self.device).median_us
        except Exception as e:  # noqa: BLE001 - a compile failure or a launch error: report, go on
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            rec["error"] = msg
            print(f"  .. {op} {backend} {value}: {msg}", flush=True)
            if "illegal" in msg.lower() or "unspecified launch failure" in msg.lower():
                self.dead = True
            return rec
        finally:
            if old is None:
                os.environ.pop(knob, None)
            else:
                os.environ[knob] = old
        gbps = nbytes / (t * 1e3)
        rec.update(time_us=t, gbps=gbps, frac_copy=gbps / self.copy_gbps)
        print(f"  .. {op} T={T} h={h} {backend} {knob}={value}: {t:.2f} µs, {100 * rec['frac_copy']:.1f}% copy"
              f"  [{time.monotonic() - self.start:.0f} s]", flush=True)
        return rec

    def print_shape(self, T, h, rows) -> None:
        print(f"\n== T={T} h={h}  (copy {self.copy_gbps:.0f} GB/s; bar {100 * BAR:.0f} %)")
        print(f"  {'op':<15} {'backend':<7} {'choice':>6} {'µs':>9} {'TB/s':>6} {'%copy':>6}")
        for r in sorted(rows, key=lambda r: (r["op"], r.get("time_us", math.inf))):
            mark = "  table" if r["table"] else ""
            if "time_us" in r:
                print(f"  {r['op']:<15} {r['backend']:<7} {r['value']:>6} {r['time_us']:>9.2f} {r['gbps'] / 1e3:>6.2f}"
                      f" {100 * r['frac_copy']:>6.1f}{mark}")
            else:
                print(f"  {r['op']:<15} {r['backend']:<7} {r['value']:>6}  {r['error']}{mark}")
        sys.stdout.flush()

    def summarise(self) -> list[dict]:
        """Per backend and token count: the choice with the best geometric mean (time over the best choice
        of that op and shape) across ops and heads, and per op and shape the best and the table's % copy."""
        summary = []
        timed = [r for r in self.results if "time_us" in r]
        for backend in self.backends:
            for T in sorted({r["shape"]["T"] for r in timed}):
                mine = [r for r in timed if r["backend"] == backend and r["shape"]["T"] == T]
                cases = sorted({(r["op"], r["shape"]["h"]) for r in mine})
                best = {c: min(r["time_us"] for r in mine if (r["op"], r["shape"]["h"]) == c) for c in cases}
                scores = {}
                for value in KNOBS[backend][1]:
                    times = {(r["op"], r["shape"]["h"]): r["time_us"] for r in mine if r["value"] == value}
                    if cases and all(c in times for c in cases):
                        scores[value] = statistics.geometric_mean([times[c] / best[c] for c in cases])
                if not scores:
                    continue
                choice = min(scores, key=scores.get)
                per_case = {}
                for op, h in cases:
                    rs = [r for r in mine if (r["op"], r["shape"]["h"]) == (op, h)]
                    fastest = min(rs, key=lambda r: r["time_us"])
                    table = next((r for r in rs if r["table"]), None)
                    per_case[f"{op} h={h}"] = {"best": fastest["value"], "best_frac_copy": fastest["frac_copy"],
                                               "table_frac_copy": table["frac_copy"] if table else None}
                summary.append({"backend": backend, "T": T, "knob": KNOBS[backend][0], "choice": choice,
                                "table": table_choice(backend, T), "slowdown_vs_best": scores[choice],
                                "scores": scores, "cases": per_case})
        return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--tokens", default="16384,2048", help="comma-separated token counts (each > 256)")
    parser.add_argument("--heads", default=",".join(str(h) for h in bench_rope.HEADS), help="comma-separated heads")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop starting new timings after this long")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_rope: needs a CUDA GPU; nothing to do")
        with open(args.out, "w") as f:
            json.dump({"meta": {"skipped": "no CUDA GPU"}, "results": [], "summary": None}, f)
        return 0
    tokens = [int(t) for t in args.tokens.split(",")]
    if any(t <= 256 for t in tokens):
        parser.error("--tokens: the knobs act only above 256 tokens")
    sweep = Sweep(args)
    for T in tokens:
        for h in (int(x) for x in args.heads.split(",")):
            if sweep.dead or time.monotonic() > sweep.deadline:
                break
            try:
                sweep.run_shape(T, h)
            except Exception:  # noqa: BLE001 - a broken shape must not lose the others' results
                traceback.print_exc()
            torch.cuda.empty_cache()
    summary = sweep.summarise()
    sweep.write(summary)
    print(f"\n== summary ({time.monotonic() - sweep.start:.0f} s; copy {sweep.copy_gbps:.0f} GB/s, "
          f"bar {100 * BAR:.0f} %)")
    for s in summary:
        print(f"  {s['backend']} T={s['T']}: best {s['knob']}={s['choice']} (x{s['slowdown_vs_best']:.3f} of the best "
              f"per case); the table gives {s['table']}")
        for case, c in s["cases"].items():
            table = "-" if c["table_frac_copy"] is None else f"{100 * c['table_frac_copy']:.1f}%"
            print(f"    {case:<22} best {c['best']}: {100 * c['best_frac_copy']:.1f}% copy; table: {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
