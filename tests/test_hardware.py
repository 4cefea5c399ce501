"""Hardware table, name matching and the H800 projection (profiles/hardware.py)."""
import pytest

from profiles import hardware as hw


def test_table_entries():
    assert set(hw.GPUS) == {"h800-sxm", "h100-sxm", "h200", "h20", "a100-sxm"}
    h800, h100, h200, h20, a100 = (hw.GPUS[k] for k in ("h800-sxm", "h100-sxm", "h200", "h20", "a100-sxm"))
    assert hw.H800 is h800
    assert (h800.hbm_gbps, h800.bf16_tflops, h800.fp8_tflops, h800.nvlink_gbps, h800.nic_gbps) == \
        (3350, 989, 1979, 200, 50)
    assert h100.hbm_gbps == 3350 and h100.nvlink_gbps == 450
    assert h200.hbm_gbps == 4800 and h200.bf16_tflops == 989
    assert h20.bf16_tflops == 148 and h20.hbm_gbps == 4000
    assert a100.fp8_tflops is None and a100.bf16_tflops == 312
    for spec in hw.GPUS.values():
        assert spec.sources, f"{spec.name} has no source"
        assert spec.hbm_gbps > 0 and spec.bf16_tflops > 0 and spec.nvlink_gbps > 0 and spec.nic_gbps > 0


def test_name_matching_and_slug():
    assert hw.spec_for_name("NVIDIA H200") is hw.GPUS["h200"]
    assert hw.spec_for_name("NVIDIA H20") is hw.GPUS["h20"]
    assert hw.spec_for_name("NVIDIA H100 80GB HBM3") is hw.GPUS["h100-sxm"]
    assert hw.spec_for_name("NVIDIA H100 PCIe") is None
    assert hw.spec_for_name("NVIDIA H800") is hw.H800
    assert hw.spec_for_name("NVIDIA A100-SXM4-80GB") is hw.GPUS["a100-sxm"]
    assert hw.spec_for_name("NVIDIA GeForce RTX 4090") is None
    assert hw.device_slug("NVIDIA H200") == "nvidia-h200"
    assert hw.device_slug("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"


def test_theoretical_bandwidth():
    # H200 as NVML reports it: 3131 MHz memory clock, 6144-bit bus -> 4.81 TB/s (shared/FACTS.md)
    assert hw.theoretical_bandwidth_gbps(3131, 6144) == pytest.approx(4809.2, abs=0.1)


def test_roofline_and_projection_memory_bound():
    h200 = hw.GPUS["h200"]
    nbytes = 4.8e9  # 1 ms at 4.8 TB/s
    assert hw.roofline_time_s(nbytes, 0, h200) == pytest.approx(1e-3)
    # Measured 1.25 ms on the H200 = 80 % of its limit (1e9 FLOPs are negligible); at 80 % of the
    # H800's 3.35 TB/s the same bytes take 1.25 ms · 4800 / 3350.
    t = hw.project(nbytes, 1e9, 1.25e-3, on=h200)
    assert t == pytest.approx(1.25e-3 * 4800 / 3350)


def test_projection_crosses_roofline():
    # 1 GB and 200 TFLOP are compute-bound on both GPUs: the time scales by the bf16 rate ratio.
    h20, h800 = hw.GPUS["h20"], hw.H800
    t = hw.project(1e9, 200e12, 2.0, on=h800, to=h20)
    assert t == pytest.approx(2.0 * 989 / 148)
    # Memory-bound on an H200 (1e9 B, 1e12 FLOP: 0.208 ms vs 1.01 ms) but compute-bound on an H20
    # (0.25 ms vs 6.76 ms): the projection follows the new bound.
    h200 = hw.GPUS["h200"]
    t = hw.project(1e9, 1e12, 1e-3, on=h200, to=h20)
    ideal_on = max(1e9 / 4800e9, 1e12 / 989e12)
    ideal_to = max(1e9 / 4000e9, 1e12 / 148e12)
    assert t == pytest.approx(1e-3 * ideal_to / ideal_on)


def test_projection_links_and_edges():
    h200 = hw.GPUS["h200"]
    # NVLink-bound traffic projects by the one-way NVLink ratio (450 -> 200 GB/s).
    assert hw.project(1e8, 0, 1e-3, on=h200, bandwidth="nvlink") == pytest.approx(1e-3 * 450 / 200)
    assert hw.project(0, 0, 1e-3, on=h200) is None
    with pytest.raises(ValueError, match="bandwidth"):
        hw.project(1, 0, 1, on=h200, bandwidth="pcie")
    with pytest.raises(ValueError, match="fp8"):
        hw.roofline_time_s(0, 1e12, hw.GPUS["a100-sxm"], flops_kind="fp8")
    assert hw.project(0, 1e12, 1e-3, on=h200, flops_kind="fp8") == pytest.approx(1e-3)


def test_detected_gpu_effective_spec():
    d = hw.DetectedGpu(index=0, name="NVIDIA L40S", slug="nvidia-l40s", memory_clock_mhz=9001,
                       bus_width_bits=384, theoretical_gbps=864.0, nvlink_links=0, memory_gib=45.0,
                       spec=None)
    assert d.effective_spec() is None
    spec = d.effective_spec(mm_tflops=300.0)
    assert spec.hbm_gbps == 864.0 and spec.bf16_tflops == 300.0
    assert hw.project(864e6, 0, 2e-3, on=spec) == pytest.approx(2e-3 * 864 / 3350)


def test_detect_without_gpu_returns_none():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert hw.detect(0) is None


def test_detect_with_fake_nvml(monkeypatch):
    import sys
    import types

    class NVMLError(Exception):
        pass

    def link_state(h, link):
        if link >= 18:
            raise NVMLError("no such link")
        return 1

    fake = types.SimpleNamespace(
        NVMLError=NVMLError, NVML_CLOCK_MEM=2, NVML_FEATURE_ENABLED=1, NVML_NVLINK_MAX_LINKS=36,
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"NVIDIA H200",
        nvmlDeviceGetMaxClockInfo=lambda h, kind: 3131,
        nvmlDeviceGetMemoryBusWidth=lambda h: 6144,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=140 * 2**30),
        nvmlDeviceGetNvLinkState=link_state)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    d = hw.detect(0)
    assert d.name == "NVIDIA H200" and d.slug == "nvidia-h200" and d.spec is hw.GPUS["h200"]
    assert d.theoretical_gbps == pytest.approx(4809.2, abs=0.1) and d.nvlink_links == 18
    assert d.memory_gib == 140
    del fake.nvmlDeviceGetMemoryBusWidth          # an older nvidia-ml-py
    assert hw.detect(0).theoretical_gbps is None
