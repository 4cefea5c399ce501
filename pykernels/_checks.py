"""Input validation shared by every public op.

Every check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape, device,
layout or value) whose message names the argument, what was expected and what was given.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def check_tensor(
    name: str,
    t: object,
    *,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
    contiguous: bool = False,
    last_dim_contiguous: bool = False,
) -> torch.Tensor:
    """Check one tensor argument; ``None`` in ``shape`` matches any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed:
            want = " or ".join(str(d).removeprefix("torch.") for d in allowed)
            raise TypeError(f"{name}: expected dtype {want}, got {str(t.dtype).removeprefix('torch.')}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        for axis, (want, got) in enumerate(zip(shape, t.shape)):
            if want is not None and want != got:
                expected = tuple("*" if s is None else s for s in shape)
                raise ValueError(
                    f"{name}: expected shape {expected}, got {tuple(t.shape)} (dimension {axis} differs)"
                )
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    if last_dim_contiguous and t.dim() > 0 and t.size(-1) > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected stride 1 in the last dimension, got strides {t.stride()}")
    return t


def check_same_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """All tensors share the first one's dtype."""
    first = tensors[0].dtype
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != first:
            raise TypeError(f"{name}: expected dtype {first} like {names[0]}, got {t.dtype}")


def check_same_device(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """All tensors live on the first one's device."""
    first = tensors[0].device
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != first:
            raise ValueError(f"{name}: expected a tensor on {first} like {names[0]}, got one on {t.device}")


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def check_choice(name: str, value: object, choices: Sequence[object]) -> object:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def value_checks_enabled(t: torch.Tensor) -> bool:
    """Whether an op inspects the *values* of an index tensor like ``t`` (block ids, lengths, positions, slots).

    Always for CPU tensors. For CUDA tensors only when ``PYKERNELS_CHECK_VALUES=1``, because reading
    values back costs a host synchronisation, which decode-path ops must not do; and never while a CUDA
    graph is being captured or under ``torch.compile``. Kernels stay memory-safe without these checks:
    they mask out-of-range ids instead of reading or writing outside their buffers.
    """
    if torch.compiler.is_compiling():
        return False  # values are not known while tracing
    if t.device.type != "cuda":
        return True
    import os

    if os.environ.get("PYKERNELS_CHECK_VALUES", "0") != "1":
        return False
    return not torch.cuda.is_current_stream_capturing()
