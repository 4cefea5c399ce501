"""``pk.ep.Buffer``: expert-parallel dispatch and combine with a DeepEP-style handle.

The math, for one source rank with ``T`` tokens and ``K`` routing slots per token, over a group of
``W`` ranks and ``E`` experts placed contiguously (rank ``r`` owns experts ``[r·E/W, (r+1)·E/W)``)::

    E_local = E / W
    dispatch: every slot (t, k) with e = topk_ids[t, k] >= 0 becomes one row x[t] on rank e // E_local,
              for local expert e % E_local, carrying the weight topk_weights[t, k]; a rank's rows are
              grouped by local expert (ready for pk.grouped_ffn); -1 in topk_ids marks an empty slot.
    combine:  y[t] = Σ_k topk_weights[t, k] · expert_out[row of (t, k)]   (float32 sums, cast to dtype)

On the wire a token row crosses to a rank once, however many of its K experts that rank owns (DeepEP's
scheme): the receiver expands it into one row per (token, local expert), and combine first reduces
the weighted expert outputs of a token on the expert's rank, then sends one row per token back. With
DeepSeek-V2's device-limited routing (topk_group = 3 groups of devices) a token crosses to at most 3
ranks instead of 6 expert rows.

Backends: ``"torch"`` (``torch.distributed.all_to_all_single``; NCCL on GPUs, also across nodes, or
gloo on CPUs) and ``"nvlink"`` (the GPUs of one host; CUDA IPC buffers and SM-driven copies in the
extension, see ``pykernels/ep/nvlink.py``). docs/expert_parallel.md has the design, including the
multi-node scheme.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pykernels._checks import check_choice, check_positive_int, check_tensor
from pykernels.profiling import nvtx_range

BACKENDS = ("torch", "nvlink")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# A rank that has not arrived after this long is taken for dead: the others raise EPTimeoutError.
DEFAULT_TIMEOUT_S = 60.0
# Routing slots per token the NVLink buffers are sized for: DeepSeek-V2 routes 6, V3 8.
DEFAULT_MAX_TOP_K = 8

# NVLink multicast (NVLS) stays off on the lent machines: any code path that may create an NCCL
# communicator or symmetric memory sets these first (setdefault: an explicit user setting wins).
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def disable_multicast() -> None:
    """Set the environment that keeps NCCL, torch symmetric memory and NVSHMEM off NVLink multicast."""
    for key, value in NO_MULTICAST_ENV.items():
        os.environ.setdefault(key, value)


class EPError(RuntimeError):
    """A dispatch or combine failed because of another rank (it died, or sent inconsistent input)."""


class EPTimeoutError(EPError, TimeoutError):
    """A rank of the group did not arrive at a dispatch or combine within the buffer's timeout."""


@dataclass(frozen=True)
class BufferSizes:
    """Static sizes a configuration needs (``Buffer.size_hint``); all counts are per rank.

    ``max_recv_token_rows``: token rows a rank can receive in one dispatch, ``W · max_tokens_per_rank``.
    ``max_recv_expert_rows``: rows of ``recv_x`` at most, ``W · max_tokens_per_rank · max_top_k``; the
    low-latency mode returns ``W · max_tokens_per_rank · K`` rows for a call with K slots (the tail past
    ``tokens_per_expert.sum()`` is padding).
    ``dispatch_row_bytes``: one token row on the NVLink wire: hidden values + per slot an int32 local
    expert, an int32 index and a float32 weight, rounded up to 16 bytes. ``nvlink_bytes``: the CUDA-IPC memory each rank shares (two
    alternating sets of dispatch and combine slots, one per source rank, plus signals).
    """

    max_recv_token_rows: int
    max_recv_expert_rows: int
    dispatch_row_bytes: int
    combine_row_bytes: int
    nvlink_bytes: int


@dataclass
class DispatchHandle:
    """What ``Buffer.combine`` needs to send expert outputs back; returned by ``Buffer.dispatch``.

    Common fields: ``backend``; ``num_tokens`` = T on this (source) rank; ``num_recv_rows`` = R, the
    rows of ``recv_x`` (for the low-latency mode, its fixed capacity); ``low_latency``.
    A handle is valid for one combine of the dispatch that made it, on the buffer that made it.
    """

    backend: str
    num_tokens: int
    num_recv_rows: int
    low_latency: bool


@dataclass
class TorchDispatchHandle(DispatchHandle):
    """Handle of the ``"torch"`` backend.

    ``send_token``: int64 ``[S]`` token index of each row sent, grouped by destination rank (ranks in
    order, tokens ascending); ``send_splits[r]`` / ``recv_splits[r]``: token rows sent to / received
    from rank r (host ints); ``recv_row``: int64 ``[R]`` the received token row each expert row was
    expanded from; ``recv_weights``: float32 ``[R]`` the weight of each expert row.
    """

    send_token: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    recv_row: torch.Tensor
    recv_weights: torch.Tensor


def _local_host() -> str:
    return socket.gethostname()


class Buffer:
    """Expert-parallel all-to-all over the ranks of ``group``.

    Args:
        group: a ``torch.distributed`` process group (None: the default group). Every rank of it
            constructs the buffer with the same arguments and then calls ``dispatch`` and ``combine``
            in the same order.
        hidden: H, the row width of ``x``.
        num_experts: E, divisible by the group size; rank r owns experts ``[r·E/W, (r+1)·E/W)``.
        max_tokens_per_rank: the most tokens one rank passes to one ``dispatch`` (the NVLink buffers'
            capacity; also checked by the torch backend).
        dtype: the dtype of ``x`` and of the expert outputs (bf16, fp16 or fp32).
        backend: ``"torch"``, ``"nvlink"`` or None (nvlink when the group is the CUDA GPUs of one host
            and the extension is built; torch otherwise).
        max_top_k: the most routing slots per token (sizes the NVLink buffers).
        timeout_s: a rank that has not arrived after this many seconds makes the others raise
            ``EPTimeoutError``.
        device: the device of the tensors (None: the current CUDA device for an NCCL group, else the CPU).

    NOTES: all ranks must call ``dispatch``/``combine`` the same number of times, in the same order;
    every call on the current stream of ``device``. After an ``EPError`` the buffer (and for the torch
    backend the process group) is unusable: a collective may still be pending. ``close()`` (collective)
    frees the NVLink memory. dispatch/combine are not torch.library custom ops (they are collective and
    keep state); the nvlink low-latency mode is captured in CUDA graphs directly.
    """

    def __init__(self, group: dist.ProcessGroup | None, hidden: int, num_experts: int, max_tokens_per_rank: int,
                 dtype: torch.dtype = torch.bfloat16, backend: str | None = None, *,
                 max_top_k: int = DEFAULT_MAX_TOP_K, timeout_s: float = DEFAULT_TIMEOUT_S,
                 device: torch.device | str | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("group: torch.distributed is not initialised (call init_process_group first)")
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.hidden = check_positive_int("hidden", hidden)
        self.num_experts = check_positive_int("num_experts", num_experts)
        if num_experts % self.world_size:
            raise ValueError(f"num_experts: expected a multiple of the group size {self.world_size}, got {num_experts}")
        self.num_local_experts = num_experts // self.world_size
        self.max_tokens_per_rank = check_positive_int("max_tokens_per_rank", max_tokens_per_rank)
        if dtype not in DTYPES:
            raise TypeError(f"dtype: expected bfloat16, float16 or float32, got {dtype}")
        self.dtype = dtype
        self.max_top_k = check_positive_int("max_top_k", max_top_k)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.device = self._resolve_device(device)
        check_choice("backend", backend, BACKENDS + (None,))
        self.backend = self._resolve_backend(backend)
        self._nvlink = None
        if self.backend == "nvlink":
            from pykernels.ep.nvlink import NvlinkState

            self._nvlink = NvlinkState(self)

    # -- configuration -------------------------------------------------------------------------

    @staticmethod
    def size_hint(num_ranks: int, hidden: int, num_experts: int, max_tokens_per_rank: int,
                  max_top_k: int = DEFAULT_MAX_TOP_K, dtype: torch.dtype = torch.bfloat16) -> BufferSizes:
        """The static sizes of a configuration (see ``BufferSizes``), without creating a buffer."""
        for name, value in (("num_ranks", num_ranks), ("hidden", hidden), ("num_experts", num_experts),
                            ("max_tokens_per_rank", max_tokens_per_rank), ("max_top_k", max_top_k)):
            check_positive_int(name, value)
        if num_experts % num_ranks:
            raise ValueError(f"num_experts: expected a multiple of num_ranks {num_ranks}, got {num_experts}")
        elem = torch.empty((), dtype=dtype).element_size()
        local = num_experts // num_ranks
        token_rows = num_ranks * max_tokens_per_rank
        from pykernels.ep.nvlink import dispatch_row_bytes, shared_bytes

        dispatch_row = dispatch_row_bytes(hidden * elem, max_top_k)
        combine_row = _round_up(hidden * elem, 16)

        return BufferSizes(
            max_recv_token_rows=token_rows,
            max_recv_expert_rows=token_rows * max_top_k,
            dispatch_row_bytes=dispatch_row,
            combine_row_bytes=combine_row,
            nvlink_bytes=shared_bytes(num_ranks, local, max_tokens_per_rank, dispatch_row, combine_row),
        )

    @property
    def sizes(self) -> BufferSizes:
        return Buffer.size_hint(self.world_size, self.hidden, self.num_experts, self.max_tokens_per_rank,
                                self.max_top_k, self.dtype)

    @property
    def local_experts(self) -> range:
        """The global ids of the experts this rank owns."""
        return range(self.rank * self.num_local_experts, (self.rank + 1) * self.num_local_experts)

    def _resolve_device(self, device: torch.device | str | None) -> torch.device:
        if device is not None:
            device = torch.device(device)
        elif "nccl" in str(dist.get_backend(self.group)).lower() and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.type == "cuda":
            disable_multicast()
        return device

    def _resolve_backend(self, backend: str | None) -> str:
        if backend == "torch" or (backend is None and self.device.type != "cuda"):
            return "torch"
        from pykernels.ep import nvlink

        elem = torch.empty((), dtype=self.dtype).element_size()
        why = nvlink.unusable_reason(self.device, self.world_size, self.hidden * elem, self.num_local_experts,
                                     self.max_top_k)
        # Every rank must take the same decision: gather each rank's host and its reason not to.
        views: list = [None] * self.world_size
        dist.all_gather_object(views, (_local_host(), why), group=self.group)
        hosts = {host for host, _ in views}
        reasons = [f"rank {r}: {reason}" for r, (_, reason) in enumerate(views) if reason]
        if len(hosts) > 1:
            reasons.append(f"the group spans {len(hosts)} hosts ({', '.join(sorted(hosts))})")
        if not reasons:
            return "nvlink"
        if backend is None:
            return "torch"
        raise ValueError(f"backend: 'nvlink' needs the CUDA GPUs of one host and the compiled extension; "
                         f"{'; '.join(reasons)}")

    # -- validation ----------------------------------------------------------------------------

    def _check_dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                        check_values: bool) -> None:
        check_tensor("x", x, ndim=2, last_dim_contiguous=True)
        if x.size(1) != self.hidden:
            raise ValueError(f"x: expected hidden size {self.hidden} (the buffer's), got shape {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise TypeError(f"x: expected dtype {self.dtype} (the buffer's), got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"x: expected a tensor on {self.device} (the buffer's device), got one on {x.device}")
        T = x.size(0)
        if T > self.max_tokens_per_rank:
            raise ValueError(f"x: {T} tokens exceed the buffer's max_tokens_per_rank {self.max_tokens_per_rank}")
        check_tensor("topk_ids", topk_ids, dtype=(torch.int32, torch.int64), ndim=2, device=self.device)
        if topk_ids.size(0) != T:
            raise ValueError(f"topk_ids: expected {T} rows like x, got shape {tuple(topk_ids.shape)}")
        K = topk_ids.size(1)
        if not 1 <= K <= self.max_top_k:
            raise ValueError(f"topk_ids: expected 1..{self.max_top_k} (max_top_k) columns, got shape "
                             f"{tuple(topk_ids.shape)}")
        check_tensor("topk_weights", topk_weights, dtype=torch.float32, shape=(T, K), device=self.device)
        if check_values and topk_ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(topk_ids))
            if lo < -1 or hi >= self.num_experts:
                raise ValueError(f"topk_ids: expected expert ids in [-1, {self.num_experts}) (-1 = empty slot), "
                                 f"got values in [{lo}, {hi}]")

    def _check_combine(self, expert_out: torch.Tensor, handle: DispatchHandle) -> None:
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle: expected the DispatchHandle returned by dispatch, got {type(handle).__name__}")
        if handle.backend != self.backend:
            raise ValueError(f"handle: made by the {handle.backend!r} backend, this buffer uses {self.backend!r}")
        check_tensor("expert_out", expert_out, ndim=2, last_dim_contiguous=True)
        if expert_out.dtype != self.dtype:
            raise TypeError(f"expert_out: expected dtype {self.dtype} (the buffer's), got {expert_out.dtype}")
        want = (handle.num_recv_rows, self.hidden)
        if tuple(expert_out.shape) != want:
            raise ValueError(f"expert_out: expected shape {want} (recv_x's rows, hidden), got {tuple(expert_out.shape)}")
        if expert_out.device != self.device:
            raise ValueError(f"expert_out: expected a tensor on {self.device}, got one on {expert_out.device}")

    # -- the two calls -------------------------------------------------------------------------

    @nvtx_range("ep dispatch")
    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                 low_latency: bool = False, return_hook: bool = False):
        """Send each token's row to the ranks that own its experts.

        Args:
            x: ``[T, hidden]`` in the buffer's dtype, ``T <= max_tokens_per_rank`` (T may be 0).
            topk_ids: int32/int64 ``[T, K]`` global expert ids in ``[0, E)``, or -1 for an empty slot;
                K is the same on every rank.
            topk_weights: float32 ``[T, K]``.
            low_latency: nvlink only: fixed capacity, no host synchronisation, CUDA-graph capturable;
                ``recv_x`` then has ``W · max_tokens_per_rank · K`` rows, the valid ones first.
            return_hook: nvlink only: return after the sends are issued, with a ``hook`` as 6th
                element; calling ``hook()`` issues the receive (the outputs are valid after it).

        Returns:
            ``recv_x`` ``[R, hidden]`` rows grouped by local expert (expert 0's rows first),
            ``recv_expert_ids`` int32 ``[R]`` local expert of each row (-1 on low-latency padding),
            ``recv_weights`` float32 ``[R]`` (0 on padding), ``tokens_per_expert`` int32
            ``[num_local_experts]``, and the ``DispatchHandle`` for ``combine``.
            Within an expert, the order of rows is unspecified.

        The torch backend validates the ids' values (it synchronises with the host anyway); the nvlink
        backend does so where ``pykernels._checks.value_checks_enabled`` allows, and its kernels skip
        out-of-range ids otherwise.
        """
        if not isinstance(low_latency, bool) or not isinstance(return_hook, bool):
            raise TypeError("low_latency, return_hook: expected bools")
        if self.backend == "torch":
            if low_latency or return_hook:
                name = "low_latency" if low_latency else "return_hook"
                raise ValueError(f"{name}: needs backend='nvlink'; this buffer uses 'torch'")
            self._check_dispatch(x, topk_ids, topk_weights, check_values=True)
            from pykernels.ep import torch_backend

            return torch_backend.dispatch(self, x, topk_ids, topk_weights)
        from pykernels._checks import value_checks_enabled

        self._check_dispatch(x, topk_ids, topk_weights, check_values=value_checks_enabled(topk_ids))
        return self._nvlink.dispatch(x, topk_ids, topk_weights, low_latency, return_hook)

    @nvtx_range("ep combine")
    def combine(self, expert_out: torch.Tensor, handle: DispatchHandle, *, return_hook: bool = False):
        """``y [T, hidden]`` on the source rank: ``y[t] = Σ_k topk_weights[t, k] · expert_out[row of (t, k)]``.

        Args:
            expert_out: ``[R, hidden]`` in the buffer's dtype, row i the expert output of ``recv_x[i]``
                (rows past ``tokens_per_expert.sum()`` in the low-latency mode are ignored).
            handle: the ``DispatchHandle`` of the matching dispatch.
            return_hook: nvlink only: return ``(y, hook)``; ``y`` is valid after ``hook()``.
        """
        if not isinstance(return_hook, bool):
            raise TypeError(f"return_hook: expected a bool, got {type(return_hook).__name__}")
        self._check_combine(expert_out, handle)
        if self.backend == "torch":
            if return_hook:
                raise ValueError("return_hook: needs backend='nvlink'; this buffer uses 'torch'")
            from pykernels.ep import torch_backend

            return torch_backend.combine(self, expert_out, handle)
        return self._nvlink.combine(expert_out, handle, return_hook)

    def check_errors(self) -> None:
        """Raise the error a kernel of an earlier nvlink call reported (a peer that timed out): the
        low-latency mode never waits on the host, so this (or the next call) is where it surfaces.
        Reads host-mapped memory, no synchronisation; a no-op for the torch backend."""
        if self._nvlink is not None:
            self._nvlink.check_errors()

    def close(self) -> None:
        """Release the NVLink buffers (after every rank's last combine); a no-op for the torch backend."""
        if self._nvlink is not None:
            self._nvlink.close()
            self._nvlink = None


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
