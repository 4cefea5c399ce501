"""pk.moe_route: the reference against DeepSeek's gate, every backend against the reference, ties, errors."""
import pytest
import torch

import pykernels as pk
from pykernels import _backend
from pykernels.moe_route import moe_route_reference

TRITON_ON_CPU = _backend.triton_usable(torch.device("cpu"))

# (T, E, top_k, method, n_group, topk_group, routed_scaling_factor, norm_topk_prob)
CASES = [
    (37, 64, 6, "greedy", 1, 1, 1.0, False),  # Lite
    (29, 160, 6, "group_limited_greedy", 8, 3, 16.0, False),  # 236B
    (1, 64, 6, "greedy", 1, 1, 1.0, False),  # one token
    (5, 16, 16, "greedy", 1, 1, 1.0, True),  # k = E, normalised
    (11, 20, 4, "group_limited_greedy", 4, 2, 2.5, True),  # odd group size
    (9, 24, 1, "greedy", 1, 1, 3.0, True),  # k = 1: normalisation does not apply
    (13, 12, 6, "group_limited_greedy", 3, 2, 1.0, False),  # groups of 4: 8 kept experts for 6 picks
]


def _gate_deepseek(logits, top_k, method, n_group, topk_group, scale, norm):
    """DeepSeek-V2's MoEGate.forward as written in modeling_deepseek.py (torch.topk, arbitrary order)."""
    scores = logits.float().softmax(dim=-1)
    n, e = scores.shape
    if method == "group_limited_greedy":
        group_scores = scores.view(n, n_group, -1).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(n, n_group, e // n_group).reshape(n, -1)
        scores = scores.masked_fill(~score_mask.bool(), 0.0)
    weight, idx = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    if top_k > 1 and norm:
        weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        weight = weight * scale
    return weight, idx


def _route(logits, case, backend):
    _, _, k, method, g, tg, scale, norm = case
    return pk.moe_route(logits, k, method=method, n_group=g, topk_group=tg, routed_scaling_factor=scale,
                        norm_topk_prob=norm, backend=backend)


def _assert_matches_reference(logits, case, weights, ids):
    _, _, k, method, g, tg, scale, norm = case
    if method == "greedy":
        g, tg = 1, 1
    ref_w, ref_ids = moe_route_reference(logits, k, g, tg, scale, norm)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.shape == weights.shape == ref_ids.shape
    assert torch.equal(ids.cpu(), ref_ids.cpu())
    torch.testing.assert_close(weights.cpu(), ref_w.cpu(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", CASES)
def test_reference_is_deepseeks_gate(case):
    torch.manual_seed(0)
    logits = torch.randn(case[0], case[1]) * 2  # distinct values: no ties
    w, ids = _route(logits, case, "torch")
    ds_w, ds_ids = _gate_deepseek(logits, *case[2:])
    order = ds_w.argsort(dim=-1, descending=True, stable=True)
    assert torch.equal(ids.long(), ds_ids.gather(1, order))
    torch.testing.assert_close(w, ds_w.gather(1, order), rtol=1e-6, atol=0)
    assert bool((w[:, :-1] >= w[:, 1:]).all())


def test_reference_ties_and_signed_zero():
    logits = torch.zeros(3, 8)
    logits[0, 5] = -0.0
    logits[1] = torch.tensor([1.0, 3.0, 3.0, 1.0, 3.0, 0.0, 3.0, 0.0])
    logits[2] = torch.tensor([2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0])  # groups of 2: 0 and 3 tie, 1 and 2 tie
    w, ids = moe_route_reference(logits, 3, 1, 1, 1.0, False)
    assert ids[0].tolist() == [0, 1, 2]
    assert ids[1].tolist() == [1, 2, 4]
    w, ids = moe_route_reference(logits[2:], 2, 4, 1, 1.0, False)
    assert ids[0].tolist() == [0, 1]  # group 0 beats group 3 on the tie
    w, ids = moe_route_reference(logits[2:], 3, 4, 2, 1.0, False)
    assert ids[0].tolist() == [0, 1, 6]


def _backends():
    out = [pytest.param("cpu", torch.float32, "torch", id="cpu-torch-fp32")]
    if TRITON_ON_CPU:
        out += [pytest.param("cpu", torch.float16, "triton", id="cpu-triton-fp16"),
                pytest.param("cpu", torch.float32, "triton", id="cpu-triton-fp32")]
    out += [pytest.param("cuda", dt, b, id=f"cuda-{b}-{str(dt)[6:]}", marks=pytest.mark.gpu)
            for b in ("triton", "torch") for dt in (torch.bfloat16, torch.float32)]
    return out


@pytest.mark.parametrize("device,dtype,backend", _backends())
@pytest.mark.parametrize("case", CASES)
def test_backend_matches_reference(device, dtype, backend, case):
    torch.manual_seed(1)
    logits = (torch.randn(case[0], case[1]) * 3).to(dtype).to(device)
    w, ids = _route(logits, case, backend)
    _assert_matches_reference(logits, case, w, ids)


@pytest.mark.parametrize("device,dtype,backend", _backends())
def test_backend_ties(device, dtype, backend, T=12):
    """Whole rows of equal logits, equal groups, -0.0 against +0.0, -inf: ids follow the lower-id rule."""
    torch.manual_seed(2)
    E = 16
    logits = torch.randint(-2, 3, (T, E)).float()  # many exact ties
    logits[0] = 0.0
    logits[1, ::3] = -0.0
    logits[2] = float("-inf")
    logits[2, 7] = 1.0
    logits[3, :4] = logits[3, 12:]  # group 0 and group 3 equal
    logits = logits.to(dtype).to(device)
    for case in [(T, E, 5, "greedy", 1, 1, 1.0, False), (T, E, 5, "group_limited_greedy", 4, 2, 16.0, False),
                 (T, E, 8, "group_limited_greedy", 4, 2, 1.0, True), (T, E, 2, "group_limited_greedy", 8, 1, 1.0, False)]:
        w, ids = _route(logits, case, backend)
        _assert_matches_reference(logits, case, w, ids)
    w, ids = _route(logits, (T, E, 4, "greedy", 1, 1, 1.0, False), backend)
    assert ids[0].tolist() == [0, 1, 2, 3]


def _nan_logits():
    """[5, 16]: a finite row, one NaN, all NaN, the NaN 0xffffffff (whose order bits equal the kernel's
    dead-lane value) among finite logits, and -inf everywhere but one expert."""
    logits = torch.randn(5, 16)
    logits[1, 3] = float("nan")
    logits[2] = float("nan")
    logits[3, 9] = torch.tensor(-1, dtype=torch.int32).view(torch.float32)
    logits[4] = float("-inf")
    logits[4, 11] = 2.0
    return logits


def _assert_nan_contract(logits, w, ids, E=16):
    """NaN rows: NaN weights, ids in range and distinct (every column written); other rows: the reference."""
    assert bool(((ids >= 0) & (ids < E)).all())
    assert all(len(set(row.tolist())) == ids.shape[1] for row in ids.cpu())
    assert bool(w[1:4].isnan().all())
    assert ids[4, 0].item() == 11


@pytest.mark.parametrize("device,dtype,backend", _backends())
def test_nan_logits_keep_ids_in_range(device, dtype, backend):
    logits = _nan_logits()
    for case in [(5, 16, 5, "greedy", 1, 1, 1.0, False), (5, 16, 5, "group_limited_greedy", 4, 2, 1.0, False)]:
        w, ids = _route(logits.to(dtype).to(device), case, backend)
        _assert_nan_contract(logits, w, ids)


@pytest.mark.parametrize("device,dtype,backend", _backends())
def test_no_tokens(device, dtype, backend):
    w, ids = pk.moe_route(torch.randn(0, 8, dtype=dtype, device=device), 2, backend=backend)
    assert w.shape == ids.shape == (0, 2)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="needs TRITON_INTERPRET=1 on the CPU")
def test_triton_several_rows_per_program(monkeypatch):
    """Prefill sizing (several rows a program, a partial last program) at interpreter-friendly sizes: fewer
    target programs make the kernel pack 4 to 8 rows a program; model shapes, then the ties test."""
    from pykernels.triton import moe_route as triton_route

    monkeypatch.setattr(triton_route, "TARGET_PROGRAMS", 8)
    for case in [(45, 64, 6, "greedy", 1, 1, 1.0, False), (27, 160, 6, "group_limited_greedy", 8, 3, 16.0, False)]:
        block_t = triton_route.launch_shape(case[0], case[1], case[4])[0]
        assert block_t > 1 and case[0] % block_t != 0
        torch.manual_seed(6)
        logits = torch.randn(case[0], case[1]) * 3
        w, ids = _route(logits, case, "triton")
        _assert_matches_reference(logits, case, w, ids)
    test_backend_ties("cpu", torch.float32, "triton", T=30)


def _check_rows_per_program(device, dtype, block_t):
    """The kernel at ``block_t`` rows a program (full and partial programs) on model shapes, ties, k = E, odd
    groups and NaN rows."""
    from pykernels.triton.moe_route import moe_route_triton

    torch.manual_seed(7)
    ties = torch.randint(-2, 3, (9, 16)).float()
    ties[0] = 0.0
    ties[1, ::3] = -0.0
    ties[2, :4] = ties[2, 12:]  # group 0 and group 3 equal
    inputs = [(torch.randn(5, 64) * 3, (5, 64, 6, "greedy", 1, 1, 1.0, False)),
              (torch.randn(5, 160) * 3, (5, 160, 6, "group_limited_greedy", 8, 3, 16.0, False)),
              (torch.randn(5, 20), (5, 20, 4, "group_limited_greedy", 4, 2, 2.5, True)),
              (ties, (9, 16, 5, "greedy", 1, 1, 1.0, False)),
              (ties, (9, 16, 5, "group_limited_greedy", 4, 2, 16.0, False)),
              (ties, (9, 16, 16, "greedy", 1, 1, 1.0, True))]  # k = E: every lane ranked
    for logits, case in inputs:
        logits = logits.to(dtype).to(device)
        _, _, k, method, g, tg, scale, norm = case
        if method == "greedy":
            g, tg = 1, 1
        w, ids = moe_route_triton(logits, k, g, tg, scale, norm, block_t=block_t)
        _assert_matches_reference(logits, case, w, ids)
    nan = _nan_logits().to(dtype).to(device)
    for g, tg in ((1, 1), (4, 2)):
        _assert_nan_contract(nan, *moe_route_triton(nan, 5, g, tg, 1.0, False, block_t=block_t))


@pytest.mark.skipif(not TRITON_ON_CPU, reason="needs TRITON_INTERPRET=1 on the CPU")
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's float max of a NaN row
def test_triton_rows_per_program_match_reference():
    """4 rows a program (full and partial programs) give the reference's ids bit for bit (the interpreter has
    no layouts, so other row counts add nothing here but time)."""
    _check_rows_per_program("cpu", torch.float32, 4)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="needs TRITON_INTERPRET=1 on the CPU")
def test_triton_direct_call_and_op_agree():
    """Eager calls launch the kernel directly; the torch.library op (taken under modes, tracing, grad) gives the same."""
    from pykernels._backend import direct_call_ok
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(5)
    logits = torch.randn(19, 32, dtype=torch.float16)
    assert direct_call_ok(logits)
    direct = pk.moe_route(logits, 4, method="group_limited_greedy", n_group=4, topk_group=2, backend="triton")
    via_op = torch.ops.pykernels.moe_route(logits, 4, 4, 2, 1.0, False, "triton")
    assert torch.equal(direct[0], via_op[0]) and torch.equal(direct[1], via_op[1])
    grad_logits = logits.float().requires_grad_()
    assert not direct_call_ok(grad_logits)
    w, ids = pk.moe_route(grad_logits, 4, method="group_limited_greedy", n_group=4, topk_group=2, backend="triton")
    assert torch.equal(ids, direct[1])
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(logits)
        assert not direct_call_ok(fake)
        w, ids = pk.moe_route(fake, 4, backend="triton")
        assert w.shape == ids.shape == (19, 4) and ids.dtype == torch.int32


def test_strided_rows():
    torch.manual_seed(3)
    logits = torch.randn(10, 40)[:, :32]  # row stride 40
    case = (10, 32, 4, "group_limited_greedy", 4, 2, 1.0, False)
    backends = ["torch"] + (["triton"] if TRITON_ON_CPU else [])
    for backend in backends:
        w, ids = _route(logits, case, backend)
        _assert_matches_reference(logits.contiguous(), case, w, ids)


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(router_logits=torch.randn(4, 8).long()), TypeError, "router_logits"),
        (dict(router_logits=torch.randn(4, 8, 2)), ValueError, "router_logits"),
        (dict(router_logits=torch.randn(8, 4).T), ValueError, "router_logits"),
        (dict(top_k=9), ValueError, "top_k"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(method="topk"), ValueError, "method"),
        (dict(method="group_limited_greedy", n_group=3), ValueError, "n_group"),
        (dict(method="group_limited_greedy", n_group=4, topk_group=5), ValueError, "topk_group"),
        (dict(method="group_limited_greedy", n_group=4, topk_group=1, top_k=3), ValueError, "top_k"),
        (dict(routed_scaling_factor=float("nan")), ValueError, "routed_scaling_factor"),
        (dict(norm_topk_prob="yes"), ValueError, "norm_topk_prob"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_input(kwargs, error, words):
    args = dict(router_logits=torch.randn(4, 8), top_k=2)
    args.update(kwargs)
    logits, k = args.pop("router_logits"), args.pop("top_k")
    with pytest.raises(error, match=words):
        pk.moe_route(logits, k, **args)


def test_custom_op_fake_and_compile():
    logits = torch.randn(6, 16)
    torch.library.opcheck(torch.ops.pykernels.moe_route.default, (logits, 4, 4, 2, 2.0, False, "torch"))
    compiled = torch.compile(lambda x: pk.moe_route(x, 4, method="group_limited_greedy", n_group=4, topk_group=2),
                             fullgraph=True, backend="eager")
    w, ids = compiled(logits)
    ref_w, ref_ids = moe_route_reference(logits, 4, 4, 2, 1.0, False)
    assert torch.equal(ids, ref_ids)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 8192])
@pytest.mark.parametrize("E,k,method,g,tg,scale", [(64, 6, "greedy", 1, 1, 1.0), (160, 6, "group_limited_greedy", 8, 3, 16.0)])
def test_gpu_model_shapes_deterministic(T, E, k, method, g, tg, scale):
    torch.manual_seed(4)
    logits = torch.randn(T, E, device="cuda", dtype=torch.float32)
    case = (T, E, k, method, g, tg, scale, False)
    w1, ids1 = _route(logits, case, "triton")
    w2, ids2 = _route(logits, case, "triton")
    assert torch.equal(w1, w2) and torch.equal(ids1, ids2)
    _assert_matches_reference(logits, case, w1, ids1)
    # backend=None picks Triton on CUDA
    w3, ids3 = _route(logits, case, None)
    assert torch.equal(w3, w1) and torch.equal(ids3, ids1)


@pytest.mark.gpu
def test_gpu_rows_per_program_match_reference():
    """Several rows a program, compiled (one row a program is every other GPU test's launch): bf16 (equal logits
    are common) at 4 rows, float32 at 2; 12 small kernels to compile."""
    for dtype, block_t in ((torch.bfloat16, 4), (torch.float32, 2)):
        _check_rows_per_program("cuda", dtype, block_t)


@pytest.mark.gpu
def test_gpu_cuda_graph():
    logits = torch.randn(64, 160, device="cuda")
    out = pk.moe_route(logits, 6, method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gw, gids = pk.moe_route(logits, 6, method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0)
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    ref_w, ref_ids = moe_route_reference(logits, 6, 8, 3, 16.0, False)
    assert torch.equal(gids, ref_ids)
    torch.testing.assert_close(gw, ref_w, rtol=1e-5, atol=1e-7)
    assert out[0].shape == gw.shape
