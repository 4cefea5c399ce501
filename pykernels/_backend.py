"""Backend choice shared by every public op.

``backend=None`` picks the fastest correct backend for the device: the first entry of the op's
CUDA preference list that is available, and the torch reference on the CPU. ``"triton"`` on a CPU
tensor runs only under Triton's interpreter (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import torch

BACKENDS = ("torch", "triton", "cuda")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_usable(device: torch.device) -> bool:
    return triton_available() and (device.type == "cuda" or triton_interpreted())


def cuda_ext_usable(device: torch.device) -> bool:
    from pykernels import _ext

    return device.type == "cuda" and _ext.available()


_USABLE: dict[str, Callable[[torch.device], bool]] = {
    "torch": lambda device: True,
    "triton": triton_usable,
    "cuda": cuda_ext_usable,
}


def resolve(
    op: str,
    backend: str | None,
    device: torch.device,
    supported: Sequence[str],
    cuda_preference: Sequence[str] | None = None,
) -> str:
    """Return the backend that runs ``op`` on ``device``.

    ``supported`` lists the backends the op has; ``cuda_preference`` orders them fastest first for
    CUDA tensors (default: ``supported`` reversed, i.e. cuda, triton, torch).
    """
    if backend is None:
        if device.type != "cuda":
            return "torch"
        order = cuda_preference if cuda_preference is not None else tuple(reversed(supported))
        for name in order:
            if _USABLE[name](device):
                return name
        return "torch"
    if backend not in supported:
        raise ValueError(f"backend: {op} supports {', '.join(map(repr, supported))} or None, got {backend!r}")
    if not _USABLE[backend](device):
        why = {
            "triton": "needs a CUDA tensor (or TRITON_INTERPRET=1 on the CPU) and an importable triton",
            "cuda": "needs a CUDA tensor and the compiled extension pykernels._C",
        }[backend]
        raise ValueError(f"backend: {backend!r} for {op} {why}; got a tensor on {device}")
    return backend


def direct_call_ok(*tensors: torch.Tensor) -> bool:
    """Whether an eager call may launch a kernel directly instead of through its ``torch.library`` op.

    The op's dispatch costs more host time than a small kernel runs (tens of µs a call), so plain eager
    calls skip it; the op stays the entry point wherever it matters: under ``torch.compile`` (tracing),
    under a dispatch or function mode (FakeTensorMode, meta propagation, ``with torch.device``), for
    tensor subclasses, and for inputs that require grad (the op has no autograd formula, so backward
    through it raises instead of silently giving no gradient).
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled()
    return all(type(t) is torch.Tensor and not (grad and t.requires_grad) for t in tensors)
