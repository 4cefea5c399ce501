"""Expert-parallel dispatch and combine (``pk.ep.Buffer``) against NCCL argsort + all_to_all_single.

    python -m bench ep                        # spawns one process per GPU (needs >= 2 GPUs)
    torchrun --nproc-per-node 2 -m bench ep   # or one rank per torchrun process; rank 0 records

Records ``ep.dispatch`` and ``ep.combine`` with shape {T, H, top_k, ranks} for every backend that
works here ("torch" over NCCL; "nvlink", normal and low-latency modes), each with the peer measured in
the same run (FACTS' "argsort-permute + NCCL all_to_all_single": 86 µs at T=128, 600 µs at T=4096 for
H5120 top-6 on 2×H200). What the peer includes (``extra.peer_includes`` says it in short):
  dispatch: argsort of the T·top_k expert ids; gather of the (token, expert) pair rows into that
            order; rows per destination rank (scatter_add: no host sync, unlike bincount);
            all_to_all_single of those counts; ONE host read of the send and receive counts (inherent:
            all_to_all_single with variable splits takes them as host lists); all_to_all_single of the
            rows.
  combine:  all_to_all_single of the pair rows back (split sizes known from the dispatch: no count
            exchange, no host read); rows × their top-k weights index_add-ed into [T, H] float32; cast
            to bf16.
The dispatch peer is also timed with the split sizes already on the host (argsort, gather, the rows'
all_to_all_single alone: no count exchange, no host read) as ``extra.peer_known_splits``; the
difference to ``peer`` is what learning the split sizes costs. On a GPU the peers without a host read (the
known-splits dispatch, the combine) are timed once more with the CPU ahead: a sleep kernel holds the
stream after the ranks align (harness.hold_stream), so every call is queued before the start event
fires, and a second on-stream all_reduce after the hold starts the ranks together again (the holds end
apart by up to ~1 % of their 10 ms: without it one rank's time would include that wait). The time is
the GPU's alone, without the Python and launch cost of each call (``extra.peer_known_splits_cpu_ahead``,
``extra.peer_cpu_ahead``). The peer sorts the expert ids as the router gives them (int32 keys: a radix
sort of half the passes of int64).

Bytes (profiles.cost_model.ep_dispatch / ep_combine): the (token, expert) pair rows whose expert lives
on another rank, times H times 2, i.e. what an all-to-all of per-pair rows moves across the link. Both
the op and the peer are measured against the same count, so GB/s compare like with like; the op sends
fewer bytes (one row per token and destination rank), recorded as ``extra.wire_bytes``.

Timing (op and peer alike): every rank runs the same fixed number of repetitions (collectives must
match). Before each one the ranks align: a barrier (host), then a one-element all_reduce on the stream,
so every rank's start event fires when the all_reduce completes, together; then CUDA events around
``inner`` calls on each rank. A repetition's time is its slowest rank's, the record holds the median
over repetitions (``extra.rank_medians_us``: each rank's own median). Rank skew from before the
repetition is thus out of the timing; waiting inside it (a host read, a peer's late launch) is in. The
low-latency mode is timed as CUDA graph replays (how a decode step runs it); everything else eagerly.
Routing: uniform random top-k over E experts, fresh per input set (2 sets alternate). On a CPU the
suite runs the torch backend over gloo with two processes at a tiny shape (a smoke test of the code
path, wall clock); with one GPU it is skipped (noted in the output).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from bench.harness import hold_stream, peer_entry, record_name

SUITE = "ep"

# Shapes: (T tokens per rank, H, top_k, E experts) — DeepSeek-V2 236B (H 5120, 160 experts) prefill and
# decode, and the Lite shapes (H 2048, 64 experts).
FULL_SHAPES = [(4096, 5120, 6, 160), (128, 5120, 6, 160), (4096, 2048, 6, 64), (128, 2048, 6, 64)]
QUICK_SHAPES = [(1024, 5120, 6, 160), (128, 2048, 6, 64)]
CPU_SHAPES = [(64, 256, 2, 8)]
# At or below this many tokens a shape is a decode step: the nvlink low-latency mode is measured too.
DECODE_TOKENS = 128
WARMUP = 5
REPS, QUICK_REPS = 30, 6
# Calls per timed sample: small calls are amortised over several so event overhead vanishes.
INNER_SMALL, INNER_LARGE = 10, 1
SMALL_TOKENS = 512
N_SETS = 2
PEER_INCLUDES = {
    "ep.dispatch": "argsort of the T*top_k expert ids; gather of the pair rows in that order; rows per "
                   "destination rank (scatter_add, no host sync); all_to_all_single of the counts; one host "
                   "read of the send and receive counts; all_to_all_single of the rows (variable splits)",
    "ep.combine": "all_to_all_single of the pair rows back (splits known from the dispatch; no count "
                  "exchange, no host read); rows x top-k weights index_add into [T, H] float32; cast to bf16",
}
TIMED_AS = ("per rank: barrier, then a 1-element all_reduce on the stream (ranks start together), {clock} "
            "around `inner` calls; each repetition's slowest rank; median over repetitions")
SPAWN_LIMIT_S = 480.0          # a hung group is killed and reported, not waited for forever


@dataclass(frozen=True)
class Config:
    T: int
    H: int
    K: int
    E: int


def run(ctx) -> None:
    if "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _run_torchrun(ctx)
        return
    if ctx.on_gpu:
        gpus = torch.cuda.device_count()
        if gpus < 2:
            ctx.note(f"  ep: skipped, expert parallelism needs >= 2 GPUs and this run has {gpus}")
            return
        world, pg = gpus, "nccl"
    else:
        world, pg = 2, "gloo"
    results = _spawn(world, pg, ctx.quick)
    _record_all(ctx, results)


def _run_torchrun(ctx) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    if rank == 0:
        ctx.ceilings  # noqa: B018 - measured before the group's timed work, not between its samples
    results = _measure(rank, world, local, "nccl", ctx.quick)
    if rank == 0:
        _record_all(ctx, results)


def _configs(pg: str, quick: bool) -> list[Config]:
    shapes = CPU_SHAPES if pg == "gloo" else (QUICK_SHAPES if quick else FULL_SHAPES)
    return [Config(*s) for s in shapes]


# ---------------------------------------------------------------------------------------------
# Recording (rank 0 of torchrun, or the parent of the spawned ranks)


def _record_all(ctx, results: list[dict]) -> None:
    from profiles import cost_model

    for r in results:
        if "error" in r:
            ctx.note(f"  ep: {r['what']} not measured: {r['error']}")
            continue
        shape = {"T": r["T"], "H": r["H"], "top_k": r["K"], "ranks": r["ranks"]}
        cost = (cost_model.ep_dispatch if r["op"] == "ep.dispatch" else cost_model.ep_combine)(r["pairs_remote"], r["H"])
        extra = {"experts": r["E"], "mode": r["mode"], "graph": r["graph"], "pg": r["pg"],
                 "wire_bytes": r["wire_bytes"], "token_rows_remote": r["token_rows_remote"],
                 "pairs_remote": r["pairs_remote"], "rank_medians_us": r["rank_medians_us"],
                 "inner": r["inner"],
                 "timed_as": TIMED_AS.format(clock="CUDA events" if r["pg"] == "nccl" else "the wall clock"),
                 "bytes_counted": "(token, expert) pairs with a remote expert x H x 2",
                 "peer_includes": PEER_INCLUDES[r["op"]], "peer_rank_medians_us": r["peer_rank_medians_us"]}
        if r["peer_us"] is not None:
            peer = (r["peer_name"], r["peer_us"])
        else:
            peer = (r["peer_name"], None, r["peer_error"])
        if r["op"] == "ep.dispatch":
            extra["peer_known_splits"] = peer_entry((f"{r['peer_name']}, split sizes known",
                                                     r["peer_known_splits_us"], r["peer_error"]))
        ahead = "peer_known_splits_cpu_ahead" if r["op"] == "ep.dispatch" else "peer_cpu_ahead"
        if r.get("peer_ahead_us") is not None:
            extra[ahead] = peer_entry((f"{r['peer_name']}, GPU time (CPU ahead)", r["peer_ahead_us"], None))
        ctx.record(op=r["op"], backend=r["backend"], shape=shape, dtype="bf16", time_us=r["time_us"],
                   bytes=cost.bytes, flops=cost.flops, peer=peer, extra=extra)


# ---------------------------------------------------------------------------------------------
# Processes


def _spawn(world: int, pg: str, quick: bool) -> list[dict]:
    import torch.multiprocessing as mp

    from bench.ceilings import _free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ep.json"
        pctx = mp.start_processes(_spawned, args=(world, _free_port(), pg, quick, str(out)), nprocs=world,
                                  join=False, start_method="spawn")
        deadline = time.monotonic() + SPAWN_LIMIT_S
        while not pctx.join(timeout=2):
            if time.monotonic() > deadline:
                for p in pctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"the ep benchmark ranks did not finish in {SPAWN_LIMIT_S:.0f} s")
        return json.loads(out.read_text())


def _spawned(rank: int, world: int, port: int, pg: str, quick: bool, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    results = _measure(rank, world, rank, pg, quick)
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def _measure(rank: int, world: int, local_rank: int, pg: str, quick: bool) -> list[dict]:
    """Every rank: time every backend and mode on every config; returns rank 0's view of the records."""
    from pykernels.ep.buffer import disable_multicast

    if pg == "nccl":
        disable_multicast()
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = []
        for cfg in _configs(pg, quick):
            results += _measure_config(cfg, rank, world, dev, pg, quick)
        dist.barrier()
        return results
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The peer: one row per (token, expert) pair, argsort by expert, NCCL all_to_all_single


def peer_dispatch(x: torch.Tensor, ids: torch.Tensor, E_local: int, world: int):
    """Pair rows to their experts' ranks the plain way (see the module doc for what it includes).
    x `[T, H]`, ids `[T, top_k]` -> received rows `[R, H]` and the state combine needs."""
    K = ids.shape[1]
    flat = ids.flatten()                                                    # [T·K]
    order = torch.argsort(flat)                                             # [T·K] slots by expert, so by rank
    rows = x[order // K]                                                    # [T·K, H]
    dest = flat.long() // E_local                                           # [T·K] rank of each pair's expert
    send = torch.zeros(world, dtype=torch.int64, device=x.device).scatter_add_(0, dest, torch.ones_like(dest))
    recv = torch.empty_like(send)                                           # [W] pair rows from each rank
    dist.all_to_all_single(recv, send)
    s, r = torch.stack((send, recv)).tolist()                               # the one host read
    out = x.new_empty(sum(r), x.size(1))
    dist.all_to_all_single(out, rows, r, s)
    return out, (order, s, r)


def peer_dispatch_known_splits(x: torch.Tensor, ids: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    """``peer_dispatch`` when the split sizes are already on the host: argsort-permute, rows all_to_all."""
    K = ids.shape[1]
    order = torch.argsort(ids.flatten())                                    # [T·K]
    out = x.new_empty(sum(recv), x.size(1))
    dist.all_to_all_single(out, x[order // K], recv, send)
    return out


def peer_combine(expert_out: torch.Tensor, state, weights: torch.Tensor, T: int) -> torch.Tensor:
    """The rows back to their tokens, weighted and summed over top-k: `[T, H]` in expert_out's dtype."""
    order, s, r = state
    K = weights.size(1)
    back = expert_out.new_empty(sum(s), expert_out.size(1))
    dist.all_to_all_single(back, expert_out, s, r)
    y = torch.zeros(T, expert_out.size(1), dtype=torch.float32, device=expert_out.device)
    y.index_add_(0, order // K, back.float() * weights.flatten()[order][:, None])
    return y.to(expert_out.dtype)


# ---------------------------------------------------------------------------------------------
# Timing


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _align(dev: torch.device, flag: torch.Tensor) -> None:
    """Start the ranks together: a barrier empties every rank's queue and meets on the host, then a
    one-element all_reduce on the stream makes the next event on each rank fire at its completion."""
    dist.barrier()
    _sync(dev)
    dist.all_reduce(flag)


def _time(fn, dev: torch.device, world: int, reps: int, inner: int, graph: bool,
          name: str, cpu_ahead: bool = False) -> tuple[float, list[float]]:
    """µs per call of ``fn(i)`` (i alternating over the input sets): the median over repetitions of
    the slowest rank's time, and every rank's own median (see the module doc). ``cpu_ahead`` (GPU): the
    stream is held before each sample, then the ranks meet on it again, so the calls are queued by then."""
    from pykernels.profiling import nvtx_range

    for i in range(WARMUP):
        fn(i % N_SETS)
    _sync(dev)
    run_sample = lambda: [fn(i % N_SETS) for i in range(inner)]
    if graph:
        g = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            run_sample()                                                   # warm the graph's allocations
        torch.cuda.current_stream(dev).wait_stream(side)
        dist.barrier()
        with torch.cuda.graph(g):
            run_sample()
        _sync(dev)
        dist.barrier()
        run_sample = g.replay
    flag = torch.zeros(1, device=dev)
    samples = []
    with nvtx_range(name):
        for _ in range(reps):
            _align(dev, flag)
            if dev.type == "cuda":
                if cpu_ahead:
                    hold_stream()
                    dist.all_reduce(flag)                                   # the ranks start together again
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run_sample()
                end.record()
                samples.append((start, end))
            else:
                t0 = time.perf_counter()
                run_sample()
                samples.append((time.perf_counter() - t0) * 1e6)
        _sync(dev)
    if dev.type == "cuda":
        samples = [start.elapsed_time(end) * 1e3 for start, end in samples]
    mine = torch.tensor(samples, dtype=torch.float64, device=dev) / inner  # [reps] this rank's µs per call
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    per_rank = torch.stack(every)                                           # [world, reps]
    slowest = per_rank.max(dim=0).values                                    # [reps]
    return float(slowest.median()), [round(float(v), 3) for v in per_rank.median(dim=1).values]


def _inputs(cfg: Config, rank: int, dev: torch.device, seed: int):
    g = torch.Generator(device=dev).manual_seed(1000 * seed + rank)
    x = torch.randn(cfg.T, cfg.H, generator=g, device=dev).to(torch.bfloat16)
    scores = torch.rand(cfg.T, cfg.E, generator=g, device=dev)
    ids = scores.topk(cfg.K, dim=1).indices.to(torch.int32)                 # [T, K] distinct experts
    weights = torch.rand(cfg.T, cfg.K, generator=g, device=dev)
    return x, ids, weights


def _measure_config(cfg: Config, rank: int, world: int, dev: torch.device, pg: str, quick: bool) -> list[dict]:
    from pykernels import ep

    E_local = cfg.E // world
    reps = QUICK_REPS if quick else REPS
    inner = INNER_SMALL if cfg.T <= SMALL_TOKENS else INNER_LARGE
    sets = [_inputs(cfg, rank, dev, seed) for seed in range(N_SETS)]
    owner = [ids.long() // E_local for _, ids, _ in sets]
    pairs_remote = int((owner[0] != rank).sum())
    token_rows_remote = sum(int((owner[0] == r).any(1).sum()) for r in range(world) if r != rank)
    base = {"T": cfg.T, "H": cfg.H, "K": cfg.K, "E": cfg.E, "ranks": world, "pg": pg,
            "pairs_remote": _mean(pairs_remote, dev), "token_rows_remote": _mean(token_rows_remote, dev)}

    # The peer, in the same run.
    shape = {"T": cfg.T, "H": cfg.H, "top_k": cfg.K, "ranks": world}
    peer_name = "NCCL argsort + all_to_all_single" if pg == "nccl" else "gloo argsort + all_to_all_single"
    peer = {"peer_name": peer_name}
    try:
        peer_state = [peer_dispatch(x, ids, E_local, world) for x, ids, _ in sets]
        peer["d"] = _time(lambda i: peer_dispatch(sets[i][0], sets[i][1], E_local, world), dev, world, reps, inner,
                          False, record_name("ep.dispatch", f"peer {peer_name}", shape))
        peer["c"] = _time(lambda i: peer_combine(peer_state[i][0], peer_state[i][1], sets[i][2], cfg.T), dev, world,
                          reps, inner, False, record_name("ep.combine", f"peer {peer_name}", shape))
        splits = [state[1:] for _, state in peer_state]                   # (send, recv) host lists per set
        peer["d_known"] = _time(lambda i: peer_dispatch_known_splits(sets[i][0], sets[i][1], *splits[i]), dev, world,
                                reps, inner, False, record_name("ep.dispatch", f"peer {peer_name} known splits", shape))
        if dev.type == "cuda":
            peer["d_ahead"] = _time(lambda i: peer_dispatch_known_splits(sets[i][0], sets[i][1], *splits[i]), dev,
                                    world, reps, inner, False,
                                    record_name("ep.dispatch", f"peer {peer_name} known splits, CPU ahead", shape),
                                    cpu_ahead=True)
            peer["c_ahead"] = _time(lambda i: peer_combine(peer_state[i][0], peer_state[i][1], sets[i][2], cfg.T), dev,
                                    world, reps, inner, False,
                                    record_name("ep.combine", f"peer {peer_name}, CPU ahead", shape), cpu_ahead=True)
        peer_state.clear()                                                  # free the received rows
    except Exception as e:  # noqa: BLE001 - reported missing in the records, the backends still run
        peer["error"] = f"{type(e).__name__}: {e}"[:300]

    variants = [("torch", False)]
    if pg == "nccl":
        variants.append(("nvlink", False))
        if cfg.T <= DECODE_TOKENS:
            variants.append(("nvlink", True))
    results = []
    for backend, low_latency in variants:
        what = f"{backend}{' low-latency' if low_latency else ''} at T={cfg.T} H={cfg.H}"
        try:
            buf = ep.Buffer(dist.group.WORLD, cfg.H, cfg.E, cfg.T, dtype=torch.bfloat16, backend=backend,
                            max_top_k=cfg.K, device=dev)
        except ValueError as error:
            results.append({"what": what, "error": str(error)})
            continue
        try:
            results += _measure_buffer(buf, sets, cfg, base, shape, low_latency, dev, world, reps, inner, peer)
        except Exception:  # noqa: BLE001 - the other variants still run; the parent reports this one
            results.append({"what": what, "error": traceback.format_exc(limit=4)})
        finally:
            buf.close()
    return results


def _measure_buffer(buf, sets, cfg: Config, base: dict, shape: dict, low_latency: bool, dev, world: int, reps: int,
                    inner: int, peer: dict) -> list[dict]:
    kw = {"low_latency": True} if low_latency else {}
    outs = [buf.dispatch(x, ids, w, **kw) for x, ids, w in sets]
    graph = low_latency
    # The low-latency mode gets its own backend label: at T <= DECODE_TOKENS both modes are recorded.
    backend = f"{buf.backend}-ll" if low_latency else buf.backend
    t_d, ranks_d = _time(lambda i: buf.dispatch(*sets[i], **kw), dev, world, reps, inner, graph,
                         record_name("ep.dispatch", backend, shape))
    t_c, ranks_c = _time(lambda i: buf.combine(outs[i][0], outs[i][4]), dev, world, reps, inner, graph,
                         record_name("ep.combine", backend, shape))
    row_bytes = cfg.H * 2
    wire = base["token_rows_remote"] * row_bytes
    common = dict(base, backend=backend, mode="low_latency" if low_latency else "normal", graph=graph, inner=inner,
                  wire_bytes=wire, peer_name=peer["peer_name"], peer_error=peer.get("error"))
    no_peer = (None, None)
    return [dict(common, op="ep.dispatch", time_us=t_d, rank_medians_us=ranks_d,
                 peer_us=peer.get("d", no_peer)[0], peer_rank_medians_us=peer.get("d", no_peer)[1],
                 peer_known_splits_us=peer.get("d_known", no_peer)[0], peer_ahead_us=peer.get("d_ahead", no_peer)[0]),
            dict(common, op="ep.combine", time_us=t_c, rank_medians_us=ranks_c,
                 peer_us=peer.get("c", no_peer)[0], peer_rank_medians_us=peer.get("c", no_peer)[1],
                 peer_ahead_us=peer.get("c_ahead", no_peer)[0])]


def _mean(value: int, dev: torch.device) -> int:
    """The mean over ranks of a per-rank count (the records speak for an average rank)."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return round(float(t.item()) / dist.get_world_size())
