"""pk.mla_decode: the torch reference against a float64 loop, every backend against the reference,
edges (empty, one-key, block-boundary lengths; shuffled and strided block tables; NaN past each
sequence's end), causal q_len > 1, input validation, the custom op's fake, and on the GPU: large
shapes, CUDA-graph replay with new lengths, torch.compile, memory safety on unchecked bad input.
"""
from __future__ import annotations

import math

import pytest
import torch

import pykernels as pk
from pykernels import _backend
from pykernels.mla_decode import mla_decode_reference

HEAD_DIM, HEAD_DIM_V = 576, 512
HAS_CUDA = torch.cuda.is_available()
interpreter_only = pytest.mark.skipif(not _backend.triton_interpreted(), reason="needs TRITON_INTERPRET=1 (CPU)")
# Relative error of out and absolute error of lse against the float32 reference, by input dtype.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-4), torch.bfloat16: (1e-2, 2e-4)}


def make_case(batch, q_len, heads, block_size, lens, *, dtype=torch.float32, device="cpu", seed=0,
              spare_blocks=3, extra_cols=1, head_dim=HEAD_DIM):
    """Random q and a paged cache holding ``lens[b]`` rows per sequence in shuffled blocks.

    Cache rows past each sequence's end (the tail of its last block and spare blocks) are NaN, and
    block-table entries past the blocks a sequence uses are garbage ids (negative or huge): any
    read the op should not make shows up as NaN or a crash.
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    gc = torch.Generator().manual_seed(seed)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    used = [(n + block_size - 1) // block_size for n in lens]
    max_blocks = max(used, default=0) + extra_cols
    num_blocks = sum(used) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gc)
    garbage = torch.tensor([-1, -(2**31), num_blocks, 2**31 - 1], dtype=torch.int32)
    block_table = garbage[torch.randint(0, 4, (batch, max_blocks), generator=gc)]
    k_cache = torch.full((num_blocks, block_size, 1, head_dim), math.nan, dtype=torch.float32, device=device)
    flat = k_cache.view(-1, head_dim)
    offset = 0
    for b, n in enumerate(lens):
        ids = perm[offset:offset + used[b]]
        offset += used[b]
        block_table[b, :used[b]] = ids.int()
        rows = (ids[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:n].to(device)
        flat[rows] = torch.randn(n, head_dim, generator=g, device=device)
    q = torch.randn(batch, q_len, heads, head_dim, generator=g, device=device)
    return q.to(dtype), k_cache.to(dtype), block_table.to(device), lens_t.to(device)


def loop_reference(q, k_cache, block_table, cache_seqlens, head_dim_v, scale, causal):
    """The docstring's math, one (sequence, query, head) at a time, in float64."""
    batch, q_len, heads, head_dim = q.shape
    block_size = k_cache.shape[1]
    out = torch.zeros(batch, q_len, heads, head_dim_v, dtype=torch.float64)
    lse = torch.full((batch, heads, q_len), -math.inf, dtype=torch.float64)
    for b in range(batch):
        n = int(cache_seqlens[b])
        keys = torch.stack([k_cache[int(block_table[b, t // block_size]), t % block_size, 0] for t in range(n)]) \
            if n else torch.zeros(0, head_dim)
        keys = keys.double()
        for i in range(q_len):
            seen = n - q_len + i + 1 if causal else n
            if seen <= 0:
                continue
            for h in range(heads):
                s = scale * (keys[:seen] @ q[b, i, h].double())
                lse[b, h, i] = torch.logsumexp(s, 0)
                out[b, i, h] = torch.softmax(s, 0) @ keys[:seen, :head_dim_v]
    return out, lse


def assert_close(out, lse, ref_out, ref_lse, dtype):
    out_tol, lse_tol = TOL[dtype]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    ref_out, ref_lse = ref_out.float(), ref_lse.float()
    err = (out.float() - ref_out).norm() / ref_out.norm().clamp_min(1e-30)
    assert err <= out_tol, f"out: relative error {err:.3e} > {out_tol}"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and bool((lse[empty] < 0).all()), \
        "lse: -inf exactly where nothing is seen"
    if (~empty).any():
        lerr = (lse[~empty] - ref_lse[~empty]).abs().max()
        assert lerr <= lse_tol, f"lse: absolute error {lerr:.3e} > {lse_tol}"


def run_against_reference(batch, q_len, heads, block_size, lens, causal, dtype, device, backend, *,
                          seed=0, softmax_scale=None, **kwargs):
    q, k_cache, block_table, seqlens = make_case(batch, q_len, heads, block_size, lens, dtype=dtype,
                                                 device=device, seed=seed)
    out, lse = pk.mla_decode(q, k_cache, block_table, seqlens, HEAD_DIM_V, softmax_scale, causal,
                             backend=backend, **kwargs)
    scale = HEAD_DIM**-0.5 if softmax_scale is None else softmax_scale
    ref_out, ref_lse = mla_decode_reference(q.float(), k_cache.float(), block_table, seqlens, HEAD_DIM_V,
                                            scale, causal)
    assert out.shape == (batch, q_len, heads, HEAD_DIM_V) and out.dtype == dtype
    assert lse.shape == (batch, heads, q_len) and lse.dtype == torch.float32
    assert_close(out, lse, ref_out, ref_lse, dtype)
    return out, lse


# ---------------------------------------------------------------------------------------------
# The reference itself


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size", [16, 5])
def test_reference_matches_loop(causal, block_size):
    q_len = 2 if causal else 1
    q, k_cache, block_table, seqlens = make_case(4, q_len, 3, block_size, [0, 2, 17, 33], seed=1)
    out, lse = mla_decode_reference(q, k_cache, block_table, seqlens, HEAD_DIM_V, 0.07, causal)
    ref_out, ref_lse = loop_reference(q, k_cache, block_table, seqlens, HEAD_DIM_V, 0.07, causal)
    assert_close(out, lse, ref_out, ref_lse, torch.float32)
    assert (out[0] == 0).all() and torch.isinf(lse[0]).all()


def test_cpu_default_backend_is_torch_and_scale_defaults():
    q, k_cache, block_table, seqlens = make_case(2, 1, 4, 16, [7, 20], seed=2)
    out, lse = pk.mla_decode(q, k_cache, block_table, seqlens)
    ref_out, ref_lse = mla_decode_reference(q, k_cache, block_table, seqlens, HEAD_DIM_V, HEAD_DIM**-0.5, False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


# ---------------------------------------------------------------------------------------------
# Triton under the interpreter (CPU, fp16/fp32)

BS = 16
INTERPRETER_CASES = [
    # batch, q_len, heads, block_size, lens, causal, num_splits (None: heuristic)
    (6, 1, 16, BS, [0, 1, BS - 1, BS, BS + 1, 3 * BS + 5], False, None),
    (6, 1, 16, BS, [0, 1, BS - 1, BS, BS + 1, 3 * BS + 5], False, 1),
    (3, 2, 16, BS, [0, 2, 2 * BS + 3], True, None),
    (3, 2, 16, BS, [2, BS, 2 * BS + 3], True, 1),
    (2, 4, 3, 32, [4, 70], True, 3),
    (2, 1, 1, 32, [31, 64], False, 2),
    (2, 1, 20, 64, [65, 130], False, None),  # two row blocks of 16
    (2, 3, 7, 24, [3, 49], True, 5),  # block size not a power of two; more splits than a short sequence fills
    (1, 1, 16, 128, [300], False, 16),  # splits beyond the sequence's end do nothing
]


@interpreter_only
@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=lambda c: f"b{c[0]}q{c[1]}h{c[2]}bs{c[3]}c{int(c[5])}s{c[6]}")
def test_triton_interpreter_fp16(case):
    from pykernels.triton import mla_decode as tmla

    batch, q_len, heads, block_size, lens, causal, splits = case
    q, k_cache, block_table, seqlens = make_case(batch, q_len, heads, block_size, lens, dtype=torch.float16, seed=3)
    config = tmla.INTERPRETER_CONFIG
    out, lse = tmla.mla_decode_triton(q, k_cache, block_table, seqlens, HEAD_DIM_V, HEAD_DIM**-0.5, causal,
                                      config=config, num_splits=splits, fallback=False)
    ref_out, ref_lse = mla_decode_reference(q.float(), k_cache.float(), block_table, seqlens, HEAD_DIM_V,
                                            HEAD_DIM**-0.5, causal)
    assert_close(out, lse, ref_out, ref_lse, torch.float16)


@interpreter_only
@pytest.mark.parametrize("case", [
    (3, 1, 64, BS, [0, BS + 3, 3 * BS], False, 2),  # 64 rows: one row block
    (2, 4, 20, BS, [4, 2 * BS + 1], True, 1),  # 80 rows: two row blocks, the second partly masked
], ids=lambda c: f"b{c[0]}q{c[1]}h{c[2]}s{c[6]}")
def test_triton_interpreter_wide_rows(case):
    """64-row programs take the warp-group path (_attend_wide: whole-width q, tiles and accumulator)."""
    from pykernels.triton import mla_decode as tmla

    batch, q_len, heads, block_size, lens, causal, splits = case
    q, k_cache, block_table, seqlens = make_case(batch, q_len, heads, block_size, lens, dtype=torch.float16, seed=9)
    config = tmla.MLADecodeConfig(block_m=64, block_n=16, num_warps=4, num_stages=1, min_chunk=16)
    out, lse = tmla.mla_decode_triton(q, k_cache, block_table, seqlens, HEAD_DIM_V, HEAD_DIM**-0.5, causal,
                                      config=config, num_splits=splits, fallback=False)
    ref_out, ref_lse = mla_decode_reference(q.float(), k_cache.float(), block_table, seqlens, HEAD_DIM_V,
                                            HEAD_DIM**-0.5, causal)
    assert_close(out, lse, ref_out, ref_lse, torch.float16)


@interpreter_only
@pytest.mark.parametrize("block_size", [16, 64, 256])
def test_triton_interpreter_tile_and_block_size_differ(block_size):
    """BLOCK_N = 128 tiles spanning several cache blocks (16, 64) or part of one (256): the sweep's
    M16/N128/w4/s1/keys config, with lengths ending inside a tile and NaN past each end."""
    from pykernels.triton import mla_decode as tmla

    config = tmla.MLADecodeConfig(block_m=16, block_n=128, num_warps=4, num_stages=1, min_chunk=128)
    lens = [1, 63, 129, 300]
    q, k_cache, block_table, seqlens = make_case(4, 1, 16, block_size, lens, dtype=torch.float16, seed=5)
    out, lse = tmla.mla_decode_triton(q, k_cache, block_table, seqlens, HEAD_DIM_V, HEAD_DIM**-0.5, False,
                                      config=config, num_splits=2, fallback=False)
    ref_out, ref_lse = mla_decode_reference(q.float(), k_cache.float(), block_table, seqlens, HEAD_DIM_V,
                                            HEAD_DIM**-0.5, False)
    assert_close(out, lse, ref_out, ref_lse, torch.float16)


@interpreter_only
def test_triton_interpreter_fp32_strided_inputs_and_peaked_softmax():
    # q is a slice of a wider tensor (row stride 640), the block table a strided column view.
    q, k_cache, block_table, seqlens = make_case(3, 2, 5, 16, [0, 9, 40], seed=4)
    wide_q = torch.randn(3, 2, 5, 640)
    wide_q[..., :HEAD_DIM] = q
    q = wide_q[..., :HEAD_DIM]
    wide_table = torch.full((3, 2 * block_table.shape[1]), -7, dtype=torch.int32)
    wide_table[:, ::2] = block_table
    table = wide_table[:, ::2]
    assert not q.is_contiguous() and table.stride(1) == 2
    out, lse = pk.mla_decode(q, k_cache, table, seqlens, HEAD_DIM_V, 0.5, True, backend="triton")
    ref_out, ref_lse = mla_decode_reference(q, k_cache, block_table, seqlens, HEAD_DIM_V, 0.5, True)
    assert_close(out, lse, ref_out, ref_lse, torch.float32)


@interpreter_only
def test_triton_interpreter_random_shapes():
    gen = torch.Generator().manual_seed(5)
    for trial in range(3):
        batch = int(torch.randint(1, 4, (1,), generator=gen))
        q_len = int(torch.randint(1, 3, (1,), generator=gen))
        heads = int(torch.randint(1, 18, (1,), generator=gen))
        block_size = [16, 32, 48][trial]
        lens = [int(x) for x in torch.randint(q_len, 3 * block_size, (batch,), generator=gen)]
        run_against_reference(batch, q_len, heads, block_size, lens, q_len > 1, torch.float16, "cpu", "triton",
                              seed=10 + trial)


@interpreter_only
def test_triton_config_that_fails_is_replaced_once(monkeypatch):
    from pykernels.triton import mla_decode as tmla

    monkeypatch.setattr(tmla, "_REPLACED", {})
    broken = tmla.MLADecodeConfig(block_m=16, block_n=24, num_warps=4, num_stages=1)  # 24: no arange
    q, k_cache, block_table, seqlens = make_case(2, 1, 4, 16, [9, 40], dtype=torch.float16, seed=15)
    with pytest.raises(Exception):
        tmla.mla_decode_triton(q, k_cache, block_table, seqlens, HEAD_DIM_V, 0.1, False, config=broken, fallback=False)
    with pytest.warns(RuntimeWarning, match="using MLADecodeConfig"):
        out, lse = tmla.mla_decode_triton(q, k_cache, block_table, seqlens, HEAD_DIM_V, 0.1, False, config=broken)
    assert tmla._REPLACED == {broken: tmla.fallback_config(broken)}
    ref_out, ref_lse = mla_decode_reference(q.float(), k_cache.float(), block_table, seqlens, HEAD_DIM_V, 0.1, False)
    assert_close(out, lse, ref_out, ref_lse, torch.float16)


@interpreter_only
def test_triton_interpreter_rejects_bf16():
    q, k_cache, block_table, seqlens = make_case(1, 1, 2, 16, [3], dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="q: .*interpreter"):
        pk.mla_decode(q, k_cache, block_table, seqlens, backend="triton")


def test_triton_head_dim_split_must_be_powers_of_two():
    if not _backend.triton_usable(torch.device("cpu")):
        pytest.skip("triton is not usable on CPU tensors here")
    q, k_cache, block_table, seqlens = make_case(1, 1, 2, 16, [3], head_dim=96)
    with pytest.raises(ValueError, match="head_dim_v"):
        pk.mla_decode(q, k_cache, block_table, seqlens, head_dim_v=48, backend="triton")
    out, _ = pk.mla_decode(q, k_cache, block_table, seqlens, head_dim_v=48, backend="torch")
    assert out.shape == (1, 1, 2, 48)
    # The kernel works on quarters of the value columns: 32 is a power of two but its quarters are too narrow.
    q, k_cache, block_table, seqlens = make_case(1, 1, 2, 16, [3], head_dim=48)
    with pytest.raises(ValueError, match="head_dim_v >= 64"):
        pk.mla_decode(q, k_cache, block_table, seqlens, head_dim_v=32, backend="triton")


# ---------------------------------------------------------------------------------------------
# Validation


def _good():
    return make_case(2, 1, 4, 16, [5, 20], seed=6)


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: a.update(q=a["q"].half()), TypeError, "k_cache: expected dtype"),
    (lambda a: a.update(q=a["q"].int()), TypeError, "q: expected dtype"),
    (lambda a: a.update(q=a["q"][0]), ValueError, "q: expected 4 dimensions"),
    (lambda a: a.update(k_cache=a["k_cache"][..., :500]), ValueError, "k_cache: expected shape"),
    (lambda a: a.update(k_cache=a["k_cache"].expand(-1, -1, 2, -1)), ValueError, "k_cache: expected shape"),
    (lambda a: a.update(q=a["q"].transpose(2, 3).contiguous().transpose(2, 3)), ValueError, "q: expected stride 1"),
    (lambda a: a.update(block_table=a["block_table"].long()), TypeError, "block_table: expected dtype int32"),
    (lambda a: a.update(block_table=a["block_table"][:1]), ValueError, "block_table: expected shape"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), TypeError, "cache_seqlens: expected dtype int32"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), ValueError, "cache_seqlens: expected shape"),
    (lambda a: a.update(cache_seqlens=torch.tensor([5, 49], dtype=torch.int32)), ValueError,
     "cache_seqlens: expected lengths in \\[0, 48\\]"),
    (lambda a: a.update(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32)), ValueError, "cache_seqlens"),
    (lambda a: a["block_table"].__setitem__((1, 1), 99), ValueError, "block_table: expected block ids"),
    (lambda a: a["block_table"].__setitem__((0, 0), -1), ValueError, "block_table: expected block ids"),
    (lambda a: a.update(head_dim_v=577), ValueError, "head_dim_v"),
    (lambda a: a.update(head_dim_v=0), ValueError, "head_dim_v"),
    (lambda a: a.update(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (lambda a: a.update(causal=1.5), ValueError, "causal"),
    (lambda a: a.update(backend="cuda"), ValueError, "backend"),
])
def test_bad_input_names_the_argument(mutate, error, match):
    q, k_cache, block_table, seqlens = _good()
    args = dict(q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=seqlens)
    mutate(args)
    with pytest.raises(error, match=match):
        pk.mla_decode(**args)


def test_causal_needs_q_len_keys_but_allows_empty_sequences():
    q, k_cache, block_table, _ = make_case(2, 3, 2, 16, [5, 20], seed=7)
    with pytest.raises(ValueError, match="cache_seqlens: with causal=True and q_len=3"):
        pk.mla_decode(q, k_cache, block_table, torch.tensor([2, 20], dtype=torch.int32), causal=True)
    out, lse = pk.mla_decode(q, k_cache, block_table, torch.tensor([0, 20], dtype=torch.int32), causal=True)
    assert (out[0] == 0).all() and torch.isinf(lse[0]).all()
    pk.mla_decode(q, k_cache, block_table, torch.tensor([2, 20], dtype=torch.int32), causal=False)


def test_unused_block_table_entries_are_not_checked():
    q, k_cache, block_table, seqlens = make_case(2, 1, 2, 16, [5, 20], extra_cols=3, seed=8)
    assert ((block_table < 0) | (block_table >= k_cache.shape[0])).any()  # garbage past the used blocks
    pk.mla_decode(q, k_cache, block_table, seqlens)


def test_custom_op_fake_and_schema():
    q, k_cache, block_table, seqlens = make_case(2, 2, 3, 16, [4, 20], seed=9)
    torch.library.opcheck(torch.ops.pykernels.mla_decode.default,
                          (q, k_cache, block_table, seqlens, HEAD_DIM_V, 0.1, True, "torch"))


def test_torch_compile_cpu():
    # On CPU tensors the value checks read the lengths (a graph break), so no fullgraph here.
    q, k_cache, block_table, seqlens = make_case(2, 2, 3, 16, [4, 20], seed=16)

    @torch.compile(backend="aot_eager")
    def step(q, k_cache, block_table, seqlens):
        out, lse = pk.mla_decode(q * 2.0, k_cache, block_table, seqlens, causal=True)
        return out + 1.0, lse

    out, lse = step(q, k_cache, block_table, seqlens)
    ref_out, ref_lse = mla_decode_reference(q * 2.0, k_cache, block_table, seqlens, HEAD_DIM_V, HEAD_DIM**-0.5, True)
    torch.testing.assert_close(out, ref_out + 1.0)
    torch.testing.assert_close(lse, ref_lse)


# ---------------------------------------------------------------------------------------------
# GPU (bf16 and fp16)

gpu = pytest.mark.gpu


def _gpu_configs():
    from pykernels.triton.mla_decode import MLADecodeConfig

    return {
        "table": None,
        "rows16_n64_s3": MLADecodeConfig(16, 64, 4, 3, min_chunk=64),
        "rows64_n32_w8": MLADecodeConfig(64, 32, 8, 2, min_chunk=32),
        "rows32_n16_two_per_sm": MLADecodeConfig(32, 16, 4, 4, programs_per_sm=2, min_chunk=32),
    }


@gpu
@pytest.mark.parametrize("dtype, config", [(torch.bfloat16, c) for c in
                                           ("table", "rows16_n64_s3", "rows64_n32_w8", "rows32_n16_two_per_sm")]
                         + [(torch.float16, "table")])
@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=lambda c: f"b{c[0]}q{c[1]}h{c[2]}bs{c[3]}c{int(c[5])}s{c[6]}")
def test_triton_gpu_edges(case, dtype, config):
    from pykernels.triton import mla_decode as tmla

    batch, q_len, heads, block_size, lens, causal, splits = case
    q, k_cache, block_table, seqlens = make_case(batch, q_len, heads, block_size, lens, dtype=dtype,
                                                 device="cuda", seed=3)
    out, lse = tmla.mla_decode_triton(q, k_cache, block_table, seqlens, HEAD_DIM_V, HEAD_DIM**-0.5, causal,
                                      config=_gpu_configs()[config], num_splits=splits, fallback=False)
    ref_out, ref_lse = mla_decode_reference(q.float(), k_cache.float(), block_table, seqlens, HEAD_DIM_V,
                                            HEAD_DIM**-0.5, causal)
    assert_close(out, lse, ref_out, ref_lse, dtype)


GPU_CASES = [
    # batch, q_len, heads, block_size, max length, causal
    (64, 1, 16, 64, 4096, False),
    (128, 1, 16, 64, 8192, False),
    (32, 1, 16, 64, 32768, False),
    (1, 1, 16, 64, 32768, False),
    (64, 1, 128, 64, 4096, False),
    (1, 1, 128, 64, 32768, False),
    (64, 2, 16, 64, 4096, True),
    (16, 2, 128, 64, 2048, True),
    (8, 4, 16, 16, 3000, True),
    (8, 3, 16, 256, 3000, True),
    (5, 1, 64, 128, 2000, False),
    (3, 1, 1, 32, 1000, False),
]


@gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"b{c[0]}q{c[1]}h{c[2]}bs{c[3]}s{c[4]}c{int(c[5])}")
@pytest.mark.parametrize("lengths", ["full", "mixed"])
def test_triton_gpu_large(case, lengths):
    batch, q_len, heads, block_size, s, causal = case
    gen = torch.Generator().manual_seed(batch * 7 + heads)
    if lengths == "full":
        lens = [s] * batch
    else:  # random lengths in [q_len, s], with an empty sequence and a one-block one when batch allows
        lens = [int(x) for x in torch.randint(q_len, s + 1, (batch,), generator=gen)]
        if batch >= 3:
            lens[0], lens[1] = 0, block_size
    run_against_reference(batch, q_len, heads, block_size, lens, causal, torch.bfloat16, "cuda", None,
                          seed=batch + heads)


@gpu
def test_backend_none_on_cuda_is_triton_and_peaked_softmax():
    run_against_reference(4, 1, 16, 64, [1, 63, 64, 1000], False, torch.bfloat16, "cuda", None, softmax_scale=0.4)
    from pykernels.mla_decode import CUDA_PREFERENCE, SUPPORTED_BACKENDS

    assert _backend.resolve("mla_decode", None, torch.device("cuda"), SUPPORTED_BACKENDS, CUDA_PREFERENCE) == "triton"


@gpu
def test_cuda_graph_replay_with_new_lengths():
    batch, heads, block_size = 16, 16, 64
    q, k_cache, block_table, seqlens = make_case(batch, 1, heads, block_size, [2048] * batch,
                                                 dtype=torch.bfloat16, device="cuda", seed=11)
    new_lens = torch.randint(0, 2049, (batch,), generator=torch.Generator().manual_seed(12)).int()
    new_lens[0] = 0
    static_lens = seqlens.clone()
    pk.mla_decode(q, k_cache, block_table, static_lens)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = pk.mla_decode(q, k_cache, block_table, static_lens)
    for lens in (seqlens, new_lens.cuda(), seqlens // 3):
        static_lens.copy_(lens)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = mla_decode_reference(q.float(), k_cache.float(), block_table, static_lens,
                                                HEAD_DIM_V, HEAD_DIM**-0.5, False)
        assert_close(out, lse, ref_out, ref_lse, torch.bfloat16)


@gpu
def test_torch_compile_fullgraph():
    q, k_cache, block_table, seqlens = make_case(8, 2, 16, 64, [300] * 8, dtype=torch.bfloat16, device="cuda", seed=13)

    @torch.compile(fullgraph=True)
    def step(q, k_cache, block_table, seqlens):
        out, lse = pk.mla_decode(q * 1.0, k_cache, block_table, seqlens, causal=True)
        return out.float().sum(-1), lse

    got, lse = step(q, k_cache, block_table, seqlens)
    ref_out, ref_lse = mla_decode_reference(q.float(), k_cache.float(), block_table, seqlens, HEAD_DIM_V,
                                            HEAD_DIM**-0.5, True)
    torch.testing.assert_close(lse, ref_lse, atol=2e-4, rtol=0)
    torch.testing.assert_close(got, ref_out.sum(-1), atol=0.5, rtol=2e-2)


@gpu
def test_value_checks_opt_in_on_cuda(monkeypatch):
    q, k_cache, block_table, seqlens = make_case(2, 1, 4, 16, [5, 20], dtype=torch.bfloat16, device="cuda")
    block_table[1, 0] = 10**6
    monkeypatch.setenv("PYKERNELS_CHECK_VALUES", "1")
    with pytest.raises(ValueError, match="block_table"):
        pk.mla_decode(q, k_cache, block_table, seqlens)
    with pytest.raises(ValueError, match="cache_seqlens"):
        pk.mla_decode(q, k_cache, block_table, torch.tensor([5, 999], dtype=torch.int32, device="cuda"))


@gpu
def test_unchecked_bad_values_stay_in_bounds():
    # Without value checks the kernel clamps: no fault, finite output (sanitizer-level safety is the
    # compute-sanitizer's job; here: no crash and no NaN from the NaN-filled spare blocks).
    q, k_cache, block_table, _ = make_case(3, 1, 16, 16, [5, 20, 40], dtype=torch.bfloat16, device="cuda", seed=14)
    k_cache.nan_to_num_(0.0)
    block_table[0, 0] = -(2**31)
    block_table[1, 1] = 2**31 - 1
    seqlens = torch.tensor([5, 10**6, -4], dtype=torch.int32, device="cuda")
    out, lse = pk.mla_decode(q, k_cache, block_table, seqlens)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert torch.isinf(lse[2]).all() and (out[2] == 0).all()


@pytest.mark.parametrize("batch, seqlen, splits", [
    (1, 32768, 128),  # one program per SM: 256 would share SMs and double the partials
    (1, 4096, 128),  # one 32-row tile per split (min_chunk)
    (16, 4096, 8),
    (64, 4096, 4),  # two long programs per SM
    (128, 8192, 2),
])
def test_split_model_picks(batch, seqlen, splits):
    """The split model on a 132-SM GPU gives the split counts measured best on the H200 (tune/mla_decode_splits.json)."""
    from pykernels.triton import mla_decode as tmla

    config = tmla.CONFIG_TABLE[0][1]  # 16 rows: h16, q_len 1
    assert tmla.choose_num_splits(batch, 1, seqlen, config, 132) == splits
