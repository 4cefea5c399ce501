"""Where a decode step's time goes: every kernel of the CUDA-graph step, timed by the profiler (CUPTI).

    python -m profiles step [--preset lite] [--batch 1,64] [--context 4096] [--steps 16] [--layers N]
    python -m profiles step --render      # the Markdown again from the committed JSON (any machine)

For each batch size: the model (random bf16 weights) decodes ``--steps`` CUDA-graph steps at ``--context``
tokens of context (cache rows filled as in ``bench e2e``), once timed with CUDA events (the step time) and
once under ``torch.profiler`` (the kernels inside the graph replays). The report groups the kernels by
name and by part of the model (``CATEGORIES``: matched on the kernel name, first match wins), and states
the idle time: step time minus the sum of kernel times (launch gaps and tails between dependent kernels).
The MoE layers run their shared experts on a side stream (model/layers.py), so kernels overlap and the
idle time can be negative: kernel times are then inflated by the kernels sharing the GPU with them.

Writes ``profiles/results/<device>/decode_step.md`` and ``decode_step.json``; the Markdown is what
docs/profiling.md points to.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WARMUP_STEPS = 3
PROMPT_LEN = 16  # the prompt's length: the context comes from filled cache rows (bench e2e's fill_context)

# (category, regular expression on the kernel name): the first match names the kernel's part of the step.
CATEGORIES = (
    ("mla_decode", r"mla"),
    ("rope_and_cache", r"rope"),
    ("moe routing", r"_route|softmax|_gate_rows|_gate_dot"),
    ("moe experts", r"moe|grouped|expert|permute|scatter|gate_up|_down|sum_topk|_count_kernel"),
    ("norm", r"rms|norm|RowwiseMoments"),
    ("gemm", r"gemm|gemv|nvjet|cutlass|xmma|sm90|ampere|splitK|Kernel2"),
    ("reduce / argmax", r"reduce|argmax|max_"),
    ("elementwise", r"elementwise|vectorized|unrolled|copy|fill|index|cat"),
)


@dataclasses.dataclass
class KernelRow:
    name: str
    category: str
    calls_per_step: float
    us_per_step: float


def categorize(name: str) -> str:
    for category, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return category
    return "other"


def kernel_events(trace: dict) -> list[tuple[str, float]]:
    """(name, duration µs) of every GPU kernel in a Chrome trace exported by torch.profiler."""
    return [(e["name"], float(e["dur"])) for e in trace.get("traceEvents", [])
            if e.get("ph") == "X" and e.get("cat") in ("kernel", "Kernel")]


def summarize(kernels: list[tuple[str, float]], steps: int) -> list[KernelRow]:
    """Kernel rows sorted by time, per step."""
    total: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for name, dur in kernels:
        total[name] += dur
        calls[name] += 1
    rows = [KernelRow(name, categorize(name), calls[name] / steps, total[name] / steps) for name in total]
    return sorted(rows, key=lambda r: -r.us_per_step)


def by_category(rows: list[KernelRow]) -> dict[str, tuple[float, float]]:
    """category -> (kernels per step, µs per step), largest first."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        out[r.category][0] += r.calls_per_step
        out[r.category][1] += r.us_per_step
    return dict(sorted(((k, (v[0], v[1])) for k, v in out.items()), key=lambda kv: -kv[1][1]))


def profile_batch(model, batch: int, context: int, steps: int) -> dict:
    """Step time (CUDA events) and the kernels of ``steps`` graph replays (profiler) at one batch size."""
    from bench.bench_e2e import fill_context
    from model.engine import Engine

    reserve = context - PROMPT_LEN + WARMUP_STEPS + 2 * steps
    engine = Engine(model, batch, PROMPT_LEN + reserve, buckets=[batch])
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    engine.prefill(prompts, list(range(batch)), reserve)
    fill_context(engine.cache, context - PROMPT_LEN)
    engine.runner.capture([batch])
    engine.decode(WARMUP_STEPS, batch)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    engine.decode(steps, batch)
    end.record()
    end.synchronize()
    step_us = start.elapsed_time(end) * 1e3 / steps
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            engine.decode(steps, batch)
            torch.cuda.synchronize()
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    rows = summarize(kernel_events(trace), steps)
    busy = sum(r.us_per_step for r in rows)
    return {"batch": batch, "context": context, "steps": steps, "step_us": step_us, "kernel_us": busy,
            "idle_us": step_us - busy, "kernels_per_step": sum(r.calls_per_step for r in rows),
            "categories": {k: {"kernels": round(n, 2), "us": round(us, 2)} for k, (n, us) in
                           by_category(rows).items()},
            "kernels": [dataclasses.asdict(r) for r in rows]}


def markdown(device: str, preset: str, layers: int, runs: list[dict]) -> str:
    lines = [f"# Decode step on {device}: {preset}, {layers} layers, CUDA-graph replay",
             "", "Written by `python -m profiles step` (profiles/decode_step.py): kernel times from the profiler "
             "inside graph replays; step time from CUDA events without the profiler; idle = step - kernels "
             "(negative where kernels overlap: the shared experts run on a side stream).", ""]
    for r in runs:
        step = r["step_us"]
        lines += [f"## batch {r['batch']}, context {r['context']}", "",
                  f"Step {step:,.1f} µs ({r['batch'] / step * 1e6:,.0f} tok/s), kernels {r['kernel_us']:,.1f} µs "
                  f"in {r['kernels_per_step']:.0f} launches, idle {r['idle_us']:,.1f} µs "
                  f"({r['idle_us'] / step:.1%}); per layer {step / layers:,.1f} µs.", "",
                  "| part | kernels/step | µs/step | share |", "|---|---:|---:|---:|"]
        for k, v in r["categories"].items():
            lines.append(f"| {k} | {v['kernels']:g} | {v['us']:,.1f} | {v['us'] / step:.1%} |")
        lines += ["", "| kernel (top 15) | part | calls/step | µs/step | µs/call |", "|---|---|---:|---:|---:|"]
        for k in r["kernels"][:15]:
            name = k["name"] if len(k["name"]) <= 90 else k["name"][:87] + "..."
            lines.append(f"| `{name}` | {k['category']} | {k['calls_per_step']:g} | {k['us_per_step']:,.1f} | "
                         f"{k['us_per_step'] / k['calls_per_step']:,.2f} |")
        lines.append("")
    return "\n".join(lines)


def render(root: Path) -> int:
    """Rewrite each ``<device>/decode_step.md`` under ``root`` from its JSON, categories taken anew."""
    paths = sorted(root.glob("*/decode_step.json"))
    for path in paths:
        data = json.loads(path.read_text())
        for run in data["runs"]:
            rows = [KernelRow(k["name"], categorize(k["name"]), k["calls_per_step"], k["us_per_step"])
                    for k in run["kernels"]]
            run["kernels"] = [dataclasses.asdict(r) for r in rows]
            run["categories"] = {k: {"kernels": round(n, 2), "us": round(us, 2)} for k, (n, us) in
                                 by_category(rows).items()}
        path.write_text(json.dumps(data, indent=1) + "\n")
        (path.parent / "decode_step.md").write_text(markdown(data["device"], data["preset"], data["layers"],
                                                             data["runs"]))
        print(path.parent / "decode_step.md")
    return 0 if paths else 1


def main(argv: list[str]) -> int:
    from model import DeepseekV2, DeepseekV2Config
    from profiles import hardware

    p = argparse.ArgumentParser(prog="python -m profiles step", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="lite")
    p.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--layers", type=int, help="only the first N layers")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results root (default profiles/results)")
    p.add_argument("--render", action="store_true",
                   help="rewrite decode_step.md of every device under --out from its decode_step.json (no GPU)")
    args = p.parse_args(argv)
    if args.render:
        return render(args.out)
    if not torch.cuda.is_available():
        print("profiles step: needs a CUDA GPU")
        return 1
    batches = [int(b) for b in args.batch.split(",")]
    if args.context <= PROMPT_LEN or args.steps < 1 or min(batches) < 1:
        p.error(f"--context must exceed {PROMPT_LEN}; --steps and --batch must be positive")
    cfg = DeepseekV2Config.from_preset(args.preset)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    t0 = time.perf_counter()
    model = DeepseekV2.random(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    print(f"model {args.preset} ({cfg.num_hidden_layers} layers) built in {time.perf_counter() - t0:.1f} s", flush=True)
    runs = []
    for b in batches:
        runs.append(profile_batch(model, b, args.context, args.steps))
        r = runs[-1]
        print(f"batch {b}: step {r['step_us']:,.1f} µs, kernels {r['kernel_us']:,.1f} µs, idle {r['idle_us']:,.1f} µs; "
              + ", ".join(f"{k} {v['us']:,.0f}" for k, v in r["categories"].items()), flush=True)
        torch.cuda.empty_cache()
    device = torch.cuda.get_device_name()
    out = args.out / hardware.device_slug(device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_step.json").write_text(json.dumps(
        {"device": device, "preset": args.preset, "layers": cfg.num_hidden_layers, "torch": torch.__version__,
         "runs": runs}, indent=1) + "\n")
    (out / "decode_step.md").write_text(markdown(device, args.preset, cfg.num_hidden_layers, runs))
    print(out / "decode_step.md")
    return 0
