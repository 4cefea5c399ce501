"""NVTX ranges for Nsight Systems timelines and Nsight Compute filtering, free when profiling is off.

    from pykernels.profiling import nvtx_range

    with nvtx_range("mla_decode"):          # a context manager
        ...

    @nvtx_range("moe_ffn")                   # or a decorator
    def moe_ffn(...): ...

Ranges are emitted only when enabled: environment ``PYKERNELS_NVTX=1`` (read at import) or
``enable_nvtx(True)``. They go through the ``nvtx`` package when it is importable and through
``torch.cuda.nvtx`` otherwise. When off, ``nvtx_range`` returns one shared no-op object: no
allocation, no call into NVTX. A decorated function checks the switch on each call (one global
read), so ``enable_nvtx`` also affects functions decorated before it was called.

Names: keep "/" out of them. Nsight Compute's ``--nvtx-include "A/"`` selects the kernels inside the
push/pop range A and inside every range nested in it, and reads "/" as the separator of nested ranges
("A/B/"); a range whose own name holds a "/" cannot be selected at all (seen with ncu 2025.3). Spaces,
"=" and ":" are fine: ``"decode step"``, ``"layer 3 attention"``, ``"mla_decode triton b=64 s=4096"``.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_enabled: bool = os.environ.get("PYKERNELS_NVTX", "0") not in ("", "0")
_push_pop: tuple[Callable[[str], Any], Callable[[], Any]] | None = None


def enable_nvtx(on: bool = True) -> None:
    """Turn NVTX ranges on or off for the whole process."""
    global _enabled
    _enabled = bool(on)


def nvtx_enabled() -> bool:
    return _enabled


def _backend() -> tuple[Callable[[str], Any], Callable[[], Any]]:
    """(push, pop): the ``nvtx`` package's, else torch.cuda.nvtx's. Resolved once."""
    global _push_pop
    if _push_pop is None:
        try:
            import nvtx

            _push_pop = (lambda name: nvtx.push_range(message=name), nvtx.pop_range)
        except ImportError:
            import torch.cuda.nvtx as tnvtx

            _push_pop = (tnvtx.range_push, tnvtx.range_pop)
    return _push_pop


class _NoRange:
    """The shared object ``nvtx_range`` returns when profiling is off.

    NOTES: ``name`` is the last name ``nvtx_range`` was called with while off; only the decorator
    path reads it, right after that call (``@nvtx_range("x")`` evaluates both in one expression).
    """

    __slots__ = ("name",)

    def __init__(self) -> None:
        self.name = ""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None

    def __call__(self, fn: F) -> F:
        return _decorate(fn, self)


_NO_RANGE = _NoRange()


class _Range:
    """An NVTX range named ``name``: push on enter, pop on exit."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> None:
        _backend()[0](self.name)

    def __exit__(self, *exc: object) -> None:
        _backend()[1]()

    def __call__(self, fn: F) -> F:
        return _decorate(fn, self)


def _decorate(fn: F, rng: _Range | _NoRange) -> F:
    name = rng.name or getattr(fn, "__qualname__", repr(fn))

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not _enabled:
            return fn(*args, **kwargs)
        push, pop = _backend()
        push(name)
        try:
            return fn(*args, **kwargs)
        finally:
            pop()

    return wrapper  # type: ignore[return-value]


def nvtx_range(name: str) -> _Range | _NoRange:
    """A context manager / decorator that marks an NVTX range named ``name`` while profiling is on.

    As a decorator the name is bound at decoration time and the on/off switch is read on each call.
    """
    if not _enabled:
        _NO_RANGE.name = name
        return _NO_RANGE
    return _Range(name)
