"""The ``"nvlink"`` backend of ``pk.ep.Buffer``: the GPUs of one host, CUDA IPC and SM-driven copies.

Each rank allocates one block of device memory (``shared_bytes``) with the extension, and the ranks
exchange its CUDA IPC handle over the process group once, at construction. From then on a call moves
data with kernels only (csrc/ep/, the protocol is described in csrc/ep/ep.h):

    dispatch  send kernel: each token row is stored once into every destination rank's block (16-byte
              stores over NVLink) with its routing metadata; slots and per-expert indices come from
              device atomics; the last block writes the counts and a release flag to every rank.
              receive kernel: spins on the flags (acquire, bounded by the timeout), scans the counts and
              expands the rows into recv_x grouped by local expert.
    combine   send kernel: per received token row, the weighted sum of its expert rows (float32) stored
              into the source rank's block, then a flag; receive kernel: waits, adds each token's rows.

Normal mode (prefill): the receive kernel runs twice, first to wait and count (the host reads the
number of rows, one synchronisation, so recv_x has exactly R rows), then to expand. Low-latency mode
(decode): recv_x has a fixed capacity (``W · max_tokens_per_rank · K`` rows, valid rows first), nothing waits on the host, and dispatch and combine can be captured in CUDA graphs; with
``return_hook=True`` the receive kernel is left to a hook, so other work can run between the two.

A rank that does not arrive makes the receive kernels give up after ``timeout_s``: they leave an
error code in host-mapped memory, which the next call (or ``Buffer.check_errors()``) turns into an
``EPTimeoutError``. The outputs of the failed call are garbage and the buffer stays failed.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pykernels import _ext
from pykernels.ep.buffer import Buffer, DispatchHandle, EPError, EPTimeoutError

# Limits of the kernels (csrc/ep/common.cuh): ranks of one host, slots per token, experts per rank.
MAX_RANKS = 8
MAX_TOP_K = 16
MAX_LOCAL_EXPERTS = 512
# Rows a block stages per step (kMaxTile): the grid spreads rows so that every SM gets some.
MAX_TILE = 32
# The flags area (two u64 arrays of [2 parities][8 ranks]) padded so the counts start aligned.
SIGNAL_BYTES = 512
# Routing metadata per slot after each dispatch row: int32 local expert, int32 index, float32 weight.
META_BYTES_PER_SLOT = 12
# Workspace: u64 sequence numbers [4], u32 done counters [4], u32 rows per destination [8], then
# u32 pairs per (destination, local expert).
WORKSPACE_HEADER_BYTES = 128
# Mode bits of the receive kernel.
WAIT, EXPAND, PAD = 1, 2, 4
DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
ERROR_MESSAGES = {
    1: "dispatch: rank {rank} waited {timeout:g} s (timeout_s) for the rows of rank {peer}, which did not "
       "call dispatch or died",
    2: "combine: rank {rank} waited {timeout:g} s (timeout_s) for the expert outputs of rank {peer}, which did "
       "not call combine or died",
    3: "dispatch: rank {peer} routed with a different number of slots per token (topk_ids columns) than rank "
       "{rank}; every rank must use the same K",
}


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def dispatch_row_bytes(hidden_bytes: int, max_top_k: int) -> int:
    """One token row on the wire: the hidden values, then the routing metadata of its K slots."""
    return _round_up(hidden_bytes + META_BYTES_PER_SLOT * max_top_k, 16)


def _areas(num_ranks: int, num_local_experts: int, capacity: int, dispatch_row: int, combine_row: int):
    """Offsets of the shared block: (counts_off, counts_stride, drows_off, crows_off, total bytes)."""
    counts_stride = _round_up(4 * (2 + num_local_experts), 16)
    drows_off = _round_up(SIGNAL_BYTES + 2 * num_ranks * counts_stride, 256)
    crows_off = drows_off + 2 * num_ranks * capacity * dispatch_row
    total = crows_off + 2 * num_ranks * capacity * combine_row
    return SIGNAL_BYTES, counts_stride, drows_off, crows_off, total


def shared_bytes(num_ranks: int, num_local_experts: int, capacity: int, dispatch_row: int, combine_row: int) -> int:
    """CUDA-IPC bytes one rank shares: flags, then per parity (2) and source rank: counts
    (2 + E_local int32), ``capacity`` dispatch rows and ``capacity`` combine rows."""
    return _areas(num_ranks, num_local_experts, capacity, dispatch_row, combine_row)[-1]


def unusable_reason(device: torch.device, world_size: int, hidden_bytes: int, num_local_experts: int,
                    max_top_k: int) -> str | None:
    """Why this rank cannot use the nvlink backend for this configuration, or None when it can."""
    if device.type != "cuda":
        return f"it needs CUDA tensors, the buffer's device is {device}"
    if not _ext.built():
        return "pykernels._C is not built"
    if not hasattr(_ext.require(), "ep_dispatch_send"):
        return "pykernels._C was built without csrc/ep"
    if world_size > MAX_RANKS:
        return f"it supports up to {MAX_RANKS} ranks (one host), the group has {world_size}"
    if hidden_bytes % 16:
        return f"hidden × element size must be a multiple of 16 bytes, got {hidden_bytes}"
    if num_local_experts > MAX_LOCAL_EXPERTS:
        return f"it supports up to {MAX_LOCAL_EXPERTS} experts per rank, got {num_local_experts}"
    if max_top_k > MAX_TOP_K:
        return f"it supports max_top_k up to {MAX_TOP_K}, got {max_top_k}"
    return None


@dataclass
class NvlinkDispatchHandle(DispatchHandle):
    """Handle of the ``"nvlink"`` backend (all tensors on the device; nothing here needs the host).

    ``top_k``: K of the dispatch; ``pos``: int32 ``[T, W]`` slot of token t in rank r's combine area
    (-1: t has no expert there); ``comb_rows``: int32 ``[W · capacity, K]`` the recv_x row that slot k
    of the token row (source, slot) was expanded into (-1: none); ``src_count``: int32 ``[W]`` token
    rows received from each rank; ``recv_weights``: the ``recv_weights`` output of the dispatch (combine
    reads it: change it and combine changes); ``received``: token rows received (normal mode; None in
    the low-latency mode, where only the device knows it).
    """

    top_k: int
    pos: torch.Tensor
    comb_rows: torch.Tensor
    src_count: torch.Tensor
    recv_weights: torch.Tensor
    received: int | None


def _grid(rows: int, num_sms: int) -> tuple[int, int]:
    """(blocks, tile): rows spread so every SM gets a share, at most MAX_TILE rows staged per step."""
    tile = min(MAX_TILE, max(1, math.ceil(rows / num_sms)))
    return max(1, min(num_sms, math.ceil(rows / tile))), tile


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its rows start on 16-byte boundaries (what the kernels' vector accesses need)."""
    if t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16 or t.stride(1) != 1:
        return t.contiguous() if not t.is_contiguous() else t.clone()
    return t


class NvlinkState:
    """The CUDA-IPC memory, peers and workspace of one ``Buffer`` (created by it; not public)."""

    def __init__(self, buf: Buffer):
        self.C = C = _ext.require()
        self.buf = buf
        dev = buf.device
        self.elem = torch.empty((), dtype=buf.dtype).element_size()
        self.row_bytes = buf.hidden * self.elem
        W, El, cap = buf.world_size, buf.num_local_experts, buf.max_tokens_per_rank
        drow = dispatch_row_bytes(self.row_bytes, buf.max_top_k)
        crow = _round_up(self.row_bytes, 16)
        counts_off, counts_stride, drows_off, crows_off, total = _areas(W, El, cap, drow, crow)
        workspace_bytes = WORKSPACE_HEADER_BYTES + 4 * MAX_RANKS * El
        # The layout the kernels take, with K (per call) at index 4.
        self.layout = [W, buf.rank, El, cap, 0, counts_off, counts_stride, drows_off, drow, crows_off, crow, total,
                       workspace_bytes]
        self.num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
        self.timeout_ns = int(buf.timeout_s * 1e9)
        self.base = C.ep_alloc_shared(dev.index, total)
        handles: list = [None] * W
        dist.all_gather_object(handles, C.ep_ipc_handle(dev.index, self.base), group=buf.group)
        ptrs = [self.base if r == buf.rank else C.ep_ipc_open(dev.index, h) for r, h in enumerate(handles)]
        self.opened = [p for r, p in enumerate(ptrs) if r != buf.rank]
        self.peers = torch.tensor(ptrs, dtype=torch.int64, device=dev)               # [W] block addresses
        self.workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=dev)
        self.error_host, self.error_dev = C.ep_alloc_error_flags()
        torch.cuda.synchronize(dev)
        dist.barrier(group=buf.group)

    def _layout(self, K: int) -> list[int]:
        layout = list(self.layout)
        layout[4] = K
        return layout

    def check_errors(self) -> None:
        """Raise what a kernel of an earlier call reported (reads host-mapped memory; no synchronisation)."""
        code = ctypes.c_int32.from_address(self.error_host).value
        if code == 0:
            return
        peer = ctypes.c_int32.from_address(self.error_host + 4).value
        text = "pk.ep " + ERROR_MESSAGES.get(code, "unknown error code {code}").format(
            rank=self.buf.rank, peer=peer, timeout=self.buf.timeout_s, code=code)
        text += ". The buffer is unusable now."
        raise (EPTimeoutError if code in (1, 2) else EPError)(text)

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, low_latency: bool,
                 return_hook: bool):
        if return_hook and not low_latency:
            raise ValueError("return_hook: needs low_latency=True (the normal mode reads its output size on the host)")
        self.check_errors()
        C, buf = self.C, self.buf
        W, El, cap, dev = buf.world_size, buf.num_local_experts, buf.max_tokens_per_rank, buf.device
        T, K = topk_ids.shape
        x = _aligned(x)
        ids, weights = topk_ids.contiguous(), topk_weights.contiguous()
        layout = self._layout(K)
        stream = _ext.stream_of(x)
        pos = torch.empty(T, W, dtype=torch.int32, device=dev)
        blocks, tile = _grid(T, self.num_sms)
        C.ep_dispatch_send(layout, self.peers.data_ptr(), self.workspace.data_ptr(), x.data_ptr(),
                           x.stride(0) * self.elem, self.row_bytes, ids.data_ptr(), ids.element_size(),
                           weights.data_ptr(), T, buf.num_experts, pos.data_ptr(), blocks, tile, stream)
        tokens_per_expert = torch.empty(El, dtype=torch.int32, device=dev)
        src_count = torch.empty(W, dtype=torch.int32, device=dev)
        comb_rows = torch.empty(W * cap, K, dtype=torch.int32, device=dev)

        def receive(mode: int, rows: int, recv_x, recv_ids, recv_w, received_bound: int) -> None:
            blocks, tile = _grid(received_bound, self.num_sms)
            C.ep_dispatch_recv(layout, self.base, self.workspace.data_ptr(), mode, _ptr(recv_x), rows,
                               self.row_bytes, _ptr(recv_ids), _ptr(recv_w), tokens_per_expert.data_ptr(),
                               src_count.data_ptr(), comb_rows.data_ptr(), blocks, tile, self.timeout_ns,
                               self.error_dev, stream)

        if low_latency:
            R = W * cap * K                                                    # fixed capacity
            recv_x = x.new_empty(R, buf.hidden)
            recv_ids = torch.empty(R, dtype=torch.int32, device=dev)
            recv_w = torch.empty(R, dtype=torch.float32, device=dev)
            handle = NvlinkDispatchHandle(backend="nvlink", num_tokens=T, num_recv_rows=R, low_latency=True, top_k=K,
                                          pos=pos, comb_rows=comb_rows, src_count=src_count, recv_weights=recv_w,
                                          received=None)
            outputs = (recv_x, recv_ids, recv_w, tokens_per_expert, handle)

            def hook() -> None:
                receive(WAIT | EXPAND | PAD, R, recv_x, recv_ids, recv_w, W * cap)

            if return_hook:
                return (*outputs, hook)
            hook()
            return outputs

        receive(WAIT, 0, None, None, None, 1)
        sizes = torch.cat([tokens_per_expert, src_count]).tolist()            # host sync: the output size
        self.check_errors()
        R, received = sum(sizes[:El]), sum(sizes[El:])
        recv_x = x.new_empty(R, buf.hidden)
        recv_ids = torch.empty(R, dtype=torch.int32, device=dev)
        recv_w = torch.empty(R, dtype=torch.float32, device=dev)
        receive(EXPAND, R, recv_x, recv_ids, recv_w, received)
        handle = NvlinkDispatchHandle(backend="nvlink", num_tokens=T, num_recv_rows=R, low_latency=False, top_k=K,
                                      pos=pos, comb_rows=comb_rows, src_count=src_count, recv_weights=recv_w,
                                      received=received)
        return recv_x, recv_ids, recv_w, tokens_per_expert, handle

    def combine(self, expert_out: torch.Tensor, handle: NvlinkDispatchHandle, return_hook: bool):
        if return_hook and not handle.low_latency:
            raise ValueError("return_hook: needs a handle of a low_latency dispatch")
        self.check_errors()
        C, buf = self.C, self.buf
        expert_out = _aligned(expert_out)
        layout = self._layout(handle.top_k)
        stream = _ext.stream_of(expert_out)
        dtype = DTYPE_CODES[buf.dtype]
        received = handle.received if handle.received is not None else buf.world_size * buf.max_tokens_per_rank
        blocks, tile = _grid(received, self.num_sms)
        C.ep_combine_send(layout, self.peers.data_ptr(), self.workspace.data_ptr(), dtype, _ptr(expert_out),
                          expert_out.stride(0) * self.elem, handle.num_recv_rows, self.row_bytes,
                          _ptr(handle.recv_weights), handle.comb_rows.data_ptr(), handle.src_count.data_ptr(), blocks,
                          tile, stream)
        T = handle.num_tokens
        y = expert_out.new_empty(T, buf.hidden)

        def hook() -> None:
            blocks, tile = _grid(T, self.num_sms)
            C.ep_combine_recv(layout, self.base, self.workspace.data_ptr(), dtype, _ptr(handle.pos), T, _ptr(y),
                              buf.hidden * self.elem, self.row_bytes, blocks, tile, self.timeout_ns, self.error_dev,
                              stream)

        if return_hook:
            return y, hook
        hook()
        return y

    def close(self) -> None:
        """Unmap the peers' blocks and free this rank's (collective: every rank calls it)."""
        C, dev = self.C, self.buf.device
        torch.cuda.synchronize(dev)
        dist.barrier(group=self.buf.group)          # every rank is past its last call
        for p in self.opened:
            C.ep_ipc_close(dev.index, p)
        dist.barrier(group=self.buf.group)          # nobody maps this rank's block any more
        C.ep_free_shared(dev.index, self.base)
        C.ep_free_error_flags(self.error_host)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()
