"""Every bench/bench_*.py suite as a pytest-benchmark test.

    pytest bench/ --benchmark-json=out.json [--bench-quick] [--bench-write] [-k mla_decode]

Each suite is one benchmark entry: its ``group`` is the suite name, its pytest-benchmark timing is
the wall time of the whole suite (one round), and ``extra_info["records"]`` holds the suite's
records with the harness's own measurements (median CUDA-event µs per call, GB/s, TFLOP/s, % of
ceilings, peer and speed-up, H800 projection) exactly as ``python -m bench`` makes them. Read the
records, not the entry's wall time, for op timings.

NOTES: why one entry per suite and not per (op, backend, shape) record. A suite's records are known
only once it has run (usable backends, peers present, GPU count, --shapes filters), so per-record
tests would have to be made by running the GPU suites during collection (then ``--collect-only`` and
``-k`` would run every benchmark). And a pytest-benchmark entry can only hold what its ``benchmark``
fixture timed itself, once per test: the harness's CUDA-event and graph-replay samples could enter
entries only through pytest-benchmark's private session and stats objects, or by rewriting its JSON
in the ``pytest_benchmark_update_json`` hook (and the terminal table would still show suites).
"""
from __future__ import annotations

import pytest

from bench.__main__ import discover

SUITES, BROKEN = discover()


@pytest.mark.parametrize("name", list(SUITES) + sorted(BROKEN))
def test_suite(name, benchmark, bench_ctx):
    if name in BROKEN:
        pytest.fail(f"suite {name}: {BROKEN[name]}")
    module = SUITES[name]

    def run_suite():
        with bench_ctx.suite_run(name):
            module.run(bench_ctx)

    benchmark.group = name
    benchmark.pedantic(run_suite, rounds=1, iterations=1)
    records = bench_ctx.suite_records(name)
    benchmark.extra_info.update(
        suite=name, device=bench_ctx.device_name, device_slug=bench_ctx.slug,
        timer=bench_ctx.timer_label, quick=bench_ctx.quick,
        ceilings={"copy_gbps": bench_ctx.ceilings.copy_gbps, "mm_tflops": bench_ctx.ceilings.mm_tflops},
        records=records)
    assert records, f"suite {name} recorded nothing"
