"""pytest-benchmark route: ``pytest bench/ [--bench-quick] [--bench-write] --benchmark-json=PATH``.

A plain ``pytest`` from the repository root does not come here (pyproject sets testpaths = tests).
"""
from __future__ import annotations

import pytest
import torch

from bench.harness import DEFAULT_RESULTS_DIR, Context


def pytest_addoption(parser):
    group = parser.getgroup("pykernels bench")
    group.addoption("--bench-quick", action="store_true",
                    help="small sweeps and short timings (always on when there is no GPU)")
    group.addoption("--bench-write", action="store_true",
                    help="also merge the records into bench/results/<device>/<suite>.json")


@pytest.fixture(scope="session")
def bench_ctx(request) -> Context:
    """One Context for the session, so the ceilings are measured once."""
    quick = request.config.getoption("--bench-quick") or not torch.cuda.is_available()
    write = request.config.getoption("--bench-write")
    return Context(quick=quick, results_dir=DEFAULT_RESULTS_DIR if write else None,
                   echo=request.config.getoption("capture") == "no")
