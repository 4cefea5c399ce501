"""Microbenchmarks and end-to-end throughput runs: ``python -m bench [suite ...]``.

Each suite is a module bench/bench_<suite>.py with ``SUITE = "<suite>"`` and ``run(ctx)``; the
harness (bench/harness.py) gives it a ``Context`` with the timer, the measured ceilings and
``record``. Results go to bench/results/<device-slug>/<suite>.json (bench/results.py).
"""
