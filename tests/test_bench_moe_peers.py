"""bench/bench_moe.py's eager peers on the CPU: the per-expert loops give what the references give."""
import torch

from bench import bench_moe
from pykernels.moe_ffn import grouped_ffn_reference, moe_ffn_reference

T, H, I, E, K = 37, 48, 40, 7, 3   # odd sizes; some experts get no rows


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) * H**-0.5
    w2 = torch.randn(E, H, I, generator=g) * I**-0.5
    ids = torch.randint(0, E - 2, (T, K), generator=g, dtype=torch.int32)   # experts E-2, E-1 unused
    weights = torch.rand(T, K, generator=g)
    return x, w13, w2, ids, weights


def test_loop_pipeline_matches_moe_ffn_reference():
    x, w13, w2, ids, weights = _inputs()
    got = bench_moe.loop_pipeline(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, moe_ffn_reference(x, w13, w2, weights, ids), rtol=1e-4, atol=1e-4)


def test_loops_on_sorted_rows_match_the_reference():
    x, w13, w2, ids, _ = _inputs()
    order, offsets = bench_moe._sort_routes(ids, E)
    x_sorted = x[order // K]                                          # [T·K, H]
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    assert counts[-2:] == [0, 0]
    got = bench_moe.loop_ffn(x_sorted, w13, w2, counts)
    torch.testing.assert_close(got, grouped_ffn_reference(x_sorted, w13, w2, offsets), rtol=1e-4, atol=1e-4)
    gate_up = bench_moe.loop_gate_up(x_sorted, w13, counts)           # one [n_e, 2I] per expert hit
    assert len(gate_up) == E - 2
    experts = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    want = torch.einsum("rh,rnh->rn", x_sorted, w13[experts])         # [T·K, 2I]
    torch.testing.assert_close(torch.cat(gate_up), want, rtol=1e-4, atol=1e-4)
