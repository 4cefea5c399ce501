"""The benchmark harness on the CPU: timing, records, results files, tables and the CLI."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from bench import harness, results
from bench.__main__ import main as bench_main
from bench.__main__ import run_suite

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture
def ctx(tmp_path):
    return harness.Context(device="cpu", quick=True, results_dir=tmp_path, echo=False)


def test_cpu_timer_rotates_sets_and_reports_stats():
    seen = []
    t = harness.time_cpu(lambda i: seen.append(i) or sum(range(200)), n_sets=3, budget=harness.QUICK)
    assert t.timer == "cpu-wall"
    assert 0 < t.min_us <= t.p10_us <= t.median_us <= t.p90_us
    assert harness.QUICK.min_reps <= t.reps <= harness.QUICK.max_reps and t.inner >= 1
    assert set(seen) == {0, 1, 2}


def test_context_time_and_sets_for(ctx):
    assert not ctx.on_gpu and ctx.slug == "cpu" and ctx.device == CPU
    x = torch.randn(256, 256)
    assert ctx.time(lambda i: x @ x) > 0
    # graph=True has no meaning on the CPU: it times plain calls there
    assert ctx.time(lambda i: x + 1, graph=True) > 0
    assert ctx.sets_for(1) == harness.MAX_SETS
    assert ctx.sets_for(10 * 2**30) == 1
    assert ctx.sets_for(harness.CPU_CACHE_BYTES) == harness.L2_SPAN
    with pytest.raises(ValueError, match="bytes_per_set"):
        ctx.sets_for(0)
    with pytest.raises(ValueError, match="n_sets"):
        ctx.time(lambda i: None, n_sets=0)


def _record(ctx, **over):
    x = torch.randn(64, 64)
    t = ctx.time(lambda i: x @ x)
    kw = dict(op="toy.mm", backend="torch", shape={"n": 64}, dtype="fp32", time_us=t,
              bytes=3 * 64 * 64 * 4, flops=2 * 64**3, peer=("numpy", 2 * t))
    kw.update(over)
    return ctx.record(**kw)


def test_record_fields_and_file(ctx, tmp_path):
    with ctx.suite_run("toy"):
        rec = _record(ctx)
    for field in results.REQUIRED_FIELDS:
        assert field in rec, field
    assert rec["device"] and rec["device_slug"] == "cpu" and rec["timer"] == "cpu-wall"
    assert rec["torch"] == torch.__version__ and rec["git_commit"]
    assert rec["gbps"] == pytest.approx(rec["bytes"] / (rec["time_us"] * 1e3), rel=1e-2)
    assert rec["tflops"] == pytest.approx(rec["flops"] / (rec["time_us"] * 1e6), rel=1e-2, abs=1e-3)
    assert rec["frac_copy_bw"] == pytest.approx(rec["gbps"] / ctx.ceilings.copy_gbps, rel=1e-2)
    assert rec["peer"] == {"name": "numpy", "time_us": pytest.approx(2 * rec["time_us"], rel=1e-3)}
    assert rec["speedup_vs_peer"] == pytest.approx(2.0, rel=1e-2)
    assert rec["h800_projected_us"] is None          # no projection from a CPU
    assert rec["nvml"]["available"] is False and rec["nvml"]["reason"]
    assert rec["timing"]["reps"] >= harness.QUICK.min_reps
    saved = json.loads((tmp_path / "cpu" / "toy.json").read_text())
    assert saved == [json.loads(json.dumps(rec))]


def test_rerun_replaces_same_key_and_sorts(ctx, tmp_path):
    with ctx.suite_run("toy"):
        _record(ctx, shape={"n": 16})
        _record(ctx, shape={"n": 2})
    with ctx.suite_run("toy"):
        again = _record(ctx, shape={"n": 16})
        _record(ctx, shape={"n": 16}, dtype="bf16")
    saved = json.loads((tmp_path / "cpu" / "toy.json").read_text())
    keys = [(r["shape"]["n"], r["dtype"]) for r in saved]
    assert keys == [(2, "fp32"), (16, "bf16"), (16, "fp32")]      # numeric shape order, one per key
    assert [r for r in saved if r["shape"]["n"] == 16 and r["dtype"] == "fp32"][0]["timestamp"] == again["timestamp"]
    assert (tmp_path / "cpu" / "toy.json").read_text().endswith("]\n")


def test_failed_suite_records_nothing(ctx, tmp_path):
    with pytest.raises(RuntimeError):
        with ctx.suite_run("toy"):
            _record(ctx)
            raise RuntimeError("suite broke")
    assert ctx.records == [] and not (tmp_path / "cpu" / "toy.json").exists()
    boom = types.SimpleNamespace(run=lambda c: (_record(c), 1 / 0))
    assert run_suite(ctx, "boom", boom) is False
    ok = types.SimpleNamespace(run=lambda c: _record(c))
    assert run_suite(ctx, "fine", ok) is True
    assert [r["suite"] for r in ctx.records] == ["fine"]


def test_missing_peer_and_bad_arguments(ctx):
    with pytest.raises(RuntimeError, match="outside a suite"):
        _record(ctx)
    with ctx.suite_run("toy"):
        rec = _record(ctx, peer=("vllm triton", None, "vllm not installed"))
        assert rec["peer"] == {"name": "vllm triton", "time_us": None, "missing": True,
                               "reason": "vllm not installed"}
        assert rec["speedup_vs_peer"] is None
        assert _record(ctx, peer=("other", None))["peer"]["missing"] is True
        with pytest.raises(ValueError, match="peer"):
            _record(ctx, peer=("a", 1.0, "x", "y"))
        with pytest.raises(TypeError, match="shape"):
            _record(ctx, shape=[1, 2])
    table = results.format_table(ctx.records)
    assert "vllm triton (missing)" in table


def test_shape_filters(tmp_path):
    assert harness.parse_shape_filters(["b=64,s=4096", "T=1"]) == [{"b": "64", "s": "4096"}, {"T": "1"}]
    with pytest.raises(ValueError, match="--shapes"):
        harness.parse_shape_filters(["b64"])
    c = harness.Context(device="cpu", quick=True, shapes=["n=16"], results_dir=None, echo=False)
    assert c.want({"n": 16, "m": 3}) and not c.want({"n": 2})
    with c.suite_run("toy"):
        assert _record(c, shape={"n": 2}) == {}
        assert _record(c, shape={"n": 16})["shape"] == {"n": 16}
    assert len(c.records) == 1 and not any(tmp_path.iterdir())


def test_markdown_table_and_json(ctx, tmp_path):
    with ctx.suite_run("toy"):
        _record(ctx)
    md = results.render_markdown(tmp_path, "cpu")
    assert "## cpu" in md and "### toy" in md and "| toy.mm | torch | n=64 | fp32 |" in md
    assert "CPU timings" in md and "python -m bench table --device cpu" in md
    out = results.write_json(tmp_path / "run.json", ctx.records)
    assert json.loads(out.read_text())[0]["op"] == "toy.mm"
    assert bench_main(["table", "--device", "cpu", "--results-dir", str(tmp_path)]) == 0


def test_cli_quick_cpu_run(tmp_path):
    """`python -m bench --quick` on the CPU: every suite, then the tiny model through the reference."""
    # As a user types it: no GPU, and no Triton interpreter (tests/conftest.py sets it for the tests).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--results-dir", str(tmp_path),
                           "--json", str(tmp_path / "run.json")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "CPU timings (wall clock)" in out and "== ceilings ==" in out
    recs = json.loads((tmp_path / "run.json").read_text())
    ops = {r["op"] for r in recs}
    assert {"ceiling.copy", "ceiling.mm_bf16"} <= ops
    assert all(r["timer"] == "cpu-wall" and r["device_slug"] == "cpu" for r in recs)
    assert (tmp_path / "cpu" / "ceilings.json").exists()
    try:
        import model  # noqa: F401
    except ImportError:
        assert "model not available" in out
    else:
        assert "tokens/s" in out and "CPU run" in out
        assert {"model.prefill", "model.decode"} <= ops
        assert (tmp_path / "cpu" / "model_cpu.json").exists()


def test_cli_rejects_unknown_suite(capsys):
    assert bench_main(["no_such_suite", "--no-write"]) == 2
    assert "unknown suite" in capsys.readouterr().err


def test_plain_pytest_does_not_collect_bench():
    import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert cfg["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]


def test_all_to_all_plumbing_with_gloo():
    """The NVLink/NCCL ceiling's process plumbing (spawn, timeout, results file) on CPU processes."""
    from bench import ceilings

    out = ceilings.nccl_all_to_all((4096, 65536), quick=True, world_size=2, backend="gloo", timeout_s=120)
    assert [(r["bytes"], r["ranks"]) for r in out] == [(4096, 2), (65536, 2)]
    assert all(r["time_us"] > 0 and r["remote_bytes"] == r["bytes"] // 2 for r in out)


class _FakeCuda:
    """Enough of torch.cuda for time_cuda's control flow on the CPU: events read the wall clock,
    a graph records the set indices its calls used and replays them into the log."""

    def __init__(self):
        self.log, self.capturing = [], None
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                self.t = __import__("time").perf_counter()

            def elapsed_time(self, end):
                return (end.t - self.t) * 1e3

        class CUDAGraph:
            def __init__(self):
                self.calls = []

            def replay(self):
                fake.log.extend(self.calls)

        class graph:
            def __init__(self, g):
                self.g = g

            def __enter__(self):
                fake.capturing = self.g

            def __exit__(self, *exc):
                fake.capturing = None

        self.Event, self.CUDAGraph, self.graph = Event, CUDAGraph, graph

    def fn(self, i):
        (self.capturing.calls if self.capturing is not None else self.log).append(i)


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("n_sets", [1, 3, 16])
def test_cuda_timer_control_flow_with_fake_cuda(monkeypatch, graph, n_sets):
    import contextlib

    fake = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "Event", fake.Event)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", fake.CUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake.graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    t = harness.time_cuda(fake.fn, n_sets=n_sets, graph=graph, budget=harness.QUICK, device=CPU)
    assert t.timer == ("cuda-graph" if graph else "cuda-events") and t.median_us > 0
    assert harness.QUICK.min_reps <= t.reps <= harness.QUICK.max_reps
    assert set(fake.log) == set(range(n_sets))
    if graph:
        # every replay visits every set: the graph holds a multiple of n_sets calls
        assert t.inner % n_sets == 0
        timed = fake.log[-t.reps * t.inner:]
        for k in range(t.reps):
            assert sorted(timed[k * t.inner:(k + 1) * t.inner]) == sorted(list(range(n_sets)) * (t.inner // n_sets))


@pytest.mark.gpu
def test_gpu_context_timing_and_record(tmp_path):
    """On a GPU: events and graph timing, a full record with NVML summary and an H800 projection."""
    c = harness.Context(quick=True, results_dir=tmp_path, echo=False)
    assert c.on_gpu and c.slug.startswith("nvidia")
    assert 1 <= c.sets_for(2**20) <= harness.MAX_SETS
    n = c.sets_for(64 * 2**20)
    xs = [torch.randn(16 * 2**20, device=c.device) for _ in range(n)]   # 64 MiB each
    ys = [torch.empty_like(x) for x in xs]
    t_eager = c.time(lambda i: ys[i].copy_(xs[i]), n_sets=n)
    t_graph = c.time(lambda i: ys[i].copy_(xs[i]), n_sets=n, graph=True)
    assert t_eager > 0 and t_graph > 0
    with c.suite_run("toy_gpu"):
        rec = c.record(op="toy.copy", backend="torch", shape={"bytes": 64 * 2**20}, dtype="fp32",
                       time_us=t_graph, bytes=2 * 64 * 2**20, peer=("eager", t_eager))
    assert rec["timer"] == "cuda-graph" and rec["timing"]["inner"] % n == 0
    assert rec["h800_projected_us"] is not None and rec["h800_projected_us"] > 0
    assert rec["nvml"]["available"] is True, rec["nvml"]
    assert c.ceilings.copy_gbps > 0 and c.ceilings.mm_tflops > 0 and c.ceilings.mm_n == 8192
    assert (tmp_path / c.slug / "toy_gpu.json").exists()


@pytest.mark.multigpu
def test_nvlink_and_nccl_ceilings():
    from bench import ceilings

    peer = ceilings.peer_copy((2**20,), quick=True)
    assert peer[0]["gbps"] > 0
    out = ceilings.nccl_all_to_all((2**20, 16 * 2**20), quick=True, world_size=2, timeout_s=300)
    assert [r["ranks"] for r in out] == [2, 2] and all(r["gbps"] > 0 for r in out)
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"
