"""The roofline report (profiles/report.py) and the 8 x H800 decode projection (profiles/deployment.py),
on a small committed fixture: a few H200 records of each suite (tests/fixtures/profiles/bench/)."""
import json
import shutil
import sys
from pathlib import Path

import pytest

from profiles import deployment, hardware, report

FIXTURES = Path(__file__).parent / "fixtures" / "profiles"
BENCH = FIXTURES / "bench"
DEVICE = BENCH / "nvidia-h200"


def _records():
    return report.load_device_records(DEVICE)


def _record(op, **shape):
    return next(r for r in _records() if r["op"] == op and all(r["shape"][k] == v for k, v in shape.items()))


def test_load_skips_tuning_sweeps():
    ops = sorted({r["op"] for r in _records()})
    assert ops == ["ceiling.copy", "ceiling.mm_bf16", "ceiling.nvlink_peer_copy", "ep.combine", "ep.dispatch",
                   "mla_decode", "moe_ffn", "rope_and_cache"]
    assert len(_records()) == 10


def test_analyse_memory_bound_record():
    rec = _record("mla_decode", h=16, b=64)
    p = report.analyse(rec)
    t = rec["time_us"] * 1e-6
    assert p["gbps"] == pytest.approx(rec["bytes"] / t / 1e9)
    assert p["tflops"] == pytest.approx(rec["flops"] / t / 1e12)
    assert p["intensity"] == pytest.approx(rec["flops"] / rec["bytes"])
    assert p["frac_copy"] == pytest.approx(p["gbps"] / rec["ceilings"]["copy_gbps"])
    assert p["frac_mm"] == pytest.approx(p["tflops"] / rec["ceilings"]["mm_tflops"])
    assert p["bound_here"] == "memory" and p["frac_roofline_here"] == pytest.approx(p["frac_copy"])
    h200 = hardware.GPUS["h200"]
    expected = hardware.project(rec["bytes"], rec["flops"], t, on=h200, to=hardware.H800)
    assert p["h800_us"] == pytest.approx(expected * 1e6)
    assert p["h800_us"] == pytest.approx(rec["time_us"] * 4800 / 3350)   # memory-bound on both
    assert p["h800_frac_bw"] == pytest.approx(rec["bytes"] / expected / 3350e9)
    assert p["h800_bound"] == "memory"


def test_analyse_moves_across_the_ridge():
    # h128 is compute-bound on the H200's measured roofline (ridge ~160 FLOP/B) and memory-bound on
    # the H800's datasheet one (ridge 295 FLOP/B): 228 FLOP/B.
    p = report.analyse(_record("mla_decode", h=128, b=64))
    assert 200 < p["intensity"] < 295
    assert p["bound_here"] == "compute" and p["h800_bound"] == "memory"
    assert p["frac_roofline_here"] == pytest.approx(p["frac_mm"])


def test_analyse_link_record():
    rec = _record("ep.dispatch", T=128)
    p = report.analyse(rec)
    assert p["link"] == "nvlink" and p["frac_copy"] is None and p["bound_here"] == "NVLink"
    gbps = rec["bytes"] / (rec["time_us"] * 1e-6) / 1e9
    assert p["frac_link_datasheet"] == pytest.approx(gbps / 450)
    assert p["h800_us"] == pytest.approx(rec["time_us"] * 450 / 200)
    assert p["h800_frac_bw"] == pytest.approx(gbps / 450)


def test_render_contains_every_section():
    records = _records()
    md = report.render(records, "nvidia-h200", None, [])
    assert md.startswith("# Roofline: NVIDIA H200 (nvidia-h200)")
    assert "(10 records;" in md and "![roofline](roofline.png)" in md
    for heading in ("## Limits", "### mla_decode", "### moe", "### rope", "## Expert-parallel traffic against NVLink",
                    "## Nsight Compute", "## DeepSeek-V2 236B decode on one 8 × H800 node (EP = 8)"):
        assert heading in md
    assert "| H800 SXM, datasheet | 3350 | 989 | 295 | 200 |" in md
    p = report.analyse(_record("mla_decode", h=16, b=64))
    row = (f"| mla_decode | triton | b=64 h=16 q_len=1 s=4096 | bf16 | {p['time_us']:.2f} | {p['intensity']:.1f} | "
           f"{p['gbps']:.0f} | {p['tflops']:.2f} | {100 * p['frac_copy']:.1f} | {100 * p['frac_mm']:.1f} | memory | "
           f"{100 * p['frac_roofline_here']:.1f} | {p['h800_us']:.2f} |")
    assert row in md
    assert "ceiling.copy |" not in md.split("## Limits")[1]          # ceilings are limits, not points
    assert "No summaries for this device yet" in md
    assert "> 50K" in md and "Not modelled:" in md


def test_write_report_with_plot_and_ncu_summary(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    (out / "nvidia-h200" / "ncu").mkdir(parents=True)
    shutil.copy(FIXTURES / "ncu" / "moe_ffn-triton.json", out / "nvidia-h200" / "ncu")
    written = report.write_report(BENCH, out)
    png, md = out / "nvidia-h200" / "roofline.png", out / "nvidia-h200" / "ROOFLINE.md"
    assert written == [png, md]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = md.read_text()
    assert "![roofline](roofline.png)" in text
    summary = json.loads((FIXTURES / "ncu" / "moe_ffn-triton.json").read_text())
    assert f"| moe_ffn | triton | E=160 H=5120 I=1536 T=128 top_k=6 | 5 | {summary['time_us']:.2f} |" in text


def test_write_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import fails
    written = report.write_report(BENCH, tmp_path)
    assert written == [tmp_path / "nvidia-h200" / "ROOFLINE.md"]
    assert not (tmp_path / "nvidia-h200" / "roofline.png").exists()
    assert "Plot skipped: matplotlib is not installed." in written[0].read_text()


def test_write_report_errors_and_cli(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="results_dir"):
        report.write_report(tmp_path / "missing", tmp_path)
    from profiles.__main__ import main

    assert main(["report", "--results", str(BENCH), "--out", str(tmp_path), "--no-plot"]) == 0
    assert "Plot skipped: --no-plot." in (tmp_path / "nvidia-h200" / "ROOFLINE.md").read_text()
    (tmp_path / "empty").mkdir()
    assert main(["report", "--results", str(tmp_path / "empty"), "--out", str(tmp_path)]) == 1


# --- the 8 x H800 projection ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg():
    return deployment.model_config()


def test_remote_ranks(cfg):
    # group-limited routing, 8 groups on 8 ranks, 3 groups a token: 3 ranks, 7/8 of them remote
    assert deployment.remote_ranks_per_token(cfg) == pytest.approx(3 * 7 / 8)
    greedy = type("C", (), dict(n_routed_experts=64, num_experts_per_tok=6, topk_method="greedy", n_group=1))()
    import math

    expected = 8 * (1 - math.comb(56, 6) / math.comb(64, 6)) * 7 / 8
    assert deployment.remote_ranks_per_token(greedy) == pytest.approx(expected)


def test_memory_and_layouts(cfg):
    fp8 = deployment.project(cfg, deployment.Scenario("fp8", "fp8", "dp", 1024))
    bf16_dp = deployment.project(cfg, deployment.Scenario("bf16", "bf16", "dp", 1024))
    bf16_tp = deployment.project(cfg, deployment.Scenario("bf16", "bf16", "tp", 1024))
    assert fp8.fits and not bf16_dp.fits and bf16_tp.fits
    assert bf16_dp.tokens_per_s is None and bf16_dp.sequences == 0
    # fp8 weights: ~236 B params / 8 GPUs of experts + a full copy of the rest, one byte each
    assert 35 < fp8.weights_gb_per_gpu < 45
    assert fp8.kv_gb_per_sequence == pytest.approx(60 * 1024 * 576 / 1e9)
    budget = hardware.H800.memory_gib * 2**30 * deployment.MEMORY_FRACTION
    per_gpu = fp8.sequences // deployment.GPUS
    assert per_gpu * fp8.kv_gb_per_sequence * 1e9 <= budget - fp8.weights_gb_per_gpu * 1e9
    assert (per_gpu + 1) * fp8.kv_gb_per_sequence * 1e9 > budget - fp8.weights_gb_per_gpu * 1e9
    assert fp8.tokens_per_s == pytest.approx(fp8.sequences / fp8.step_s)
    assert fp8.step_s == pytest.approx(sum(fp8.phases_s.values()) + fp8.comm_s)


def test_projection_orderings(cfg):
    sc = deployment.Scenario("fp8", "fp8", "dp", 1024)
    serial = deployment.project(cfg, sc)
    overlapped = deployment.project(cfg, sc, overlap=True)
    slower = deployment.project(cfg, sc, deployment.Efficiency(mla=0.5, experts=0.5, other_memory=0.5,
                                                               other_compute=0.5, comm=0.5))
    assert overlapped.tokens_per_s >= serial.tokens_per_s
    assert slower.tokens_per_s == pytest.approx(serial.tokens_per_s / 2)
    longer = deployment.project(cfg, deployment.Scenario("fp8", "fp8", "dp", 4096))
    bf16_kv = deployment.project(cfg, deployment.Scenario("fp8", "bf16", "dp", 1024))
    assert longer.tokens_per_s < serial.tokens_per_s and bf16_kv.tokens_per_s < serial.tokens_per_s
    with pytest.raises(ValueError, match="layout"):
        deployment.project(cfg, deployment.Scenario("fp8", "fp8", "ep", 1024))
    with pytest.raises(ValueError, match="context"):
        deployment.project(cfg, deployment.Scenario("fp8", "fp8", "dp", 0))


def test_measured_efficiency_from_the_fixture(cfg):
    records = _records()
    points = [report.analyse(r) for r in records]
    sc = deployment.Scenario("fp8", "fp8", "dp", 1024)
    eff = report.measured_efficiency(points, records, cfg, sc, 2048)
    h200 = hardware.GPUS["h200"]
    mla = _record("mla_decode", h=128, b=64)
    assert eff.mla == pytest.approx(hardware.roofline_time_s(mla["bytes"], mla["flops"], h200)
                                    / (mla["time_us"] * 1e-6))
    moe = _record("moe_ffn", T=8192)                      # 2048 node tokens: closer to 8192 than to 128
    assert eff.experts == pytest.approx(hardware.roofline_time_s(moe["bytes"], moe["flops"], h200)
                                        / (moe["time_us"] * 1e-6))
    ep = [_record("ep.dispatch", T=128), _record("ep.combine", T=128)]
    gbps = sum(r["bytes"] for r in ep) / sum(r["time_us"] * 1e-6 for r in ep) / 1e9
    assert eff.comm == pytest.approx(gbps / 450)
    assert 0 < eff.other_memory <= 1 and 0 < eff.other_compute <= 1
    assert set(eff.sources) == {"MLA core", "routed experts", "other matmuls", "NVLink dispatch + combine"}
