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


# --- NVML sampler (profiles/nvml.py) --------------------------------------------------------------

def _fake_pynvml(clocks=(1980, 3201), power_mw=500_000, temp=60, reasons=0x4 | 0x1):
    import types

    class NVMLError(Exception):
        pass

    m = types.SimpleNamespace(NVMLError=NVMLError, NVML_CLOCK_SM=0, NVML_CLOCK_MEM=1, NVML_TEMPERATURE_GPU=0)
    state = {"inits": 0}
    m.nvmlInit = lambda: state.__setitem__("inits", state["inits"] + 1)
    m.nvmlShutdown = lambda: state.__setitem__("inits", state["inits"] - 1)
    m.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    m.nvmlDeviceGetClockInfo = lambda h, kind: clocks[kind]
    m.nvmlDeviceGetPowerUsage = lambda h: power_mw
    m.nvmlDeviceGetTemperature = lambda h, kind: temp
    m.nvmlDeviceGetCurrentClocksEventReasons = lambda h: reasons
    return m, state


def test_nvml_sampler_with_fake_nvml(monkeypatch):
    import time

    from profiles import nvml

    fake, state = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with nvml.NvmlSampler(0, interval_s=0.005) as s:
        time.sleep(0.05)
        assert s.available
    summary = s.summary()
    assert summary["available"] and summary["samples"] >= 3
    assert summary["sm_clock_mhz"] == {"min": 1980, "mean": 1980, "max": 1980}
    assert summary["mem_clock_mhz"]["max"] == 3201
    assert summary["power_w"]["mean"] == 500.0 and summary["temp_c"]["min"] == 60
    assert summary["throttle_reasons"] == ["sw_power_cap"]        # gpu_idle is left out
    assert state["inits"] == 0                                       # shut down again
    assert s.summary(since=time.monotonic() + 10) == {"available": True, "samples": 0}


def test_nvml_sampler_without_nvml(monkeypatch):
    from profiles import nvml

    monkeypatch.setitem(sys.modules, "pynvml", None)                 # import fails
    s = nvml.NvmlSampler().start()
    s.stop()
    assert not s.available
    assert s.summary() == {"available": False, "reason": "nvidia-ml-py (pynvml) is not installed"}


def test_nvml_sampler_on_this_machine():
    import torch

    from profiles import nvml

    with nvml.NvmlSampler() as s:
        pass
    summary = s.summary()
    if torch.cuda.is_available():
        assert summary["available"] and summary["samples"] >= 1
    else:
        assert summary["available"] is False and summary["reason"]


def test_throttle_names():
    from profiles.nvml import throttle_names

    assert throttle_names(0) == []
    assert throttle_names(0x8 | 0x40) == ["hw_slowdown", "hw_thermal_slowdown"]
    assert throttle_names(0x1000) == ["0x1000"]
