"""``python -m bench``: run benchmark suites, or render the committed results as Markdown.

    python -m bench [suite ...] [--quick] [--shapes b=64,s=4096 ...] [--json PATH]
    python -m bench table [--device SLUG]
    python -m bench e2e [--preset lite] [--batch 1,32,64] ...   (bench/bench_e2e.py; --help)
    python -m bench --list

With no suite named, every bench/bench_*.py suite runs (ceilings first). On a machine without a
GPU the run is always --quick, and it also runs the tiny model preset through the reference path
(a forward over a batch, then greedy generation over the latent cache; tokens/s), labelled as a
CPU run. A suite that raises is reported
and the others still run; the exit status is then 1. Multi-GPU ceilings (NVLink, NCCL) are launched
by the ``ceilings`` suite itself in spawned processes: no torchrun needed.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

import torch

from bench import results
from bench.harness import DEFAULT_RESULTS_DIR, Context

BENCH_DIR = Path(__file__).resolve().parent
FIRST = ("ceilings",)


def discover() -> tuple[dict[str, ModuleType], dict[str, str]]:
    """Suites by SUITE name, and the modules that failed to import (name -> error)."""
    suites, broken = {}, {}
    for path in sorted(BENCH_DIR.glob("bench_*.py")):
        stem = path.stem
        try:
            mod = importlib.import_module(f"bench.{stem}")
        except Exception as e:  # noqa: BLE001 - a broken suite must not stop the others
            broken[stem.removeprefix("bench_")] = f"import failed: {type(e).__name__}: {e}"
            continue
        name, run = getattr(mod, "SUITE", None), getattr(mod, "run", None)
        if not isinstance(name, str) or not callable(run):
            broken[stem.removeprefix("bench_")] = "module has no SUITE string or run(ctx) function"
            continue
        suites[name] = mod
    order = [n for n in FIRST if n in suites] + sorted(n for n in suites if n not in FIRST)
    return {n: suites[n] for n in order}, broken


def run_suite(ctx: Context, name: str, mod: ModuleType) -> bool:
    """Run one suite; print its table. False (and nothing recorded) if it raised."""
    ctx.note(f"\n== {name} ==")
    t0 = time.perf_counter()
    try:
        with ctx.suite_run(name):
            mod.run(ctx)
    except Exception:  # noqa: BLE001 - reported, then the next suite runs
        ctx.note(f"!! suite {name} failed, nothing recorded for it:\n{traceback.format_exc()}")
        if ctx.on_gpu:
            torch.cuda.empty_cache()
        return False
    recs = ctx.suite_records(name)
    ctx.note(f"-- {name}: {len(recs)} records in {time.perf_counter() - t0:.1f} s "
             f"({ctx.timer_label})\n{results.format_table(recs)}")
    return True


def run_model_cpu(ctx: Context) -> bool:
    """The tiny preset through the reference path on the CPU: a timed forward over a batch (no
    cache), then greedy generation over the paged latent cache (model.generate.greedy), tokens/s.
    False if it raised."""
    try:
        from model import DeepseekV2, DeepseekV2Config
        from model.generate import greedy
    except Exception as e:  # noqa: BLE001 - model/ is optional here
        ctx.note(f"\n== model (CPU run) ==\nmodel not available: {type(e).__name__}: {e}")
        return True
    from profiles import cost_model

    ctx.note("\n== model (CPU run: tiny preset, random weights, reference path, float32) ==")
    batch, prompt, new_tokens = 2, 16, 8
    try:
        with ctx.suite_run("model_cpu"), torch.no_grad():
            cfg = DeepseekV2Config.from_preset("tiny")
            m = DeepseekV2.random(cfg, seed=0, dtype=torch.float32, device="cpu")
            elem = next(m.parameters()).element_size()
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(0, cfg.vocab_size, (batch, prompt), generator=gen)  # [batch, prompt]
            t_fwd = ctx.time(lambda i: m(ids))
            cost = cost_model.model_prefill(cfg, batch * prompt, seq_len=prompt, elem_bytes=elem)
            fwd_tok_s = batch * prompt / (t_fwd * 1e-6)
            ctx.record(op="model.prefill", backend="reference", dtype="fp32", time_us=t_fwd,
                       shape={"preset": "tiny", "batch": batch, "context": prompt},
                       bytes=cost.bytes, flops=cost.flops,
                       extra={"tokens_per_s": round(fwd_tok_s, 1), "path": "forward, no cache"})
            prompts = ids.tolist()
            greedy(m, prompts, 2)  # first-call costs (op registration) stay out of the timing
            r = greedy(m, prompts, new_tokens)
            steps = new_tokens - 1
            mid_context = prompt + new_tokens // 2  # the decode steps' average context
            cost = cost_model.model_decode_step(cfg, batch, mid_context, elem_bytes=elem)
            ctx.record(op="model.decode", backend="reference", dtype="fp32",
                       time_us=r.decode_s / steps * 1e6,
                       shape={"preset": "tiny", "batch": batch, "context": mid_context},
                       bytes=cost.bytes, flops=cost.flops,
                       extra={"tokens_per_s": round(r.decode_tok_s, 1), "decode_steps": steps,
                              "prefill_tokens_per_s": round(r.prefill_tok_s, 1), "tokens": r.tokens,
                              "path": "model.generate.greedy over the paged latent cache; one run"})
            ctx.note(f"CPU run, tiny preset, batch {batch}: forward {fwd_tok_s:.0f} tokens/s; greedy "
                     f"generation: prefill {r.prefill_tok_s:.0f} tokens/s, decode {r.decode_tok_s:.1f} "
                     f"tokens/s; first tokens {r.tokens[0]}")
    except Exception:  # noqa: BLE001
        ctx.note(f"!! model CPU run failed:\n{traceback.format_exc()}")
        return False
    return True


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("suites", nargs="*", help="suites to run (default: all); `table` renders results")
    p.add_argument("--quick", action="store_true", help="small sweeps, short timings (always on a CPU)")
    p.add_argument("--shapes", nargs="+", metavar="K=V[,K=V]",
                   help="only shapes matching one filter, e.g. b=64,s=4096")
    p.add_argument("--json", metavar="PATH", help="also write this run's records to PATH")
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS_DIR),
                   help="where <device-slug>/<suite>.json are merged (default: bench/results)")
    p.add_argument("--no-write", action="store_true", help="do not touch the results files")
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    return p


def _table_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench table",
                                description="Markdown tables of the committed results (for the README)")
    p.add_argument("--device", help="device slug, e.g. nvidia-h200 (default: every device)")
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS_DIR))
    args = p.parse_args(argv)
    rdir = Path(args.results_dir)
    if not rdir.is_dir():
        print(f"no results folder at {rdir}", file=sys.stderr)
        return 1
    print(results.render_markdown(rdir, args.device))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["table"]:
        return _table_main(argv[1:])
    if argv[:1] == ["e2e"]:
        from bench.bench_e2e import main as e2e_main

        return e2e_main(argv[1:])
    args = _run_parser().parse_args(argv)
    args.suites = [s for arg in args.suites for s in arg.split(",") if s]   # "a,b" == "a b"
    suites, broken = discover()
    if args.list:
        for name, mod in suites.items():
            print(f"{name:<16} {(mod.__doc__ or '').strip().splitlines()[0] if mod.__doc__ else ''}")
        for name, err in broken.items():
            print(f"{name:<16} BROKEN: {err}")
        return 0
    unknown = [s for s in args.suites if s not in suites and s not in broken]
    if unknown:
        print(f"unknown suite(s) {unknown}; available: {sorted(suites) + sorted(broken)}", file=sys.stderr)
        return 2
    on_gpu = torch.cuda.is_available()
    ctx = Context(quick=args.quick or not on_gpu, shapes=args.shapes,
                  results_dir=None if args.no_write else args.results_dir)
    ctx.note(f"device: {ctx.device_name} ({ctx.slug}); {ctx.timer_label}; "
             f"{'quick' if ctx.quick else 'full'} run; torch {torch.__version__}")
    if not on_gpu:
        ctx.note("CPU run: no GPU here, so every suite runs its --quick CPU version; numbers are CPU timings.")
    try:
        c = ctx.ceilings
    except Exception:  # noqa: BLE001 - without ceilings no record can be made
        ctx.note(f"!! measuring the ceilings failed; nothing can be recorded:\n{traceback.format_exc()}")
        return 1
    ctx.note(f"ceilings (measured now): copy {c.copy_gbps:.1f} GB/s (read + write), "
             f"bf16 mm {c.mm_tflops:.2f} TFLOP/s at {c.mm_n}^3")
    names = args.suites or list(suites) + sorted(broken)
    failed = []
    for name in ctx.progress(names, desc="suites"):
        if name in broken:
            ctx.note(f"\n== {name} ==\n!! suite {name} failed, nothing recorded for it: {broken[name]}")
            failed.append(name)
        elif not run_suite(ctx, name, suites[name]):
            failed.append(name)
    if not on_gpu and not args.suites and not run_model_cpu(ctx):
        failed.append("model_cpu")
    if args.json:
        results.write_json(args.json, ctx.records)
        ctx.note(f"\nwrote {len(ctx.records)} records to {args.json}")
    if failed:
        ctx.note(f"\nFAILED suites: {', '.join(failed)}")
        return 1
    ctx.note(f"\nall {len(names)} suites ran; {len(ctx.records)} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
