"""Results records, the JSON files under bench/results/<device-slug>/<suite>.json, and tables.

One record per (op, backend, shape, dtype). Fields (None where they do not apply):
    suite, op, backend, shape (dict), dtype, time_us (median), bytes, flops (the op's cost model),
    gbps, tflops, frac_copy_bw, frac_mm_rate (of the ceilings measured in the same run), ideal_us
    (roofline time from those ceilings), peer {name, time_us[, missing, reason]}, speedup_vs_peer
    (peer time / our time), h800_projected_us, device, device_slug, timer, timing {min_us, p10_us,
    p90_us, reps, inner, n_sets, timer}, ceilings {copy_gbps, mm_tflops (sustained),
    mm_tflops_burst, frac_mm_rate_of (which matmul rate frac_mm_rate and ideal_us divide by)}, nvml
    (summary of the samples taken while the op ran), torch, triton, python, git_commit, timestamp,
    extra.

A file holds a JSON list of records sorted by key; writing merges: a record replaces the one with
the same key, others stay. The files are committed, so they are kept small and diff-friendly.
"""
from __future__ import annotations

import collections

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REQUIRED_FIELDS = (
    "op", "backend", "shape", "dtype", "time_us", "gbps", "tflops", "frac_copy_bw", "frac_mm_rate",
    "peer", "speedup_vs_peer", "h800_projected_us", "device", "torch", "triton", "git_commit",
    "timestamp", "nvml",
)


def _shape_sort_key(shape: dict[str, Any]) -> tuple:
    # Numbers sort as numbers (b=2 before b=16), everything else as text after them.
    return tuple((k, (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)))
                 for k, v in sorted(shape.items()))


def record_key(rec: dict[str, Any]) -> tuple:
    """The identity of a record: (op, backend, shape, dtype)."""
    return (rec["op"], rec["backend"], json.dumps(rec["shape"], sort_keys=True), rec["dtype"])


def _sort_key(rec: dict[str, Any]) -> tuple:
    return (rec["op"], rec["backend"], _shape_sort_key(rec["shape"]), rec["dtype"])


def load(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def merge(existing: Iterable[dict[str, Any]], new: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records of ``existing`` and ``new``, a new one replacing an old one with the same key; sorted."""
    by_key = {record_key(r): r for r in existing}
    for r in new:
        by_key[record_key(r)] = r
    return sorted(by_key.values(), key=_sort_key)


def dump(records: Iterable[dict[str, Any]]) -> str:
    return json.dumps(list(records), indent=1, sort_keys=True) + "\n"


def write_suite(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Merge ``records`` into the results file at ``path`` (created with its folder if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = merge(load(path), records)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(dump(merged))
    tmp.replace(path)
    return path


def write_json(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write the run's records (``--json PATH``), sorted, replacing the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump(sorted(records, key=lambda r: (r.get("suite", ""),) + _sort_key(r))))
    return path


# ---------------------------------------------------------------------------------------------
# Tables.

COLUMNS = ("op", "backend", "shape", "dtype", "µs", "GB/s", "TFLOP/s", "% copy", "% mm", "peer",
           "peer µs", "speed-up", "H800 µs")


def format_shape(shape: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _cells(rec: dict[str, Any]) -> list[str]:
    peer = rec.get("peer") or {}
    if peer.get("missing"):
        peer_name, peer_us = f"{peer['name']} (missing)", "-"
    else:
        peer_name, peer_us = peer.get("name") or "-", _num(peer.get("time_us"), ".2f")
    speedup = rec.get("speedup_vs_peer")
    return [rec["op"], rec["backend"], format_shape(rec["shape"]), rec["dtype"],
            _num(rec["time_us"], ".2f"), _num(rec.get("gbps"), ".1f"), _num(rec.get("tflops"), ".2f"),
            _pct(rec.get("frac_copy_bw")), _pct(rec.get("frac_mm_rate")), peer_name, peer_us,
            "-" if speedup is None else f"{speedup:.2f}x", _num(rec.get("h800_projected_us"), ".2f")]


def format_row(rec: dict[str, Any]) -> str:
    """One line per record, printed as the run goes."""
    c = dict(zip(COLUMNS, _cells(rec)))
    line = (f"  {c['op']:<24} {c['backend']:<10} {c['shape']:<36} {c['dtype']:<5} "
            f"{c['µs']:>10} µs {c['GB/s']:>8} GB/s {c['TFLOP/s']:>7} TFLOP/s")
    if rec.get("peer"):
        line += f"  vs {c['peer']} {c['peer µs']} µs ({c['speed-up']})"
    return line


def format_table(records: Iterable[dict[str, Any]], markdown: bool = False) -> str:
    """A table of records: fixed-width text for the terminal, or a Markdown table."""
    rows = [_cells(r) for r in sorted(records, key=_sort_key)]
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |",
                 "|" + "|".join("---" if i < 4 or c == "peer" else "---:" for i, c in enumerate(COLUMNS)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(COLUMNS)]
    right = [i >= 4 and COLUMNS[i] != "peer" for i in range(len(COLUMNS))]

    def line(cells):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    return "\n".join([line(COLUMNS), line(["-" * w for w in widths])] + [line(r) for r in rows])


def run_header(records: list[dict[str, Any]]) -> str:
    """Device, timer, ceilings, versions and commit of a set of records (taken from the newest); where the
    rows come from several runs, each commit with its row count, oldest first."""
    if not records:
        return ""
    r = max(records, key=lambda x: x.get("timestamp", ""))
    c = r.get("ceilings") or {}
    timer = "CPU timings (wall clock)" if r.get("timer") == "cpu-wall" else "CUDA events"
    burst = f" ({c['mm_tflops_burst']} in a burst after idle)" if c.get("mm_tflops_burst") else ""
    runs = collections.Counter(x.get("git_commit") for x in sorted(records, key=lambda x: x.get("timestamp", "")))
    older = "" if len(runs) == 1 else (
        "; rows from commits " + ", ".join(f"{commit} ({n})" for commit, n in runs.items()) + ", the newest run's")
    return (f"{r['device']} ({r.get('device_slug', '')}), {timer}{older}; ceilings: copy "
            f"{c.get('copy_gbps', '-')} GB/s, bf16 mm {c.get('mm_tflops', '-')} TFLOP/s sustained, "
            f"the rate % mm uses{burst}; torch {r['torch']}, triton {r['triton']}, commit "
            f"{r['git_commit']}, {r['timestamp']}")


def render_markdown(results_dir: str | Path, device: str | None = None) -> str:
    """Markdown tables of the committed results: one section per device, one table per suite."""
    results_dir = Path(results_dir)
    devices = [results_dir / device] if device else sorted(p for p in results_dir.iterdir() if p.is_dir())
    out = []
    for ddir in devices:
        files = sorted(ddir.glob("*.json")) if ddir.is_dir() else []
        if not files:
            out.append(f"No results for device {ddir.name!r} under {results_dir}.\n")
            continue
        out.append(f"## {ddir.name}\n")
        for f in files:
            recs = load(f)
            out.append(f"### {f.stem}\n\n{run_header(recs)}\n\n{format_table(recs, markdown=True)}\n")
    out.append("Regenerate: `python -m bench` on the GPU, then `python -m bench table"
               + (f" --device {device}" if device else "") + "`.\n")
    return "\n".join(out)
