"""Every bench/bench_*.py suite as a pytest-benchmark test; one benchmark entry per record.

    pytest bench/ --benchmark-json=out.json [--bench-quick] [--bench-write] [--bench-shapes b=64,s=4096]
                  [-k mla_decode]

A test runs one suite. In the terminal table and in the JSON every record of it is its own entry
(``mla_decode[triton bf16 b=64 q_len=1 h=16 s=4096]``, group = the suite): its statistics are the
harness's samples (µs per call of CUDA-event or graph-replay samples: the same median as the
record's ``time_us``), its ``extra_info`` the record (GB/s, TFLOP/s, % of ceilings, peer and
speed-up, H800 projection). bench/conftest.py makes those entries; after the table the session
prints the harness's own table per suite.

NOTES: why tests per suite, entries per record. A suite's records are known only once it has run
(usable backends, peers present, GPU count, model presets), so a test per record would need each
suite to list its records without running, or would run the GPU suites during collection (then
``--collect-only`` and ``-k`` would run every benchmark). Instead the test times nothing itself: it
runs the suite once under ``benchmark.pedantic`` (one round; that wall time is dropped) and hands
the records and their samples over in ``extra_info``; the plugin's ``pytest_benchmark_update_json``
and ``pytest_benchmark_group_stats`` hooks replace the suite's entry by the records' entries,
with statistics computed by pytest-benchmark's own Stats class. So ``-k`` selects suites (and
``--bench-shapes`` shapes, as ``python -m bench --shapes``), and ``--collect-only`` runs nothing.
``--benchmark-compare`` looks saved entries up by the running test's id (the suite's), so it finds
no per-record rows to compare: compare results files with ``python -m bench table`` instead.
"""
from __future__ import annotations

import pytest

from bench.__main__ import discover
from bench.conftest import suite_extra_info

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
    benchmark.extra_info.update(suite_extra_info(bench_ctx, name))
    assert bench_ctx.suite_records(name), f"suite {name} recorded nothing"
