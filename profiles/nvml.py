"""Background NVML sampler: SM and memory clocks, power, temperature and throttle reasons while a
benchmark runs, so a result can be read next to the state the GPU was in.

    with NvmlSampler(device_index=0) as s:
        ...                      # the work
    s.summary()                  # {"available": True, "samples": 40, "sm_clock_mhz": {...}, ...}

Without NVML (a CPU machine, or no driver) the sampler does nothing and ``summary()`` says why:
``{"available": False, "reason": "..."}``.
"""
from __future__ import annotations

import threading
import time
from typing import Any

# Throttle ("clocks event") reason bits of nvml.h, named once here so the summary is readable.
_THROTTLE_BITS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}

# 50 ms: fine enough to see a clock drop inside one benchmark, rare enough (one NVML query set
# costs ~0.1 ms of a CPU core) to leave the measured work alone.
DEFAULT_INTERVAL_S = 0.05


def throttle_names(mask: int) -> list[str]:
    """Names of the reason bits set in ``mask`` (unknown bits as hex)."""
    names = [name for bit, name in _THROTTLE_BITS.items() if mask & bit]
    rest = mask & ~sum(_THROTTLE_BITS)
    if rest:
        names.append(hex(rest))
    return names


class NvmlSampler:
    """Samples one GPU every ``interval_s`` on a daemon thread between ``start()`` and ``stop()``."""

    def __init__(self, device_index: int = 0, interval_s: float = DEFAULT_INTERVAL_S):
        self.device_index = device_index
        self.interval_s = interval_s
        self.reason: str | None = None      # why sampling is off, None while it works
        self._samples: list[tuple[float, int, int, float, int, int]] = []  # t, sm, mem, W, °C, mask
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle = None
        self._nvml = None

    @property
    def available(self) -> bool:
        return self.reason is None and self._handle is not None

    def start(self) -> NvmlSampler:
        try:
            import pynvml
        except ImportError:
            self.reason = "nvidia-ml-py (pynvml) is not installed"
            return self
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            self.reason = f"NVML unavailable: {e}"
            return self
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
        except pynvml.NVMLError as e:
            self.reason = f"NVML has no device {self.device_index}: {e}"
            pynvml.nvmlShutdown()
            return self
        self._nvml = pynvml
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._sample()
            self._nvml.nvmlShutdown()
            self._handle = None

    def __enter__(self) -> NvmlSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        nv, h = self._nvml, self._handle
        try:
            reasons = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
                nv.nvmlDeviceGetCurrentClocksThrottleReasons
            row = (time.monotonic(),
                   nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
                   nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
                   nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
                   nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
                   int(reasons(h)))
        except Exception as e:  # noqa: BLE001 - NVMLError, or a query this nvidia-ml-py lacks
            self.reason = f"NVML query failed: {type(e).__name__}: {e}"
            self._stop.set()
            return
        with self._lock:
            self._samples.append(row)

    def summary(self, since: float | None = None) -> dict[str, Any]:
        """Min/mean/max of each quantity and the throttle reasons seen, over the samples taken at or
        after ``since`` (a ``time.monotonic()`` value; None = all of them)."""
        if self._nvml is None and not self._samples:
            return {"available": False, "reason": self.reason or "sampler not started"}
        with self._lock:
            rows = [r for r in self._samples if since is None or r[0] >= since]
        if not rows:
            return {"available": True, "samples": 0}
        out: dict[str, Any] = {"available": True, "samples": len(rows)}
        for i, key in ((1, "sm_clock_mhz"), (2, "mem_clock_mhz"), (3, "power_w"), (4, "temp_c")):
            vals = [r[i] for r in rows]
            out[key] = {"min": round(min(vals), 1), "mean": round(sum(vals) / len(vals), 1),
                        "max": round(max(vals), 1)}
        mask = 0
        for r in rows:
            mask |= r[5]
        # Idle is what a GPU reports between launches; it says nothing about the work.
        out["throttle_reasons"] = [n for n in throttle_names(mask) if n != "gpu_idle"]
        if self.reason:
            out["reason"] = self.reason
        return out
