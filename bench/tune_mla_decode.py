"""Tuning sweep for the Triton MLA decode kernel at the performance bar's shapes (GPU only).

    python -m bench.tune_mla_decode --out tune-mla_decode.json [--budget-s 225] [--only rows16] [--skip NAME,..]
    python -m bench.tune_mla_decode --out tune-mla_decode_splits.json --split-grid

``--split-grid`` times the table's 16-row config over a grid of (batch, length) x split counts and
prints, per shape, the best split count against the one ``choose_num_splits`` picks: the data the
split model's constants (PROGRAM_COST_TILES, CO_RESIDENT_SPEEDUP) are fitted to.

Each row group runs in its own process; a config that kills the CUDA context (an illegal memory
access) is reported and its group is rerun without it, so the sweep still covers the rest.

For each group of shapes sharing a row count (q_len x heads: 16, 32 or 128 rows per sequence):

1. every kernel config of the group's grid (BLOCK_M, BLOCK_N, num_warps, num_stages, programs per
   SM) is timed once per shape at the split count the heuristic gives it;
2. the three best configs of the group are timed again over a range of split counts.

Every run is checked against the float32 reference (a wrong config is reported, never chosen),
and every config is guarded: a compile failure or a shared-memory overflow is reported and the
sweep goes on. Timings are CUDA-graph replays rotating input sets past the L2. The table printed
per shape gives µs, TB/s and % of the measured copy bandwidth, TFLOP/s and % of the bf16 matmul
rate; the summary proposes, per row group, the config with the best geometric mean over its
shapes (each at its best split count) and the split model (programs_per_sm, PROGRAM_COST_TILES)
whose picks come closest to that config's best split counts: copy them into ``CONFIG_TABLE`` and
``PROGRAM_COST_TILES`` in pykernels/triton/mla_decode.py. Results are written to the
JSON file after every shape, so a run stopped by the time budget still leaves what it measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
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
# The split model's parameters fitted by the summary: (programs_per_sm, program_cost_tiles).
SPLIT_MODELS = [(ppsm, cost) for ppsm in (1, 2) for cost in (1.0, 2.0, 3.0, 4.0, 6.0)]
# --split-grid: (batch, length) shapes at h16, q_len 1, each timed at these split counts (those that give
# a split at least one 32-row tile and at most ~600 programs) and at the model's pick.
SPLIT_GRID_SHAPES = [(1, 32768), (1, 16384), (1, 8192), (1, 4096), (2, 32768), (4, 32768), (8, 8192), (16, 4096),
                     (32, 4096), (64, 4096), (32, 32768), (128, 8192)]
SPLIT_GRID_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384)
SPLIT_GRID_MAX_PROGRAMS = 600


def _cfg(block_m, block_n, num_warps, num_stages, ppsm=1):
    from pykernels.triton.mla_decode import MLADecodeConfig

    # min_chunk = block_n: the sweep's explicit split counts are taken as given.
    return MLADecodeConfig(block_m, block_n, num_warps, num_stages, programs_per_sm=ppsm,
                           min_chunk=block_n)


def groups():
    """Row groups: (name, share of the time budget, shapes [(q_len, heads, batch, seqlen, split counts
    to try)], kernel configs). A group may run until its cumulative share of the budget has passed."""
    return [
        ("rows16", 0.5, [
            (1, 16, 64, 4096, [1, 2, 3, 4, 6]),
            (1, 16, 128, 8192, [1, 2, 3, 4]),
            (1, 16, 32, 32768, [2, 4, 6, 8, 12, 16]),
            (1, 16, 1, 32768, [64, 96, 128, 192, 256, 384]),
        ], [
            _cfg(16, 64, 4, 3), _cfg(16, 64, 8, 3), _cfg(16, 32, 4, 3, ppsm=2),
            _cfg(16, 32, 4, 4), _cfg(16, 16, 4, 4, ppsm=2),
        ]),
        ("rows32", 0.2, [
            (2, 16, 64, 4096, [1, 2, 3, 4, 6, 8]),
        ], [
            _cfg(32, 64, 8, 3), _cfg(32, 32, 8, 3, ppsm=2), _cfg(32, 32, 8, 4), _cfg(32, 32, 4, 3, ppsm=2),
            _cfg(32, 64, 4, 3), _cfg(16, 32, 4, 3, ppsm=2),
        ]),
        ("rows128", 0.3, [
            (1, 128, 64, 4096, [1, 2, 3, 4]),
        ], [
            _cfg(64, 32, 8, 4), _cfg(64, 32, 8, 3), _cfg(32, 64, 8, 3), _cfg(32, 32, 8, 4), _cfg(16, 64, 4, 3),
        ]),
    ]


def config_name(c) -> str:
    ppsm = f"/{c.programs_per_sm}perSM" if c.programs_per_sm != 1 else ""
    return f"M{c.block_m}/N{c.block_n}/w{c.num_warps}/s{c.num_stages}{ppsm}"


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
            return self.tmla.mla_decode_triton(*inputs[i], HEAD_DIM_V, scale, causal, config=config, num_splits=splits,
                                           fallback=False)

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
            print(f"  .. {rec['name']} splits={splits}: {msg}", flush=True)
            if "illegal" in msg.lower() or "unspecified launch failure" in msg.lower():
                self.dead = True
                self.meta["dead_config"] = rec["name"]
            return rec
        cost = cost_model.mla_decode(batch, q_len, heads, batch * seqlen, HEAD_DIM, HEAD_DIM_V, elem_bytes=2)
        rec.update(time_us=t, gbps=cost.bytes / (t * 1e3), tflops=cost.flops / (t * 1e6),
                   frac_copy=cost.bytes / (t * 1e3) / self.ceil.copy_gbps,
                   frac_mm=cost.flops / (t * 1e6) / self.ceil.mm_tflops)
        print(f"  .. {rec['name']} splits={splits}: {t:.2f} µs, {100 * rec['frac_copy']:.1f}% copy,"
              f" {100 * rec['frac_mm']:.1f}% mm  [{time.monotonic() - self.start:.0f} s]", flush=True)
        return rec

    def heuristic_splits(self, shape, config, programs_per_sm=1, program_cost_tiles=None) -> int:
        """The split count choose_num_splits gives ``config`` (with the table's min_chunk)."""
        q_len, heads, batch, seqlen = shape
        row_blocks = math.ceil(q_len * heads / config.block_m)
        capacity = math.ceil(seqlen / BLOCK_SIZE) * BLOCK_SIZE
        table_min_chunk = self.tmla.default_config(q_len * heads, 2).min_chunk
        model = dataclasses.replace(config, min_chunk=table_min_chunk, programs_per_sm=programs_per_sm)
        cost = self.tmla.PROGRAM_COST_TILES if program_cost_tiles is None else program_cost_tiles
        return self.tmla.choose_num_splits(batch, row_blocks, capacity, model, self.sms, program_cost_tiles=cost)

    def run_group(self, name, shapes, configs, fixed=None) -> list[dict]:
        """Phases 1 and 2 below over ``configs``; with ``fixed = (config, split counts)``, that config at
        each of the counts instead."""
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
            if fixed is not None:
                rows = [self.measure(shape, inputs, ref, fixed[0], splits) for splits in fixed[1]]
            for config in configs:  # phase 1: every config at its heuristic split count
                rows.append(self.measure(shape, inputs, ref, config, self.heuristic_splits(shape, config)))
            ranked = sorted((r for r in rows if "time_us" in r), key=lambda r: r["time_us"]) if configs else []
            seen = {(r["name"], r["splits"]) for r in rows}
            for best in ranked[:TOP_CONFIGS]:  # phase 2: the best configs over split counts
                config = next(c for c in configs if config_name(c) == best["name"])
                model_picks = {self.heuristic_splits(shape, config, ppsm, cost) for ppsm, cost in SPLIT_MODELS}
                for splits in sorted(set(split_list) | model_picks):
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

    def run_split_grid(self) -> dict:
        """The table's 16-row config over SPLIT_GRID_SHAPES x split counts; per shape the best split
        count, the model's pick and the pick's slowdown against the best."""
        config = self.tmla.default_config(16, 2)
        summary = {}
        for batch, seqlen in SPLIT_GRID_SHAPES:
            pick = self.tmla.choose_num_splits(batch, 1, seqlen, config, self.sms)
            counts = sorted({pick} | {c for c in SPLIT_GRID_COUNTS
                                      if batch * c <= SPLIT_GRID_MAX_PROGRAMS and seqlen // c >= config.block_n})
            rows = self.run_group("split-grid", [(1, 16, batch, seqlen, [])], [], fixed=(config, counts))
            timed = {r["splits"]: r["time_us"] for r in rows if "time_us" in r}
            if timed:
                best = min(timed, key=timed.get)
                key = json.dumps({"b": batch, "s": seqlen})
                summary[key] = {"best_splits": best, "best_us": timed[best], "model_pick": pick,
                                "pick_us": timed.get(pick), "pick_slowdown": timed[pick] / timed[best] if pick in timed else None}
                print(f"  b={batch} s={seqlen}: best {best} splits {timed[best]:.2f} µs; model picks {pick}"
                      f" ({summary[key]['pick_slowdown'] or float('nan'):.3f}x)", flush=True)
            self.write({"split_grid": summary})
        return summary

    def summarise(self, name, shapes, rows) -> dict | None:
        """The config with the best geometric mean over the group's shapes (each at its best split
        count; a config missing a shape is not eligible), and the split model (programs_per_sm,
        program_cost_tiles) whose picks come closest to that config's best split counts."""
        timed = [r for r in rows if "time_us" in r]
        keys = [json.dumps({"b": b, "q_len": q, "h": h, "s": s}, sort_keys=True) for q, h, b, s, _ in shapes]
        key_of = {id(r): json.dumps(r["shape"], sort_keys=True) for r in timed}
        keys = [k for k in keys if any(key_of[id(r)] == k for r in timed)]
        if not keys:
            return None
        best = {k: min((r for r in timed if key_of[id(r)] == k), key=lambda r: r["time_us"]) for k in keys}
        scores = {}
        for cname in {r["name"] for r in timed}:
            mine = {k: [r for r in timed if r["name"] == cname and key_of[id(r)] == k] for k in keys}
            if all(mine.values()):
                fastest = {k: min(v, key=lambda r: r["time_us"]) for k, v in mine.items()}
                scores[cname] = (statistics.geometric_mean([fastest[k]["time_us"] / best[k]["time_us"] for k in keys]),
                                 mine, fastest)
        if not scores:
            return None
        cname, (score, mine, fastest) = min(scores.items(), key=lambda kv: kv[1][0])
        config = fastest[keys[0]]["config"]
        cfg = self.tmla.MLADecodeConfig(**config)
        # Fit the split model: the pair whose picks lose least against this config's best splits.
        fits = []
        for ppsm, cost in SPLIT_MODELS:
            loss, picks = 0.0, {}
            for (q, h, b, s, _), k in zip(shapes, keys):
                pick = self.heuristic_splits((q, h, b, s), cfg, ppsm, cost)
                at_pick = [r["time_us"] for r in mine[k] if r["splits"] == pick]
                picks[k] = pick
                loss += math.log(at_pick[0] / fastest[k]["time_us"]) if at_pick else math.inf
            fits.append((loss, ppsm, cost, picks))
        loss, ppsm, cost, picks = min(fits, key=lambda f: (f[0], f[1], abs(f[2] - self.tmla.PROGRAM_COST_TILES)))
        return {
            "group": name, "config": config, "name": cname, "slowdown_vs_best_per_shape": score,
            "best_splits_per_shape": {k: fastest[k]["splits"] for k in keys},
            "split_model": {"programs_per_sm": ppsm, "program_cost_tiles": cost, "picks": picks,
                            "slowdown": math.exp(loss / len(keys)) if math.isfinite(loss) else None},
            "best_per_shape": {k: {f: best[k][f] for f in ("name", "splits", "time_us", "frac_copy", "frac_mm")}
                               for k in keys},
        }


# A group whose CUDA context dies is rerun without the config that killed it, at most this often.
MAX_GROUP_RESTARTS = 3


def run_isolated(args) -> int:
    """Each row group in its own process (``--in-process``): a config that kills the CUDA context
    (illegal address) ends only its process; the group is rerun without that config, with what is
    left of the group's budget, and the results of every run are merged into ``args.out``."""
    chosen = [g for g in groups() if not args.only or g[0] in args.only.split(",")]
    total_share = sum(g[1] for g in chosen)
    merged = {"meta": None, "results": [], "summary": []}
    for name, share, _, _ in chosen:
        deadline = time.monotonic() + args.budget_s * share / total_share
        skip, part = list(args.skip.split(",")) if args.skip else [], f"{args.out}.{name}.part"
        for _ in range(MAX_GROUP_RESTARTS + 1):
            budget = max(1.0, deadline - time.monotonic())
            cmd = [sys.executable, "-m", "bench.tune_mla_decode", "--in-process", "--only", name, "--out", part,
                   "--budget-s", f"{budget:.1f}"] + (["--skip", ",".join(skip)] if skip else [])
            rc = subprocess.run(cmd, check=False).returncode
            try:
                with open(part) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                print(f"tune_mla_decode: group {name} left no results (exit {rc})", flush=True)
                break
            merged["meta"] = merged["meta"] or data["meta"]
            dead = data["meta"].get("dead_config")
            # Of a dead run keep only the failing config's error row: the rerun measures everything else.
            merged["results"] += [r for r in data["results"]
                                  if dead is None or (r["name"] == dead and "skipped" not in r.get("error", "skipped"))]
            if dead is None or time.monotonic() >= deadline:
                merged["summary"] += data["summary"] or []
                break
            print(f"tune_mla_decode: {dead} lost the CUDA context; rerunning group {name} without it", flush=True)
            skip.append(dead)
        if os.path.exists(part):
            os.remove(part)
        with open(args.out, "w") as f:
            json.dump(merged, f, indent=1)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--budget-s", type=float, default=225.0, help="stop starting new timings after this long")
    parser.add_argument("--only", default=None, help="comma-separated row groups (rows16, rows32, rows128)")
    parser.add_argument("--skip", default=None, help="comma-separated config names to leave out (M16/N128/w4/s1/keys)")
    parser.add_argument("--split-grid", action="store_true",
                        help="time the 16-row table config over (batch, length) x split counts instead")
    parser.add_argument("--in-process", action="store_true",
                        help="run the groups in this process (what each isolated group process does)")
    args = parser.parse_args(argv)
    if torch.cuda.is_available() and not args.in_process and not args.split_grid:
        return run_isolated(args)
    if not torch.cuda.is_available():
        print("tune_mla_decode: needs a CUDA GPU; nothing to do")
        with open(args.out, "w") as f:
            json.dump({"meta": {"skipped": "no CUDA GPU"}, "results": [], "summary": None}, f)
        return 0
    sweep = Sweep(args)
    if args.split_grid:
        sweep.run_split_grid()
        return 0
    wanted = set(args.only.split(",")) if args.only else None
    summary = []
    skip = set(args.skip.split(",")) if args.skip else set()
    chosen = [(n, sh, shapes, [c for c in configs if config_name(c) not in skip])
              for n, sh, shapes, configs in groups() if not wanted or n in wanted]
    total_share, used_share = sum(g[1] for g in chosen), 0.0
    for name, share, shapes, configs in chosen:
        used_share += share
        sweep.deadline = sweep.start + args.budget_s * used_share / total_share
        try:
            rows = sweep.run_group(name, shapes, configs)
        except Exception:  # noqa: BLE001 - a broken group must not lose the others' results
            traceback.print_exc()
            rows = [r for r in sweep.results if r.get("group") == name]
        s = sweep.summarise(name, [sh[:5] for sh in shapes], rows)
        if s is not None:
            summary.append(s)
        sweep.write(summary)
    print(f"\n== summary ({time.monotonic() - sweep.start:.0f} s; copy {sweep.ceil.copy_gbps:.0f} GB/s,"
          f" mm {sweep.ceil.mm_tflops:.0f} TFLOP/s)")
    for s in summary:
        c, m = s["config"], s["split_model"]
        slow = "-" if m["slowdown"] is None else f"x{m['slowdown']:.3f}"
        print(f"  {s['group']}: {s['name']} (x{s['slowdown_vs_best_per_shape']:.3f} of the best per shape)")
        print(f"    MLADecodeConfig(block_m={c['block_m']}, block_n={c['block_n']}, num_warps={c['num_warps']}, "
              f"num_stages={c['num_stages']}, programs_per_sm={m['programs_per_sm']})")
        print(f"    split model: programs_per_sm={m['programs_per_sm']}, PROGRAM_COST_TILES={m['program_cost_tiles']}"
              f" ({slow} of this config's best splits)")
        for shape, b in s["best_per_shape"].items():
            print(f"    {shape}: best {b['name']} splits={b['splits']} {b['time_us']:.2f} µs "
                  f"{100 * b['frac_copy']:.1f}% copy {100 * b['frac_mm']:.1f}% mm; this config's best splits "
                  f"{s['best_splits_per_shape'][shape]}, model picks {m['picks'][shape]}")
    sweep.write(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
