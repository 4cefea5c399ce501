"""pytest-benchmark route: ``pytest bench/ [--bench-quick] [--bench-write] [--bench-shapes K=V,..]
--benchmark-json=PATH``.

A plain ``pytest`` from the repository root does not come here (pyproject sets testpaths = tests).

Each test runs one suite (bench/test_benchmarks.py) and hands its records, with the harness's timed
samples, to pytest-benchmark in the entry's ``extra_info``. Two of pytest-benchmark's hooks then
replace that suite entry by one entry per record, in the terminal table and in the JSON:

* name ``op[backend dtype k=v ...]``, group the suite, fullname the suite test's id + ``::`` + name,
  params ``{"op", "backend", "dtype", **shape}`` (so ``--benchmark-group-by=func`` groups by op,
  ``param:h`` by a shape size);
* statistics from the harness's samples (µs per call of each CUDA-event or graph-replay sample,
  ``iterations`` = the calls a sample averages), so min/median/IQR/ops are the record's own; a record
  whose time the suite measured otherwise (a generate run, spawned ranks) has one round, its time_us;
* ``extra_info`` the whole record (time_us, gbps, tflops, frac_copy_bw, frac_mm_rate, peer,
  speedup_vs_peer, h800_projected_us, nvml, ...), exactly as ``python -m bench`` writes it.

After pytest-benchmark's table the session also prints the harness's own table per suite (µs, GB/s,
TFLOP/s, % of ceilings, peer and speed-up, H800 projection).
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from bench import results
from bench.harness import DEFAULT_RESULTS_DIR, Context

# Keys of a suite entry's extra_info that carry its records to the hooks below.
RECORDS = "records"
SAMPLES = "samples_us"
# The Context of the session, for the terminal summary.
CONTEXT = pytest.StashKey[Context]()


def pytest_addoption(parser):
    group = parser.getgroup("pykernels bench")
    group.addoption("--bench-quick", action="store_true",
                    help="small sweeps and short timings (always on when there is no GPU)")
    group.addoption("--bench-write", action="store_true",
                    help="also merge the records into bench/results/<device>/<suite>.json")
    group.addoption("--bench-shapes", nargs="+", metavar="K=V[,K=V]",
                    help="only shapes matching one filter, e.g. b=64,s=4096 (as python -m bench --shapes)")


@pytest.fixture(scope="session")
def bench_ctx(request) -> Context:
    """One Context for the session, so the ceilings are measured once."""
    quick = request.config.getoption("--bench-quick") or not torch.cuda.is_available()
    write = request.config.getoption("--bench-write")
    ctx = Context(quick=quick, shapes=request.config.getoption("--bench-shapes"),
                  results_dir=DEFAULT_RESULTS_DIR if write else None,
                  echo=request.config.getoption("capture") == "no")
    request.config.stash[CONTEXT] = ctx
    return ctx


def suite_extra_info(ctx: Context, suite: str) -> dict[str, Any]:
    """What a suite's test puts in its entry's extra_info: the run's context, the suite's records
    and, in the same order, each record's samples (µs per call; empty when it has none)."""
    records = ctx.suite_records(suite)
    return {"suite": suite, "device": ctx.device_name, "device_slug": ctx.slug, "timer": ctx.timer_label,
            "quick": ctx.quick,
            "ceilings": {"copy_gbps": ctx.ceilings.copy_gbps, "mm_tflops": ctx.ceilings.mm_tflops},
            RECORDS: records, SAMPLES: [list(ctx.samples_of(r)) for r in records]}


def record_entries(entry: dict[str, Any], *, flat: bool) -> list[dict[str, Any]]:
    """A suite's pytest-benchmark entry (as its JSON or its flat table row holds it) as one entry per
    record; an entry that carries no records (another test's, or one loaded to compare) as itself."""
    info = entry.get("extra_info") or {}
    if RECORDS not in info:
        return [entry]
    stats = entry if flat else entry.get("stats") or {}
    include_data = "data" in stats
    out, seen = [], set()
    for rec, samples_us in zip(info[RECORDS], info.get(SAMPLES) or [[]] * len(info[RECORDS])):
        label = " ".join(filter(None, (rec["backend"], rec["dtype"], results.format_shape(rec["shape"]))))
        name = f"{rec['op']}[{label}]"
        while name in seen:  # same (op, backend, dtype, shape) twice: keep both rows apart
            name += "'"
        seen.add(name)
        timing = rec.get("timing") or {}
        inner = timing.get("inner", 1) if samples_us else 1
        new = {"group": entry.get("group"), "name": name, "fullname": f"{entry['fullname']}::{name}",
               "params": {"op": rec["op"], "backend": rec["backend"], "dtype": rec["dtype"], **rec["shape"]},
               "param": label, "extra_info": rec,
               "options": {"timer": rec.get("timer"), "inner": inner, "n_sets": timing.get("n_sets"),
                           "samples": "harness samples" if samples_us else "the record's time_us only"}}
        rec_stats = _stats([s * 1e-6 for s in samples_us] or [rec["time_us"] * 1e-6], inner, include_data)
        if flat:
            new.update(rec_stats, path=entry.get("path"), source=entry.get("source"))
        else:
            new["stats"] = rec_stats
        out.append(new)
    return out


def _stats(seconds: list[float], iterations: int, include_data: bool) -> dict[str, Any]:
    """pytest-benchmark's statistics of per-call times, computed by its own Stats class."""
    from pytest_benchmark.stats import Stats

    s = Stats()
    for x in seconds:
        s.update(x)
    out = s.as_dict()
    if include_data:
        out["data"] = list(seconds)
    out["iterations"] = iterations
    return out


def _expand(entries: list[dict[str, Any]], *, flat: bool) -> list[dict[str, Any]]:
    return [new for entry in entries for new in record_entries(entry, flat=flat)]


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    """--benchmark-json / --benchmark-save: one entry per record instead of one per suite."""
    output_json["benchmarks"] = _expand(output_json["benchmarks"], flat=False)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_benchmark_group_stats(config, benchmarks, group_by):
    """The terminal table: the suites' rows become one row per record, in place, and returning None
    lets pytest-benchmark's own grouping (--benchmark-group-by) run on them."""
    benchmarks[:] = _expand(benchmarks, flat=True)


def pytest_terminal_summary(terminalreporter, config):
    ctx = config.stash.get(CONTEXT, None)
    if ctx is None or not ctx.records:
        return
    terminalreporter.section(f"pykernels bench records ({ctx.device_name}; {ctx.timer_label})")
    for suite in dict.fromkeys(r["suite"] for r in ctx.records):
        terminalreporter.write_line(f"-- {suite}")
        terminalreporter.write_line(results.format_table(ctx.suite_records(suite)))
