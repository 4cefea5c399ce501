"""pk.moe_ffn / pk.grouped_ffn: the references against a per-route loop, every backend against the reference, edges, errors."""
import pytest
import torch
import torch.nn.functional as F

import pykernels as pk
from pykernels import _backend
from pykernels.moe_ffn import grouped_ffn_reference, moe_ffn_reference
from pykernels.triton import moe_configs

HAS_CUDA = torch.cuda.is_available()
TRITON_ON_CPU = _backend.triton_usable(torch.device("cpu"))
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rel(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in the output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _weights(E, H, I, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype).to(device)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype).to(device)
    return w13, w2


def _routing(T, E, k, device, seed=0, avoid=None):
    """Random distinct experts per token (optionally never ``avoid``) and positive weights."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    if avoid is not None:
        scores[:, avoid] = -1.0
    ids = scores.topk(k, dim=-1).indices.to(torch.int32)
    w = torch.rand(T, k, generator=g) + 0.1
    return w.to(device), ids.to(device)


def _loop_reference(x, w13, w2, topk_weights, topk_ids):
    """The contract's formula, one route at a time, in float64."""
    y = torch.zeros(x.shape, dtype=torch.float64)
    inter = w13.shape[1] // 2
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            v = x[t].double()
            h = F.silu(w13[e, :inter].double() @ v) * (w13[e, inter:].double() @ v)
            y[t] += float(topk_weights[t, k]) * (w2[e].double() @ h)
    return y


def _sorted_rows(x, topk_ids, num_experts):
    """x_sorted and offsets for grouped_ffn: every route's token row, grouped by expert (stable)."""
    k = topk_ids.shape[1]
    order = topk_ids.reshape(-1).long().argsort(stable=True)
    counts = torch.bincount(topk_ids.reshape(-1).long().cpu(), minlength=num_experts)
    return x[order // k].contiguous(), counts.cumsum(0).to(torch.int32).to(x.device)


def test_references_match_the_route_loop():
    torch.manual_seed(0)
    T, E, H, I, k = 9, 5, 24, 20, 3
    x = torch.randn(T, H, dtype=torch.float64)
    w13, w2 = _weights(E, H, I, torch.float64, "cpu")
    tw, ids = _routing(T, E, k, "cpu")
    ref = _loop_reference(x, w13, w2, tw, ids)
    assert _rel(moe_ffn_reference(x, w13, w2, tw.double(), ids), ref) < 1e-6  # float32 math
    xs, offsets = _sorted_rows(x, ids, E)
    order = ids.reshape(-1).long().argsort(stable=True)
    ones = torch.ones(T * k, 1, dtype=torch.float64)
    per_row = _loop_reference(xs, w13, w2, ones, ids.reshape(-1, 1)[order])
    assert _rel(grouped_ffn_reference(xs, w13, w2, offsets), per_row) < 1e-6


# (T, E, H, I, top_k, what)
CASES = [
    (13, 8, 64, 48, 3, "random"),
    (1, 8, 64, 32, 2, "one token"),
    (6, 4, 32, 16, 4, "k = E"),
    (11, 6, 97, 75, 2, "odd H and I"),
    (10, 6, 48, 32, 2, "expert 2 gets no token"),
    (40, 6, 32, 32, 1, "every token on expert 3"),
]


def _case_inputs(case, dtype, device):
    T, E, H, I, k, what = case
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(7)).to(dtype).to(device)
    w13, w2 = _weights(E, H, I, dtype, device)
    tw, ids = _routing(T, E, k, device, avoid=2 if "no token" in what else None)
    if "every token" in what:
        ids.fill_(3)
    return x, w13, w2, tw, ids


def _backends():
    out = [pytest.param("cpu", torch.float32, "torch", id="cpu-torch-fp32")]
    if TRITON_ON_CPU:
        out += [pytest.param("cpu", torch.float16, "triton", id="cpu-triton-fp16")]
    out += [pytest.param("cuda", dt, "triton", id=f"cuda-triton-{str(dt)[6:]}", marks=pytest.mark.gpu)
            for dt in (torch.bfloat16, torch.float16, torch.float32)]
    out += [pytest.param("cuda", torch.bfloat16, "cuda", id="cuda-cuda-bfloat16", marks=pytest.mark.gpu)]
    return out


def _sm90_refuses(backend, x, H, I) -> bool:
    """backend "cuda" on a shape or GPU its sm_90 GEMMs do not take: check the error instead (True)."""
    from pykernels import moe_gemm_sm90

    if backend != "cuda" or (moe_gemm_sm90.supports(H, I) and moe_gemm_sm90.available(x.device)):
        return False
    with pytest.raises(ValueError, match="backend: 'cuda'"):
        pk.moe_ffn(x, *_weights(4, H, I, x.dtype, x.device), torch.ones(x.shape[0], 1, device=x.device),
                   torch.zeros(x.shape[0], 1, dtype=torch.int32, device=x.device), backend="cuda")
    return True


@pytest.mark.parametrize("device,dtype,backend", _backends())
@pytest.mark.parametrize("case", CASES, ids=[c[-1] for c in CASES])
def test_moe_ffn_matches_reference(device, dtype, backend, case):
    x, w13, w2, tw, ids = _case_inputs(case, dtype, device)
    if _sm90_refuses(backend, x, case[2], case[3]):
        return
    y = pk.moe_ffn(x, w13, w2, tw, ids, backend=backend)
    assert y.shape == x.shape and y.dtype == dtype
    ref = moe_ffn_reference(x.float(), w13.float(), w2.float(), tw, ids)
    assert _rel(y, ref) <= TOL[dtype]


@pytest.mark.parametrize("device,dtype,backend", _backends())
@pytest.mark.parametrize("case", CASES[:1] + CASES[3:], ids=[c[-1] for c in CASES[:1] + CASES[3:]])
def test_grouped_ffn_matches_reference(device, dtype, backend, case):
    x, w13, w2, tw, ids = _case_inputs(case, dtype, device)
    if _sm90_refuses(backend, x, case[2], case[3]):
        return
    xs, offsets = _sorted_rows(x, ids, w13.shape[0])
    y = pk.grouped_ffn(xs, w13, w2, offsets, backend=backend)
    assert y.shape == xs.shape and y.dtype == dtype
    assert _rel(y, grouped_ffn_reference(xs.float(), w13.float(), w2.float(), offsets)) <= TOL[dtype]


def _fast_devices():
    out = [pytest.param("cpu", torch.float16, id="cpu-fp16")] if TRITON_ON_CPU else []
    return out + [pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.gpu)]


LAYOUTS = ("direct", "sorted", "padded")


@pytest.mark.parametrize("device,dtype", _fast_devices())
@pytest.mark.parametrize("layout", ["direct", "padded"])
@pytest.mark.parametrize("case", CASES, ids=[c[-1] for c in CASES])
def test_triton_layouts_match_reference(device, dtype, layout, case):
    """The row layouts moe_ffn does not pick by default at these shapes (test_moe_ffn_matches_reference runs the
    default: sorted, as these shapes have no direct tiles); the direct layout takes any T, repeated experts too."""
    from pykernels.triton.grouped_gemm import moe_ffn_triton

    x, w13, w2, tw, ids = _case_inputs(case, dtype, device)
    y = moe_ffn_triton(x, w13, w2, tw, ids, layout=layout)
    assert _rel(y, moe_ffn_reference(x.float(), w13.float(), w2.float(), tw, ids)) <= TOL[dtype]


def test_layout_choice():
    from pykernels.triton.grouped_gemm import moe_ffn_triton

    tuned = next(key[1:3] for key in moe_configs.TABLE if key[3] == "direct")  # (H, I) with direct tiles
    assert moe_configs.layout_for(moe_configs.DIRECT_MAX_TOKENS, *tuned) == "direct"
    assert moe_configs.layout_for(moe_configs.DIRECT_MAX_TOKENS + 1, *tuned) == "sorted"
    assert moe_configs.layout_for(1, 5120, 768) == "sorted"  # the TP2 shard: no direct tiles
    with pytest.raises(ValueError, match="layout"):
        moe_ffn_triton(*_bad_moe().values(), layout="aligned")


@pytest.mark.parametrize("device,dtype", _fast_devices())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_skips_out_of_range_ids(device, dtype, layout):
    """Unchecked bad ids (CUDA without PYKERNELS_CHECK_VALUES): memory-safe, the route contributes nothing."""
    from pykernels.triton.grouped_gemm import moe_ffn_triton

    x, w13, w2, tw, ids = _case_inputs((7, 4, 32, 16, 2, "random"), dtype, device)
    ids[0, 1] = 4
    ids[3, 0] = -5
    y = moe_ffn_triton(x, w13, w2, tw, ids, layout=layout)
    assert _rel(y, moe_ffn_reference(x.float(), w13.float(), w2.float(), tw, ids)) <= TOL[dtype]
    wide = ids.long()
    wide[5, 1] = (1 << 32) + 1  # int64 id whose low 32 bits are a valid expert: still skipped
    y = moe_ffn_triton(x, w13, w2, tw, wide, layout=layout)
    assert _rel(y, moe_ffn_reference(x.float(), w13.float(), w2.float(), tw, wide)) <= TOL[dtype]


@pytest.mark.parametrize("device,dtype", _fast_devices())
@pytest.mark.parametrize("variant", ["pointers", "tma", "single dot"])
def test_triton_direct_split_units(device, dtype, variant, monkeypatch):
    """The direct layout runs the units past the last full round over the SMs in pieces, on "SMs" programs
    (the interpreter's programs, or a GPU's SM count, monkeypatched): 3 tokens x
    top-2 x 2 I tiles = 12 units on 4 (none split); 7 x top-3 x 2 = 42 on 4, the last 2 in 2 pieces of 32
    columns; 3 x top-3 x 2 = 18 on 8 (2 left: 4 pieces of 16) and on 16 (8 pieces of 8). I = 100: pieces
    partly and wholly past I; I = 96: the pieces end at I. The last route's id is bad (a split unit's);
    several H steps of w2 (pieces: one step of more rows than H); against the reference."""
    from pykernels.triton import grouped_gemm, moe_direct

    cfg_gu = moe_configs.GemmConfig(16, 64, 32, 1, 4, 2, variant == "tma", variant == "single dot")
    cfg_dn = moe_configs.GemmConfig(16, 32, 32, 1, 4, 2, variant == "tma")
    for sms, T, I, k, split in ((4, 3, 128, 2, 1), (4, 7, 100, 3, 2), (8, 3, 100, 3, 4), (16, 3, 100, 3, 8),
                                (16, 3, 96, 3, 8)):
        monkeypatch.setattr(moe_direct, "INTERPRETER_PROGRAMS", sms)
        monkeypatch.setattr(moe_direct, "_sm_count", lambda _, sms=sms: sms)
        units = T * k * 2
        assert moe_direct.direct_split(units, sms, 64) == (units - (units % sms if split > 1 else 0), split)
        x, w13, w2, tw, ids = _case_inputs((T, 5, 72, I, k, "random"), dtype, device)
        ids[T - 1, k - 1] = 9
        y = grouped_gemm.moe_ffn_triton(x, w13, w2, tw, ids, gate_up_config=cfg_gu, down_config=cfg_dn,
                                        layout="direct")
        assert _rel(y, moe_ffn_reference(x.float(), w13.float(), w2.float(), tw, ids)) <= TOL[dtype], (sms, T, I)


def test_direct_split_plans():
    """Whole rounds over the SMs, the rest in as many pieces (a power of two, >= 8 columns) as fit one round."""
    from pykernels.triton.moe_direct import direct_split

    assert direct_split(132, 132, 64) == (132, 1)  # Lite, T = 1: one round
    assert direct_split(144, 132, 64) == (132, 8)  # 236B, T = 1: 12 left, 96 pieces of 8 columns
    assert direct_split(72, 132, 64) == (72, 1)  # fewer units than SMs
    assert direct_split(264 + 70, 132, 64) == (334, 1)  # 70 left: no room for 2 pieces each, run whole
    assert direct_split(140, 132, 16) == (132, 2)  # 16-column units: pieces of 8
    assert direct_split(140, 132, 64) == (132, 8)  # 8 left: 16 each would fit, pieces stop at 8 columns


def test_direct_counters_left_zero(monkeypatch):
    """The direct kernel's counters (no memset per launch) are zero after each launch, whatever the launch size;
    a bigger T grows the buffer."""
    from pykernels.triton import grouped_gemm, moe_direct

    x, w13, w2, tw, ids = _case_inputs((5, 6, 40, 48, 2, "random"), torch.float16, "cpu")
    for programs in (1, 3, 16):
        monkeypatch.setattr(moe_direct, "INTERPRETER_PROGRAMS", programs)
        for n in (2, 5):
            y = grouped_gemm.moe_ffn_triton(x[:n], w13, w2, tw[:n], ids[:n], layout="direct")
            assert _rel(y, moe_ffn_reference(x[:n].float(), w13.float(), w2.float(), tw[:n], ids[:n])) <= 1e-2
            assert not moe_direct._sync_buffer(x.device, n + 2).any()


@pytest.mark.parametrize("device,dtype", _fast_devices())
@pytest.mark.parametrize("variant", ["pointers", "tma", "single dot"])
def test_triton_tiles_and_rows_past_the_end(device, dtype, variant):
    """Several M tiles per expert (forced 16-row tiles, 40 rows on one expert) in each layout; a down tile of 32
    rows over gate_up tiles of 16 (padded to 32); rows past offsets[E-1] give 0; K not a multiple of BLOCK_K."""
    from pykernels.triton.grouped_gemm import grouped_ffn_triton, moe_ffn_triton

    cfg = moe_configs.GemmConfig(16, 16, 16, 2, 4, 2, variant == "tma", variant == "single dot")
    x, w13, w2, tw, ids = _case_inputs((40, 6, 32, 24, 2, "random"), dtype, device)
    ids[:, 0] = 3
    ref = moe_ffn_reference(x.float(), w13.float(), w2.float(), tw, ids)
    for layout in ("sorted", "padded"):
        y = moe_ffn_triton(x, w13, w2, tw, ids, gate_up_config=cfg, down_config=cfg, layout=layout)
        assert _rel(y, ref) <= TOL[dtype], layout
    y = moe_ffn_triton(x[:3], w13, w2, tw[:3], ids[:3], gate_up_config=cfg, down_config=cfg, layout="direct")
    assert _rel(y, ref[:3]) <= TOL[dtype]  # (the direct layout has no M tiles; its weight-load variants)
    y = moe_ffn_triton(x, w13, w2, tw, ids, gate_up_config=cfg, down_config=cfg._replace(block_m=32, block_k=32),
                       layout="padded")
    assert _rel(y, ref) <= TOL[dtype]
    xs, offsets = _sorted_rows(x, ids, 6)
    short = offsets.clone()
    short[-2:] -= 5  # the last 5 rows belong to no expert
    y = grouped_ffn_triton(xs, w13, w2, short, gate_up_config=cfg, down_config=cfg)
    assert torch.equal(y[-5:].cpu(), torch.zeros_like(y[-5:]).cpu())
    assert _rel(y, grouped_ffn_reference(xs.float(), w13.float(), w2.float(), short)) <= TOL[dtype]


def _routes_with_counts(counts, hidden, dtype, device, seed):
    """One route per token, ``counts[e]`` tokens on expert e in shuffled order: (ids [T, 1] int32, x [T, H],
    routing weights [T, 1] in [0.1, 1.1))."""
    ids = torch.cat([torch.full((n,), e, dtype=torch.int32) for e, n in enumerate(counts)])
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))].view(-1, 1).to(device)
    num_tokens = ids.shape[0]
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(seed + 4)).to(dtype).to(device)
    tw = (torch.rand(num_tokens, 1, generator=torch.Generator().manual_seed(seed + 2)) + 0.1).to(device)
    return ids, x, tw


@pytest.mark.parametrize("device,dtype", _fast_devices())
@pytest.mark.parametrize("variant", ["pointers", "tma", "single dot"])
def test_triton_split_tail(device, dtype, variant):
    """split_tail: an expert's last tile of <= BLOCK_M / 2 rows runs half-height. 32-row tiles over experts of
    0 rows, 16 (all half), 36 (32 + a half tail of 4), 17 and 47 (tails just past half: full height), 61;
    H and I not multiples of BLOCK_K; moe_ffn's sorted layout and grouped_ffn, bit-identical when repeated;
    every route on one expert (several full tiles and a half tail)."""
    from pykernels.triton.grouped_gemm import grouped_ffn_triton, moe_ffn_triton

    E, H, I = 6, 40, 24
    counts = [16, 36, 0, 17, 47, 61]
    ids, x, tw = _routes_with_counts(counts, H, dtype, device, seed=3)
    w13, w2 = _weights(E, H, I, dtype, device)
    cfg = moe_configs.GemmConfig(32, 16, 16, 2, 4, 2, variant == "tma", variant == "single dot", True)
    ref = moe_ffn_reference(x.float(), w13.float(), w2.float(), tw, ids)
    y = moe_ffn_triton(x, w13, w2, tw, ids, gate_up_config=cfg, down_config=cfg, layout="sorted")
    assert _rel(y, ref) <= TOL[dtype]
    assert torch.equal(y, moe_ffn_triton(x, w13, w2, tw, ids, gate_up_config=cfg, down_config=cfg, layout="sorted"))
    y = moe_ffn_triton(x, w13, w2, tw, ids, gate_up_config=cfg, down_config=cfg, layout="padded")  # full tiles
    assert _rel(y, ref) <= TOL[dtype]
    xs, offsets = _sorted_rows(x, ids, E)
    y = grouped_ffn_triton(xs, w13, w2, offsets, gate_up_config=cfg, down_config=cfg)
    assert _rel(y, grouped_ffn_reference(xs.float(), w13.float(), w2.float(), offsets)) <= TOL[dtype]
    one = torch.full_like(ids, 4)[:80]  # 80 rows on expert 4: tiles of 32, 32, 16 (half)
    y = moe_ffn_triton(x[:80], w13, w2, tw[:80], one, gate_up_config=cfg, down_config=cfg, layout="sorted")
    assert _rel(y, moe_ffn_reference(x[:80].float(), w13.float(), w2.float(), tw[:80], one)) <= TOL[dtype]



@pytest.mark.parametrize("device,dtype", _fast_devices())
def test_triton_strided_rows_int64_ids_half_weights(device, dtype):
    """x with a row stride > H, int64 topk_ids, routing weights in x's dtype."""
    x, w13, w2, tw, ids = _case_inputs((9, 5, 40, 24, 2, "random"), dtype, device)
    wide = torch.randn(9, 56, dtype=dtype, device=device)
    wide[:, :40] = x
    y = pk.moe_ffn(wide[:, :40], w13, w2, tw.to(dtype), ids.long(), backend="triton")
    assert y.is_contiguous()
    assert _rel(y, moe_ffn_reference(x.float(), w13.float(), w2.float(), tw.to(dtype), ids)) <= TOL[dtype]
    xs, offsets = _sorted_rows(x, ids, 5)
    wide = torch.randn(xs.shape[0], 48, dtype=dtype, device=device)
    wide[:, :40] = xs
    y = pk.grouped_ffn(wide[:, :40], w13, w2, offsets, backend="triton")
    assert _rel(y, grouped_ffn_reference(xs.float(), w13.float(), w2.float(), offsets)) <= TOL[dtype]


def test_no_tokens():
    x = torch.randn(0, 16)
    w13, w2 = _weights(4, 16, 8, torch.float32, "cpu")
    y = pk.moe_ffn(x, w13, w2, torch.ones(0, 2), torch.zeros(0, 2, dtype=torch.int32))
    assert y.shape == (0, 16)
    y = pk.grouped_ffn(x, w13, w2, torch.zeros(4, dtype=torch.int32))
    assert y.shape == (0, 16)


def _bad_moe(**change):
    x = torch.randn(4, 16)
    w13, w2 = _weights(4, 16, 8, torch.float32, "cpu")
    args = dict(x=x, w13=w13, w2=w2, topk_weights=torch.rand(4, 2), topk_ids=torch.randint(0, 4, (4, 2), dtype=torch.int32))
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change,error,words",
    [
        (dict(x=torch.randn(4, 16).long()), TypeError, "x"),
        (dict(x=torch.randn(4, 15)), ValueError, "w13"),
        (dict(w13=torch.randn(4, 17, 16)), ValueError, "w13"),
        (dict(w13=torch.randn(4, 16, 16).half()), TypeError, "w13"),
        (dict(w2=torch.randn(4, 16, 9)), ValueError, "w2"),
        (dict(w2=torch.randn(3, 16, 8)), ValueError, "w2"),
        (dict(w2=torch.randn(4, 8, 16).transpose(1, 2)), ValueError, "w2"),
        (dict(topk_ids=torch.zeros(4, 2)), TypeError, "topk_ids"),
        (dict(topk_ids=torch.zeros(5, 2, dtype=torch.int32)), ValueError, "topk_ids"),
        (dict(topk_weights=torch.rand(4, 3)), ValueError, "topk_weights"),
        (dict(topk_weights=torch.ones(4, 2, dtype=torch.int32)), TypeError, "topk_weights"),
        (dict(topk_ids=torch.tensor([[0, 1], [2, 4], [0, 0], [1, 1]], dtype=torch.int32)), ValueError, r"topk_ids.*\[1, 1\]"),
        (dict(topk_ids=torch.tensor([[0, 1], [2, 3], [-1, 0], [1, 1]], dtype=torch.int32)), ValueError, "topk_ids"),
    ],
)
def test_moe_ffn_bad_input(change, error, words):
    args = _bad_moe(**change)
    with pytest.raises(error, match=words):
        pk.moe_ffn(args["x"], args["w13"], args["w2"], args["topk_weights"], args["topk_ids"])


@pytest.mark.parametrize(
    "offsets,error,words",
    [
        (torch.tensor([2, 1, 6, 6], dtype=torch.int32), ValueError, "offsets.*non-decreasing"),
        (torch.tensor([1, 2, 3, 5], dtype=torch.int32), ValueError, "offsets.*= R = 6"),
        (torch.tensor([-1, 2, 3, 6], dtype=torch.int32), ValueError, "offsets"),
        (torch.tensor([1, 2, 3, 6], dtype=torch.int64), TypeError, "offsets"),
        (torch.tensor([1, 2, 6], dtype=torch.int32), ValueError, "offsets"),
    ],
)
def test_grouped_ffn_bad_offsets(offsets, error, words):
    w13, w2 = _weights(4, 16, 8, torch.float32, "cpu")
    with pytest.raises(error, match=words):
        pk.grouped_ffn(torch.randn(6, 16), w13, w2, offsets)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="needs TRITON_INTERPRET=1 on the CPU")
def test_triton_direct_call_and_op_agree():
    """Eager calls launch the Triton pipeline directly; through the torch.library op it gives the same bits."""
    x, w13, w2, tw, ids = _case_inputs((5, 6, 32, 16, 2, "random"), torch.float16, "cpu")
    direct = pk.moe_ffn(x, w13, w2, tw, ids, backend="triton")
    assert torch.equal(direct, torch.ops.pykernels.moe_ffn(x, w13, w2, tw, ids, "triton"))
    xs, offsets = _sorted_rows(x, ids, 6)
    direct = pk.grouped_ffn(xs, w13, w2, offsets, backend="triton")
    assert torch.equal(direct, torch.ops.pykernels.grouped_ffn(xs, w13, w2, offsets, "triton"))


def test_custom_ops_fake_and_compile():
    args = _bad_moe()
    torch.library.opcheck(torch.ops.pykernels.moe_ffn.default,
                          (args["x"], args["w13"], args["w2"], args["topk_weights"], args["topk_ids"], "torch"))
    offsets = torch.tensor([1, 3, 3, 4], dtype=torch.int32)
    torch.library.opcheck(torch.ops.pykernels.grouped_ffn.default, (args["x"], args["w13"], args["w2"], offsets, "torch"))
    compiled = torch.compile(lambda *a: pk.moe_ffn(*a), fullgraph=True, backend="eager")
    y = compiled(args["x"], args["w13"], args["w2"], args["topk_weights"], args["topk_ids"])
    assert _rel(y, moe_ffn_reference(args["x"], args["w13"], args["w2"], args["topk_weights"], args["topk_ids"])) < 1e-6


# ----------------------------------------------------------------------------------------------- GPU


def _poison_allocator():
    """Fill the CUDA caching allocator's free memory with 0xFF bytes (NaN in bf16/fp16/fp32) before a run."""
    blob = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    blob.fill_(0xFF)
    del blob


def _gpu_inputs(T, E, H, I, k, method="greedy", n_group=1, topk_group=1, seed=0, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    x = torch.randn(T, H, device="cuda").to(dtype)
    w13 = (torch.randn(E, 2 * I, H, device="cuda") / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device="cuda") / I**0.5).to(dtype)
    tw, ids = pk.moe_route(torch.randn(T, E, device="cuda"), k, method=method, n_group=n_group, topk_group=topk_group)
    return x, w13, w2, tw, ids


GPU_SHAPES = [  # (T, E, H, I, top_k, method, n_group, topk_group)
    (1, 64, 2048, 1408, 6, "greedy", 1, 1),
    (1, 160, 5120, 1536, 6, "group_limited_greedy", 8, 3),
    (8, 64, 2048, 1408, 6, "greedy", 1, 1),
    (128, 64, 2048, 1408, 6, "greedy", 1, 1),
    (700, 64, 2048, 1408, 6, "greedy", 1, 1),
    (64, 160, 5120, 1536, 6, "group_limited_greedy", 8, 3),
    (96, 160, 5120, 192, 6, "group_limited_greedy", 8, 3),
    (33, 16, 1000, 333, 4, "greedy", 1, 1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[f"T{s[0]}-E{s[1]}-H{s[2]}-I{s[3]}" for s in GPU_SHAPES])
def test_gpu_model_shapes(shape):
    from pykernels.triton.grouped_gemm import moe_ffn_triton

    x, w13, w2, tw, ids = _gpu_inputs(*shape)
    _poison_allocator()
    y = pk.moe_ffn(x, w13, w2, tw, ids)  # backend=None: Triton
    ref = moe_ffn_reference(x, w13, w2, tw, ids)
    assert _rel(y, ref) <= TOL[torch.bfloat16]
    for layout in ("direct", "padded") if shape[0] <= 128 else ("padded",):
        _poison_allocator()
        assert _rel(moe_ffn_triton(x, w13, w2, tw, ids, layout=layout), ref) <= TOL[torch.bfloat16], layout
    xs, offsets = _sorted_rows(x, ids, shape[1])
    _poison_allocator()
    ys = pk.grouped_ffn(xs, w13, w2, offsets)
    assert _rel(ys, grouped_ffn_reference(xs, w13, w2, offsets)) <= TOL[torch.bfloat16]


def _all_configs():
    """(gemm, config): the table's configs in the GEMM they are listed for, and each again with the other
    weight-load variants (what the sweep may pick). A down config is never a gate_up one (gate_up holds two
    BLOCK_N-wide weight tiles per stage: a down tile's shared memory, doubled, need not fit)."""
    listed = {(key[0], cfg) for table in (moe_configs.DEFAULTS, moe_configs.TABLE) for key, cfg in table.items()}
    variants = {(g, c._replace(tma=not c.tma, single_dot=False)) for g, c in listed}
    variants |= {(g, c._replace(tma=False, single_dot=not c.single_dot)) for g, c in listed}
    variants |= {(g, c._replace(split_tail=not c.split_tail)) for g, c in listed if c.block_m >= 64}
    return sorted(listed | variants)


@pytest.mark.gpu
@pytest.mark.parametrize("gemm, cfg", _all_configs(), ids=lambda v: str(v))
def test_gpu_every_table_config(gemm, cfg):
    """Every configuration the table can pick, and its weight-load variants, compiles and is right in every
    row layout (H and I not multiples of the tiles, several tiles per expert) as the GEMM it is listed for;
    grouped_ffn's kernels for the table's own configs."""
    from pykernels.triton.grouped_gemm import grouped_ffn_triton, moe_ffn_triton

    configs = {"gate_up_config": cfg} if gemm == "gate_up" else {"down_config": cfg}
    x, w13, w2, tw, ids = _gpu_inputs(300, 8, 1000, 360, 4)  # 16-byte rows: TMA applies
    for layout in ("sorted", "padded", "direct"):
        _poison_allocator()
        y = moe_ffn_triton(x, w13, w2, tw, ids, layout=layout, **configs)
        assert _rel(y, moe_ffn_reference(x, w13, w2, tw, ids)) <= TOL[torch.bfloat16], layout
    if cfg in moe_configs.TABLE.values() or cfg in moe_configs.DEFAULTS.values():
        xs, offsets = _sorted_rows(x, ids, 8)
        y = grouped_ffn_triton(xs, w13, w2, offsets, **configs)
        assert _rel(y, grouped_ffn_reference(xs, w13, w2, offsets)) <= TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8, 2048])
def test_gpu_deterministic(T):
    from pykernels.triton.grouped_gemm import moe_ffn_triton

    x, w13, w2, tw, ids = _gpu_inputs(T, 64, 2048, 1408, 6)
    y1 = pk.moe_ffn(x, w13, w2, tw, ids)
    _poison_allocator()
    y2 = pk.moe_ffn(x, w13, w2, tw, ids)
    assert torch.equal(y1, y2)
    for layout in ("direct", "padded"):
        assert torch.equal(moe_ffn_triton(x, w13, w2, tw, ids, layout=layout),
                           moe_ffn_triton(x, w13, w2, tw, ids, layout=layout))
    xs, offsets = _sorted_rows(x, ids, 64)
    assert torch.equal(pk.grouped_ffn(xs, w13, w2, offsets), pk.grouped_ffn(xs, w13, w2, offsets))


@pytest.mark.gpu
def test_gpu_direct_any_launch_size(monkeypatch):
    """The direct kernel's programs take work items from a counter: 1, 2 or 7 programs per SM (more than fit
    at once) finish, with the same bits (each item computes the same way whichever program takes it)."""
    from pykernels.triton import grouped_gemm, moe_direct

    for T, E, H, I in ((1, 64, 2048, 1408), (3, 160, 5120, 1536)):
        x, w13, w2, tw, ids = _gpu_inputs(T, E, H, I, 6)
        outs = []
        for per_sm in (1, 2, 7):
            monkeypatch.setattr(moe_direct, "DIRECT_PROGRAMS_PER_SM", per_sm)
            _poison_allocator()
            outs.append(grouped_gemm.moe_ffn_triton(x, w13, w2, tw, ids, layout="direct"))
        assert all(torch.equal(o, outs[0]) for o in outs[1:])
        assert _rel(outs[0], moe_ffn_reference(x, w13, w2, tw, ids)) <= TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
def test_gpu_direct_in_cuda_graph(monkeypatch, pdl):
    """The direct layout at T = 1 (Lite; 236B, with split units) captured three times over in one CUDA graph,
    between eager calls on the same stream: the counters each launch clears need no memset. Replays on new
    inputs match the reference, and an eager call after them gives the same bits; with the programmatic
    dependent launch (DIRECT_PDL) on and off."""
    from pykernels.triton import grouped_gemm, moe_direct

    monkeypatch.setattr(moe_direct, "DIRECT_PDL", pdl)
    for E, H, I in ((64, 2048, 1408), (160, 5120, 1536)):
        x, w13, w2, tw, ids = _gpu_inputs(1, E, H, I, 6)

        def step():
            return grouped_gemm.moe_ffn_triton(x, w13, w2, tw, ids, layout="direct")

        step()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ys = [step() for _ in range(3)]
        for _ in range(2):
            new_tw, new_ids = pk.moe_route(torch.randn(1, E, device="cuda"), 6)
            x.copy_(torch.randn_like(x))
            tw.copy_(new_tw)
            ids.copy_(new_ids)
            graph.replay()
            ref = moe_ffn_reference(x, w13, w2, tw, ids)
            assert all(_rel(y, ref) <= TOL[torch.bfloat16] for y in ys)
            assert all(torch.equal(y, ys[0]) for y in ys[1:])
            assert torch.equal(step(), ys[0])


@pytest.mark.gpu
def test_gpu_direct_timeline():
    """The direct kernel's diagnosis timeline (bench/tune_moe.py --timeline) stamps every item in order
    (start <= first phase <= end) and leaves the output's bits unchanged."""
    from pykernels.triton import grouped_gemm, moe_direct

    T, E, H, I = 2, 64, 2048, 1408
    x, w13, w2, tw, ids = _gpu_inputs(T, E, H, I, 6)
    cfg_gu, cfg_dn = (moe_configs.pick(g, H, I, T * 6, E, 2, direct=True) for g in ("gate_up", "down"))
    plain = grouped_gemm.moe_ffn_triton(x, w13, w2, tw, ids, layout="direct")
    y = torch.empty_like(plain)
    timeline = torch.zeros(4096, 4, dtype=torch.int64, device="cuda")
    moe_direct.moe_ffn_direct(x, w13, w2, tw.reshape(-1), ids.reshape(-1), y, 6, cfg_gu, cfg_dn, timeline)
    assert torch.equal(y, plain)
    rows = timeline[timeline[:, 0] > 0]
    items = T * 6 * -(-I // cfg_gu.block_n)  # the slice items; the sum items follow
    assert rows.shape[0] > items
    assert bool((rows[:, 0] <= rows[:, 1]).all()) and bool((rows[:, 1] <= rows[:, 2]).all())


@pytest.mark.gpu
def test_gpu_cuda_graph_decode_step():
    """Route + FFN captured in one CUDA graph (no host synchronisation inside), replayed on new inputs."""
    x, w13, w2, _, _ = _gpu_inputs(8, 64, 2048, 1408, 6)
    logits = torch.randn(8, 64, device="cuda")

    def step():
        tw, ids = pk.moe_route(logits, 6)
        return pk.moe_ffn(x, w13, w2, tw, ids)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    x.copy_(torch.randn_like(x))
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    tw, ids = pk.moe_route(logits, 6, backend="torch")
    assert _rel(y, moe_ffn_reference(x, w13, w2, tw, ids)) <= TOL[torch.bfloat16]
