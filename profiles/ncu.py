"""Nsight Compute sessions: ``python -m profiles ncu <op>|all [--backend B] [--shape k=v,...]``.

One session profiles one op at one shape: ncu runs ``python -m profiles.ncu_launch`` with
``--clock-control none`` (the clocks stay as the GPU sets them, as in the benchmarks) and NVTX
filtering on the range the launcher opens around the profiled calls, so only the op's kernels are
measured (not the input set-up, not the warm-up compiles). The report is exported, then read back
as ncu's raw page in CSV with base units and summarised:

    per kernel   duration, DRAM bytes read / written, DRAM and SM throughput (% of peak),
                 achieved and theoretical occupancy, grid, block, registers, shared memory
    per call     the sums over the op's kernels, the over-fetch ratio (DRAM bytes measured / the cost
                 model's minimal bytes), the time against the datasheet roofline, and the limit that
                 binds (see ``binding_limit``)

Outputs under ``profiles/results/<device-slug>/ncu/``: ``<op>-<backend>.json`` and ``.md``, and the
``.ncu-rep`` when it is under ``KEEP_REP_BYTES`` (or with --keep-rep); ``profiles/results/<slug>/NCU.md``
indexes every summary there. ncu caches: its default --cache-control all flushes the L2 before every
kernel, so each kernel reads its inputs from DRAM (what the over-fetch ratio needs).
"""
from __future__ import annotations

import csv
import datetime
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from profiles import hardware, ncu_targets

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "profiles" / "results"
BENCH_RESULTS_DIR = REPO_ROOT / "bench" / "results"

# The metrics requested (names as `ncu --query-metrics` gives them on sm_90).
DRAM_READ = "dram__bytes_read.sum"
DRAM_WRITE = "dram__bytes_write.sum"
DURATION = "gpu__time_duration.sum"
DRAM_PCT = "dram__throughput.avg.pct_of_peak_sustained_elapsed"
SM_PCT = "sm__throughput.avg.pct_of_peak_sustained_elapsed"
MEM_PCT = "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"
OCCUPANCY = "sm__warps_active.avg.pct_of_peak_sustained_active"
THEORETICAL_OCCUPANCY = "sm__maximum_warps_per_active_cycle_pct"
GRID = "launch__grid_size"
BLOCK = "launch__block_size"
REGISTERS = "launch__registers_per_thread"
SMEM_DYNAMIC = "launch__shared_mem_per_block_dynamic"
SMEM_STATIC = "launch__shared_mem_per_block_static"
WAVES = "launch__waves_per_multiprocessor"
DEVICE_NAME = "device__attribute_display_name"  # in every raw page, not requested
METRICS = (DRAM_READ, DRAM_WRITE, DURATION, DRAM_PCT, SM_PCT, MEM_PCT, OCCUPANCY, THEORETICAL_OCCUPANCY,
           GRID, BLOCK, REGISTERS, SMEM_DYNAMIC, SMEM_STATIC, WAVES)

# ncu's guidance reads a unit at >= 60 % of its peak as the one that limits the kernel; below that on
# both DRAM and SM the kernel waits (latency: too few warps or too little work in flight).
BOUND_PCT = 60.0
# A report is kept in the repository when it is smaller than this (Triton kernels give ~1 MB; a
# report of torch's kernels carries libtorch's large cubins and can be tens of MB).
KEEP_REP_BYTES = 5 * 2**20
# Calls the launcher makes inside the range, and the most kernels ncu profiles (a bound, not a target:
# the torch reference of mla_decode launches ~15 kernels a call).
DEFAULT_ITERS = 1
DEFAULT_LAUNCH_COUNT = 200

# Where ncu is looked for when it is not on PATH ($PYKERNELS_NCU first).
NCU_GLOBS = ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu", "/usr/local/cuda-*/bin/ncu",
             "/usr/local/NVIDIA-Nsight-Compute*/ncu")

# Why an over-fetch ratio can read below 1.
WRITE_NOTE = ("DRAM writes are counted as the L2 evicts them: lines still dirty in the L2 (60 MB on an H200) "
              "when a kernel ends are not in its count, so a writing kernel can show fewer bytes than its minimum.")

_UNIT_SCALE = {
    "byte": 1.0, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12,
    "ns": 1.0, "nsecond": 1.0, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6, "s": 1e9, "second": 1e9,
}


def find_ncu() -> str | None:
    """The ncu executable: $PYKERNELS_NCU, PATH, then the usual install folders (newest version first)."""
    env = os.environ.get("PYKERNELS_NCU")
    if env:
        return env if Path(env).exists() else None
    if found := shutil.which("ncu"):
        return found
    for pattern in NCU_GLOBS:
        hits = sorted(glob.glob(pattern), key=_version_key, reverse=True)
        for hit in hits:
            if os.access(hit, os.X_OK):
                return hit
    return None


def _version_key(path: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", path))


def profile_command(ncu: str, op: str, backend: str, shape: dict[str, Any], export: Path, info: Path,
                    iters: int = DEFAULT_ITERS, launch_count: int = DEFAULT_LAUNCH_COUNT,
                    python: str = sys.executable) -> list[str]:
    """The ncu command line of one session (``export`` without the .ncu-rep suffix)."""
    return [ncu, "--clock-control", "none", "--nvtx", "--nvtx-include", ncu_targets.nvtx_include(op, backend, shape),
            "--metrics", ",".join(METRICS), "--launch-count", str(launch_count), "--export", str(export),
            "--force-overwrite", python, "-m", "profiles.ncu_launch", op, backend,
            ",".join(f"{k}={v}" for k, v in shape.items()), "--iters", str(iters), "--info", str(info)]


def import_command(ncu: str, report: Path) -> list[str]:
    """Read a report back as the raw page, CSV, base units (bytes, ns)."""
    return [ncu, "--import", str(report), "--csv", "--page", "raw", "--print-units", "base"]


# ---------------------------------------------------------------------------------------------
# Parsing ncu's raw CSV page.


def _number(text: str) -> float | None:
    """ncu's formatted number ("67,117,056", "71.00", "n/a") as a float, None when not a number."""
    text = text.strip().replace(",", "")
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _nvtx_stack(cell: str) -> list[str]:
    """Range names of ncu's push/pop column, outermost first.

    The cell reads ``<tid>  "<domain>:<range>:<PL_Type>:<PL_Value>:<CLR_Type>:<Color>:<Msg_Type>:<Msg>" ...``;
    a range name may itself hold ":", so the six trailing fields are cut from the right.
    """
    names = []
    for item in re.findall(r'"([^"]*)"', cell):
        _, _, rest = item.partition(":") if not item.startswith("<") else item.partition(">:")
        names.append(rest.rsplit(":", 6)[0])
    return names


def parse_raw_csv(text: str) -> list[dict[str, Any]]:
    """Kernels of ncu's ``--csv --page raw`` output: one dict per profiled kernel.

    Lines before the header (ncu's ``==PROF==`` log when it shares stdout) are skipped. The row after
    the header holds the units; values are scaled to bytes and nanoseconds where a unit says
    otherwise (without ``--print-units base``). Each dict: ``id``, ``name``, ``block``, ``grid`` (ncu's
    text), ``nvtx`` (the push/pop stack), ``device`` (its name), ``metrics`` {name: float | None} for
    every metric column.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError("ncu CSV: no header row starting with \"ID\" (is this `--csv --page raw` output?)")
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header = rows[0]
    if "Kernel Name" not in header:
        raise ValueError(f"ncu CSV: expected a 'Kernel Name' column, got {header[:8]}")
    col = {name: i for i, name in enumerate(header)}
    nvtx_col = next((i for i, name in enumerate(header) if "Push/Pop_Range" in name), None)
    data = rows[1:]
    units: dict[str, str] = {}
    if data and data[0][col["ID"]] == "":
        units = {name: data[0][i] for name, i in col.items() if i < len(data[0])}
        data = data[1:]
    metric_names = [name for name in header if "__" in name]
    kernels = []
    for row in data:
        if len(row) < len(header):
            continue  # a truncated line (ncu killed mid-write)
        metrics = {}
        for name in metric_names:
            value = _number(row[col[name]])
            scale = _UNIT_SCALE.get(units.get(name, "").strip().lower(), 1.0)
            metrics[name] = value * scale if value is not None else None
        kernels.append({
            "id": int(_number(row[col["ID"]]) or 0),
            "name": row[col["Kernel Name"]],
            "block": row[col["Block Size"]] if "Block Size" in col else None,
            "grid": row[col["Grid Size"]] if "Grid Size" in col else None,
            "nvtx": _nvtx_stack(row[nvtx_col]) if nvtx_col is not None else [],
            "device": row[col[DEVICE_NAME]] if DEVICE_NAME in col else None,
            "metrics": metrics,
        })
    return kernels


# ---------------------------------------------------------------------------------------------
# Summaries.


def binding_limit(dram_pct: float | None, sm_pct: float | None) -> str:
    """Which limit binds a kernel, from its DRAM and SM throughput as % of peak."""
    dram, sm = dram_pct or 0.0, sm_pct or 0.0
    if max(dram, sm) >= BOUND_PCT:
        return "DRAM bandwidth" if dram >= sm else "SM throughput"
    return "latency"


def _weighted(kernels: list[dict], metric: str) -> float | None:
    """Duration-weighted mean of ``metric`` over kernels that report both."""
    pairs = [(k["metrics"].get(DURATION), k["metrics"].get(metric)) for k in kernels]
    pairs = [(d, v) for d, v in pairs if d and v is not None]
    total = sum(d for d, _ in pairs)
    return sum(d * v for d, v in pairs) / total if total else None


def summarize(kernels: list[dict[str, Any]], *, op: str, backend: str, shape: dict[str, int], device: str,
              info: dict[str, Any] | None = None, bench_time_us: float | None = None,
              elem_bytes: int = 2) -> dict[str, Any]:
    """The per-call summary of one session: totals over the op's kernels divided by the calls made."""
    info = info or {}
    iters = int(info.get("iters", 1))
    cost = ncu_targets.minimal_cost(op, shape, elem_bytes, info.get("experts_hit"))
    rows = []
    for k in kernels:
        m = k["metrics"]
        dram_pct, sm_pct = m.get(DRAM_PCT), m.get(SM_PCT)
        smem = sum(v for v in (m.get(SMEM_DYNAMIC), m.get(SMEM_STATIC)) if v is not None)
        rows.append({
            "name": k["name"], "grid": k["grid"], "block": k["block"],
            "duration_us": _scaled(m.get(DURATION), 1e-3),
            "dram_read_bytes": m.get(DRAM_READ), "dram_write_bytes": m.get(DRAM_WRITE),
            "dram_pct": dram_pct, "sm_pct": sm_pct, "memory_pct": m.get(MEM_PCT),
            "occupancy_pct": m.get(OCCUPANCY), "theoretical_occupancy_pct": m.get(THEORETICAL_OCCUPANCY),
            "registers": m.get(REGISTERS), "shared_mem_bytes": smem, "waves_per_sm": m.get(WAVES),
            "limit": binding_limit(dram_pct, sm_pct), "nvtx": k["nvtx"],
        })
    duration_ns = sum(k["metrics"].get(DURATION) or 0.0 for k in kernels) / iters
    read = sum(k["metrics"].get(DRAM_READ) or 0.0 for k in kernels) / iters
    written = sum(k["metrics"].get(DRAM_WRITE) or 0.0 for k in kernels) / iters
    dram_pct, sm_pct = _weighted(kernels, DRAM_PCT), _weighted(kernels, SM_PCT)
    spec = hardware.spec_for_name(device)
    ideal_us = hardware.roofline_time_s(cost.bytes, cost.flops, spec) * 1e6 if spec else None
    time_us = duration_ns * 1e-3
    range_name = ncu_targets.range_name(op, backend, shape)
    return {
        "op": op, "backend": backend, "shape": dict(shape), "dtype": "bf16" if elem_bytes == 2 else f"{elem_bytes}B",
        "device": device, "device_slug": hardware.device_slug(device),
        "nvtx_range": range_name,
        "nvtx_seen": bool(kernels) and all(range_name in k["nvtx"] for k in kernels),
        "calls": iters,
        "kernels_per_call": len(kernels) / iters,
        "time_us": time_us,
        "bench_time_us": bench_time_us,
        "dram_read_bytes": read, "dram_write_bytes": written,
        "minimal_bytes": cost.bytes, "minimal_flops": cost.flops,
        "overfetch": (read + written) / cost.bytes if cost.bytes else None,
        "dram_gbps": (read + written) / duration_ns if duration_ns else None,
        "dram_pct": dram_pct, "sm_pct": sm_pct,
        "occupancy_pct": _weighted(kernels, OCCUPANCY),
        "ideal_us": ideal_us,
        "frac_roofline": ideal_us / time_us if ideal_us and time_us else None,
        "limit": binding_limit(dram_pct, sm_pct),
        "info": {k: v for k, v in info.items() if k not in ("iters", "device")},
        "kernels": rows,
    }


def _scaled(x: float | None, factor: float) -> float | None:
    return None if x is None else x * factor


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{format(x, spec)}{suffix}"


def _pct(frac: float | None) -> str:
    return _fmt(None if frac is None else 100 * frac, ".1f", " %")


def _mb(x: float | None) -> str:
    return _fmt(None if x is None else x / 1e6, ".2f")


def render_summary(s: dict[str, Any]) -> str:
    """The Markdown of one session's summary."""
    shape = ncu_targets.format_shape(s["shape"])
    seen = "seen on every profiled kernel" if s["nvtx_seen"] else "NOT seen on every kernel"
    lines = [
        f"# ncu: {s['op']} ({s['backend']}) {shape}, {s['dtype']}, on {s['device']}",
        "",
        f"NVTX range `{s['nvtx_range']}` ({seen}); {s['calls']} call(s) profiled, "
        f"{s['kernels_per_call']:g} kernel(s) a call; `ncu --clock-control none`, L2 flushed before each "
        f"kernel (ncu's default cache control); ncu {s.get('ncu_version') or '?'}, "
        f"commit {s.get('git_commit') or '?'}.",
        "",
        "| per call | value |",
        "|---|---:|",
        f"| time (sum of kernel durations) | {_fmt(s['time_us'], '.2f', ' µs')} |",
        f"| benchmark median (bench/results, commit {s.get('bench_commit') or '-'}) | "
        f"{_fmt(s.get('bench_time_us'), '.2f', ' µs')} |",
        f"| DRAM read / written | {_mb(s['dram_read_bytes'])} / {_mb(s['dram_write_bytes'])} MB |",
        f"| minimal bytes (profiles/cost_model.py) | {_mb(s['minimal_bytes'])} MB |",
        f"| over-fetch (DRAM bytes / minimal bytes) | {_fmt(s['overfetch'], '.3f', 'x')} |",
        f"| DRAM bytes over kernel time | {_fmt(s['dram_gbps'], '.0f', ' GB/s')} |",
        f"| DRAM throughput, % of peak (time-weighted) | {_fmt(s['dram_pct'], '.1f', ' %')} |",
        f"| SM throughput, % of peak (time-weighted) | {_fmt(s['sm_pct'], '.1f', ' %')} |",
        f"| achieved occupancy (time-weighted) | {_fmt(s['occupancy_pct'], '.1f', ' %')} |",
        f"| ideal time at the datasheet limits (minimal bytes and FLOPs) | {_fmt(s['ideal_us'], '.2f', ' µs')} |",
        f"| fraction of that roofline | {_pct(s['frac_roofline'])} |",
        f"| limit that binds | {s['limit']} |",
    ]
    if s.get("info"):
        lines += ["", "Inputs: " + ", ".join(f"{k} {v}" for k, v in s["info"].items()) + "."]
    lines += ["", "## Kernels", "",
              "| kernel | grid | block | regs | smem B | µs | DRAM read MB | written MB | DRAM % | SM % | "
              "occupancy % (achieved / theoretical) | limit |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for k in s["kernels"]:
        name = k["name"] if len(k["name"]) <= 90 else k["name"][:87] + "..."
        lines.append(
            f"| `{name}` | {k['grid']} | {k['block']} | {_fmt(k['registers'], '.0f')} | "
            f"{_fmt(k['shared_mem_bytes'], '.0f')} | {_fmt(k['duration_us'], '.2f')} | {_mb(k['dram_read_bytes'])} | "
            f"{_mb(k['dram_write_bytes'])} | {_fmt(k['dram_pct'], '.1f')} | {_fmt(k['sm_pct'], '.1f')} | "
            f"{_fmt(k['occupancy_pct'], '.1f')} / {_fmt(k['theoretical_occupancy_pct'], '.1f')} | {k['limit']} |")
    lines += ["", f"Limit: a unit at >= {BOUND_PCT:.0f} % of its peak binds (DRAM or SM, the higher); below "
              "that on both the kernel is latency-bound (too little work in flight). " + WRITE_NOTE, ""]
    if s.get("report"):
        lines.append(f"Raw report: `{s['report']}` (open with `ncu-ui` or `ncu --import`).")
    lines.append(f"Regenerate: `{s['regenerate']}` on the GPU." if s.get("regenerate") else "")
    return "\n".join(lines).rstrip() + "\n"


def render_index(summaries: list[dict[str, Any]]) -> str:
    """One table over every session summary of a device (NCU.md, also quoted by the roofline report)."""
    lines = ["| op | backend | shape | kernels | µs | DRAM MB | minimal MB | over-fetch | DRAM % | SM % | "
             "occupancy % | % of roofline | limit | NVTX seen |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for s in sorted(summaries, key=lambda x: (x["op"], x["backend"])):
        frac = None if s["frac_roofline"] is None else 100 * s["frac_roofline"]
        lines.append(
            f"| {s['op']} | {s['backend']} | {ncu_targets.format_shape(s['shape'])} | {s['kernels_per_call']:g} | "
            f"{_fmt(s['time_us'], '.2f')} | {_mb(s['dram_read_bytes'] + s['dram_write_bytes'])} | "
            f"{_mb(s['minimal_bytes'])} | {_fmt(s['overfetch'], '.3f', 'x')} | {_fmt(s['dram_pct'], '.1f')} | "
            f"{_fmt(s['sm_pct'], '.1f')} | {_fmt(s['occupancy_pct'], '.1f')} | {_fmt(frac, '.1f')} | {s['limit']} | "
            f"{'yes' if s['nvtx_seen'] else 'no'} |")
    return "\n".join(lines) + "\n"


def load_summaries(device_dir: Path) -> list[dict[str, Any]]:
    """Every ``ncu/*.json`` summary under a device's results folder."""
    return [json.loads(p.read_text()) for p in sorted((device_dir / "ncu").glob("*.json"))]


def write_index(device_dir: Path) -> Path:
    summaries = load_summaries(device_dir)
    device = summaries[0]["device"] if summaries else device_dir.name
    text = (f"# Nsight Compute summaries: {device}\n\n"
            "Written by `python -m profiles ncu`; one file per session in `ncu/` (Markdown, JSON, and the "
            "`.ncu-rep` where it is small). Over-fetch = DRAM bytes measured / the cost model's minimal bytes; "
            "times are ncu's kernel durations (L2 flushed before each kernel, clocks uncontrolled). "
            + WRITE_NOTE + "\n\n"
            + render_index(summaries))
    path = device_dir / "NCU.md"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# Running sessions.


def bench_record(op: str, backend: str, shape: dict[str, Any], slug: str,
                 results_dir: Path = BENCH_RESULTS_DIR) -> dict[str, Any] | None:
    """The committed benchmark record of the same op, backend and shape on this device, if any."""
    for path in sorted((results_dir / slug).glob("*.json")):
        try:
            records = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for r in records if isinstance(records, list) else []:
            if r.get("op") == op and r.get("backend") == backend and r.get("shape") == shape:
                return r
    return None


def regenerate_command(op: str, backend: str, shape: dict[str, Any]) -> str:
    return (f"python -m profiles ncu {op} --backend {backend} --shape "
            + ",".join(f"{k}={v}" for k, v in shape.items()) + " --keep-rep")


def _ncu_version(ncu: str) -> str | None:
    try:
        out = subprocess.run([ncu, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[-1].removeprefix("Version ") if lines else None


def run_session(op: str, backend: str | None = None, shape_overrides: dict[str, str] | None = None, *,
                out_root: Path = RESULTS_DIR, iters: int = DEFAULT_ITERS,
                launch_count: int = DEFAULT_LAUNCH_COUNT, keep_rep: bool = False,
                ncu: str | None = None) -> dict[str, Any]:
    """Profile one op under ncu and write its summary; returns the summary (raises RuntimeError on failure)."""
    backend = ncu_targets.check_backend(op, backend)
    shape = ncu_targets.resolve_shape(op, shape_overrides)
    ncu = ncu or find_ncu()
    if ncu is None:
        raise RuntimeError("ncu not found: put Nsight Compute's ncu on PATH or set PYKERNELS_NCU "
                           f"(looked in PATH and {', '.join(NCU_GLOBS)})")
    with tempfile.TemporaryDirectory(prefix="pk-ncu-") as tmp:
        export, info_path = Path(tmp) / "session", Path(tmp) / "info.json"
        cmd = profile_command(ncu, op, backend, shape, export, info_path, iters, launch_count)
        env = dict(os.environ, PYKERNELS_NVTX="1")
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        report = export.with_suffix(".ncu-rep")
        if proc.returncode != 0 or not report.exists():
            raise RuntimeError(f"ncu session {op}/{backend} failed (rc {proc.returncode}):\n"
                               + _tail(proc.stdout + proc.stderr))
        raw = subprocess.run(import_command(ncu, report), capture_output=True, text=True)
        if raw.returncode != 0:
            raise RuntimeError(f"ncu --import failed (rc {raw.returncode}):\n{_tail(raw.stdout + raw.stderr)}")
        kernels = parse_raw_csv(raw.stdout)
        if not kernels:
            raise RuntimeError(f"ncu profiled no kernel in the range {ncu_targets.range_name(op, backend, shape)!r}:\n"
                               + _tail(proc.stdout + proc.stderr))
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        device = info.get("device") or kernels[0]["device"] or "unknown GPU"
        slug = hardware.device_slug(device)
        bench = bench_record(op, backend, shape, slug) or {}
        summary = summarize(kernels, op=op, backend=backend, shape=shape, device=device, info=info,
                            bench_time_us=bench.get("time_us"))
        summary["bench_commit"] = bench.get("git_commit")
        out_dir = out_root / slug / "ncu"
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{op}-{backend}"
        kept = out_dir / f"{stem}.ncu-rep"
        if keep_rep or report.stat().st_size < KEEP_REP_BYTES:
            shutil.copyfile(report, kept)
            summary["report"] = kept.name
        else:
            kept.unlink(missing_ok=True)
            summary["report"] = None
        summary.update(
            report_bytes=report.stat().st_size,
            regenerate=regenerate_command(op, backend, shape),
            ncu_command=" ".join(cmd[1:cmd.index("--export")]),
            ncu_version=_ncu_version(ncu),
            git_commit=_git_commit(),
            timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
    (out_dir / f"{stem}.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    (out_dir / f"{stem}.md").write_text(render_summary(summary))
    write_index(out_root / slug)
    return summary


def _git_commit() -> str:
    from bench.harness import git_commit  # honours $PYKERNELS_GIT_COMMIT (a tree copied without .git)

    return git_commit()


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])
