"""The benchmark harness on the CPU: timing, records, results files, tables and the CLI."""
import json
import os
import statistics
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


def test_header_names_every_run_its_rows_come_from(ctx):
    with ctx.suite_run("toy"):
        old, new = _record(ctx), _record(ctx, shape={"n": 65})
    assert "rows from" not in results.run_header([old, new])        # one run: its commit alone
    old = dict(old, git_commit="aaaaaaa", timestamp="2000-01-01T00:00:00+00:00")
    header = results.run_header([new, old])
    assert f"rows from commits aaaaaaa (1), {new['git_commit']} (1)" in header
    assert header.endswith(f"commit {new['git_commit']}, {new['timestamp']}")   # the newest run's details


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
    assert {"ceiling.copy", "ceiling.mm_bf16", "ceiling.mm_bf16_burst", "mla_decode", "ep.dispatch"} <= ops
    assert all(r["timer"] == "cpu-wall" and r["device_slug"] == "cpu" for r in recs)
    assert all(r["ceilings"]["frac_mm_rate_of"] == harness.MM_RATE_USED and r["ceilings"]["mm_tflops_burst"] > 0
               for r in recs)
    mla = [r for r in recs if r["op"] == "mla_decode"]
    assert all(r["peer"]["time_us"] > 0 and r["extra"]["peer_with_gather"]["time_us"] > 0
               and r["extra"]["peer_with_lse"]["time_us"] > 0 for r in mla)
    assert all(r["extra"]["peer_check"]["out_max_abs_diff"] <= 1e-4 for r in mla)
    assert all(r["peer"]["time_us"] > 0 and "host read" in r["extra"]["peer_includes"]
               for r in recs if r["op"] == "ep.dispatch")
    assert (tmp_path / "cpu" / "ceilings.json").exists()
    try:
        import model  # noqa: F401
    except ImportError:
        assert "model not available" in out
    else:
        assert "tokens/s" in out and "CPU run" in out
        assert {"model.prefill", "model.decode"} <= ops
        assert (tmp_path / "cpu" / "model_cpu.json").exists()


def test_ceiling_records_sustained_and_burst(ctx):
    from bench import bench_ceilings

    with ctx.suite_run("ceilings"):
        bench_ceilings.run(ctx)
    by_op = {r["op"]: r for r in ctx.records}
    c = ctx.ceilings
    assert c.mm_tflops > 0 and c.mm_burst_tflops > 0 and c.mm_n == 512
    sustained, burst = by_op["ceiling.mm_bf16"], by_op["ceiling.mm_bf16_burst"]
    assert sustained["frac_mm_rate"] == pytest.approx(1.0, rel=1e-3)     # the rate fractions divide by
    assert burst["frac_mm_rate"] == pytest.approx(c.mm_burst_tflops / c.mm_tflops, rel=1e-2)
    assert burst["extra"]["timed_calls"] >= 1 and "burst" in burst["extra"]["what"]
    assert by_op["ceiling.copy"]["frac_copy_bw"] == pytest.approx(1.0, rel=1e-3)
    assert sustained["ceilings"]["frac_mm_rate_of"] == "ceiling.mm_bf16 (sustained)"
    assert "sustained" in results.run_header(ctx.records) and "burst" in results.run_header(ctx.records)


def test_time_runs_in_an_nvtx_range_named_after_the_record(ctx, monkeypatch):
    from pykernels import profiling

    pushed = []
    monkeypatch.setattr(profiling, "_push_pop", (pushed.append, lambda: pushed.append("<pop>")))
    name = harness.record_name("mla_decode", "triton", {"b": 64, "q_len": 1})
    assert name == "mla_decode triton b=64 q_len=1"
    monkeypatch.setattr(profiling, "_enabled", False)
    ctx.time(lambda i: None, name=name)
    assert pushed == []                                   # off: nothing reaches NVTX
    monkeypatch.setattr(profiling, "_enabled", True)
    ctx.time(lambda i: None, name=name)
    assert pushed == [name, "<pop>"]                      # one range around the timed samples

    def ours(i):
        return i

    pushed.clear()
    with ctx.suite_run("toy"):
        ctx.time(ours)
    assert pushed == ["toy test_time_runs_in_an_nvtx_range_named_after_the_record.<locals>.ours", "<pop>"]


def test_time_peer_reports_a_failing_peer_missing(ctx):
    def broken(i):
        raise RuntimeError("no kernel image for this device")

    def oom(i):
        raise torch.OutOfMemoryError("CUDA out of memory")

    assert ctx.time_peer("p", lambda i: i)[1] > 0
    assert ctx.time_peer("p", broken) == ("p", None, "RuntimeError: no kernel image for this device")
    assert ctx.time_peer("p", oom) == ("p", None, "out of memory")
    with ctx.suite_run("toy"):
        rec = _record(ctx, peer=ctx.time_peer("p", broken))
    assert rec["peer"]["missing"] and "no kernel image" in rec["peer"]["reason"] and rec["speedup_vs_peer"] is None
    assert harness.peer_entry(("q", None, "why")) == {"name": "q", "time_us": None, "missing": True, "reason": "why"}
    assert harness.peer_entry({"name": "q", "time_us": 2.0}) == {"name": "q", "time_us": 2.0}


@pytest.mark.parametrize("q_len,heads,batch,seqlen,lengths", [
    (1, 16, 3, 100, None),            # P = 128 > s: the bias hides the tail of the last block
    (2, 16, 2, 200, [200, 137]),      # causal, ragged
    (4, 8, 2, 64, [64, 4]),           # causal, one sequence of exactly q_len keys
    (1, 4, 2, 256, None),             # every key seen: no bias at all
])
def test_mla_peer_matches_the_reference(q_len, heads, batch, seqlen, lengths):
    from bench import bench_mla_decode as m
    from pykernels.mla_decode import mla_decode_reference

    q, k_cache, table, lens = m.make_inputs(q_len, heads, batch, seqlen, dtype=torch.float32, device="cpu", seed=3)
    if lengths is not None:
        lens = torch.tensor(lengths, dtype=torch.int32)
    causal, scale = q_len > 1, 0.07
    kv = m.gather_pages(k_cache, table)
    assert kv.shape == (batch, table.shape[1] * m.BLOCK_SIZE, m.HEAD_DIM)
    bias = m.attention_bias(lens, q_len, kv.shape[1], causal, q.dtype)
    assert (bias is None) == (lengths is None and seqlen % m.BLOCK_SIZE == 0 and not causal)
    ref = mla_decode_reference(q, k_cache, table, lens, m.HEAD_DIM_V, scale, causal)
    peer = m.torch_peer(q, kv, scale, bias)
    for got, want in zip(peer, ref):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    m.check_peer(ref, peer, "test")
    with pytest.raises(RuntimeError, match="disagree"):
        m.check_peer(ref, (peer[0] + 0.1, peer[1]), "test")
    out_only, no_lse = m.torch_peer(q, kv, scale, bias, with_lse=False)  # the headline peer: out only
    assert no_lse is None and torch.equal(out_only, peer[0])


def test_mla_peer_in_bf16_is_within_the_in_run_tolerance():
    """The bench's in-run check compares the bf16 peer with the op: its tolerance must cover the
    peer's bf16 rounding with room (a few x), checked against the float32 reference."""
    from bench import bench_mla_decode as m
    from pykernels.mla_decode import mla_decode_reference

    q, k_cache, table, lens = m.make_inputs(2, 16, 2, 2048, dtype=torch.bfloat16, device="cpu", seed=5)
    scale = m.HEAD_DIM**-0.5
    kv = m.gather_pages(k_cache, table)
    peer = m.torch_peer(q, kv, scale, m.attention_bias(lens, 2, kv.shape[1], True, q.dtype))
    ref = mla_decode_reference(q, k_cache, table, lens, m.HEAD_DIM_V, scale, True)
    diffs = m.check_peer(ref, peer, "bf16")
    assert diffs["out_max_abs_diff"] <= m.PEER_ATOL["out"] / 4 and diffs["lse_max_abs_diff"] <= m.PEER_ATOL["lse"] / 4


def _ep_bench_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import time as _t

    import torch.distributed as dist

    from bench import bench_ep

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        T, H, K, E = 9 + 4 * rank, 16, 3, 8
        x = torch.randn(T, H, generator=g).to(torch.bfloat16)
        ids = torch.rand(T, E, generator=g).topk(K, dim=1).indices.to(torch.int32)  # [T, K]
        w = torch.rand(T, K, generator=g)
        received, state = bench_ep.peer_dispatch(x, ids, E // world, world)
        y = bench_ep.peer_combine(received, state, w, T)  # identity experts: each token comes back K times
        expect = (x.float() * w.sum(1, keepdim=True)).to(torch.bfloat16)
        err = float((y.float() - expect.float()).abs().max())
        known = bench_ep.peer_dispatch_known_splits(x, ids, state[1], state[2])
        err = max(err, float((known.float() - received.float()).abs().max()))
        # rank 1 is slower by 20 ms: the slowest rank's time is what each repetition counts
        t, ranks = bench_ep._time(lambda i: _t.sleep(0.005 + 0.020 * rank), torch.device("cpu"), world, 4, 1, False,
                                  "ep/test")
        Path(out_dir, f"{rank}.json").write_text(json.dumps(
            {"err": err, "received": received.shape[0], "t": t, "ranks": ranks}))
    finally:
        dist.destroy_process_group()


def test_ep_peer_and_aligned_timer_with_gloo(tmp_path):
    """The EP peer round trip (dispatch, identity experts, combine) and the per-repetition slowest-rank
    timer on two CPU processes."""
    import torch.multiprocessing as mp

    from bench.ceilings import _free_port

    mp.start_processes(_ep_bench_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    out = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert all(o["err"] <= 0.05 for o in out)
    for o in out:
        assert 25_000 <= o["t"] < 60_000                      # rank 1's 25 ms, not the mean
        assert o["ranks"][0] < 15_000 and o["ranks"][1] >= 25_000
    assert sum(o["received"] for o in out) == sum(9 + 4 * r for r in range(2)) * 3


def test_cli_rejects_unknown_suite(capsys):
    assert bench_main(["no_such_suite", "--no-write"]) == 2
    assert "unknown suite" in capsys.readouterr().err


def test_samples_of_a_record_are_its_timing(ctx):
    x = torch.randn(64, 64)
    with pytest.raises(RuntimeError), ctx.suite_run("broken"):
        dropped = _record(ctx)
        raise RuntimeError("suite broke")
    assert ctx.samples_of(dropped) == ()
    with ctx.suite_run("toy"):
        timed = _record(ctx)
        untimed = _record(ctx, shape={"n": 1}, time_us=ctx.time(lambda i: x @ x) + 0.5)  # not a median
    samples = ctx.samples_of(timed)
    assert len(samples) == timed["timing"]["reps"] and min(samples) == pytest.approx(timed["timing"]["min_us"], rel=1e-5)
    assert statistics.median(samples) == pytest.approx(timed["time_us"], rel=1e-5)
    assert ctx.samples_of(untimed) == () and untimed["timing"] is None


def _suite_entry(ctx, flat):
    """A pytest-benchmark entry of a suite test as bench/test_benchmarks.py fills it (JSON or table form)."""
    from bench.conftest import suite_extra_info

    with ctx.suite_run("toy"):
        _record(ctx)
        _record(ctx, shape={"n": 1}, time_us=12.5, peer=None)        # a time the suite measured otherwise
        _record(ctx)                                                   # the same key again
    entry = {"group": "toy", "name": "test_suite[toy]", "fullname": "bench/test_benchmarks.py::test_suite[toy]",
             "params": {"name": "toy"}, "param": "toy", "options": {}, "extra_info": suite_extra_info(ctx, "toy")}
    stats = {"min": 1.0, "median": 1.0, "rounds": 1, "iterations": 1}
    if flat:  # the table's rows carry no samples
        return dict(entry, **stats, path=None, source=None)
    return dict(entry, stats=dict(stats, data=[1.0]))


@pytest.mark.parametrize("flat", [False, True])
def test_pytest_benchmark_entries_one_per_record(ctx, flat):
    from bench.conftest import record_entries

    entry = _suite_entry(ctx, flat)
    timed, untimed, again = ctx.suite_records("toy")
    out = record_entries(entry, flat=flat)
    assert [e["name"] for e in out] == ["toy.mm[torch fp32 n=64]", "toy.mm[torch fp32 n=1]",
                                        "toy.mm[torch fp32 n=64]'"]
    assert out[0]["fullname"] == "bench/test_benchmarks.py::test_suite[toy]::toy.mm[torch fp32 n=64]"
    assert all(e["group"] == "toy" for e in out)
    assert out[0]["params"] == {"op": "toy.mm", "backend": "torch", "dtype": "fp32", "n": 64}
    assert out[0]["extra_info"] is timed and out[2]["extra_info"] is again
    assert out[0]["extra_info"]["gbps"] > 0 and out[0]["extra_info"]["speedup_vs_peer"] > 0
    for e, rec in zip(out, (timed, untimed, again)):
        st = e if flat else e["stats"]
        samples = ctx.samples_of(rec)
        assert st["median"] == pytest.approx(rec["time_us"] * 1e-6, rel=1e-5)
        assert st["rounds"] == max(1, len(samples)) and st["min"] <= st["median"] <= st["max"]
        assert st["iterations"] == (rec["timing"]["inner"] if samples else 1)
        assert ("data" in st) == (not flat)
        assert e["options"]["timer"] == "cpu-wall"
    assert out[1]["options"]["samples"] == "the record's time_us only"
    other = {"name": "test_other", "fullname": "x::test_other", "extra_info": {}, "stats": {}}
    assert record_entries(other, flat=False) == [other]


def test_pytest_benchmark_route_on_the_cpu(tmp_path):
    """`pytest bench/ --bench-quick -k rope --benchmark-json`: one entry per record, the harness's statistics;
    --collect-only runs nothing."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    base = [sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider", "--bench-quick"]
    proc = subprocess.run(base + ["--collect-only"], check=False, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test_suite[rope]" in proc.stdout and "test_suite[mla_decode]" in proc.stdout
    assert "pykernels bench records" not in proc.stdout
    out_json = tmp_path / "pb.json"
    proc = subprocess.run(base + ["-k", "rope", f"--benchmark-json={out_json}", "--bench-shapes", "T=1", "T=16"],
                          check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    entries = json.loads(out_json.read_text())["benchmarks"]
    assert entries and all(e["group"] == "rope" and e["fullname"].startswith("bench/test_benchmarks.py::"
                                                                             "test_suite[rope]::") for e in entries)
    assert {e["params"]["op"] for e in entries} == {"apply_rotary", "rope_and_cache"}
    assert {e["params"]["T"] for e in entries} == {1, 16}
    for e in entries:
        rec = e["extra_info"]
        assert e["name"].startswith(rec["op"] + "[")
        assert e["stats"]["median"] == pytest.approx(rec["time_us"] * 1e-6, rel=1e-5)
        assert e["stats"]["rounds"] == rec["timing"]["reps"] == len(e["stats"]["data"])
        assert e["stats"]["iterations"] == rec["timing"]["inner"]
    assert "apply_rotary[torch fp32 T=1 h=16]" in proc.stdout           # pytest-benchmark's table, a row a record
    assert "pykernels bench records" in proc.stdout and "GB/s" in proc.stdout   # and the harness's table


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
    assert all(r["eager_time_us"] == r["time_us"] for r in out)   # no stream to hold on gloo: one timing


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


def test_mm_burst_control_flow_with_fake_cuda(monkeypatch):
    """The GPU branch of the burst: idle gap, warm-up calls, then each call timed alone; the median."""
    import contextlib

    from bench import ceilings

    fake = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "Event", fake.Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    slept = []
    monkeypatch.setattr(ceilings.time, "sleep", slept.append)
    calls = []
    t = ceilings._time_burst(types.SimpleNamespace(on_gpu=True, device=CPU), lambda: calls.append(1), "burst")
    assert t > 0 and slept == [ceilings.BURST_IDLE_S]
    assert len(calls) == ceilings.BURST_WARMUP + ceilings.BURST_CALLS


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
    assert c.ceilings.mm_burst_tflops > 0 and c.ceilings.warmup_s >= 0.25
    assert (tmp_path / c.slug / "toy_gpu.json").exists()


@pytest.mark.multigpu
def test_nvlink_and_nccl_ceilings():
    from bench import ceilings

    peer = ceilings.peer_copy((2**20,), quick=True)
    assert peer[0]["gbps"] > 0 and peer[0]["eager_time_us"] > 0
    out = ceilings.nccl_all_to_all((2**20, 16 * 2**20), quick=True, world_size=2, timeout_s=300)
    assert [r["ranks"] for r in out] == [2, 2] and all(r["gbps"] > 0 and r["eager_time_us"] > 0 for r in out)
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"
