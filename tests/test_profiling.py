"""NVTX ranges: shared no-op when off, push/pop when on (pykernels/profiling.py)."""
import os
import subprocess
import sys

import pytest

from pykernels import profiling


@pytest.fixture
def recorder(monkeypatch):
    """Replace the NVTX backend by a list of ("push", name) / ("pop",) events."""
    events = []
    monkeypatch.setattr(profiling, "_push_pop", (lambda name: events.append(("push", name)),
                                                 lambda: events.append(("pop",))))
    monkeypatch.setattr(profiling, "_enabled", False)
    return events


def test_off_returns_the_shared_noop(recorder):
    a, b = profiling.nvtx_range("a"), profiling.nvtx_range("b")
    assert a is b is profiling._NO_RANGE
    with profiling.nvtx_range("x"):
        pass
    assert recorder == []
    assert not profiling.nvtx_enabled()


def test_on_pushes_and_pops(recorder):
    profiling.enable_nvtx(True)
    with profiling.nvtx_range("outer"):
        with profiling.nvtx_range("inner"):
            pass
    assert recorder == [("push", "outer"), ("push", "inner"), ("pop",), ("pop",)]


def test_pop_on_exception(recorder):
    profiling.enable_nvtx(True)
    with pytest.raises(RuntimeError):
        with profiling.nvtx_range("boom"):
            raise RuntimeError("x")
    assert recorder == [("push", "boom"), ("pop",)]


def test_decorator_reads_the_switch_per_call(recorder):
    @profiling.nvtx_range("f")          # decorated while off
    def f(x, y=1):
        """doc"""
        return x + y

    assert f.__name__ == "f" and f.__doc__ == "doc"
    assert f(1, y=2) == 3 and recorder == []
    profiling.enable_nvtx(True)
    assert f(1) == 2
    assert recorder == [("push", "f"), ("pop",)]
    profiling.enable_nvtx(False)
    f(1)
    assert len(recorder) == 2


def test_decorator_defined_while_on(recorder):
    profiling.enable_nvtx(True)

    @profiling.nvtx_range("g")
    def g():
        raise ValueError("inside")

    with pytest.raises(ValueError):
        g()
    assert recorder == [("push", "g"), ("pop",)]


def test_real_backend_runs_on_cpu(monkeypatch):
    # The nvtx package (or torch.cuda.nvtx) must be callable without a profiler attached.
    monkeypatch.setattr(profiling, "_push_pop", None)
    monkeypatch.setattr(profiling, "_enabled", True)
    try:
        with profiling.nvtx_range("cpu-range"):
            pass
    except RuntimeError as e:  # torch.cuda.nvtx on a CPU-only torch without the nvtx package
        pytest.skip(f"no NVTX backend here: {e}")


def test_env_switch():
    code = "from pykernels import profiling as p; print(p.nvtx_enabled())"
    for value, expected in (("1", "True"), ("0", "False")):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYKERNELS_NVTX": value},
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == expected
