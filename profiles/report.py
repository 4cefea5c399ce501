"""The roofline report: ``python -m profiles report [--results DIR] [--out DIR] [--device SLUG]``.

Reads the committed benchmark records (bench/results/<device>/<suite>.json; tuning sweeps, files
named ``tune-*``, are not records) and writes, for each device, ``profiles/results/<device>/ROOFLINE.md``
and ``roofline.png``:

- the limits: the ceilings measured in the records' runs, the device's datasheet and the H800's;
- every op and shape as a point: FLOPs per byte, GB/s, TFLOP/s, the fraction of the measured copy
  bandwidth and matmul rate, the limit that binds there, the fraction of that roofline reached, and
  the projection onto an H800 at the same fraction of its datasheet roofline (profiles/hardware.py:
  t_H800 = t · ideal_H800 / ideal_here) with the fractions of the H800's HBM and bf16 rate it means;
- expert-parallel traffic against NVLink;
- the Nsight Compute summaries of ``python -m profiles ncu`` when they exist for the device;
- DeepSeek-V2 236B decode throughput on one 8 × H800 node (profiles/deployment.py) at the roofline
  and at the fractions this repository's kernels reach, beside DeepSeek's published figure.

The plot needs matplotlib; without it the Markdown is written and says the plot was skipped.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from profiles import deployment, hardware, ncu

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_RESULTS_DIR = REPO_ROOT / "bench" / "results"
RESULTS_DIR = REPO_ROOT / "profiles" / "results"
PLOT_NAME = "roofline.png"
REPORT_NAME = "ROOFLINE.md"

# Ops whose bytes cross NVLink (the H800 projection uses its NVLink bandwidth, not HBM).
LINK_PREFIXES = ("ep.", "ceiling.nvlink", "ceiling.nccl")
CEILING_PREFIX = "ceiling."


# ---------------------------------------------------------------------------------------------
# Records.


def load_device_records(device_dir: Path) -> list[dict[str, Any]]:
    """The records of every suite file of one device (tuning sweeps and malformed files skipped)."""
    records = []
    for path in sorted(device_dir.glob("*.json")):
        if path.name.startswith("tune-"):
            continue
        data = json.loads(path.read_text())
        if isinstance(data, list):
            records += [r for r in data if isinstance(r, dict) and r.get("op") and r.get("time_us")]
    return records


def link_of(op: str) -> str:
    return "nvlink" if op.startswith(LINK_PREFIXES) else "hbm"


def analyse(rec: dict[str, Any]) -> dict[str, Any]:
    """One record as a roofline point: fractions of the measured and datasheet limits, the H800 projection."""
    t_s = rec["time_us"] * 1e-6
    nbytes, flops = rec.get("bytes") or 0, rec.get("flops") or 0
    ceil = rec.get("ceilings") or {}
    copy_gbps, mm_tflops = ceil.get("copy_gbps"), ceil.get("mm_tflops")
    link = link_of(rec["op"])
    spec = hardware.spec_for_name(rec.get("device", ""))
    out: dict[str, Any] = {
        "op": rec["op"], "backend": rec["backend"], "shape": rec["shape"], "dtype": rec["dtype"],
        "time_us": rec["time_us"], "bytes": nbytes, "flops": flops, "link": link,
        "intensity": flops / nbytes if nbytes else None,
        "gbps": nbytes / t_s / 1e9 if nbytes else None,
        "tflops": flops / t_s / 1e12 if flops else None,
    }
    out["frac_copy"] = out["gbps"] / copy_gbps if out["gbps"] and copy_gbps and link == "hbm" else None
    out["frac_mm"] = out["tflops"] / mm_tflops if out["tflops"] and mm_tflops else None
    if link == "hbm" and copy_gbps and mm_tflops:
        t_mem, t_cmp = nbytes / (copy_gbps * 1e9), flops / (mm_tflops * 1e12)
        out["bound_here"] = "memory" if t_mem >= t_cmp else "compute"
        out["frac_roofline_here"] = max(t_mem, t_cmp) / t_s
    else:
        out["bound_here"], out["frac_roofline_here"] = ("NVLink" if link == "nvlink" else None), None
    h800 = None
    if spec is not None and (nbytes or flops):
        kind = "fp8" if "fp8" in rec["dtype"] else "bf16"
        h800 = hardware.project(nbytes, flops, t_s, on=spec, to=hardware.H800, flops_kind=kind, bandwidth=link)
        if link == "nvlink" and nbytes:
            out["frac_link_datasheet"] = nbytes / t_s / 1e9 / spec.nvlink_gbps
    if h800 is None and rec.get("h800_projected_us") is not None:
        h800 = rec["h800_projected_us"] * 1e-6          # a GPU outside the table: the harness's projection
    out["h800_us"] = h800 * 1e6 if h800 else None
    if h800:
        bw = hardware.link_gbps(hardware.H800, link) * 1e9
        out["h800_frac_bw"] = nbytes / h800 / bw if nbytes else None
        out["h800_frac_bf16"] = flops / h800 / hardware.H800.flops_rate("bf16") if flops else None
        t_mem, t_cmp = nbytes / bw, flops / hardware.H800.flops_rate("bf16")
        out["h800_bound"] = ("NVLink" if link == "nvlink" else "memory") if t_mem >= t_cmp else "compute"
    return out


# ---------------------------------------------------------------------------------------------
# Markdown.


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _shape(shape: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _sort_key(p: dict[str, Any]) -> tuple:
    shape = tuple((k, v if isinstance(v, (int, float)) else 0) for k, v in sorted(p["shape"].items()))
    return (p["op"], p["backend"], shape)


def _span(values: Iterable[float | None]) -> str:
    vals = sorted({v for v in values if v is not None})
    if not vals:
        return "-"
    return f"{vals[0]:g}" if len(vals) == 1 else f"{vals[0]:g}–{vals[-1]:g}"


def limits_table(records: list[dict[str, Any]]) -> str:
    device = records[0].get("device", "?")
    spec = hardware.spec_for_name(device)
    copies = [(r.get("ceilings") or {}).get("copy_gbps") for r in records]
    mms = [(r.get("ceilings") or {}).get("mm_tflops") for r in records]
    peer = [r for r in records if r["op"] == "ceiling.nvlink_peer_copy"]
    peer_best = max((analyse(r)["gbps"] for r in peer), default=None)
    copy_mid = _median([c for c in copies if c])
    mm_mid = _median([m for m in mms if m])
    rows = ["| limits | HBM GB/s | bf16 TFLOP/s | ridge FLOP/B | NVLink GB/s (one way) |", "|---|---:|---:|---:|---:|",
            f"| {device}, measured (the records' ceilings: device-to-device copy, bf16 matmul) | {_span(copies)} | "
            f"{_span(mms)} | {_f(mm_mid * 1e3 / copy_mid if copy_mid and mm_mid else None, '.0f')} | "
            f"{_f(peer_best, '.0f') + ' (peer copy, best size)' if peer_best else '-'} |"]
    for name, s in ((f"{device}, datasheet", spec), ("H800 SXM, datasheet", hardware.H800)):
        if s is not None:
            rows.append(f"| {name} | {s.hbm_gbps:.0f} | {s.bf16_tflops:.0f} | {s.bf16_tflops * 1e3 / s.hbm_gbps:.0f} | "
                        f"{s.nvlink_gbps:.0f} |")
    return "\n".join(rows)


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


HBM_COLUMNS = ("op", "backend", "shape", "dtype", "µs", "FLOP/B", "GB/s", "TFLOP/s", "% copy", "% mm",
               "bound here", "% of roofline here", "H800 µs", "H800 % HBM", "H800 % bf16", "bound on H800")


def hbm_table(points: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HBM_COLUMNS) + " |",
             "|" + "|".join("---" if i < 4 or c.startswith("bound") else "---:"
                            for i, c in enumerate(HBM_COLUMNS)) + "|"]
    for p in sorted(points, key=_sort_key):
        lines.append("| " + " | ".join([
            p["op"], p["backend"], _shape(p["shape"]), p["dtype"], _f(p["time_us"], ".2f"), _f(p["intensity"], ".1f"),
            _f(p["gbps"], ".0f"), _f(p["tflops"], ".2f"), _pct(p["frac_copy"]), _pct(p["frac_mm"]),
            p["bound_here"] or "-", _pct(p["frac_roofline_here"]), _f(p["h800_us"], ".2f"),
            _pct(p.get("h800_frac_bw")), _pct(p.get("h800_frac_bf16")), p.get("h800_bound") or "-"]) + " |")
    return "\n".join(lines)


def link_table(points: list[dict[str, Any]]) -> str:
    lines = ["| op | backend | shape | µs | GB/s | % of NVLink datasheet (one way) | H800 µs | H800 % NVLink |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for p in sorted(points, key=_sort_key):
        lines.append(f"| {p['op']} | {p['backend']} | {_shape(p['shape'])} | {_f(p['time_us'], '.2f')} | "
                     f"{_f(p['gbps'], '.1f')} | {_pct(p.get('frac_link_datasheet'))} | {_f(p['h800_us'], '.2f')} | "
                     f"{_pct(p.get('h800_frac_bw'))} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The 8 x H800 projection, with the fractions this repository's kernels reach.


def _closest(points: list[dict[str, Any]], key: str, target: float) -> dict[str, Any] | None:
    """The point whose shape[key] is nearest ``target`` on a log scale; among the backends and layouts
    recorded at that shape, the fastest (what ``backend=None`` would run)."""
    cands = [p for p in points if p["shape"].get(key)]
    return min(cands, key=lambda p: (abs(math.log(p["shape"][key] / target)), p["time_us"]), default=None)


def _datasheet_fraction(p: dict[str, Any], spec: hardware.GpuSpec) -> float:
    return hardware.roofline_time_s(p["bytes"], p["flops"], spec) / (p["time_us"] * 1e-6)


def measured_efficiency(points: list[dict[str, Any]], records: list[dict[str, Any]], cfg: Any,
                        scenario: deployment.Scenario, sequences: int) -> deployment.Efficiency:
    """Fractions of the datasheet limits this repository's kernels reach on the measured GPU, picked
    for one scenario's shapes (the closest committed record); 1.0 where there is no record."""
    spec = hardware.spec_for_name(records[0].get("device", "")) if records else None
    if spec is None:
        return deployment.Efficiency.roofline()
    heads = cfg.num_attention_heads // (1 if scenario.layout == "dp" else deployment.GPUS)
    per_gpu = sequences // deployment.GPUS if scenario.layout == "dp" else sequences
    kw: dict[str, float] = {}
    sources: dict[str, str] = {}
    mla = [p for p in points
           if p["op"] == "mla_decode" and p["shape"].get("h") == heads and p["shape"].get("q_len") == 1]
    if pick := _closest(mla, "b", per_gpu):
        kw["mla"] = _datasheet_fraction(pick, spec)
        sources["MLA core"] = f"mla_decode {pick['backend']} {_shape(pick['shape'])}: {100 * kw['mla']:.0f} %"
    moe = [p for p in points if p["op"] == "moe_ffn" and p["shape"].get("E") == cfg.n_routed_experts]
    if pick := _closest(moe, "T", sequences):   # EP8 rows per expert = those of moe_ffn at T = node tokens
        kw["experts"] = _datasheet_fraction(pick, spec)
        sources["routed experts"] = f"moe_ffn {pick['backend']} {_shape(pick['shape'])}: {100 * kw['experts']:.0f} %"
    ceil = [(r.get("ceilings") or {}) for r in records]
    copies = [c["copy_gbps"] for c in ceil if c.get("copy_gbps")]
    mms = [c["mm_tflops"] for c in ceil if c.get("mm_tflops")]
    if copies and mms:
        kw["other_memory"] = _median(copies) / spec.hbm_gbps
        kw["other_compute"] = _median(mms) / spec.bf16_tflops
        sources["other matmuls"] = (f"the measured ceilings: copy {100 * kw['other_memory']:.0f} % of HBM, "
                                    f"bf16 matmul {100 * kw['other_compute']:.0f} % of the tensor rate")
    if scenario.layout == "dp":
        ep = [p for p in points if p["op"] in ("ep.dispatch", "ep.combine") and p["shape"].get("H") == cfg.hidden_size]
        if pick_t := _closest(ep, "T", per_gpu):
            same = [p for p in ep if p["shape"]["T"] == pick_t["shape"]["T"]]
            best = {}
            for p in same:   # the fastest backend of each op
                if p["op"] not in best or p["time_us"] < best[p["op"]]["time_us"]:
                    best[p["op"]] = p
            nbytes = sum(p["bytes"] for p in best.values())
            secs = sum(p["time_us"] for p in best.values()) * 1e-6
            kw["comm"] = nbytes / secs / 1e9 / spec.nvlink_gbps
            sources["NVLink dispatch + combine"] = (
                ", ".join(f"{p['op']} {p['backend']}" for p in best.values())
                + f" at {_shape(pick_t['shape'])}: {100 * kw['comm']:.0f} % of NVLink")
    return deployment.Efficiency(**kw, sources=sources)


def deployment_section(points: list[dict[str, Any]], records: list[dict[str, Any]]) -> str:
    cfg = deployment.model_config()
    lines = ["## DeepSeek-V2 236B decode on one 8 × H800 node (EP = 8)", "",
             f"Published: {deployment.PUBLISHED_SOURCE}.", "",
             "Projection (profiles/deployment.py): one decode step, each phase at max(bytes / HBM, FLOPs / "
             "tensor rate) on the H800 datasheet (3.35 TB/s, 989 TFLOP/s bf16, 1979 fp8, NVLink 200 GB/s one "
             "way, 80 GiB), phases one after another; fp8-weight matmuls at the fp8 rate, the MLA core at the "
             "bf16 rate; the batch is the most sequences whose latent cache fits in "
             f"{100 * deployment.MEMORY_FRACTION:.0f} % of the memory beside the weights; uniform routing; "
             "with data-parallel attention each token's dispatch (weight format) and combine (bf16) cross "
             f"NVLink to {deployment.remote_ranks_per_token(cfg):.3f} remote ranks on average (group-limited "
             "routing: 3 of 8 groups, one group per GPU). Communication added to the step (serial) or hidden "
             "behind it (overlapped). 'Ours' runs each phase at the fraction of its roofline this repository's "
             "kernel reaches on the measured GPU at the closest committed shape (sources below).", "",
             "| scenario | fits | weights GB/GPU | sequences in the node | step ms (roofline, serial) | "
             "tokens/s roofline, serial | tokens/s roofline, overlapped | fractions ours (MLA / experts / "
             "NVLink) | tokens/s ours, serial | ours vs > 50K |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    sources: dict[str, set[str]] = {}
    for sc in deployment.SCENARIOS:
        roof = deployment.project(cfg, sc)
        if not roof.fits:
            lines.append(f"| {sc.label()} | no: {roof.weights_gb_per_gpu:.1f} GB of weights a GPU | "
                         f"{roof.weights_gb_per_gpu:.1f} | 0 | - | - | - | - | - | - |")
            continue
        over = deployment.project(cfg, sc, overlap=True)
        eff = measured_efficiency(points, records, cfg, sc, roof.sequences)
        ours = deployment.project(cfg, sc, eff)
        for phase, text in eff.sources.items():
            sources.setdefault(phase, set()).add(text)
        fracs = " / ".join(f"{100 * x:.0f}" for x in (eff.mla, eff.experts, eff.comm))
        lines.append(f"| {sc.label()} | yes | {roof.weights_gb_per_gpu:.1f} | {roof.sequences} | "
                     f"{roof.step_s * 1e3:.2f} | {roof.tokens_per_s:,.0f} | {over.tokens_per_s:,.0f} | {fracs} % | "
                     f"{ours.tokens_per_s:,.0f} | {ours.tokens_per_s / deployment.PUBLISHED_TOKENS_PER_S:.2f}x |")
    lines += ["", "Fractions of the datasheet roofline used for 'ours' (the committed record closest to each "
              "scenario's per-GPU shape; 100 % where none):", ""]
    lines += [f"- {phase}: " + "; ".join(sorted(texts)) for phase, texts in sorted(sources.items())] \
        or ["- none: no matching records (every phase at 100 %)"]
    lines += ["", "How to read it: the published > 50K tokens/s is a measured serving throughput; the roofline "
              "columns are upper bounds of this model of a step, not predictions. With fp8 weights the batch "
              "is set by the latent cache (576 entries a token a layer), and the step is mostly the MLA core "
              "(compute-bound at 128 heads: ~480 FLOP per cache byte in fp8) and the expert FFNs; bf16 weights "
              "do not fit with a full copy of the attention per GPU, and tensor-parallel attention stores every "
              "sequence's latent cache on every GPU, which caps the batch and the throughput.", "",
              "Not modelled: prefill interleaved with decode (the service mixes both), the real prompt and "
              "generation length distribution (the context here is fixed), expert load imbalance (the busiest "
              "GPU sets the pace; routing is assumed uniform), KV quantisation below 8 bits (DeepSeek's ~6 bits "
              "average) and its dequantisation cost, fp8 kernels (this repository's kernels are bf16: their "
              "fractions are assumed to hold at the fp8 rate), launch gaps and the host (CUDA graphs assumed), "
              "activation memory beyond the 10 % reserve, sampling, and the H200 → H800 transfer of the "
              "measured fractions (same Hopper SM; the H800 has less HBM bandwidth and NVLink)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The plot.


def write_plot(points: list[dict[str, Any]], records: list[dict[str, Any]], path: Path) -> str | None:
    """Two log-log rooflines (the device with its measured and datasheet roofs; the H800 with the projected
    points). Returns None when written, else why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    pts = [p for p in points
           if p["link"] == "hbm" and p["flops"] and p["bytes"] and not p["op"].startswith(CEILING_PREFIX)]
    if not pts:
        return "no HBM-bound record with both bytes and FLOPs"
    device = records[0].get("device", "?")
    spec = hardware.spec_for_name(device)
    ceil = [(r.get("ceilings") or {}) for r in records]
    copy = _median([c["copy_gbps"] for c in ceil if c.get("copy_gbps")])
    mm = _median([c["mm_tflops"] for c in ceil if c.get("mm_tflops")])
    lo = min(p["intensity"] for p in pts) / 3
    hi = max(max(p["intensity"] for p in pts) * 3, 2000)
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]

    def roof(gbps, tflops):
        return [min(gbps * x / 1e3, tflops) for x in xs]

    fig, axes = plt.subplots(1, 2, figsize=(14, 6), sharey=True)
    ops = sorted({(p["op"], p["backend"]) for p in pts})
    cmap = plt.get_cmap("tab10")
    colors = {op: cmap(i % 10) for i, op in enumerate(sorted({o for o, _ in ops}))}
    markers = dict(zip(sorted({b for _, b in ops}), "osD^v<>"))
    ax = axes[0]
    if copy and mm:
        ax.plot(xs, roof(copy, mm), "k-", label=f"measured: copy {copy:.0f} GB/s, mm {mm:.0f} TFLOP/s")
    if spec:
        ax.plot(xs, roof(spec.hbm_gbps, spec.bf16_tflops), "k--", alpha=0.5,
                label=f"datasheet: {spec.hbm_gbps:.0f} GB/s, {spec.bf16_tflops:.0f} TFLOP/s")
    h8 = hardware.H800
    axes[1].plot(xs, roof(h8.hbm_gbps, h8.bf16_tflops), "k-",
                 label=f"H800 datasheet: {h8.hbm_gbps:.0f} GB/s, {h8.bf16_tflops:.0f} TFLOP/s bf16")
    for op, backend in ops:
        mine = [p for p in pts if (p["op"], p["backend"]) == (op, backend)]
        style = dict(color=colors[op], marker=markers[backend], linestyle="none", alpha=0.8, label=f"{op} ({backend})")
        axes[0].plot([p["intensity"] for p in mine], [p["tflops"] for p in mine], **style)
        proj = [p for p in mine if p["h800_us"]]
        axes[1].plot([p["intensity"] for p in proj], [p["flops"] / p["h800_us"] / 1e6 for p in proj], **style)
    axes[0].set_title(f"{device}: measured (bench/results)")
    axes[1].set_title("H800 SXM: projected at the same fraction of the roofline")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP / minimal byte)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("TFLOP/s (minimal FLOPs / time)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------
# The report.


def render(records: list[dict[str, Any]], slug: str, plot_note: str | None,
           ncu_summaries: list[dict[str, Any]] | None = None) -> str:
    points = [analyse(r) for r in records]
    device = records[0].get("device", slug)
    commits = sorted({r.get("git_commit", "?") for r in records})
    newest = max((r.get("timestamp", "") for r in records), default="")
    kernels = [p for p in points if p["link"] == "hbm" and not p["op"].startswith(CEILING_PREFIX)]
    links = [p for p in points if p["link"] == "nvlink" and not p["op"].startswith(CEILING_PREFIX)]
    lines = [f"# Roofline: {device} ({slug})", "",
             f"Generated by `python -m profiles report` from `bench/results/{slug}/*.json` ({len(records)} records; "
             f"commits {', '.join(commits)}; newest {newest}). Do not edit: regenerate.", ""]
    lines.append(f"![roofline]({PLOT_NAME})" if plot_note is None else f"Plot skipped: {plot_note}.")
    lines += ["", "## Limits", "", limits_table(records), "",
              "## Kernels against the limits", "",
              "Bytes and FLOPs are each op's minimal count (profiles/cost_model.py). '% copy' and '% mm' are of "
              "the ceilings measured in the same run; 'bound here' is the side of the measured roofline the "
              "op sits on and '% of roofline here' the time it would take at that limit over the time it took. "
              "'H800 µs' runs the op at the same fraction of the H800's datasheet roofline as it reaches of "
              "this GPU's datasheet roofline; 'H800 % HBM / % bf16' are the fractions of the H800's limits "
              "that time means. An op far below every limit (a few % of its roofline: launch or latency sets "
              "its time, as for the one-token rope calls) does not scale with bandwidth; its H800 time is "
              "scaled all the same and overstates the difference.", ""]
    suites = sorted({r.get("suite") or r["op"].split(".")[0] for r in records})
    for suite in suites:
        mine = [p for r, p in zip(records, points)
                if (r.get("suite") or r["op"].split(".")[0]) == suite and p["link"] == "hbm"
                and not p["op"].startswith(CEILING_PREFIX)]
        if mine:
            lines += [f"### {suite}", "", hbm_table(mine), ""]
    if links:
        lines += ["## Expert-parallel traffic against NVLink", "",
                  "Bytes: the rows that cross to other ranks (profiles/cost_model.ep_dispatch / ep_combine); "
                  "the H800 projection uses its NVLink (200 GB/s one way) instead of the H200's 450.", "",
                  link_table(links), ""]
    if ncu_summaries:
        lines += ["## Nsight Compute", "",
                  "From `python -m profiles ncu all` (details per session in `ncu/`, index in NCU.md). Over-fetch "
                  "= DRAM bytes measured / minimal bytes; kernel times with the L2 flushed before each kernel.", "",
                  ncu.render_index(ncu_summaries), ""]
    else:
        lines += ["## Nsight Compute", "",
                  "No summaries for this device yet: run `python -m profiles ncu all` on it.", ""]
    lines += [deployment_section(kernels + links, records), ""]
    return "\n".join(lines)


def write_report(results_dir: Path = BENCH_RESULTS_DIR, out_root: Path = RESULTS_DIR,
                 devices: list[str] | None = None, plot: bool = True) -> list[Path]:
    """Write ROOFLINE.md (and the plot) for each device folder of ``results_dir``; returns the paths written."""
    results_dir, out_root = Path(results_dir), Path(out_root)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results_dir: no folder {results_dir}")
    slugs = devices or sorted(p.name for p in results_dir.iterdir() if p.is_dir())
    written = []
    for slug in slugs:
        records = load_device_records(results_dir / slug)
        if not records:
            continue
        out_dir = out_root / slug
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_path = out_dir / PLOT_NAME
        note = write_plot([analyse(r) for r in records], records, plot_path) if plot else "--no-plot"
        if note is None:
            written.append(plot_path)
        text = render(records, slug, note, ncu.load_summaries(out_dir))
        (out_dir / REPORT_NAME).write_text(text)
        written.append(out_dir / REPORT_NAME)
    return written
