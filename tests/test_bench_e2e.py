"""bench/bench_e2e.py on the CPU: the records it makes, the context fill, the transformers peer's config,
and the command line (``python -m bench e2e``)."""
from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
import torch

from bench import bench_e2e
from bench.__main__ import main as bench_main
from bench.harness import Context
from model import DeepseekV2, DeepseekV2Config, PagedLatentCache, attention


def small_run(peer: bool) -> list[dict]:
    ctx = Context(quick=True, results_dir=None, echo=False)
    args = bench_e2e.E2EArgs(preset="tiny", batches=(2,), prompt_len=6, context=20, new_tokens=3,
                             peer_new_tokens=4, layers=2, peer=peer, prefill_bar=False)
    with ctx.suite_run(bench_e2e.SUITE):
        bench_e2e.run_e2e(ctx, args)
    return ctx.suite_records(bench_e2e.SUITE)


def test_records_with_peer():
    recs = small_run(peer=True)
    ours = {r["op"]: r for r in recs if r["backend"] == "pykernels"}
    peers = {r["op"]: r for r in recs if r["backend"] == "transformers"}
    assert set(ours) == set(peers) == {"model.prefill", "model.decode"}
    assert ours["model.prefill"]["shape"] == {"preset": "tiny", "batch": 2, "context": 6, "layers": 2}
    assert ours["model.decode"]["shape"] == {"preset": "tiny", "batch": 2, "context": 20, "layers": 2}
    for op, r in ours.items():
        # (a fraction, not a timing bar: a tiny model's bytes sit in the CPU's caches and can beat the copy
        # ceiling, so only its sign is checked)
        assert r["extra"]["tokens_per_s"] > 0 and r["extra"]["frac_bound"] > 0
        assert r["peer"]["name"] == bench_e2e.PEER_NAME and r["peer"]["time_us"] == peers[op]["time_us"]
        if not torch.cuda.is_available():
            assert r["nvml"] == {"available": False, "reason": "CPU run"}
    d = ours["model.decode"]
    assert d["extra"]["steps"] == 2 and d["extra"]["bound"] == "bytes"
    assert math.isclose(d["extra"]["tokens_per_s"], 2 / (d["time_us"] * 1e-6), rel_tol=1e-2)
    # the bound: bytes of one step over the copy ceiling, divided by the step time
    assert math.isclose(d["extra"]["frac_bound"], d["frac_copy_bw"], rel_tol=1e-2)
    p = ours["model.prefill"]
    assert math.isclose(p["extra"]["frac_bound"], p["frac_mm_rate"], rel_tol=1e-2)
    want = attention.CANDIDATES if torch.cuda.is_available() else ("default",)
    assert p["extra"]["attention"] in want
    # the peer's step: the median of generate's 3 step times (4 new tokens), with their mean, min and max
    steps = peers["model.decode"]["extra"]
    mean, fastest, slowest = steps["ms_per_step_mean_min_max"]
    assert 0 < fastest <= steps["ms_per_step"] <= slowest and fastest <= mean <= slowest


def test_missing_peer_is_reported():
    recs = small_run(peer=False)
    assert {r["backend"] for r in recs} == {"pykernels"}
    for r in recs:
        assert r["peer"]["missing"] and "disabled" in r["peer"]["reason"]


def test_fill_context_appends_random_rows():
    cfg = dataclasses.replace(DeepseekV2Config.from_preset("tiny"), num_hidden_layers=2)
    cache = PagedLatentCache(cfg, 2, 48, block_size=16, dtype=torch.float32)
    cache.append([5, 9])
    cache.kv.fill_(math.nan)
    bench_e2e.fill_context(cache, 30)
    assert cache.lengths == [35, 39] and cache.cache_seqlens.tolist() == [35, 39]
    for b, (lo, hi) in enumerate([(5, 35), (9, 39)]):
        slots = [cache.blocks[b][p // 16] * 16 + p % 16 for p in range(lo, hi)]
        rows = cache.kv.view(2, -1, cfg.kv_cache_dim)[:, slots]
        assert not rows.isnan().any() and 0.8 < rows.std().item() < 1.2
        assert cache.kv.view(2, -1, cfg.kv_cache_dim)[:, [cache.blocks[b][0] * 16]].isnan().all()  # prompt rows


def test_hf_config_matches_ours():
    from transformers import DeepseekV2ForCausalLM

    cfg = dataclasses.replace(DeepseekV2Config.from_preset("tiny"), num_hidden_layers=2)
    hf_cfg = bench_e2e.hf_config(cfg)
    hf = DeepseekV2ForCausalLM(hf_cfg)
    ours = DeepseekV2(cfg, device="meta")
    assert sum(p.numel() for p in hf.parameters()) == ours.num_parameters()
    assert hf_cfg.rope_parameters["rope_type"] == "yarn" and hf_cfg.rope_parameters["factor"] == 4
    bench_e2e.randomize(hf)
    assert all(torch.isfinite(p).all() for p in hf.parameters())


def test_command_line(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    rc = bench_main(["e2e", "--batch", "1", "--prompt-len", "4", "--context", "9", "--new-tokens", "2", "--layers",
                     "1", "--no-peer", "--no-prefill-bar", "--no-write", "--json", str(out)])
    assert rc == 0
    recs = json.loads(out.read_text())
    assert {(r["op"], r["shape"]["batch"], r["shape"]["context"]) for r in recs} == {
        ("model.prefill", 1, 4), ("model.decode", 1, 9)}
    assert "batch 1, context 9: decode" in capsys.readouterr().out
    assert bench_main(["e2e", "--context", "3", "--prompt-len", "4", "--no-write"]) == 2
    with pytest.raises(SystemExit):
        bench_main(["e2e", "--batch", "1,x"])


def test_decode_bytes_per_rank():
    cfg = DeepseekV2Config.from_preset("v2-236b")
    from profiles import cost_model

    whole = cost_model.model_decode_step(cfg, 64, 4096, 2).bytes
    one = bench_e2e.decode_bytes_per_rank(cfg, 64, 4096, 1, 2)
    two = bench_e2e.decode_bytes_per_rank(cfg, 64, 4096, 2, 2)
    assert abs(one - whole) <= 1
    # 2 ranks: each reads half of the experts 128 tokens hit (more than 64 tokens hit, fewer than all)
    p = cost_model.model_params(cfg)
    experts = p.num_moe_layers * p.expert * 2
    hit = cost_model.expected_experts_hit
    assert math.isclose(two - one, experts * (hit(160, 6, 128) / 2 - hit(160, 6, 64)), rel_tol=1e-9, abs_tol=2)
    assert two < one


def _ep_bench_worker(rank: int, port: int, out: str) -> None:
    import os
    import traceback
    from pathlib import Path

    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        ctx = Context(device="cpu", quick=True, results_dir=None, echo=False)  # gloo: CPU tensors, also on a GPU host
        args = bench_e2e.E2EArgs(preset="tiny", batches=(2,), prompt_len=6, context=12, new_tokens=3, layers=2, ep=2)
        with ctx.suite_run(bench_e2e.SUITE):
            bench_e2e.run_e2e_ep(ctx, args)
        result = {"ok": True, "records": ctx.suite_records(bench_e2e.SUITE)}
    except Exception:  # noqa: BLE001 - reported to the test
        result = {"ok": False, "error": traceback.format_exc()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)


def test_expert_parallel_run_on_cpu(tmp_path):
    """``--ep 2`` through two gloo processes (the torch EP backend, eager decode): the records rank 0 makes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = mp.start_processes(_ep_bench_worker, args=(port, str(tmp_path)), nprocs=2, join=False,
                               start_method="spawn")
    deadline = time.monotonic() + 300
    while not procs.join(timeout=1) and time.monotonic() < deadline:
        pass
    for p in procs.processes:
        if p.is_alive():
            p.kill()
    results = [json.loads(f.read_text()) if (f := tmp_path / f"rank{r}.json").exists() else
               {"ok": False, "error": "no result: the rank hung or died"} for r in range(2)]
    for r in results:
        assert r["ok"], r.get("error")
    recs = {rec["op"]: rec for rec in results[0]["records"]}
    assert set(recs) == {"model.prefill", "model.decode"}
    d = recs["model.decode"]
    assert d["backend"] == "pykernels-ep" and d["shape"] == {"preset": "tiny", "batch": 2, "context": 12,
                                                             "layers": 2, "ep": 2}
    assert d["extra"]["per_layer_us"] > 0 and d["extra"]["extrapolated_3_layers_ms"] > 0
    assert "extrapolation" in d["extra"]["extrapolation"] and d["peer"]["missing"]
    assert not d["extra"]["cuda_graphs"] and d["extra"]["ep_backend"] == "torch"
