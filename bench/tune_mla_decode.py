"""Tuning sweep for the Triton MLA decode kernel at the performance bar's shapes (GPU only).

    python -m bench.tune_mla_decode --out tune-mla_decode.json [--budget-s 225] [--only rows16]

For each group of shapes sharing a row count (q_len x heads: 16, 32 or 128 rows per sequence):

1. every kernel config of the group's grid (BLOCK_M, BLOCK_N, num_warps, num_stages, keys-major
   or rows-major) is timed once per shape at the split count the heuristic gives it;
2. the three best configs of the group are timed again over a range of split counts.

Every run is checked against the float32 reference (a wrong config is reported, never chosen),
and every config is guarded: a compile failure or a shared-memory overflow is reported and the
sweep goes on. Timings are CUDA-graph replays rotating input sets past the L2. The table printed
per shape gives µs, TB/s and % of the measured copy bandwidth, TFLOP/s and % of the bf16 matmul
rate; the summary proposes, per row group, the config with the best geometric mean over its
shapes (each at its best split count) and the ``waves`` value that reproduces those split counts:
copy them into ``CONFIG_TABLE`` in pykernels/triton/mla_decode.py. Results are written to the
JSON file after every shape, so a run stopped by the time budget still leaves what it measured.
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

from bench.bench_mla_decode import BLOCK_SIZE, HEAD_DIM, HEAD_DIM_V, make_inputs
from bench.harness import Budget, Context, time_cuda
from profiles import cost_model

# Short timings: a sweep compares configs, it does not publish numbers (bench_mla_decode does).
SWEEP_BUDGET = Budget(warmup_s=0.005, min_reps=5, max_reps=30, seconds=0.03)
# Phase 2 re-times this many configs of a group over split counts.
TOP_CONFIGS = 3
# A config whose output is further than this from the reference (relative, bf16) is wrong.
MAX_REL_ERR = 1e-2


def _cfg(block_m, block_n, num_warps, num_stages, swap_ab=False):
    from pykernels.triton.mla_decode import MLADecodeConfig

    # min_chunk = block_n: the sweep's explicit split counts are taken as given.
    return MLADecodeConfig(block_m, block_n, num_warps, num_stages, waves=2.0, min_chunk=block_n, swap_ab=swap_ab)


def groups():
    """Row groups: (name, share of the time budget, shapes [(q_len, heads, batch, seqlen, split counts
    to try)], kernel configs). A group may run until its cumulative share of the budget has passed."""
    return [
        ("rows16", 0.5, [
            (1, 16, 64, 4096, [1, 2, 3, 4, 6, 8]),
            (1, 16, 128, 8192, [1, 2, 3, 4]),
            (1, 16, 32, 32768, [2, 4, 6, 8, 12, 16]),
            (1, 16, 1, 32768, [32, 64, 96, 128, 192, 256]),
        ], [
            _cfg(16, 32, 4, 3), _cfg(16, 32, 4, 4), _cfg(16, 64, 4, 2), _cfg(16, 64, 4, 3), _cfg(16, 64, 8, 2),
            _cfg(16, 128, 8, 1),
            _cfg(16, 64, 4, 2, True), _cfg(16, 64, 4, 3, True), _cfg(16, 64, 8, 2, True), _cfg(16, 32, 4, 4, True),
            _cfg(16, 128, 8, 1, True),
        ]),
        ("rows32", 0.2, [
            (2, 16, 64, 4096, [1, 2, 3, 4, 6, 8]),
        ], [
            _cfg(32, 32, 4, 3), _cfg(32, 64, 4, 2), _cfg(32, 64, 8, 2), _cfg(32, 32, 8, 3),
            _cfg(32, 64, 4, 2, True), _cfg(32, 64, 8, 2, True), _cfg(32, 32, 4, 3, True),
        ]),
        ("rows128", 0.3, [
            (1, 128, 64, 4096, [1, 2, 3, 4]),
        ], [
            _cfg(64, 32, 8, 2), _cfg(64, 32, 8, 3), _cfg(64, 16, 8, 3), _cfg(64, 64, 8, 1), _cfg(64, 64, 8, 2),
            _cfg(128, 16, 16, 2), _cfg(128, 32, 16, 1), _cfg(32, 64, 4, 2),
            _cfg(64, 64, 8, 1, True), _cfg(64, 64, 8, 2, True),
        ]),
    ]


def config_name(c) -> str:
    return f"M{c.block_m}/N{c.block_n}/w{c.num_warps}/s{c.num_stages}/{'keys' if c.swap_ab else 'rows'}"


class Sweep:
    def __init__(self, args):
        from pykernels.triton import mla_decode as tmla

        self.tmla = tmla
        self.args = args
        self.ctx = Context(quick=True, results_dir=None, echo=False)
        self.ceil = self.ctx.ceilings
        self.sms = tmla.num_sms(self.ctx.device)
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.results: list[dict] = []
        self.dead = False  # a CUDA error that poisons the context: stop timing
        self.meta = {
            "device": self.ctx.device_name, "sms": self.sms, "torch": torch.__version__,
            "triton": __import__("triton").__version__, "copy_gbps": self.ceil.copy_gbps,
            "mm_tflops": self.ceil.mm_tflops, "block_size": BLOCK_SIZE,
        }

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def write(self, summary=None) -> None:
        with open(self.args.out, "w") as f:
            json.dump({"meta": self.meta, "results": self.results, "summary": summary}, f, indent=1)

    def measure(self, shape, inputs, ref, config, splits) -> dict:
        q_len, heads, batch, seqlen = shape
        rec = {"shape": {"b": batch, "q_len": q_len, "h": heads, "s": seqlen}, "config": dataclasses.asdict(config),
               "name": config_name(config), "splits": splits}
        if self.dead or self.out_of_time():
            rec["error"] = "skipped: CUDA context lost" if self.dead else "skipped: time budget"
            return rec
        causal = q_len > 1
        scale = HEAD_DIM**-0.5

        def fn(i):
            return self.tmla.mla_decode_triton(*inputs[i], HEAD_DIM_V, scale, causal, config=config, num_splits=splits)

        try:
            out, lse = fn(0)
            torch.cuda.synchronize()
            err = ((out.float() - ref[0]).norm() / ref[0].norm()).item()
            lse_err = (lse - ref[1]).abs().max().item()
            rec.update(rel_err=err, lse_err=lse_err)
            if not (err <= MAX_REL_ERR and lse_err <= 1e-2):
                rec["error"] = f"wrong: relative error {err:.2e}, lse error {lse_err:.2e}"
                return rec
            t = time_cuda(fn, len(inputs), graph=True, budget=SWEEP_BUDGET, device=self.ctx.device).median_us
        except Exception as e:  # noqa: BLE001 - compile failure, out of shared memory, ...: report, go on
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            rec["error"] = msg
            if "illegal" in msg.lower() or "unspecified launch failure" in msg.lower():
                self.dead = True
            return rec
        cost = cost_model.mla_decode(batch, q_len, heads, batch * seqlen, HEAD_DIM, HEAD_DIM_V, elem_bytes=2)
        rec.update(time_us=t, gbps=cost.bytes / (t * 1e3), tflops=cost.flops / (t * 1e6),
                   frac_copy=cost.bytes / (t * 1e3) / self.ceil.copy_gbps,
                   frac_mm=cost.flops / (t * 1e6) / self.ceil.mm_tflops)
        return rec

    def heuristic_splits(self, shape, config) -> int:
        q_len, heads, batch, seqlen = shape
        row_blocks = math.ceil(q_len * heads / config.block_m)
        capacity = math.ceil(seqlen / BLOCK_SIZE) * BLOCK_SIZE
        return self.tmla.choose_num_splits(batch, row_blocks, capacity, dataclasses.replace(config, min_chunk=256),
                                           self.sms)

    def run_group(self, name, shapes, configs) -> list[dict]:
        group_results = []
        for q_len, heads, batch, seqlen, split_list in shapes:
            shape = (q_len, heads, batch, seqlen)
            if self.out_of_time() or self.dead:
                break
            n_sets = self.ctx.sets_for(batch * seqlen * HEAD_DIM * 2)
            inputs = [make_inputs(q_len, heads, batch, seqlen, device=self.ctx.device, seed=i) for i in range(n_sets)]
            from pykernels.mla_decode import mla_decode_reference

            ref_out, ref_lse = mla_decode_reference(*(x.float() if x.is_floating_point() else x for x in inputs[0]),
                                                    HEAD_DIM_V, HEAD_DIM**-0.5, q_len > 1)
            ref = (ref_out.float(), ref_lse)
            rows = []
            for config in configs:  # phase 1: every config at its heuristic split count
                rows.append(self.measure(shape, inputs, ref, config, self.heuristic_splits(shape, config)))
            ranked = sorted((r for r in rows if "time_us" in r), key=lambda r: r["time_us"])
            seen = {(r["name"], r["splits"]) for r in rows}
            for best in ranked[:TOP_CONFIGS]:  # phase 2: the best configs over split counts
                config = next(c for c in configs if config_name(c) == best["name"])
                for splits in split_list:
                    if (best["name"], splits) not in seen:
                        seen.add((best["name"], splits))
                        rows.append(self.measure(shape, inputs, ref, config, splits))
            for r in rows:
                r["group"] = name
            self.results.extend(rows)
            group_results.extend(rows)
            self.print_shape(shape, rows)
            self.write()
            del inputs, ref, ref_out, ref_lse
            torch.cuda.empty_cache()
        return group_results

    def print_shape(self, shape, rows) -> None:
        q_len, heads, batch, seqlen = shape
        print(f"\n== q_len={q_len} h={heads} b={batch} s={seqlen}  (copy {self.ceil.copy_gbps:.0f} GB/s,"
              f" mm {self.ceil.mm_tflops:.0f} TFLOP/s)")
        print(f"  {'config':<26} {'splits':>6} {'µs':>9} {'TB/s':>6} {'%copy':>6} {'TFLOP/s':>8} {'%mm':>5}")
        for r in sorted(rows, key=lambda r: r.get("time_us", math.inf)):
            if "time_us" in r:
                print(f"  {r['name']:<26} {r['splits']:>6} {r['time_us']:>9.2f} {r['gbps'] / 1e3:>6.2f}"
                      f" {100 * r['frac_copy']:>6.1f} {r['tflops']:>8.1f} {100 * r['frac_mm']:>5.1f}")
            else:
                print(f"  {r['name']:<26} {r['splits']:>6}  {r['error']}")
        sys.stdout.flush()

    def summarise(self, name, rows) -> dict | None:
        """The config with the best geometric mean over the group's shapes (each at its best split
        count, shapes where it did not run count as missing), and the waves that give those splits."""
        timed = [r for r in rows if "time_us" in r]
        if not timed:
            return None
        shapes = sorted({json.dumps(r["shape"], sort_keys=True) for r in timed})
        best_time = {s: min(r["time_us"] for r in timed if json.dumps(r["shape"], sort_keys=True) == s) for s in shapes}
        scores = {}
        for cname in {r["name"] for r in timed}:
            ratios, splits = [], {}
            for s in shapes:
                mine = [r for r in timed if r["name"] == cname and json.dumps(r["shape"], sort_keys=True) == s]
                if not mine:
                    break
                fastest = min(mine, key=lambda r: r["time_us"])
                ratios.append(fastest["time_us"] / best_time[s])
                splits[s] = fastest["splits"]
            else:
                scores[cname] = (statistics.geometric_mean(ratios), splits)
        if not scores:
            return None
        cname, (score, splits) = min(scores.items(), key=lambda kv: kv[1][0])
        config = next(r["config"] for r in timed if r["name"] == cname)
        waves = []
        for s, n in splits.items():
            shape = json.loads(s)
            row_blocks = math.ceil(shape["q_len"] * shape["h"] / config["block_m"])
            waves.append(n * shape["b"] * row_blocks / self.sms)
        best = {s: min((r for r in timed if json.dumps(r["shape"], sort_keys=True) == s), key=lambda r: r["time_us"])
                for s in shapes}
        return {
            "group": name, "config": config, "name": cname, "slowdown_vs_best_per_shape": score,
            "splits_per_shape": splits, "suggested_waves": statistics.median(waves),
            "best_per_shape": {s: {k: best[s][k] for k in ("name", "splits", "time_us", "frac_copy", "frac_mm")}
                               for s in shapes},
        }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--budget-s", type=float, default=225.0, help="stop starting new timings after this long")
    parser.add_argument("--only", default=None, help="comma-separated row groups (rows16, rows32, rows128)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_mla_decode: needs a CUDA GPU; nothing to do")
        with open(args.out, "w") as f:
            json.dump({"meta": {"skipped": "no CUDA GPU"}, "results": [], "summary": None}, f)
        return 0
    sweep = Sweep(args)
    wanted = set(args.only.split(",")) if args.only else None
    summary = []
    chosen = [g for g in groups() if not wanted or g[0] in wanted]
    total_share, used_share = sum(g[1] for g in chosen), 0.0
    for name, share, shapes, configs in chosen:
        used_share += share
        sweep.deadline = sweep.start + args.budget_s * used_share / total_share
        try:
            rows = sweep.run_group(name, shapes, configs)
        except Exception:  # noqa: BLE001 - a broken group must not lose the others' results
            traceback.print_exc()
            rows = [r for r in sweep.results if r.get("group") == name]
        s = sweep.summarise(name, rows)
        if s is not None:
            summary.append(s)
        sweep.write(summary)
    print(f"\n== summary ({time.monotonic() - sweep.start:.0f} s; copy {sweep.ceil.copy_gbps:.0f} GB/s,"
          f" mm {sweep.ceil.mm_tflops:.0f} TFLOP/s)")
    for s in summary:
        c = s["config"]
        print(f"  {s['group']}: {s['name']} (x{s['slowdown_vs_best_per_shape']:.3f} of the best per shape), "
              f"waves ~{s['suggested_waves']:.2f}")
        print(f"    MLADecodeConfig(block_m={c['block_m']}, block_n={c['block_n']}, num_warps={c['num_warps']}, "
              f"num_stages={c['num_stages']}, waves={s['suggested_waves']:.2f}, min_chunk=256, swap_ab={c['swap_ab']})")
        for shape, b in s["best_per_shape"].items():
            print(f"    best at {shape}: {b['name']} splits={b['splits']} {b['time_us']:.2f} µs "
                  f"{100 * b['frac_copy']:.1f}% copy {100 * b['frac_mm']:.1f}% mm")
    sweep.write(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
