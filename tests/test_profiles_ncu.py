"""Nsight Compute sessions (profiles/ncu.py, ncu_targets.py, ncu_launch.py): parsing ncu's raw CSV,
the per-call summary, the command lines, and a whole session against a stand-in ncu on the CPU.

The CSV fixture is ncu 2025.3's ``--csv --page raw --print-units base`` output of the mla_decode
(triton) session on an H200, trimmed to the columns the summary reads, with ncu's log lines around it.
"""
import json
import stat
import sys
from pathlib import Path

import pytest

from profiles import cost_model, ncu, ncu_launch, ncu_targets

FIXTURES = Path(__file__).parent / "fixtures" / "profiles"
RAW_CSV = FIXTURES / "ncu" / "raw_mla_decode_triton.csv"
MLA_SHAPE = {"b": 64, "q_len": 1, "h": 16, "s": 4096}
MLA_RANGE = "profiles mla_decode triton b=64 q_len=1 h=16 s=4096"


def test_parse_raw_csv_fixture():
    kernels = ncu.parse_raw_csv(RAW_CSV.read_text())
    assert [k["name"] for k in kernels] == ["_mla_decode_split_kernel", "_mla_decode_combine_kernel"]
    split = kernels[0]
    assert split["nvtx"] == [MLA_RANGE]
    assert split["device"] == "NVIDIA H200"
    assert split["grid"] == "(1, 64, 4)" and split["block"] == "(128, 1, 1)"
    m = split["metrics"]
    assert m[ncu.DRAM_READ] == 303_241_216 and m[ncu.DRAM_WRITE] == 2_654_720   # thousands separators
    assert m[ncu.DURATION] == 77_568                                            # ns
    assert m[ncu.DRAM_PCT] == pytest.approx(81.99) and m[ncu.SM_PCT] == pytest.approx(32.30)
    assert m[ncu.REGISTERS] == 177 and m[ncu.SMEM_DYNAMIC] == 93_184
    assert set(ncu.METRICS) <= set(m)


def test_parse_scales_units_and_skips_log_lines():
    # Without --print-units base, ncu scales units per value; a second range nests the first.
    text = "\n".join([
        "==PROF== Connected to process 1 (/usr/bin/python3)",
        '"ID","Process ID","thread Domain:Push/Pop_Range:PL_Type:PL_Value:CLR_Type:Color:Msg_Type:Msg","Kernel Name",'
        '"Block Size","Grid Size","dram__bytes_read.sum","gpu__time_duration.sum",'
        '"sm__throughput.avg.pct_of_peak_sustained_elapsed"',
        '"","","","","","","Mbyte","usecond","%"',
        '"0","1","1  ""<default domain>:outer:none:none:none:none:none:none""  '
        '""mydomain:a:b c:none:none:none:none:none:none"" ",'
        '"k1","(32, 1, 1)","(8, 1, 1)","1,234.5","2.50","n/a"',
        '"1","1","",'  # a line cut short: skipped
    ])
    (k,) = ncu.parse_raw_csv(text)
    assert k["nvtx"] == ["outer", "a:b c"]                 # ":" inside a range name survives
    assert k["metrics"]["dram__bytes_read.sum"] == pytest.approx(1234.5e6)
    assert k["metrics"]["gpu__time_duration.sum"] == pytest.approx(2500.0)
    assert k["metrics"]["sm__throughput.avg.pct_of_peak_sustained_elapsed"] is None
    assert k["device"] is None


def test_parse_rejects_other_output():
    with pytest.raises(ValueError, match="no header row"):
        ncu.parse_raw_csv("==PROF== No kernels were profiled.\n")
    with pytest.raises(ValueError, match="Kernel Name"):
        ncu.parse_raw_csv('"ID","Section Name"\n"0","x"\n')


@pytest.mark.parametrize("dram, sm, limit", [(82.0, 32.3, "DRAM bandwidth"), (30.0, 83.0, "SM throughput"),
                                             (60.0, 59.9, "DRAM bandwidth"), (42.1, 57.7, "latency"),
                                             (None, None, "latency")])
def test_binding_limit(dram, sm, limit):
    assert ncu.binding_limit(dram, sm) == limit


def test_summarize_fixture():
    kernels = ncu.parse_raw_csv(RAW_CSV.read_text())
    s = ncu.summarize(kernels, op="mla_decode", backend="triton", shape=MLA_SHAPE, device="NVIDIA H200",
                      info={"iters": 1, "causal": False, "device": "NVIDIA H200"}, bench_time_us=167.82)
    read = sum(k["metrics"][ncu.DRAM_READ] for k in kernels)
    written = sum(k["metrics"][ncu.DRAM_WRITE] for k in kernels)
    minimal = cost_model.mla_decode(64, 1, 16, 64 * 4096).bytes
    assert s["minimal_bytes"] == minimal == 304_218_112
    assert s["dram_read_bytes"] == read and s["dram_write_bytes"] == written
    assert s["overfetch"] == pytest.approx((read + written) / minimal)
    assert s["time_us"] == pytest.approx(sum(k["metrics"][ncu.DURATION] for k in kernels) / 1e3)
    # duration-weighted DRAM %: the split kernel (77.6 µs at 82 %) dominates the combine (4.9 µs at 36 %)
    d = [(k["metrics"][ncu.DURATION], k["metrics"][ncu.DRAM_PCT]) for k in kernels]
    assert s["dram_pct"] == pytest.approx(sum(a * b for a, b in d) / sum(a for a, _ in d))
    assert s["limit"] == "DRAM bandwidth" and s["nvtx_seen"] and s["nvtx_range"] == MLA_RANGE
    assert [k["limit"] for k in s["kernels"]] == ["DRAM bandwidth", "latency"]
    assert s["ideal_us"] == pytest.approx(minimal / 4800e3)                   # H200 datasheet, memory-bound
    assert s["frac_roofline"] == pytest.approx(s["ideal_us"] / s["time_us"])
    assert s["info"] == {"causal": False}

    twice = ncu.summarize(kernels, op="mla_decode", backend="triton", shape=MLA_SHAPE, device="NVIDIA H200",
                          info={"iters": 2})
    assert twice["time_us"] == pytest.approx(s["time_us"] / 2) and twice["kernels_per_call"] == 1


def test_summary_flags_kernels_outside_the_range():
    kernels = ncu.parse_raw_csv(RAW_CSV.read_text())
    kernels[1]["nvtx"] = ["something else"]
    s = ncu.summarize(kernels, op="mla_decode", backend="triton", shape=MLA_SHAPE, device="NVIDIA H200")
    assert not s["nvtx_seen"]
    assert "NOT seen on every kernel" in ncu.render_summary(dict(s, regenerate="x"))


def test_render_summary_and_index():
    kernels = ncu.parse_raw_csv(RAW_CSV.read_text())
    s = ncu.summarize(kernels, op="mla_decode", backend="triton", shape=MLA_SHAPE, device="NVIDIA H200",
                      bench_time_us=167.82)
    s.update(regenerate=ncu.regenerate_command("mla_decode", "triton", MLA_SHAPE), report="mla_decode-triton.ncu-rep")
    md = ncu.render_summary(s)
    assert md.startswith("# ncu: mla_decode (triton) b=64 q_len=1 h=16 s=4096, bf16, on NVIDIA H200")
    assert f"| over-fetch (DRAM bytes / minimal bytes) | {s['overfetch']:.3f}x |" in md
    assert "| minimal bytes (profiles/cost_model.py) | 304.22 MB |" in md
    assert "| `_mla_decode_split_kernel` | (1, 64, 4) | (128, 1, 1) | 177 | 93184 | 77.57 |" in md
    assert "| limit that binds | DRAM bandwidth |" in md
    assert "python -m profiles ncu mla_decode --backend triton --shape b=64,q_len=1,h=16,s=4096 --keep-rep" in md
    index = ncu.render_index([s])
    assert "| mla_decode | triton | b=64 q_len=1 h=16 s=4096 | 2 |" in index and "| DRAM bandwidth | yes |" in index


def test_profile_command():
    cmd = ncu.profile_command("/opt/ncu", "mla_decode", "triton", MLA_SHAPE, Path("/tmp/rep"), Path("/tmp/i.json"),
                              iters=2, launch_count=50, python="python3")
    assert cmd[:3] == ["/opt/ncu", "--clock-control", "none"]
    assert cmd[cmd.index("--nvtx-include") + 1] == MLA_RANGE + "/"
    assert "--nvtx" in cmd and cmd[cmd.index("--launch-count") + 1] == "50"
    assert cmd[cmd.index("--metrics") + 1].split(",") == list(ncu.METRICS)
    assert cmd[cmd.index("--export") + 1] == "/tmp/rep"
    assert cmd[cmd.index("python3"):] == ["python3", "-m", "profiles.ncu_launch", "mla_decode", "triton",
                                          "b=64,q_len=1,h=16,s=4096", "--iters", "2", "--info", "/tmp/i.json"]
    assert ncu.import_command("ncu", Path("r.ncu-rep")) == ["ncu", "--import", "r.ncu-rep", "--csv", "--page", "raw",
                                                           "--print-units", "base"]


def test_targets():
    assert ncu_targets.ALL_RUNS == (("mla_decode", "triton"), ("mla_decode", "torch"), ("moe_ffn", "triton"),
                                    ("rope_and_cache", "triton"), ("rope_and_cache", "cuda"))
    assert ncu_targets.resolve_shape("mla_decode", {"b": "32"}) == {"b": 32, "q_len": 1, "h": 16, "s": 4096}
    with pytest.raises(ValueError, match="--shape: mla_decode has keys"):
        ncu_targets.resolve_shape("mla_decode", {"T": "1"})
    with pytest.raises(ValueError, match="integer for b"):
        ncu_targets.resolve_shape("mla_decode", {"b": "x"})
    with pytest.raises(ValueError, match="positive s"):
        ncu_targets.resolve_shape("mla_decode", {"s": "0"})
    with pytest.raises(ValueError, match="--backend: moe_ffn is profiled with"):
        ncu_targets.check_backend("moe_ffn", "cuda")
    with pytest.raises(ValueError, match="op: expected one of"):
        ncu_targets.target("apply_rotary")
    for op, t in ncu_targets.TARGETS.items():
        assert "/" not in ncu_targets.range_name(op, t.backends[0], t.shape)
    assert ncu_targets.minimal_cost("rope_and_cache", {"T": 7, "h": 3}) == cost_model.rope_and_cache(7, 3)
    moe = {"T": 5, "E": 16, "H": 64, "I": 48, "top_k": 4}
    assert ncu_targets.minimal_cost("moe_ffn", moe, experts_hit=11) == cost_model.moe_ffn(5, 4, 11, 64, 48)
    assert ncu_targets.minimal_cost("moe_ffn", moe) == cost_model.moe_ffn(
        5, 4, cost_model.expected_experts_hit(16, 4, 5), 64, 48)


def test_launcher_shape_parsing_and_no_gpu():
    assert ncu_launch.parse_shape("b=64, s=4096,") == {"b": "64", "s": "4096"}
    with pytest.raises(ValueError, match="key=value"):
        ncu_launch.parse_shape("b64")
    import torch

    if not torch.cuda.is_available():
        assert ncu_launch.main(["rope_and_cache", "triton", "T=64,h=16"]) == 2


def test_find_ncu(monkeypatch, tmp_path):
    fake = tmp_path / "ncu"
    fake.write_text("#!/bin/sh\n")
    monkeypatch.setenv("PYKERNELS_NCU", str(fake))
    assert ncu.find_ncu() == str(fake)
    monkeypatch.setenv("PYKERNELS_NCU", str(tmp_path / "missing"))
    assert ncu.find_ncu() is None
    monkeypatch.delenv("PYKERNELS_NCU")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(ncu, "NCU_GLOBS", (str(tmp_path / "opt" / "*" / "ncu"),))
    assert ncu.find_ncu() is None
    for version in ("2024.1.0", "2025.3.1"):
        path = tmp_path / "opt" / version / "ncu"
        path.parent.mkdir(parents=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    assert ncu.find_ncu() == str(tmp_path / "opt" / "2025.3.1" / "ncu")


# A stand-in for ncu: a profiling call writes the report and the launcher's info file (the launcher
# itself needs a GPU); --import prints the fixture; --version prints a version line.
FAKE_NCU = """#!{python}
import json, pathlib, sys
args = sys.argv[1:]
if args == ["--version"]:
    print("NVIDIA (R) Nsight Compute Command Line Profiler\\nVersion 2025.3.1.0 (build 1) (public-release)")
elif "--import" in args:
    print(pathlib.Path({csv!r}).read_text())
else:
    pathlib.Path(args[args.index("--export") + 1] + ".ncu-rep").write_bytes(b"report")
    info = pathlib.Path(args[args.index("--info") + 1])
    info.write_text(json.dumps({{"iters": 1, "causal": False, "device": "NVIDIA H200"}}))
"""


def test_run_session_with_a_stand_in_ncu(monkeypatch, tmp_path):
    fake = tmp_path / "ncu"
    fake.write_text(FAKE_NCU.format(python=sys.executable, csv=str(RAW_CSV)))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(ncu, "_git_commit", lambda: "abc1234")  # bench.harness.git_commit is cached per process
    out = tmp_path / "results"
    s = ncu.run_session("mla_decode", "triton", {"b": "64"}, out_root=out, ncu=str(fake))
    folder = out / "nvidia-h200"
    assert s["kernels_per_call"] == 2 and s["nvtx_seen"] and s["git_commit"] == "abc1234"
    assert s["ncu_version"] == "2025.3.1.0 (build 1) (public-release)"
    assert s["report"] == "mla_decode-triton.ncu-rep" and (folder / "ncu" / s["report"]).read_bytes() == b"report"
    saved = json.loads((folder / "ncu" / "mla_decode-triton.json").read_text())
    assert saved["overfetch"] == pytest.approx(s["overfetch"])
    assert (folder / "ncu" / "mla_decode-triton.md").read_text().startswith("# ncu: mla_decode (triton)")
    assert "| mla_decode | triton |" in (folder / "NCU.md").read_text()
    # a report over the size limit is not kept, and the summary says how to regenerate it
    monkeypatch.setattr(ncu, "KEEP_REP_BYTES", 1)
    s = ncu.run_session("mla_decode", "triton", out_root=out, ncu=str(fake))
    assert s["report"] is None and not (folder / "ncu" / "mla_decode-triton.ncu-rep").exists()
    assert "--keep-rep" in s["regenerate"]


def test_run_session_errors(monkeypatch, tmp_path):
    monkeypatch.setattr(ncu, "find_ncu", lambda: None)
    with pytest.raises(RuntimeError, match="ncu not found"):
        ncu.run_session("mla_decode", out_root=tmp_path)
    failing = tmp_path / "ncu"
    failing.write_text("#!/bin/sh\necho '==ERROR== the profiler failed' >&2\nexit 3\n")
    failing.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"rc 3\):\n==ERROR== the profiler failed"):
        ncu.run_session("rope_and_cache", "cuda", out_root=tmp_path, ncu=str(failing))


def test_cli_argument_errors(capsys):
    from profiles.__main__ import main

    with pytest.raises(SystemExit):
        main(["ncu", "all", "--backend", "triton"])
    with pytest.raises(SystemExit):
        main(["ncu", "mla_decode", "--shape", "T=1"])
    assert "--shape: mla_decode has keys" in capsys.readouterr().err


@pytest.mark.gpu
def test_launcher_runs_each_target_on_the_gpu(tmp_path):
    # Without ncu: inputs, warm-up and the range run; small shapes.
    small = {"mla_decode": "b=2,s=256", "moe_ffn": "T=4,E=64,H=2048,I=1408", "rope_and_cache": "T=64,h=16"}
    for op, backend in ncu_targets.ALL_RUNS:
        if backend == "cuda":
            from pykernels import _ext

            if not _ext.available():
                continue
        info = tmp_path / f"{op}-{backend}.json"
        assert ncu_launch.main([op, backend, small[op], "--info", str(info)]) == 0
        assert json.loads(info.read_text())["iters"] == 1
