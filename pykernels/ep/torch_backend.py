"""The ``"torch"`` backend of ``pk.ep.Buffer``: ``torch.distributed.all_to_all_single`` over any group.

Works with NCCL (GPUs, one host or many: the multi-node path today) and gloo (CPUs). Each dispatch
makes three collectives and one host synchronisation; each combine one collective:

    counts   int64 [W, 2 + E_local] per destination: token rows, K, then (token, expert) pairs per local
             expert. One all_to_all; the host reads the received counts (allocation sizes).
    payload  the token rows, each sent once per destination rank, ``[S, H]``, and their routing
             metadata ``[S, 2K]`` int32 (local expert id or -1, then the float32 weight bits).
    combine  every rank reduces its weighted expert outputs per received token row, in float32, and
             sends one row per token back; the source adds the rows of each token's ranks.

Payloads travel as byte views, so any dtype works with gloo. Every collective is issued with
``async_op=True`` and waited for on the host with the buffer's timeout (gloo: a timed ``wait``; NCCL:
polling ``is_completed``), so a rank that never arrives or died turns into ``EPTimeoutError`` on the
others instead of a hang. The host therefore waits for each dispatch and combine to finish. After a
timeout over NCCL the collective is still pending on the GPU: the process group is unusable, and torch's
NCCL watchdog (``TORCH_NCCL_ASYNC_ERROR_HANDLING``) may end the process once the group's own timeout
passes.
"""
from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

from pykernels.ep.buffer import Buffer, EPError, EPTimeoutError, TorchDispatchHandle


def _all_to_all(buf: Buffer, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None,
                in_splits: list[int] | None, what: str):
    """Issue one ``all_to_all_single`` over byte views; returns the work to ``_wait`` for."""
    return dist.all_to_all_single(out.view(torch.uint8), inp.view(torch.uint8), out_splits, in_splits,
                                  group=buf.group, async_op=True), what


# CUDA collectives are polled (a timed NCCL ``wait`` sleeps in 1 ms steps): yield the CPU between
# polls for this long, then sleep POLL_SLEEP_S between them (a collective that slow is not latency-bound).
POLL_SPIN_S = 2e-3
POLL_SLEEP_S = 5e-4


def _wait(buf: Buffer, *pending) -> None:
    for work, what in pending:
        try:
            if buf.device.type == "cuda":
                _poll(buf, work)
                work.wait()                  # the current stream waits for the collective's stream
            else:
                work.wait(timeout=datetime.timedelta(seconds=buf.timeout_s))
        except (RuntimeError, TimeoutError) as error:
            text = str(error)
            if isinstance(error, TimeoutError) or "timed out" in text.lower() or "timeout" in text.lower():
                raise EPTimeoutError(
                    f"pk.ep {what}: rank {buf.rank} waited {buf.timeout_s:g} s (the buffer's timeout_s) for the "
                    f"other ranks of the group; one of them did not call it or died. The process group may be "
                    f"unusable now. ({text})") from error
            raise EPError(f"pk.ep {what} failed on rank {buf.rank}, most likely because another rank died: "
                          f"{text}") from error


def _poll(buf: Buffer, work) -> None:
    """Return when ``work`` has completed (or failed: ``wait`` then raises); TimeoutError after timeout_s."""
    start = time.monotonic()
    while not work.is_completed():
        elapsed = time.monotonic() - start
        if elapsed > buf.timeout_s:
            raise TimeoutError(f"not complete after {elapsed:.1f} s")
        time.sleep(0 if elapsed < POLL_SPIN_S else POLL_SLEEP_S)


def dispatch(buf: Buffer, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
    W, E_local, dev = buf.world_size, buf.num_local_experts, buf.device
    T, K = topk_ids.shape
    ids = topk_ids.long()                                                    # [T, K]
    owner = torch.where(ids >= 0, ids // E_local, W)                         # [T, K]; W = empty slot
    to_rank = torch.zeros(T, W + 1, dtype=torch.bool, device=dev)
    to_rank.scatter_(1, owner, True)
    to_rank = to_rank[:, :W]                                                 # [T, W] token t goes to rank r
    send_rank, send_token = to_rank.t().nonzero(as_tuple=True)               # [S] rank-major, tokens ascending

    # Routing metadata of each sent row: the local expert of every slot the destination owns, else -1.
    mine = owner[send_token] == send_rank[:, None]                           # [S, K]
    local_ids = torch.where(mine, ids[send_token] - send_rank[:, None] * E_local, -1).to(torch.int32)
    weights = torch.where(mine, topk_weights[send_token], 0.0)               # [S, K] float32
    meta = torch.cat([local_ids, weights.view(torch.int32)], dim=1)          # [S, 2K]

    pairs = torch.bincount(torch.where(ids >= 0, ids, buf.num_experts).flatten(),
                           minlength=buf.num_experts + 1)[:-1]               # [E] (token, expert) pairs
    counts = torch.cat([to_rank.sum(0, dtype=torch.int64)[:, None],
                        torch.full((W, 1), K, dtype=torch.int64, device=dev),
                        pairs.view(W, E_local)], dim=1)                      # [W, 2 + E_local]
    recv_counts = torch.empty_like(counts)
    _wait(buf, _all_to_all(buf, recv_counts, counts, None, None, "dispatch (counts)"))
    table = recv_counts.tolist()                                             # host sync: sizes below
    send_splits = counts[:, 0].tolist()
    recv_splits = [row[0] for row in table]
    ks = [row[1] for r, row in enumerate(table) if recv_splits[r]]
    if any(k != K for k in ks):
        raise EPError(f"pk.ep dispatch: topk_ids has {K} columns on rank {buf.rank} but another rank sent "
                      f"rows with {sorted(set(ks))}; every rank must route with the same K")
    N = sum(recv_splits)
    R = sum(sum(row[2:]) for row in table)

    recv_rows = x.new_empty(N, buf.hidden)                                   # [N, H] token rows received
    recv_meta = torch.empty(N, 2 * K, dtype=torch.int32, device=dev)
    _wait(buf,
          _all_to_all(buf, recv_rows, x[send_token], recv_splits, send_splits, "dispatch (rows)"),
          _all_to_all(buf, recv_meta, meta, recv_splits, send_splits, "dispatch (routing)"))

    # Expand every received token row into one row per (token, local expert), grouped by expert.
    recv_local = recv_meta[:, :K]                                            # [N, K] local expert or -1
    key = torch.where(recv_local >= 0, recv_local, E_local).flatten()        # [N·K]; E_local sorts last
    order = torch.argsort(key, stable=True)[:R]                              # [R] slot n·K + k
    recv_row = order // K                                                    # [R] received token row
    recv_weights = recv_meta[:, K:].contiguous().view(torch.float32).flatten()[order]
    handle = TorchDispatchHandle(backend="torch", num_tokens=T, num_recv_rows=R, low_latency=False,
                                 send_token=send_token, send_splits=send_splits, recv_splits=recv_splits,
                                 recv_row=recv_row, recv_weights=recv_weights)
    tokens_per_expert = recv_counts[:, 2:].sum(0).to(torch.int32)            # [E_local]
    return recv_rows[recv_row], key[order].to(torch.int32), recv_weights, tokens_per_expert, handle


def combine(buf: Buffer, expert_out: torch.Tensor, handle: TorchDispatchHandle) -> torch.Tensor:
    N = sum(handle.recv_splits)
    # partial[n] = Σ over the expert rows of received token row n of weight · expert_out  (float32)
    partial = torch.zeros(N, buf.hidden, dtype=torch.float32, device=buf.device)
    partial.index_add_(0, handle.recv_row, expert_out.float() * handle.recv_weights[:, None])
    back = expert_out.new_empty(handle.send_token.numel(), buf.hidden)      # [S, H] one row per (token, rank)
    _wait(buf, _all_to_all(buf, back, partial.to(buf.dtype), handle.send_splits, handle.recv_splits, "combine"))
    y = torch.zeros(handle.num_tokens, buf.hidden, dtype=torch.float32, device=buf.device)
    y.index_add_(0, handle.send_token, back.float())
    return y.to(buf.dtype)
