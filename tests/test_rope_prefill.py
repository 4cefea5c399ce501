"""The prefill launches of pk.rope_and_cache and pk.apply_rotary (more than 256 tokens): Triton takes several
tokens per program; CUDA keeps its one launch shape. Every Triton launch choice (the tuning knob
PYKERNELS_ROPE_TOKENS_PER_PROGRAM) and the CUDA kernel against the torch backend on the same inputs: a token
count that no choice divides, odd head counts, padded tokens (slot -1), bad positions and slots inside a
token block, untouched cache rows filled with NaN, and the unaligned (CUDA fallback) layout.

CPU: Triton under TRITON_INTERPRET=1 (fp32/fp16). GPU (@pytest.mark.gpu): Triton and CUDA in bf16/fp16/fp32.
"""
from __future__ import annotations

import pytest
import torch

import pykernels as pk
from pykernels import _backend
from pykernels import rope as rope_mod
from pykernels.triton import rope as triton_rope

CPU_TRITON = pytest.mark.skipif(not _backend.triton_interpreted(), reason="Triton on the CPU needs TRITON_INTERPRET=1")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
D = 64
MAX_POSITION = 8192
TRITON_KNOB = "PYKERNELS_ROPE_TOKENS_PER_PROGRAM"

# (T, H, Dq, L, q as a slice of a wider buffer): T > 256 and not a multiple of 2, 4 or 8; odd heads. The second shape's q row stride (70) and latent width (37) are not
# multiples of 16 bytes: the CUDA fallback path.
SHAPES = [(259, 5, 192, 512, False), (263, 3, 70, 37, True)]
BAD_POSITION_TOKENS = (5, 130)  # position -3 and MAX_POSITION
BAD_SLOT_TOKENS = (201, 258)  # slot num_slots and -5
_ROPES: dict[tuple, pk.YarnRotary] = {}


def make_rope(device, interleaved) -> pk.YarnRotary:
    key = (str(device), interleaved)
    if key not in _ROPES:
        _ROPES[key] = pk.YarnRotary(max_position=MAX_POSITION, interleaved=interleaved, device=device)
    return _ROPES[key]


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def cache_inputs(T, H, Dq, L, q_view, dtype, device, seed=0):
    """q (NaN in the columns past a view), kv_latent, k_pe, positions and slots with padded tokens, bad
    values at BAD_*_TOKENS, and a NaN-filled cache of more rows than tokens."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(T, H, Dq + 24, generator=g)
    wide[..., Dq:] = float("nan")
    wide = wide.to(device=device, dtype=dtype)
    q = wide[..., :Dq] if q_view else wide[..., :Dq].contiguous()
    kv = torch.randn(T, L + D, generator=g).to(device=device, dtype=dtype)
    block_size = 16
    num_blocks = T // block_size + 3
    cache = torch.full((num_blocks, block_size, 1, L + D), float("nan"), device=device, dtype=dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[::7] = -1  # padded tokens, in every token block
    positions = torch.randint(0, MAX_POSITION, (T,), generator=g)
    positions[BAD_POSITION_TOKENS[0]], positions[BAD_POSITION_TOKENS[1]] = -3, MAX_POSITION
    slots[BAD_SLOT_TOKENS[0]], slots[BAD_SLOT_TOKENS[1]] = num_blocks * block_size, -5
    return wide, q, kv[:, :L], kv[:, L:], positions.to(device), cache, slots.to(device)


def run_rope_and_cache(backend, wide, q, kv_latent, k_pe, positions, cache, slots, interleaved):
    """The op past its eager value checks (the bad values reach the kernel); returns the error-flag bits."""
    rope_mod.check_errors()
    flag = rope_mod.error_flag(q.device)
    rope_mod._rope_and_cache_impl(q, kv_latent, k_pe, positions, make_rope(q.device, interleaved).cos_sin_cache,
                                  cache, slots, flag, interleaved, backend)
    bits = int(flag.item())
    flag.zero_()
    return bits


def check_rope_and_cache(backend, dtype, device, interleaved, shape):
    T, H, Dq, L, q_view = shape
    ours = cache_inputs(T, H, Dq, L, q_view, dtype, device)
    ref = cache_inputs(T, H, Dq, L, q_view, dtype, device)
    wide0 = ours[0].clone()
    bits = run_rope_and_cache(backend, *ours, interleaved)
    ref_bits = run_rope_and_cache("torch", *ref, interleaved)
    assert bits == ref_bits == rope_mod.ERR_POSITION | rope_mod.ERR_SLOT
    wide, q, q_ref = ours[0], ours[1], ref[1]
    assert rel(q[..., Dq - D:].float().cpu(), q_ref[..., Dq - D:].float().cpu()) <= TOL[dtype]
    assert torch.equal(q[..., : Dq - D], q_ref[..., : Dq - D])  # q's other columns are untouched
    for t in BAD_POSITION_TOKENS:  # a bad position leaves its q row as it was
        assert torch.equal(q[t].cpu(), wide0[t, :, :Dq].cpu())
    if q_view:
        assert wide[..., Dq:].isnan().all()
    cache, cache_ref = ours[5], ref[5]
    assert torch.equal(cache.isnan(), cache_ref.isnan())  # the same rows written; the rest still NaN
    rows = cache.view(-1, L + D)
    written = ~rows.isnan().all(dim=1)
    good = [t for t, s in enumerate(ours[6].tolist()) if 0 <= s < rows.shape[0] and t not in BAD_POSITION_TOKENS]
    assert int(written.sum()) == len(good) > 0
    assert torch.equal(rows[ours[6][good], :L].cpu(), ours[2][good].cpu())  # latent copied bit for bit
    assert rel(cache.nan_to_num().float().cpu(), cache_ref.nan_to_num().float().cpu()) <= TOL[dtype]


def check_apply_rotary(backend, dtype, device, interleaved, T, H):
    rope = make_rope(device, interleaved)
    g = torch.Generator().manual_seed(T + H)
    q = torch.randn(T, H, 128 + D, generator=g).to(device=device, dtype=dtype)[..., 128:]  # strided rows
    k = torch.randn(T, D, generator=g).to(device=device, dtype=dtype)
    positions = torch.randint(0, MAX_POSITION, (T,), generator=g)
    positions[BAD_POSITION_TOKENS[0]] = -1
    positions = positions.to(device)
    flag = rope_mod.error_flag(device)
    rope_mod.check_errors()
    qo, ko = rope_mod._apply_rotary_impl(q, k, positions, rope.cos_sin_cache, flag, interleaved, backend)
    bits = int(flag.item())
    flag.zero_()
    qr, kr = rope_mod._apply_rotary_impl(q, k, positions, rope.cos_sin_cache, flag, interleaved, "torch")
    flag.zero_()
    assert bits == rope_mod.ERR_POSITION
    assert not qo.isnan().any() and not ko.isnan().any()
    assert rel(qo.float().cpu(), qr.float().cpu()) <= TOL[dtype]
    assert rel(ko.float().cpu(), kr.float().cpu()) <= TOL[dtype]
    t = BAD_POSITION_TOKENS[0]  # a bad position passes through unrotated
    assert torch.equal(qo[t], q[t]) and torch.equal(ko[t], k[t])


def shape_id(s):
    return "T{}h{}q{}L{}{}".format(*s[:4], "-qview" if s[4] else "")


# ---------------------------------------------------------------------------------------------------------
# CPU: Triton interpreted
# ---------------------------------------------------------------------------------------------------------

@CPU_TRITON
@pytest.mark.parametrize("tokens", [None, "8"], ids=lambda v: f"tokens-{v or 'table'}")
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_triton_prefill_rope_and_cache_cpu(tokens, interleaved, shape, monkeypatch):
    if tokens is not None:
        monkeypatch.setenv(TRITON_KNOB, tokens)
    check_rope_and_cache("triton", torch.float32, "cpu", interleaved, shape)


@CPU_TRITON
@pytest.mark.parametrize("tokens", [None, "2"], ids=lambda v: f"tokens-{v or 'table'}")
def test_triton_prefill_fp16_cpu(tokens, monkeypatch):
    if tokens is not None:
        monkeypatch.setenv(TRITON_KNOB, tokens)
    check_rope_and_cache("triton", torch.float16, "cpu", True, SHAPES[0])
    check_apply_rotary("triton", torch.float16, "cpu", True, 261, 3)


@CPU_TRITON
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
def test_triton_prefill_apply_rotary_cpu(interleaved):
    check_apply_rotary("triton", torch.float32, "cpu", interleaved, 261, 5)


def test_tokens_per_program_table_and_knob(monkeypatch):
    monkeypatch.delenv(TRITON_KNOB, raising=False)
    assert triton_rope.tokens_per_program(1) == triton_rope.tokens_per_program(256) == 1  # decode
    assert triton_rope.tokens_per_program(257) == triton_rope.PREFILL_TOKENS_PER_PROGRAM
    monkeypatch.setenv(TRITON_KNOB, "8")
    assert triton_rope.tokens_per_program(16384) == 8
    assert triton_rope.tokens_per_program(256) == 1  # the knob is read only for prefill sizes
    monkeypatch.setenv(TRITON_KNOB, "3")
    with pytest.raises(ValueError, match=f"^{TRITON_KNOB}"):
        triton_rope.tokens_per_program(300)


# ---------------------------------------------------------------------------------------------------------
# GPU: every Triton launch choice, and the CUDA kernel
# ---------------------------------------------------------------------------------------------------------

def _gpu_cases():
    """Every Triton launch choice and the CUDA kernel in bf16 interleaved (the bench's case); the default
    choices also in fp16 and fp32 and with the half-split layout."""
    choices = [("triton", v) for v in (None, "1", "2", "4", "8")] + [("cuda", None)]
    cases = [(b, v, torch.bfloat16, True) for b, v in choices]
    cases += [(b, None, dt, il) for b in ("triton", "cuda")
              for dt, il in ((torch.float16, True), (torch.float32, True), (torch.bfloat16, False),
                             (torch.float32, False))]
    return [pytest.param(b, v, dt, il, id=f"{b}-tokens-{v or 'table'}-{str(dt)[6:]}-"
                         f"{'interleaved' if il else 'halves'}") for b, v, dt, il in cases]


def _set_knob(monkeypatch, backend, value):
    if value is None:
        monkeypatch.delenv(TRITON_KNOB, raising=False)
    else:
        monkeypatch.setenv(TRITON_KNOB, value)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,value,dtype,interleaved", _gpu_cases())
@pytest.mark.parametrize("shape", SHAPES + [(4099, 16, 192, 512, False)], ids=shape_id)
def test_prefill_rope_and_cache_gpu(backend, value, dtype, interleaved, shape, monkeypatch):
    _set_knob(monkeypatch, backend, value)
    check_rope_and_cache(backend, dtype, "cuda", interleaved, shape)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,value,dtype,interleaved", _gpu_cases())
def test_prefill_apply_rotary_gpu(backend, value, dtype, interleaved, monkeypatch):
    _set_knob(monkeypatch, backend, value)
    check_apply_rotary(backend, dtype, "cuda", interleaved, 261, 5)
    check_apply_rotary(backend, dtype, "cuda", interleaved, 4097, 128)
