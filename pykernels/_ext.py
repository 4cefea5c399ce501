"""The compiled extension ``pykernels._C``, if it was built, and the conventions for calling it.

Kernels in the extension take raw device addresses, sizes and the current ``cudaStream_t`` as
Python integers (``tensor.data_ptr()``, ``torch.cuda.current_stream().cuda_stream``).
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch

try:
    from pykernels import _C as _module
except ImportError as error:  # built without nvcc, or not built at all
    _module, _IMPORT_ERROR = None, error
else:
    _IMPORT_ERROR = None


def built() -> bool:
    """True when pykernels._C was compiled and imports."""
    return _module is not None


@functools.cache
def available() -> bool:
    """True when the extension is built and a CUDA device is visible to it."""
    return _module is not None and _module.device_count() > 0


def require() -> ModuleType:
    """The extension module, or a RuntimeError saying why it is missing."""
    if _module is None:
        raise RuntimeError(
            "pykernels._C is not built (install with nvcc on PATH, or PYKERNELS_BUILD_EXT=1): "
            f"{_IMPORT_ERROR}"
        )
    return _module


def stream_of(t: torch.Tensor) -> int:
    """The current CUDA stream of t's device, as the integer the extension expects."""
    return torch.cuda.current_stream(t.device).cuda_stream


def copy_2d(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` for 2-D CUDA tensors of one dtype whose rows are contiguous, by the extension.

    The smallest kernel of the extension: it exercises the build and the pointer/stream convention.
    """
    from pykernels._checks import check_same_device, check_tensor

    check_tensor("src", src, ndim=2, last_dim_contiguous=True)
    check_tensor("dst", dst, dtype=src.dtype, shape=tuple(src.shape), last_dim_contiguous=True)
    check_same_device(("src", "dst"), (src, dst))
    if src.device.type != "cuda":
        raise ValueError(f"src: expected a CUDA tensor, got one on {src.device}")
    elem = src.element_size()
    require().copy_2d(
        dst.data_ptr(), dst.stride(0) * elem, src.data_ptr(), src.stride(0) * elem,
        src.size(0), src.size(1) * elem, stream_of(src),
    )
    return dst
