"""YaRN rotary position embedding (DeepSeek-V2's formulas) and the fused decode step rope + paged-cache write.

Public surface::

    rope = YarnRotary(rotary_dim=64, base=10000.0, factor=40.0, original_max_position=4096,
                      beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                      max_position=163840, interleaved=True, device=None)
    rope = YarnRotary.from_config(cfg, device=None)      # HF field names (qk_rope_head_dim, rope_theta, ...)
    q_pe, k_pe = apply_rotary(q_pe, k_pe, positions, rope, backend=None)
    rope_and_cache(q, kv_latent, k_pe, positions, rope, k_cache, slot_mapping, backend=None)
    check_errors(device=None)                             # raise if a kernel saw a bad position or slot

The math (DeepSeek's modeling_deepseek.py, written out here as the reference)::

    yarn_get_mscale(s, m)  = 1                          if s <= 1
                           = 0.1 * m * ln(s) + 1        otherwise
    correction_dim(r)      = d * ln(original_max_position / (2 * pi * r)) / (2 * ln(base))
    low, high              = max(floor(correction_dim(beta_fast)), 0), min(ceil(correction_dim(beta_slow)), d - 1)
    freq_extra[i]          = base ** (-2i / d)                       i in [0, d/2)
    freq_inter[i]          = freq_extra[i] / factor
    ramp[i]                = clamp((i - low) / (high - low), 0, 1)     (high += 0.001 when low == high)
    inv_freq               = freq_inter * ramp + freq_extra * (1 - ramp)
    cos[p, i], sin[p, i]   = cos(p * inv_freq[i]) * m, sin(p * inv_freq[i]) * m,
                             m = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    attention_scale_factor = yarn_get_mscale(factor, mscale_all_dim) ** 2   (multiplies the softmax scale)

With factor <= 1 it is plain RoPE: inv_freq = freq_extra, m = 1, attention_scale_factor = 1.

Rotation of one row x [d] at position p, pair i in [0, d/2) made of (a, b):
    interleaved=True  (DeepSeek's checkpoints, vLLM's is_neox_style=False): a = x[2i], b = x[2i + 1]
    interleaved=False (GPT-NeoX halves):                                    a = x[i],  b = x[i + d/2]
    a' = a * cos[p, i] - b * sin[p, i]
    b' = b * cos[p, i] + a * sin[p, i]
DeepSeek's original code de-interleaves q and k and then rotates halves; that permutes the columns of both
the same way, so q . k is the same as with the interleaved rotation in place.

Bad values (positions outside [0, max_position), slot ids outside [-1, num_blocks * block_size)): CPU
tensors (and CUDA tensors when ``PYKERNELS_CHECK_VALUES=1``, see ``_checks.value_checks_enabled``) raise
ValueError before anything runs. Otherwise no value is read back to the host: every backend skips the bad
row (apply_rotary returns it unrotated; rope_and_cache leaves that q row and its cache row untouched) and
raises a bit in a per-device error flag on the device; ``check_errors()`` reads it (one host sync), resets
it and raises ValueError naming ``positions`` and/or ``slot_mapping``. Slot -1 is a legitimate "skip" and
raises nothing. Kernels never read or write out of bounds.

NOTES: the error flag of a device is allocated by the first call on that device (or ``error_flag(device)``);
make that first call before capturing a CUDA graph (the usual warm-up run does), so the flag is not
allocated inside the graph's memory pool.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from pykernels import _backend, _ext
from pykernels._checks import (
    check_same_device,
    check_tensor,
    value_checks_enabled,
)

__all__ = ["YarnRotary", "apply_rotary", "check_errors", "error_flag", "rope_and_cache", "yarn_get_mscale"]

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int64, torch.int32)
BACKENDS = ("torch", "triton", "cuda")

# Bits of the device error flag (the CUDA and Triton kernels use the same values).
ERR_POSITION = 1  # a position outside [0, max_position)
ERR_SLOT = 2  # a slot id outside [-1, num_blocks * block_size)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 1 when there is no scaling, else ``0.1 * mscale * ln(scale) + 1``."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, original_max_position: int) -> float:
    """The (fractional) rotary dimension whose wavelength fits ``num_rotations`` times in the original context."""
    return dim * math.log(original_max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def _correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                      original_max_position: int) -> tuple[int, int]:
    low = math.floor(_correction_dim(beta_fast, dim, base, original_max_position))
    high = math.ceil(_correction_dim(beta_slow, dim, base, original_max_position))
    return max(low, 0), min(high, dim - 1)


class YarnRotary:
    """The cos/sin table of YaRN-scaled (or plain) RoPE, built once on ``device`` in float32.

    ``cos_sin_cache`` is ``[max_position, rotary_dim]`` float32: columns ``[0, d/2)`` hold cos and
    ``[d/2, d)`` hold sin of ``position * inv_freq`` (times the mscale ratio). Positions must lie in
    ``[0, max_position)``. ``interleaved`` picks the pair layout of the rotated vectors (see the module doc).

    NOTES: the angles ``position * inv_freq`` are computed in float32 from a float32 ``inv_freq``, as
    DeepSeek's code does, so the table matches what the checkpoints were trained with (at position 1e5 a
    float64 angle would differ by up to ~1e-2 rad). ``inv_freq`` is computed on the CPU, so the table does
    not depend on the device's ``pow``.
    """

    def __init__(
        self,
        rotary_dim: int = 64,
        base: float = 10000.0,
        factor: float = 40.0,
        original_max_position: int = 4096,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        mscale: float = 1.0,
        mscale_all_dim: float = 1.0,
        max_position: int = 163840,
        interleaved: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2:
            raise ValueError(f"rotary_dim: expected a positive even integer, got {rotary_dim!r}")
        for name, value in (("base", base), ("factor", factor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
        if base == 1:
            raise ValueError("base: expected a number other than 1 (log(base) divides), got 1")
        for name, value in (("original_max_position", original_max_position), ("max_position", max_position)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        for name, value in (("beta_fast", beta_fast), ("beta_slow", beta_slow)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
        for name, value in (("mscale", mscale), ("mscale_all_dim", mscale_all_dim)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
        if not isinstance(interleaved, bool):
            raise TypeError(f"interleaved: expected a bool, got {type(interleaved).__name__}")

        self.rotary_dim = rotary_dim
        self.base = float(base)
        self.factor = float(factor)
        self.original_max_position = original_max_position
        self.beta_fast = float(beta_fast)
        self.beta_slow = float(beta_slow)
        self.mscale = float(mscale)
        self.mscale_all_dim = float(mscale_all_dim)
        self.max_position = max_position
        self.interleaved = interleaved
        self.scaled = self.factor > 1

        d = rotary_dim
        exponents = torch.arange(0, d, 2, dtype=torch.float32) / d  # [d/2]
        freq_extra = 1.0 / (self.base ** exponents)  # [d/2] the original frequencies
        if self.scaled:
            freq_inter = 1.0 / (self.factor * self.base ** exponents)  # [d/2] interpolated by factor
            low, high = _correction_range(self.beta_fast, self.beta_slow, d, self.base, original_max_position)
            self.correction_range: tuple[int, int] | None = (low, high)
            span = (high - low) if high != low else 0.001
            ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / span).clamp(0, 1)  # [d/2]
            extrapolate = 1.0 - ramp  # 1: keep the original frequency; 0: interpolate
            inv_freq = freq_inter * (1 - extrapolate) + freq_extra * extrapolate
            self.cos_sin_scale = yarn_get_mscale(self.factor, self.mscale) / yarn_get_mscale(
                self.factor, self.mscale_all_dim)
            self.attention_scale_factor = yarn_get_mscale(self.factor, self.mscale_all_dim) ** 2
        else:
            self.correction_range = None
            inv_freq = freq_extra
            self.cos_sin_scale = 1.0
            self.attention_scale_factor = 1.0

        device = torch.device(device) if device is not None else torch.get_default_device()
        self.inv_freq = inv_freq.to(device)  # [d/2] float32
        t = torch.arange(max_position, dtype=torch.float32, device=device)  # [P]
        angles = torch.outer(t, self.inv_freq)  # [P, d/2]
        table = torch.cat((angles.cos(), angles.sin()), dim=-1)  # [P, d]
        if self.cos_sin_scale != 1.0:
            table = table * self.cos_sin_scale
        self.cos_sin_cache = table.contiguous()

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device | str | None = None, *,
                    interleaved: bool = True) -> YarnRotary:
        """Build from a ``DeepseekV2Config`` (Hugging Face field names).

        Reads ``qk_rope_head_dim``, ``rope_theta``, ``max_position_embeddings`` and ``rope_scaling``: a dict
        with ``"type"`` (or ``"rope_type"``) ``"yarn"``, ``factor``, ``original_max_position_embeddings``,
        ``beta_fast``, ``beta_slow``, ``mscale``, ``mscale_all_dim`` (DeepSeek's defaults 32, 1, 1, 0 when
        missing), or ``None`` for plain RoPE.
        """
        scaling = getattr(cfg, "rope_scaling", None)
        common = dict(rotary_dim=cfg.qk_rope_head_dim, base=float(cfg.rope_theta),
                      max_position=int(cfg.max_position_embeddings), interleaved=interleaved, device=device)
        if scaling is None:
            return cls(factor=1.0, original_max_position=int(cfg.max_position_embeddings), **common)
        if not isinstance(scaling, dict):
            raise TypeError(f"cfg.rope_scaling: expected a dict or None, got {type(scaling).__name__}")
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind not in ("yarn", "default", None):
            raise ValueError(f"cfg.rope_scaling: expected type 'yarn' (or None for plain RoPE), got {kind!r}")
        if kind == "default":
            return cls(factor=1.0, original_max_position=int(cfg.max_position_embeddings), **common)
        if "factor" not in scaling:
            raise ValueError(f"cfg.rope_scaling: a 'yarn' scaling needs 'factor', got keys {sorted(scaling)}")
        return cls(
            factor=float(scaling["factor"]),
            original_max_position=int(scaling.get("original_max_position_embeddings",
                                                  cfg.max_position_embeddings)),
            beta_fast=float(scaling.get("beta_fast", 32)),
            beta_slow=float(scaling.get("beta_slow", 1)),
            mscale=float(scaling.get("mscale", 1)),
            mscale_all_dim=float(scaling.get("mscale_all_dim", 0)),
            **common,
        )

    @property
    def device(self) -> torch.device:
        return self.cos_sin_cache.device

    def to(self, device: torch.device | str) -> YarnRotary:
        """This rotary on ``device`` (self when it is already there); the table is copied, not recomputed."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device:
            return self
        other = object.__new__(YarnRotary)
        other.__dict__.update(self.__dict__)
        other.inv_freq = self.inv_freq.to(device)
        other.cos_sin_cache = self.cos_sin_cache.to(device)
        return other

    def __repr__(self) -> str:
        scaling = (f"factor={self.factor}, original_max_position={self.original_max_position}, "
                   f"beta_fast={self.beta_fast}, beta_slow={self.beta_slow}, mscale={self.mscale}, "
                   f"mscale_all_dim={self.mscale_all_dim}, " if self.scaled else "plain, ")
        return (f"YarnRotary(rotary_dim={self.rotary_dim}, base={self.base}, {scaling}"
                f"max_position={self.max_position}, interleaved={self.interleaved}, device={self.device})")


# ---------------------------------------------------------------------------------------------------------
# Device error flag
# ---------------------------------------------------------------------------------------------------------

_ERROR_FLAGS: dict[torch.device, torch.Tensor] = {}


def _canonical(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def error_flag(device: torch.device | str) -> torch.Tensor:
    """The int32 ``[1]`` error flag of ``device`` (bit 1: bad position, bit 2: bad slot), allocated on first use."""
    device = _canonical(torch.device(device))
    flag = _ERROR_FLAGS.get(device)
    if flag is None:
        flag = torch.zeros(1, dtype=torch.int32, device=device)
        _ERROR_FLAGS[device] = flag
    return flag


def check_errors(device: torch.device | str | None = None) -> None:
    """Raise ValueError if a rope kernel saw a bad position or slot id since the last check, and reset.

    ``device=None`` checks every device that ran a rope op. Reads the flag back: one host sync per device.
    """
    devices = list(_ERROR_FLAGS) if device is None else [_canonical(torch.device(device))]
    bits = 0
    for dev in devices:
        flag = _ERROR_FLAGS.get(dev)
        if flag is None:
            continue
        bits |= int(flag.item())
        flag.zero_()
    problems = []
    if bits & ERR_POSITION:
        problems.append("positions: a value outside [0, rope.max_position) was seen; those rows were not rotated "
                        "(rope_and_cache did not write their cache rows)")
    if bits & ERR_SLOT:
        problems.append("slot_mapping: a slot id outside [-1, num_blocks * block_size) was seen; those rows "
                        "were not written")
    if problems:
        raise ValueError("; ".join(problems))


def _flag_bad_values(flag: torch.Tensor, positions: torch.Tensor, max_position: int,
                     slots: torch.Tensor | None = None, num_slots: int = 0) -> None:
    """flag |= the error bits of ``positions`` and ``slots``, by device ops only (no host sync)."""
    bad = ((positions < 0) | (positions >= max_position)).any().to(torch.int32) * ERR_POSITION
    if slots is not None:
        bad = bad | ((slots < -1) | (slots >= num_slots)).any().to(torch.int32) * ERR_SLOT
    flag.bitwise_or_(bad)


def _eager_value_checks(positions: torch.Tensor, max_position: int, slots: torch.Tensor | None = None,
                        num_slots: int = 0) -> None:
    """Raise ValueError for bad positions/slots; only when ``value_checks_enabled`` (reads values)."""
    if positions.numel() and value_checks_enabled(positions):
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= max_position:
            raise ValueError(f"positions: expected values in [0, {max_position}) (rope.max_position), "
                             f"got values in [{lo}, {hi}]")
    if slots is not None and slots.numel() and value_checks_enabled(slots):
        lo, hi = int(slots.min()), int(slots.max())
        if lo < -1 or hi >= num_slots:
            raise ValueError(f"slot_mapping: expected values in [-1, {num_slots}) (-1 = skip; num_blocks * "
                             f"block_size = {num_slots}), got values in [{lo}, {hi}]")


# ---------------------------------------------------------------------------------------------------------
# Torch reference
# ---------------------------------------------------------------------------------------------------------

def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the pairs of ``x [..., d]`` by ``cos, sin [..., d/2]`` (broadcast), in float32; same shape."""
    xf = x.float()
    if interleaved:
        a, b = xf[..., 0::2], xf[..., 1::2]  # [..., d/2]
        return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    a, b = xf[..., :half], xf[..., half:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def _cos_sin(positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """cos, sin ``[T, d/2]`` of each position, and ``ok [T]``: position in range (bad rows read row 0)."""
    max_position, d = cos_sin_cache.shape
    ok = (positions >= 0) & (positions < max_position)  # [T]
    rows = cos_sin_cache[torch.where(ok, positions, 0).long()]  # [T, d]
    return rows[:, : d // 2], rows[:, d // 2:], ok


def apply_rotary_reference(q_pe: torch.Tensor, k_pe: torch.Tensor, positions: torch.Tensor,
                           cos_sin_cache: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of ``apply_rotary``: new tensors ``[T, H, d]`` and ``k_pe``'s shape; bad rows unrotated."""
    cos, sin, ok = _cos_sin(positions, cos_sin_cache)
    q_rot = _rotate_reference(q_pe, cos[:, None], sin[:, None], interleaved)  # [T, H, d]
    k2 = k_pe.reshape(k_pe.shape[0], -1)  # [T, d]
    k_rot = _rotate_reference(k2, cos, sin, interleaved)  # [T, d]
    q_out = torch.where(ok[:, None, None], q_rot, q_pe.float()).to(q_pe.dtype)
    k_out = torch.where(ok[:, None], k_rot, k2.float()).to(k_pe.dtype).reshape(k_pe.shape)
    return q_out, k_out


def rope_and_cache_reference(q: torch.Tensor, kv_latent: torch.Tensor, k_pe: torch.Tensor,
                             positions: torch.Tensor, cos_sin_cache: torch.Tensor, interleaved: bool,
                             k_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Torch reference of ``rope_and_cache`` (rotate + cat + index_put), without a host sync.

    Math::

        q[t, :, -d:] = rotate(q[t, :, -d:], positions[t])                for ok[t]
        k_cache.view(-1, L + d)[slot_mapping[t]] = cat(kv_latent[t], rotate(k_pe[t], positions[t]))
                                                                          for ok[t] and slot_mapping[t] in range

    NOTES: rows to skip (slot -1, bad slot or bad position) must not write; a boolean filter would need a
    host sync (its size depends on the values). Instead every skipped row is sent to a target that is
    rewritten with the value it gets anyway: the slot of the first written row, with that row's value, or,
    when no row writes, slot 0 with its own old value. Duplicate indices then all carry one value, so
    ``index_put_`` is deterministic.
    """
    d = cos_sin_cache.shape[1]
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    cache_rows = k_cache.view(num_slots, k_cache.shape[-1])  # [num_slots, L + d]
    cos, sin, ok = _cos_sin(positions, cos_sin_cache)

    q_rope = q[..., -d:]  # [T, H, d] view
    q_rot = _rotate_reference(q_rope, cos[:, None], sin[:, None], interleaved)
    q_rope.copy_(torch.where(ok[:, None, None], q_rot, q_rope.float()))

    if num_slots == 0:
        return
    k_rot = _rotate_reference(k_pe.reshape(k_pe.shape[0], d), cos, sin, interleaved)  # [T, d]
    rows = torch.cat((kv_latent.float(), k_rot), dim=-1).to(k_cache.dtype)  # [T, L + d]
    slots = slot_mapping.long()
    write = ok & (slots >= 0) & (slots < num_slots)  # [T]
    first = torch.argmax(write.to(torch.int32)).view(1)  # [1] the first written row (0 when none)
    any_write = write.any()
    fallback_slot = torch.where(any_write, slots.index_select(0, first), 0)  # [1]
    fallback_row = torch.where(any_write, rows.index_select(0, first), cache_rows[:1])  # [1, L + d]
    index = torch.where(write, slots, fallback_slot)  # [T]
    values = torch.where(write[:, None], rows, fallback_row)  # [T, L + d]
    cache_rows.index_put_((index,), values)


# ---------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------

def _cuda_aligned(*pairs: tuple[torch.Tensor, tuple[int, ...]]) -> bool:
    """True when each tensor's address and the given element strides/offsets are multiples of 16 bytes."""
    for t, counts in pairs:
        es = t.element_size()
        if t.data_ptr() % 16:
            return False
        if any((c * es) % 16 for c in counts):
            return False
    return True


def _apply_rotary_impl(q_pe, k_pe, positions, cos_sin_cache, flag, interleaved, backend):
    """Validated inputs, returns (q_out, k_out); no value checks here (see ``_eager_value_checks``)."""
    T, H, d = q_pe.shape
    q_out = torch.empty((T, H, d), dtype=q_pe.dtype, device=q_pe.device)
    k_out = torch.empty(k_pe.shape, dtype=k_pe.dtype, device=k_pe.device)
    if T == 0:
        return q_out, k_out
    k2 = k_pe if k_pe.dim() == 2 else k_pe[:, 0]  # [T, d]
    k_out2 = k_out.view(T, d)
    if backend == "torch":
        qr, kr = apply_rotary_reference(q_pe, k2, positions, cos_sin_cache, interleaved)
        q_out.copy_(qr)
        k_out2.copy_(kr)
        _flag_bad_values(flag, positions, cos_sin_cache.shape[0])
    elif backend == "triton":
        from pykernels.triton import rope as triton_rope

        triton_rope.rope_rows(q_pe, q_out, k2, k_out2, None, positions, cos_sin_cache, None, flag,
                              interleaved=interleaved, copy_bad_rows=True)
    else:
        _cuda_launch(q_pe, q_out, k2, k_out2, None, positions, cos_sin_cache, None, flag, interleaved,
                     copy_bad_rows=True)
    return q_out, k_out


def _rope_and_cache_impl(q, kv_latent, k_pe, positions, cos_sin_cache, k_cache, slot_mapping, flag,
                         interleaved, backend):
    T, _, Dq = q.shape
    d = cos_sin_cache.shape[1]
    if T == 0:
        return
    k2 = k_pe if k_pe.dim() == 2 else k_pe[:, 0]  # [T, d]
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    cache_rows = k_cache.view(num_slots, k_cache.shape[-1])  # [num_slots, L + d]
    if backend == "torch":
        rope_and_cache_reference(q, kv_latent, k2, positions, cos_sin_cache, interleaved, k_cache, slot_mapping)
        _flag_bad_values(flag, positions, cos_sin_cache.shape[0], slot_mapping, num_slots)
        return
    q_rope = q[..., Dq - d:]  # [T, H, d] view, rotated in place
    if backend == "triton":
        from pykernels.triton import rope as triton_rope

        triton_rope.rope_rows(q_rope, q_rope, k2, cache_rows, kv_latent, positions, cos_sin_cache,
                              slot_mapping, flag, interleaved=interleaved, copy_bad_rows=False)
    else:
        _cuda_launch(q_rope, q_rope, k2, cache_rows, kv_latent, positions, cos_sin_cache, slot_mapping, flag,
                     interleaved, copy_bad_rows=False)


def _cuda_launch(q_src, q_dst, k_src, k_dst, latent, positions, cos_sin_cache, slots, flag, interleaved,
                 copy_bad_rows):
    """One launch of csrc/rope's kernel (see csrc/rope/rope.h); it takes the 16-byte path when it can."""
    T, H, d = q_src.shape
    _ext.require().rope_rows(
        q_src.data_ptr(), q_src.stride(0), q_src.stride(1), q_dst.data_ptr(), q_dst.stride(0), q_dst.stride(1),
        k_src.data_ptr(), k_src.stride(0), k_dst.data_ptr(), k_dst.stride(0), k_dst.shape[0],
        0 if latent is None else latent.data_ptr(), 0 if latent is None else latent.stride(0),
        0 if latent is None else latent.shape[1],
        positions.data_ptr(), positions.dtype == torch.int32, cos_sin_cache.data_ptr(), cos_sin_cache.shape[0],
        0 if slots is None else slots.data_ptr(), slots is not None and slots.dtype == torch.int32,
        flag.data_ptr(), T, H, d, _DTYPE_CODES[q_src.dtype], interleaved, copy_bad_rows, _ext.stream_of(q_src),
    )


_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# ---------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------

@torch.library.custom_op("pykernels::apply_rotary", mutates_args=("error_flag",))
def _apply_rotary_op(q_pe: torch.Tensor, k_pe: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor, error_flag: torch.Tensor, interleaved: bool,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    _eager_value_checks(positions, cos_sin_cache.shape[0])
    return _apply_rotary_impl(q_pe, k_pe, positions, cos_sin_cache, error_flag, interleaved, backend)


@_apply_rotary_op.register_fake
def _(q_pe, k_pe, positions, cos_sin_cache, error_flag, interleaved, backend):
    return torch.empty_like(q_pe, memory_format=torch.contiguous_format), torch.empty_like(
        k_pe, memory_format=torch.contiguous_format)


@torch.library.custom_op("pykernels::rope_and_cache", mutates_args=("q", "k_cache", "error_flag"))
def _rope_and_cache_op(q: torch.Tensor, kv_latent: torch.Tensor, k_pe: torch.Tensor, positions: torch.Tensor,
                       cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       error_flag: torch.Tensor, interleaved: bool, backend: str) -> None:
    _eager_value_checks(positions, cos_sin_cache.shape[0], slot_mapping, k_cache.shape[0] * k_cache.shape[1])
    _rope_and_cache_impl(q, kv_latent, k_pe, positions, cos_sin_cache, k_cache, slot_mapping, error_flag,
                         interleaved, backend)


@_rope_and_cache_op.register_fake
def _(q, kv_latent, k_pe, positions, cos_sin_cache, k_cache, slot_mapping, error_flag, interleaved, backend):
    return None


# ---------------------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------------------

# backend=None on CUDA: the CUDA kernel when its 16-byte path applies, else Triton. Both are one launch;
# the choice is revisited with the H200 numbers of bench/bench_rope.py.
_CUDA_PREFERENCE = ("cuda", "triton", "torch")


def _check_rope(rope: object, device: torch.device) -> YarnRotary:
    if not isinstance(rope, YarnRotary):
        raise TypeError(f"rope: expected a pykernels.YarnRotary, got {type(rope).__name__}")
    if _canonical(rope.device) != _canonical(device):
        raise ValueError(f"rope: its table is on {rope.device} but the inputs are on {device}; "
                         f"build it with YarnRotary(..., device=...) or use rope.to(device)")
    return rope


def _check_k_pe(k_pe: object, T: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    check_tensor("k_pe", k_pe, dtype=dtype, last_dim_contiguous=True)
    if k_pe.dim() == 2:
        check_tensor("k_pe", k_pe, shape=(T, d))
    elif k_pe.dim() == 3:
        check_tensor("k_pe", k_pe, shape=(T, 1, d))
    else:
        raise ValueError(f"k_pe: expected shape ({T}, {d}) or ({T}, 1, {d}), got {tuple(k_pe.shape)}")
    return k_pe


def _check_positions(positions: object, T: int) -> torch.Tensor:
    check_tensor("positions", positions, dtype=INDEX_DTYPES, shape=(T,))
    return positions.contiguous()


def _pick_backend(op: str, backend: str | None, device: torch.device, cuda_ok: bool) -> str:
    chosen = _backend.resolve(op, backend, device, BACKENDS, _CUDA_PREFERENCE)
    if chosen == "cuda" and not hasattr(_ext.require(), "rope_rows"):
        if backend == "cuda":
            raise ValueError("backend: 'cuda' needs pykernels._C built with csrc/rope (rebuild the extension)")
        cuda_ok = False
    if chosen == "cuda" and backend is None and not cuda_ok:
        chosen = _backend.resolve(op, None, device, BACKENDS, ("triton", "torch"))
    return chosen


def apply_rotary(q_pe: torch.Tensor, k_pe: torch.Tensor, positions: torch.Tensor, rope: YarnRotary, *,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q_pe [T, H, d]`` and ``k_pe [T, d]`` (or ``[T, 1, d]``) by ``rope`` at ``positions [T]``.

    ``d = rope.rotary_dim``; dtypes bf16, fp16 or fp32 (the same for both), rows may be strided but the last
    dimension must be contiguous; ``positions`` int64 or int32 on the same device, in ``[0, rope.max_position)``
    (see the module doc for out-of-range values). Returns new contiguous tensors of the inputs' shapes and
    dtype; the arithmetic is float32. ``backend``: None (fastest for the device), "torch", "triton", "cuda".
    """
    check_tensor("q_pe", q_pe, dtype=FLOAT_DTYPES, ndim=3, last_dim_contiguous=True)
    T, _, d = q_pe.shape
    rope = _check_rope(rope, q_pe.device)
    if d != rope.rotary_dim:
        raise ValueError(f"q_pe: expected last dimension rope.rotary_dim = {rope.rotary_dim}, got shape "
                         f"{tuple(q_pe.shape)}")
    _check_k_pe(k_pe, T, d, q_pe.dtype)
    positions = _check_positions(positions, T)
    check_same_device(("q_pe", "k_pe", "positions"), (q_pe, k_pe, positions))
    cuda_ok = q_pe.device.type == "cuda" and T > 0 and _cuda_aligned(
        (q_pe, (q_pe.stride(0), q_pe.stride(1), 2 * d)), (k_pe, (k_pe.stride(0),)))
    chosen = _pick_backend("apply_rotary", backend, q_pe.device, cuda_ok)
    return _apply_rotary_op(q_pe, k_pe, positions, rope.cos_sin_cache, error_flag(q_pe.device),
                            rope.interleaved, chosen)


def rope_and_cache(q: torch.Tensor, kv_latent: torch.Tensor, k_pe: torch.Tensor, positions: torch.Tensor,
                   rope: YarnRotary, k_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                   backend: str | None = None) -> None:
    """Fused step: rotate ``q[..., -d:]`` in place and write ``cat(kv_latent, rotate(k_pe))`` into the cache.

    Args (``d = rope.rotary_dim``, ``L = kv_latent.shape[-1]``):
        q:            ``[T, H, Dq]``, ``Dq >= d``; only the last d columns are rotated, in place. Rows may be
                      strided (a slice of a bigger buffer) but the last dimension must be contiguous.
        kv_latent:    ``[T, L]``, last dimension contiguous.
        k_pe:         ``[T, d]`` or ``[T, 1, d]``, last dimension contiguous.
        positions:    int64 or int32 ``[T]``, in ``[0, rope.max_position)``.
        k_cache:      ``[num_blocks, block_size, 1, L + d]``, contiguous; written in place. Its byte layout:
                      row ``slot = block * block_size + offset`` holds ``L`` latent values then the d
                      rotated rope values.
        slot_mapping: int64 (or int32) ``[T]``: the cache row of each token; -1 skips the token (padding).
    q, kv_latent, k_pe and k_cache share one dtype (bf16, fp16 or fp32). One kernel launch on CUDA.
    """
    check_tensor("q", q, dtype=FLOAT_DTYPES, ndim=3, last_dim_contiguous=True)
    T, _, Dq = q.shape
    rope = _check_rope(rope, q.device)
    d = rope.rotary_dim
    if Dq < d:
        raise ValueError(f"q: expected last dimension >= rope.rotary_dim = {d}, got shape {tuple(q.shape)}")
    check_tensor("kv_latent", kv_latent, dtype=q.dtype, ndim=2, last_dim_contiguous=True)
    if kv_latent.shape[0] != T:
        raise ValueError(f"kv_latent: expected {T} rows like q, got shape {tuple(kv_latent.shape)}")
    L = kv_latent.shape[1]
    _check_k_pe(k_pe, T, d, q.dtype)
    check_tensor("k_cache", k_cache, dtype=q.dtype, ndim=4, contiguous=True)
    if k_cache.shape[2] != 1 or k_cache.shape[3] != L + d:
        raise ValueError(f"k_cache: expected shape (num_blocks, block_size, 1, {L + d}) (kv_latent's {L} + "
                         f"rope.rotary_dim {d}), got {tuple(k_cache.shape)}")
    positions = _check_positions(positions, T)
    check_tensor("slot_mapping", slot_mapping, dtype=INDEX_DTYPES, shape=(T,))
    slot_mapping = slot_mapping.contiguous()
    check_same_device(("q", "kv_latent", "k_pe", "positions", "k_cache", "slot_mapping"),
                      (q, kv_latent, k_pe, positions, k_cache, slot_mapping))
    cuda_ok = q.device.type == "cuda" and T > 0 and _cuda_aligned(
        (q, (q.stride(0), q.stride(1), Dq - d, 2 * d)), (k_pe, (k_pe.stride(0),)),
        (kv_latent, (kv_latent.stride(0), L)), (k_cache, (L + d,)))
    chosen = _pick_backend("rope_and_cache", backend, q.device, cuda_ok)
    _rope_and_cache_op(q, kv_latent, k_pe, positions, rope.cos_sin_cache, k_cache, slot_mapping,
                       error_flag(q.device), rope.interleaved, chosen)
