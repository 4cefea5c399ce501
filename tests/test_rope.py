"""pk.YarnRotary, pk.apply_rotary, pk.rope_and_cache: DeepSeek's formulas, every backend against a float64
oracle, the paged-cache round trip, bad input, the device error flag, custom-op and CUDA-graph behaviour.

CPU: the torch reference and the Triton kernel under TRITON_INTERPRET=1 (fp16/fp32). GPU (@pytest.mark.gpu):
torch, Triton and CUDA in bf16/fp16/fp32, CUDA-graph capture, no host sync.
"""
from __future__ import annotations

import math
import types

import pytest
import torch
from compiled_triton import run_compile_script

import pykernels as pk
from pykernels import _backend, _ext
from pykernels import rope as rope_mod

HAS_CUDA = torch.cuda.is_available()
# Triton on CPU tensors runs only interpreted (conftest sets TRITON_INTERPRET=1 on machines without a GPU).
CPU_TRITON = pytest.mark.skipif(not _backend.triton_interpreted(), reason="Triton on the CPU needs TRITON_INTERPRET=1")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# Shipped configs (FACTS.md): Lite's yarn mscale = mscale_all_dim = 0.707, Coder-V2 236B's 1.0 / 1.0.
LITE = dict(factor=40.0, original_max_position=4096, beta_fast=32.0, beta_slow=1.0, mscale=0.707,
            mscale_all_dim=0.707)
CODER = dict(LITE, mscale=1.0, mscale_all_dim=1.0)

_ROPES: dict[tuple, pk.YarnRotary] = {}


def make_rope(device="cpu", interleaved=True, rotary_dim=64, max_position=163840, **kw) -> pk.YarnRotary:
    """Cached: building the 163840-row table is not free on the CPU."""
    key = (str(device), interleaved, rotary_dim, max_position, tuple(sorted(kw.items())))
    if key not in _ROPES:
        _ROPES[key] = pk.YarnRotary(rotary_dim=rotary_dim, max_position=max_position, interleaved=interleaved,
                                    device=device, **{**CODER, **kw})
    return _ROPES[key]


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------------
# An independent transcription of DeepSeek's DeepseekV2YarnRotaryEmbedding + apply_rotary_pos_emb
# (modeling_deepseek.py), from the formulas in FACTS.md: cos/sin of [P, d] with the frequencies repeated
# over both halves, and a rotation that first de-interleaves q and k, then rotates halves.
# ---------------------------------------------------------------------------------------------------------

def deepseek_mscale(scale, mscale=1.0):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def deepseek_tables(dim, max_pos, base, factor, orig_max, beta_fast, beta_slow, mscale, mscale_all_dim):
    def corr_dim(rot):
        return (dim * math.log(orig_max / (rot * 2 * math.pi))) / (2 * math.log(base))

    lo = max(math.floor(corr_dim(beta_fast)), 0)
    hi = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    extra = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    inter = 1.0 / (factor * base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / ((hi + 0.001 if lo == hi else hi) - lo),
                       0, 1)
    mask = 1.0 - ramp
    inv = inter * (1 - mask) + extra * mask
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    m = deepseek_mscale(factor, mscale) / deepseek_mscale(factor, mscale_all_dim)
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, d]
    return (lo, hi), emb.cos() * m, emb.sin() * m


def deepseek_rotate(x, cos, sin):
    """x [..., d] interleaved pairs -> DeepSeek's output (de-interleaved order); cos/sin [..., d]."""
    d = x.shape[-1]
    x = x.reshape(*x.shape[:-1], d // 2, 2).transpose(-1, -2).reshape(x.shape)  # de-interleave
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def oracle_rotate(x, positions, rope):
    """float64 rotation of x [T, ..., d] by rope's own table (the kernels' contract)."""
    d = rope.rotary_dim
    cs = rope.cos_sin_cache.double().cpu()[positions.long().cpu()]  # [T, d]
    cos, sin = cs[:, : d // 2], cs[:, d // 2:]
    while cos.dim() < x.dim():
        cos, sin = cos[:, None], sin[:, None]
    xf = x.double().cpu()
    if rope.interleaved:
        a, b = xf[..., 0::2], xf[..., 1::2]
        return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    a, b = xf[..., : d // 2], xf[..., d // 2:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


# ---------------------------------------------------------------------------------------------------------
# The table and DeepSeek's formulas
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [LITE, CODER, dict(CODER, mscale=1.0, mscale_all_dim=0.707)],
                         ids=["lite", "coder", "mscale-ratio"])
def test_table_matches_deepseek_transcription(cfg):
    rope = make_rope(**cfg)
    (lo, hi), cos, sin = deepseek_tables(64, 163840, 10000.0, cfg["factor"], cfg["original_max_position"],
                                         cfg["beta_fast"], cfg["beta_slow"], cfg["mscale"], cfg["mscale_all_dim"])
    assert rope.correction_range == (lo, hi) == (10, 23)
    table = rope.cos_sin_cache
    assert table.dtype == torch.float32 and table.shape == (163840, 64)
    assert (table[:, :32] - cos[:, :32]).abs().max().item() <= 1e-6
    assert (table[:, 32:] - sin[:, :32]).abs().max().item() <= 1e-6
    assert torch.equal(cos[:, :32], cos[:, 32:])  # DeepSeek repeats the frequencies over both halves


@pytest.mark.gpu
def test_table_built_on_the_gpu_matches_the_cpu_one():
    gpu = make_rope(device="cuda", **LITE).cos_sin_cache
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    assert (gpu.cpu() - make_rope(**LITE).cos_sin_cache).abs().max().item() <= 1e-6


def test_mscale_ratio_scales_the_table():
    plain_ratio = make_rope(**dict(CODER, mscale=1.0, mscale_all_dim=0.707))
    expected = deepseek_mscale(40.0, 1.0) / deepseek_mscale(40.0, 0.707)
    assert plain_ratio.cos_sin_scale == pytest.approx(expected)
    assert plain_ratio.cos_sin_cache[0, :32].sub(expected).abs().max().item() < 1e-6  # cos(0) * m


@pytest.mark.parametrize("cfg,scale", [(LITE, 0.11472), (CODER, 0.13523)], ids=["lite", "coder-v2-236b"])
def test_attention_scale_factor(cfg, scale):
    rope = make_rope(**cfg)
    assert rope.attention_scale_factor == pytest.approx(deepseek_mscale(40.0, cfg["mscale_all_dim"]) ** 2)
    assert round(192 ** -0.5 * rope.attention_scale_factor, 5) == scale


def test_plain_rope_when_factor_at_most_one():
    rope = pk.YarnRotary(factor=1.0, max_position=4096)
    assert rope.attention_scale_factor == 1.0 and rope.cos_sin_scale == 1.0 and rope.correction_range is None
    inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    assert torch.equal(rope.inv_freq, inv)
    angles = torch.outer(torch.arange(4096, dtype=torch.float32), inv)
    assert torch.allclose(rope.cos_sin_cache, torch.cat((angles.cos(), angles.sin()), -1), atol=1e-6, rtol=0)


def test_from_config_fields():
    cfg = types.SimpleNamespace(qk_rope_head_dim=64, rope_theta=10000.0, max_position_embeddings=163840,
                                rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                              "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                              "mscale_all_dim": 0.707})
    rope = pk.YarnRotary.from_config(cfg)
    assert (rope.rotary_dim, rope.max_position, rope.interleaved) == (64, 163840, True)
    assert torch.equal(rope.cos_sin_cache, make_rope(**LITE).cos_sin_cache)
    assert round(192 ** -0.5 * rope.attention_scale_factor, 5) == 0.11472
    plain = pk.YarnRotary.from_config(types.SimpleNamespace(qk_rope_head_dim=32, rope_theta=500.0,
                                                            max_position_embeddings=128, rope_scaling=None))
    assert (plain.rotary_dim, plain.base, plain.max_position, plain.attention_scale_factor) == (32, 500.0, 128, 1.0)
    with pytest.raises(ValueError, match="rope_scaling"):
        pk.YarnRotary.from_config(types.SimpleNamespace(qk_rope_head_dim=64, rope_theta=1e4, max_position_embeddings=8,
                                                        rope_scaling={"type": "linear", "factor": 2.0}))


def test_from_model_presets():
    config = pytest.importorskip("model.config")
    for name, scale in (("lite", 0.11472), ("coder-v2-236b", 0.13523)):
        cfg = config.DeepseekV2Config.from_preset(name)
        rope = pk.YarnRotary.from_config(cfg)
        assert rope.correction_range == (10, 23)
        assert round(cfg.qk_head_dim ** -0.5 * rope.attention_scale_factor, 5) == scale


@pytest.mark.parametrize("kwargs,name", [
    (dict(rotary_dim=63), "rotary_dim"), (dict(rotary_dim=0), "rotary_dim"), (dict(base=-1.0), "base"),
    (dict(factor=0.0), "factor"), (dict(max_position=0), "max_position"), (dict(beta_fast=0.0), "beta_fast"),
    (dict(original_max_position=2.5), "original_max_position"), (dict(mscale=float("nan")), "mscale"),
])
def test_constructor_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        pk.YarnRotary(**{"max_position": 16, **kwargs})


# ---------------------------------------------------------------------------------------------------------
# Interleaved rotation == DeepSeek's de-interleave-then-rotate-halves, up to the column permutation
# ---------------------------------------------------------------------------------------------------------

def test_scores_match_deepseek_form():
    torch.manual_seed(0)
    rope = make_rope(**LITE)
    _, cos, sin = deepseek_tables(64, 163840, 10000.0, 40.0, 4096, 32.0, 1.0, 0.707, 0.707)
    T, H = 9, 4
    q, k = torch.randn(T, H, 64), torch.randn(T, 64)
    positions = torch.tensor([0, 1, 7, 100, 4095, 4096, 50000, 131071, 163839])
    q_rot, k_rot = pk.apply_rotary(q, k, positions, rope, backend="torch")
    q_ds = deepseek_rotate(q, cos[positions][:, None], sin[positions][:, None])
    k_ds = deepseek_rotate(k, cos[positions], sin[positions])
    scores = torch.einsum("thd,sd->hts", q_rot.double(), k_rot.double())
    scores_ds = torch.einsum("thd,sd->hts", q_ds.double(), k_ds.double())
    assert rel(scores, scores_ds) < 1e-6
    perm = torch.cat((torch.arange(0, 64, 2), torch.arange(1, 64, 2)))  # the de-interleaving permutation
    assert rel(q_rot[..., perm], q_ds) < 1e-6 and rel(k_rot[..., perm], k_ds) < 1e-6


def test_relative_position_property():
    """q.k after rotation depends on the position difference only (plain RoPE, float64 oracle)."""
    torch.manual_seed(1)
    rope = pk.YarnRotary(factor=1.0, max_position=2048)
    q, k = torch.randn(1, 1, 64), torch.randn(1, 64)
    s = []
    for m, n in ((10, 3), (110, 103), (1010, 1003)):
        qr = oracle_rotate(q, torch.tensor([m]), rope)
        kr = oracle_rotate(k, torch.tensor([n]), rope)
        s.append((qr[0, 0] * kr[0]).sum().item())
    assert s[0] == pytest.approx(s[1], rel=1e-5) and s[0] == pytest.approx(s[2], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Backends against the float64 oracle
# ---------------------------------------------------------------------------------------------------------

CPU_BACKENDS = [("torch", torch.float32), ("torch", torch.float16), ("triton", torch.float32),
                ("triton", torch.float16)]
GPU_BACKENDS = [(b, dt) for b in ("torch", "triton", "cuda") for dt in (torch.bfloat16, torch.float16, torch.float32)]


def backend_params():
    params = [pytest.param(b, dt, "cpu", id=f"cpu-{b}-{str(dt)[6:]}", marks=[CPU_TRITON] if b == "triton" else [])
              for b, dt in CPU_BACKENDS]
    params += [pytest.param(b, dt, "cuda", id=f"cuda-{b}-{str(dt)[6:]}", marks=pytest.mark.gpu)
               for b, dt in GPU_BACKENDS]
    return params


def rope_for(device, interleaved, rotary_dim=64):
    if rotary_dim == 64:
        return make_rope(device=device, interleaved=interleaved)
    return make_rope(device=device, interleaved=interleaved, rotary_dim=rotary_dim, max_position=5000)


# (T, H, rotary_dim, q_pe made as a strided slice, k_pe as [T, 1, d], positions int32)
APPLY_SHAPES = [(1, 1, 64, False, False, False), (3, 5, 64, True, True, False), (37, 16, 64, False, False, True),
                (5, 3, 40, True, False, False), (4, 7, 16, False, True, True)]


@pytest.mark.parametrize("backend,dtype,device", backend_params())
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("shape", APPLY_SHAPES, ids=lambda s: "T{}h{}d{}{}{}{}".format(
    *s[:3], "-strided" if s[3] else "", "-k3d" if s[4] else "", "-i32" if s[5] else ""))
def test_apply_rotary_matches_oracle(backend, dtype, device, interleaved, shape):
    T, H, d, strided, k3d, i32 = shape
    rope = rope_for(device, interleaved, d)
    g = torch.Generator().manual_seed(T * 100 + H)
    if strided:  # q_pe is the rope part of [T, H, 128 + d], as in the naive prefill form
        q_pe = torch.randn(T, H, 128 + d, generator=g).to(device=device, dtype=dtype)[..., 128:]
    else:
        q_pe = torch.randn(T, H, d, generator=g).to(device=device, dtype=dtype)
    k_pe = torch.randn(T, 1, d, generator=g) if k3d else torch.randn(T, d + 8, generator=g)[:, 8:]
    k_pe = k_pe.to(device=device, dtype=dtype)
    positions = torch.randint(0, rope.max_position, (T,), generator=g)
    positions[0] = rope.max_position - 1
    positions = positions.to(device=device, dtype=torch.int32 if i32 else torch.int64)
    q_before, k_before = q_pe.clone(), k_pe.clone()
    q_out, k_out = pk.apply_rotary(q_pe, k_pe, positions, rope, backend=backend)
    assert q_out.shape == (T, H, d) and k_out.shape == k_pe.shape
    assert q_out.dtype == dtype and k_out.dtype == dtype and q_out.is_contiguous()
    assert torch.equal(q_pe, q_before) and torch.equal(k_pe, k_before)  # inputs untouched
    assert not q_out.isnan().any() and not k_out.isnan().any()
    assert rel(q_out.cpu(), oracle_rotate(q_pe, positions, rope)) <= TOL[dtype]
    assert rel(k_out.cpu(), oracle_rotate(k_pe, positions, rope)) <= TOL[dtype]


# (T, H, Dq, L, q as a slice of a wider buffer, kv_latent/k_pe as slices of one [T, L + d] projection)
CACHE_SHAPES = [(1, 16, 576, 512, False, True), (5, 3, 192, 512, True, True), (17, 1, 64, 100, False, False),
                (6, 5, 70, 37, True, False), (33, 16, 576, 512, True, True)]


@pytest.mark.parametrize("backend,dtype,device", backend_params())
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("shape", CACHE_SHAPES, ids=lambda s: "T{}h{}q{}L{}{}{}".format(
    *s[:4], "-qview" if s[4] else "", "-kvview" if s[5] else ""))
def test_rope_and_cache_matches_oracle(backend, dtype, device, interleaved, shape):
    T, H, Dq, L, q_view, kv_view = shape
    d = 64
    rope = rope_for(device, interleaved)
    g = torch.Generator().manual_seed(T * 1000 + H * 10 + L)
    wide = torch.randn(T, H, Dq + 24, generator=g).to(device=device, dtype=dtype)
    wide[..., Dq:] = float("nan")  # columns outside the view: must stay NaN
    q = wide[..., :Dq] if q_view else wide[..., :Dq].contiguous()
    if kv_view:  # kv_a_proj output [T, L + d] split into latent and rope parts
        kv = torch.randn(T, L + d, generator=g).to(device=device, dtype=dtype)
        kv_latent, k_pe = kv[:, :L], kv[:, L:]
    else:
        kv_latent = torch.randn(T, L, generator=g).to(device=device, dtype=dtype)
        k_pe = torch.randn(T, 1, d, generator=g).to(device=device, dtype=dtype)
    num_blocks, block_size = 3, 16
    k_cache = torch.full((num_blocks, block_size, 1, L + d), float("nan"), device=device, dtype=dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[T // 2] = -1  # a padded token
    positions = torch.randint(0, rope.max_position, (T,), generator=g)
    slots, positions = slots.to(device), positions.to(device)
    q0, wide0 = q.clone(), wide.clone()

    pk.rope_and_cache(q, kv_latent, k_pe, positions, rope, k_cache, slots, backend=backend)

    q_ref = oracle_rotate(q0[..., Dq - d:], positions, rope)
    assert rel(q[..., Dq - d:].cpu(), q_ref) <= TOL[dtype]
    assert torch.equal(q[..., : Dq - d], q0[..., : Dq - d])  # the nope / latent part of q is untouched
    if q_view:
        assert wide[..., Dq:].isnan().all() and torch.equal(wide[..., :Dq - d], wide0[..., :Dq - d])
    rows = k_cache.view(-1, L + d).cpu()
    written = torch.zeros(rows.shape[0], dtype=torch.bool)
    k_ref = oracle_rotate(k_pe.reshape(T, d), positions, rope)
    for t in range(T):
        s = int(slots[t])
        if s < 0:
            continue
        written[s] = True
        assert torch.equal(rows[s, :L], kv_latent[t].cpu())  # the latent is copied bit for bit
        assert rel(rows[s, L:], k_ref[t]) <= TOL[dtype]
    assert rows[~written].isnan().all()  # untouched rows (incl. the padded token's) stay untouched
    assert not rows[written].isnan().any()


@CPU_TRITON
def test_rotary_dim_16_backends_agree_exactly_on_cpu():
    """torch and Triton (interpreted) compute the same float32 products: identical fp32 outputs."""
    rope = make_rope(rotary_dim=16, max_position=5000)
    g = torch.Generator().manual_seed(3)
    q, k, pos = torch.randn(6, 3, 16, generator=g), torch.randn(6, 16, generator=g), torch.randint(0, 5000, (6,), generator=g)
    a = pk.apply_rotary(q, k, pos, rope, backend="torch")
    b = pk.apply_rotary(q, k, pos, rope, backend="triton")
    assert rel(a[0], b[0]) < 1e-6 and rel(a[1], b[1]) < 1e-6


def test_empty_batch():
    rope = make_rope()
    q, k = torch.randn(0, 4, 64), torch.randn(0, 64)
    qo, ko = pk.apply_rotary(q, k, torch.zeros(0, dtype=torch.long), rope)
    assert qo.shape == (0, 4, 64) and ko.shape == (0, 64)
    cache = torch.full((1, 4, 1, 576), float("nan"))
    pk.rope_and_cache(torch.randn(0, 4, 576), torch.randn(0, 512), k, torch.zeros(0, dtype=torch.long), rope, cache,
                      torch.zeros(0, dtype=torch.long))
    assert cache.isnan().all()


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------

def _good_args(T=3, H=2, L=512, dtype=torch.float32):
    rope = make_rope()
    return dict(q=torch.randn(T, H, 576, dtype=dtype), kv_latent=torch.randn(T, L, dtype=dtype),
                k_pe=torch.randn(T, 64, dtype=dtype), positions=torch.arange(T), rope=rope,
                k_cache=torch.zeros(2, 4, 1, L + 64, dtype=dtype), slot_mapping=torch.tensor([0, -1, 7])[:T])


@pytest.mark.parametrize("change,error,name", [
    (dict(q=torch.randn(3, 2, 60)), ValueError, "q"),
    (dict(q=torch.randn(3, 576)), ValueError, "q"),
    (dict(q=torch.randn(3, 2, 576, dtype=torch.float64)), TypeError, "q"),
    (dict(q=torch.randn(3, 2, 1152)[..., ::2]), ValueError, "q"),
    (dict(kv_latent=torch.randn(3, 512, dtype=torch.float16)), TypeError, "kv_latent"),
    (dict(kv_latent=torch.randn(4, 512)), ValueError, "kv_latent"),
    (dict(k_pe=torch.randn(3, 32)), ValueError, "k_pe"),
    (dict(k_pe=torch.randn(3, 2, 64)), ValueError, "k_pe"),
    (dict(k_cache=torch.zeros(2, 4, 1, 570)), ValueError, "k_cache"),
    (dict(k_cache=torch.zeros(2, 4, 576)), ValueError, "k_cache"),
    (dict(k_cache=torch.zeros(2, 4, 1, 576, dtype=torch.float16)), TypeError, "k_cache"),
    (dict(k_cache=torch.zeros(4, 2, 1, 576).transpose(0, 1)), ValueError, "k_cache"),
    (dict(positions=torch.arange(3.0)), TypeError, "positions"),
    (dict(positions=torch.arange(4)), ValueError, "positions"),
    (dict(positions=torch.tensor([0, 163840, 1])), ValueError, "positions"),
    (dict(positions=torch.tensor([0, -1, 1])), ValueError, "positions"),
    (dict(slot_mapping=torch.tensor([0, 1, 8])), ValueError, "slot_mapping"),
    (dict(slot_mapping=torch.tensor([0, -2, 1])), ValueError, "slot_mapping"),
    (dict(slot_mapping=torch.tensor([0.0, 1.0, 2.0])), TypeError, "slot_mapping"),
    (dict(rope="rope"), TypeError, "rope"),
])
def test_rope_and_cache_rejects_bad_input(change, error, name):
    args = {**_good_args(), **change}
    cache_before = args["k_cache"].clone()
    with pytest.raises(error, match=rf"^{name}\b"):
        pk.rope_and_cache(**args)
    assert torch.equal(args["k_cache"], cache_before)  # nothing was written


@pytest.mark.parametrize("change,error,name", [
    (dict(q_pe=torch.randn(3, 2, 32)), ValueError, "q_pe"),
    (dict(q_pe=torch.randn(3, 2, 64, dtype=torch.float16)), TypeError, "k_pe"),
    (dict(k_pe=torch.randn(4, 64)), ValueError, "k_pe"),
    (dict(positions=torch.tensor([0, 1, 163840])), ValueError, "positions"),
    (dict(positions=torch.zeros(3, 1, dtype=torch.long)), ValueError, "positions"),
])
def test_apply_rotary_rejects_bad_input(change, error, name):
    args = {**dict(q_pe=torch.randn(3, 2, 64), k_pe=torch.randn(3, 64), positions=torch.arange(3), rope=make_rope()),
            **change}
    with pytest.raises(error, match=rf"^{name}\b"):
        pk.apply_rotary(**args)


def test_backend_name_is_checked():
    with pytest.raises(ValueError, match="^backend"):
        pk.apply_rotary(torch.randn(1, 1, 64), torch.randn(1, 64), torch.zeros(1, dtype=torch.long), make_rope(),
                        backend="cutlass")
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="^backend"):
            pk.apply_rotary(torch.randn(1, 1, 64), torch.randn(1, 64), torch.zeros(1, dtype=torch.long), make_rope(),
                            backend="cuda")


# ---------------------------------------------------------------------------------------------------------
# The device error flag: bad rows are skipped, the flag is raised, check_errors reports and resets
# ---------------------------------------------------------------------------------------------------------

def _run_without_value_checks(op, backend, device, dtype=torch.float32):
    """The op's implementation after validation, past the eager value checks (what a CUDA call does)."""
    rope = make_rope(device=device)
    flag = rope_mod.error_flag(device)
    g = torch.Generator().manual_seed(5)
    positions = torch.tensor([3, -4, 200000, 9, 11]).to(device)
    slots = torch.tensor([0, 1, 2, 99, -7]).to(device)  # rows 3 and 4: bad slots; rows 1, 2: bad positions
    T = positions.numel()
    if op == "apply_rotary":
        q = torch.randn(T, 2, 64, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(T, 64, generator=g).to(device=device, dtype=dtype)
        qo, ko = rope_mod._apply_rotary_impl(q, k, positions, rope.cos_sin_cache, flag, True, backend)
        return rope, positions, slots, (q, k, qo, ko)
    q = torch.randn(T, 2, 576, generator=g).to(device=device, dtype=dtype)
    kv = torch.randn(T, 512, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(T, 64, generator=g).to(device=device, dtype=dtype)
    cache = torch.full((2, 4, 1, 576), float("nan"), device=device, dtype=dtype)
    q0 = q.clone()
    rope_mod._rope_and_cache_impl(q, kv, k, positions, rope.cos_sin_cache, cache, slots, flag, True, backend)
    return rope, positions, slots, (q0, q, kv, k, cache)


def _error_flag_backends():
    params = [pytest.param("torch", "cpu", id="cpu-torch"), pytest.param("triton", "cpu", id="cpu-triton", marks=CPU_TRITON)]
    params += [pytest.param(b, "cuda", id=f"cuda-{b}", marks=pytest.mark.gpu) for b in ("torch", "triton", "cuda")]
    return params


@pytest.mark.parametrize("backend,device", _error_flag_backends())
def test_bad_rows_are_skipped_and_flagged(backend, device):
    rope_mod.check_errors()  # start clean
    rope, positions, _, (q0, q, kv, _, cache) = _run_without_value_checks("rope_and_cache", backend, device)
    rows = cache.view(8, 576)
    assert torch.equal(q[1:3], q0[1:3])  # bad positions: q rows untouched
    good = torch.tensor([0, 3, 4])  # good positions (rows 3, 4 have bad slots: q is still rotated)
    assert rel(q[good, :, 512:].cpu(), oracle_rotate(q0[good, :, 512:], positions[good.to(positions.device)], rope)) < 1e-5
    assert torch.equal(rows[0, :512], kv[0])  # the one good row was written
    assert rows[1:].isnan().all()  # every other row skipped (bad position or bad slot), nothing out of bounds
    with pytest.raises(ValueError, match="positions.*slot_mapping"):
        rope_mod.check_errors(device)
    rope_mod.check_errors(device)  # reset: no error the second time


@pytest.mark.parametrize("backend,device", _error_flag_backends())
def test_apply_rotary_bad_positions_pass_through_unrotated(backend, device):
    rope_mod.check_errors()
    rope, positions, _, (q, k, qo, ko) = _run_without_value_checks("apply_rotary", backend, device)
    assert torch.equal(qo[1:3], q[1:3]) and torch.equal(ko[1:3], k[1:3])
    assert rel(qo[3:].cpu(), oracle_rotate(q[3:], positions[3:], rope)) < 1e-5
    with pytest.raises(ValueError, match="^positions"):
        rope_mod.check_errors(device)


# ---------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------

def test_custom_ops_opcheck():
    rope = make_rope(max_position=4096)
    flag = rope_mod.error_flag("cpu")
    q, k, pos = torch.randn(4, 3, 64), torch.randn(4, 64), torch.tensor([1, 2, 3, 4000])
    torch.library.opcheck(torch.ops.pykernels.apply_rotary.default, (q, k, pos, rope.cos_sin_cache, flag, True, "torch"))
    qq, kv, cache = torch.randn(4, 3, 576), torch.randn(4, 512), torch.zeros(2, 4, 1, 576)
    torch.library.opcheck(torch.ops.pykernels.rope_and_cache.default,
                          (qq, kv, k, pos, rope.cos_sin_cache, cache, torch.tensor([0, 5, -1, 2]), flag, False, "torch"))


def test_compiles_through_the_fake_implementations():
    rope = make_rope()

    def step(q, kv, k, pos, cache, slots):
        q_pe, k_pe = pk.apply_rotary(q[..., 512:], k, pos, rope)
        pk.rope_and_cache(q, kv, k, pos, rope, cache, slots)
        return q_pe.sum() + k_pe.sum()

    args = (torch.randn(3, 2, 576), torch.randn(3, 512), torch.randn(3, 64), torch.tensor([5, 6, 7]),
            torch.zeros(1, 8, 1, 576), torch.tensor([0, 3, -1]))
    eager_args = tuple(a.clone() for a in args)
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(*args)
    ref = step(*eager_args)
    assert torch.allclose(out, ref, rtol=1e-5)
    assert torch.equal(args[0], eager_args[0]) and torch.equal(args[4], eager_args[4])


# ---------------------------------------------------------------------------------------------------------
# GPU only: CUDA graphs, no host sync, backend choice, big shapes
# ---------------------------------------------------------------------------------------------------------

def _decode_inputs(T, H, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, 576, generator=g).to("cuda", dtype)
    kv = torch.randn(T, 576, generator=g).to("cuda", dtype)
    cache = torch.full((64, 64, 1, 576), float("nan"), device="cuda", dtype=dtype)
    slots = torch.randperm(64 * 64, generator=g)[:T].cuda()
    positions = torch.randint(0, 163840, (T,), generator=g).cuda()
    return q, kv[:, :512], kv[:, 512:], positions, cache, slots


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_cuda_graph_capture_and_replay(backend):
    rope = make_rope(device="cuda")
    rope_mod.error_flag("cuda")  # allocated outside the capture
    q, kv_latent, k_pe, positions, cache, slots = _decode_inputs(8, 16)
    for _ in range(2):  # warm-up (Triton compiles) on a side stream, as torch's graph docs ask
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            pk.rope_and_cache(q.clone(), kv_latent, k_pe, positions, rope, cache.clone(), slots, backend=backend)
        torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pk.rope_and_cache(q, kv_latent, k_pe, positions, rope, cache, slots, backend=backend)
    new = _decode_inputs(8, 16, seed=1)
    for dst, src in zip((q, kv_latent, k_pe, positions), new[:4]):
        dst.copy_(src)
    slots.copy_(new[5])
    cache.fill_(float("nan"))
    q0 = q.clone()
    graph.replay()
    torch.cuda.synchronize()
    q_ref = q0.clone()
    cache_ref = torch.full_like(cache, float("nan"))
    pk.rope_and_cache(q_ref, kv_latent, k_pe, positions, rope, cache_ref, slots, backend="torch")
    assert rel(q.float(), q_ref.float()) <= TOL[torch.bfloat16]
    assert torch.equal(cache.isnan(), cache_ref.isnan())
    assert rel(cache.nan_to_num().float(), cache_ref.nan_to_num().float()) <= TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_no_host_sync(backend, monkeypatch):
    monkeypatch.delenv("PYKERNELS_CHECK_VALUES", raising=False)
    rope = make_rope(device="cuda")
    q, kv_latent, k_pe, positions, cache, slots = _decode_inputs(16, 16)
    pk.rope_and_cache(q, kv_latent, k_pe, positions, rope, cache, slots, backend=backend)  # warm-up / compile
    pk.apply_rotary(q[..., 512:], k_pe, positions, rope, backend=backend)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pk.rope_and_cache(q, kv_latent, k_pe, positions, rope, cache, slots, backend=backend)
        pk.apply_rotary(q[..., 512:], k_pe, positions, rope, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_cuda_values_checked_eagerly_when_asked(monkeypatch):
    monkeypatch.setenv("PYKERNELS_CHECK_VALUES", "1")
    rope = make_rope(device="cuda")
    q, kv_latent, k_pe, positions, cache, slots = _decode_inputs(4, 2)
    positions[1] = 163840
    with pytest.raises(ValueError, match="^positions"):
        pk.rope_and_cache(q, kv_latent, k_pe, positions, rope, cache, slots)


@pytest.mark.gpu
def test_cuda_bad_values_flagged_without_sync(monkeypatch):
    monkeypatch.delenv("PYKERNELS_CHECK_VALUES", raising=False)
    rope_mod.check_errors()
    rope = make_rope(device="cuda")
    q, kv_latent, k_pe, positions, cache, slots = _decode_inputs(4, 2)
    slots[2] = 64 * 64  # one past the end
    pk.rope_and_cache(q, kv_latent, k_pe, positions, rope, cache, slots)
    with pytest.raises(ValueError, match="^slot_mapping"):
        pk.rope.check_errors()


@pytest.mark.gpu
def test_backend_none_on_cuda_is_a_kernel():
    device = torch.device("cuda", torch.cuda.current_device())
    assert rope_mod._pick_backend("rope_and_cache", None, device, True) in ("cuda", "triton")
    if _ext.available():
        assert rope_mod._pick_backend("rope_and_cache", None, device, True) == "cuda"
        assert rope_mod._pick_backend("rope_and_cache", None, device, False) == "triton"  # unaligned rows


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("T,H", [(256, 128), (4096, 16), (70000, 1)])
def test_large_shapes(backend, T, H):
    """Decode h128, prefill-sized, and more tokens than CUDA's gridDim.y limit (65535)."""
    rope = make_rope(device="cuda")
    g = torch.Generator().manual_seed(T)
    q = torch.randn(T, H, 576, generator=g).to("cuda", torch.bfloat16)
    kv = torch.randn(T, 576, generator=g).to("cuda", torch.bfloat16)
    positions = torch.randint(0, 163840, (T,), generator=g).cuda()
    cache = torch.full((T // 64 + 2, 64, 1, 576), float("nan"), device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(cache.shape[0] * 64, generator=g)[:T].cuda()
    q_ref, cache_ref = q.clone(), cache.clone()
    pk.rope_and_cache(q, kv[:, :512], kv[:, 512:], positions, rope, cache, slots, backend=backend)
    pk.rope_and_cache(q_ref, kv[:, :512], kv[:, 512:], positions, rope, cache_ref, slots, backend="torch")
    assert rel(q.float(), q_ref.float()) <= TOL[torch.bfloat16]
    assert torch.equal(cache.isnan(), cache_ref.isnan())
    assert rel(cache.nan_to_num().float(), cache_ref.nan_to_num().float()) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("backend,dtype,device", [p for p in backend_params() if p.values[1] == torch.float32])
def test_cache_without_blocks_still_rotates_q(backend, dtype, device):
    """A cache with no rows: every slot is out of range (flagged, nothing written), q is still rotated."""
    rope_mod.check_errors()
    rope = make_rope(device=device)
    q = torch.randn(2, 3, 576, device=device)
    q0 = q.clone()
    positions = torch.tensor([4, 5], device=device)
    cache = torch.empty(0, 16, 1, 576, device=device)
    rope_mod._rope_and_cache_impl(q, torch.randn(2, 512, device=device), torch.randn(2, 64, device=device), positions,
                                  rope.cos_sin_cache, cache, torch.tensor([-1, 0], device=device),
                                  rope_mod.error_flag(device), True, backend)
    assert rel(q[..., 512:].cpu(), oracle_rotate(q0[..., 512:], positions, rope)) < 1e-5
    with pytest.raises(ValueError, match="^slot_mapping"):
        rope_mod.check_errors(device)


_COMPILE_FOR_SM90 = r"""
import itertools
import sys
from triton import compile as triton_compile
from triton.compiler import ASTSource
from triton.compiler.errors import CompilationError
try:
    from triton.backends.compiler import GPUTarget
except ImportError:
    sys.exit(77)
from pykernels.triton import rope as triton_rope

kernel = triton_rope._rope_rows_kernel
types = {"positions": "*i64", "cos_sin": "*fp32", "slots": "*i64", "flag": "*i32", "T": "i32", "H": "i32",
         "max_position": "i32", "k_dst_rows": "i64"}
for cache, interleaved, block_t in itertools.product((False, True), (True, False), (1, 4)):
        consts = dict(L=512 if cache else 0, D=64, HALF_BLOCK=32, BLOCK_T=block_t, BLOCK_H=16,
                      BLOCK_L=512 if cache else 1, INTERLEAVED=interleaved, USE_SLOTS=cache, HAS_LATENT=cache,
                      COPY_BAD_ROWS=not cache)
        signature = {n: "constexpr" if n in consts else types.get(n, "i64" if "stride" in n else "*bf16")
                     for n in kernel.arg_names}
        hinted = [i for i, n in enumerate(kernel.arg_names) if signature[n].startswith("*") or "stride" in n]
        try:
            src = ASTSource(fn=kernel, signature=signature, constexprs=consts,
                            attrs={(i,): [["tt.divisibility", 16]] for i in hinted})
            compiled = triton_compile(src, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": triton_rope.NUM_WARPS})
        except CompilationError:
            raise
        except Exception as e:  # an API difference or no ptxas: not this kernel's fault
            print(f"cannot compile here: {type(e).__name__}: {e}")
            sys.exit(77)
        ptx = compiled.asm["ptx"]
        assert "st.global.v4.b32" in ptx or "st.global.v2.b32" in ptx, "the q tile is not stored with wide accesses"
        print("compiled", "rope_and_cache" if cache else "apply_rotary", "interleaved" if interleaved else "halves",
              f"BLOCK_T={block_t}")
"""


def test_triton_kernel_compiles_for_sm90():
    """Compiled (not interpreted) Triton has stricter rules (globals, types across branches): compile the
    kernel for sm_90 without a GPU, with the 16-byte divisibility hints a real launch gets, in a process
    without TRITON_INTERPRET."""
    out = run_compile_script(_COMPILE_FOR_SM90)
    assert out.count("compiled") == 8, out
