"""Tuning sweep for the grouped-GEMM expert FFN's tile configurations and row layouts (GPU only, ~4 minutes).

    python -m bench.tune_moe --out tune-moe.json [--budget-s 240] [--only lite] [--decode-only | --prefill-only]
    python -m bench.tune_moe --out compile.json --compile-only     # no GPU: shared memory, registers, spills
    python -m bench.tune_moe --out timeline.json --timeline        # where the direct kernel's T = 1 time goes

Three parts, in this order (the budget stops the sweep between configs; the JSON is written after every
case, so a run stopped by the budget keeps what it measured):

1. The direct layout (moe_ffn at T = 1 in one launch: slice items per (route, I tile) running both GEMMs,
   then sum items), keys ``(gemm, H, I, "direct")``, at the shapes below with T = 1: the gate_up candidates
   with the default down tile, then the down candidates with the best gate_up one, each timed as the whole
   kernel; then the best pair at 1, 2 and 3 programs per SM (``moe_direct.DIRECT_PROGRAMS_PER_SM``).
2. Row layouts of the whole moe_ffn (direct, sorted, padded) at T = 1, 2, 4, 8, 64, 128 on the Lite and
   236B shapes with the table's configs, as % of the measured copy bandwidth over the weights of the
   experts hit: the crossing of direct and sorted is ``moe_configs.DIRECT_MAX_TOKENS``; padded against
   sorted is the align-vs-masked-tiles comparison. Printed as a table at the end.
3. Sorted-layout GEMMs (skipped with --decode-only past T = 128): the performance bar's shapes at top-6
   (Lite E 64 / H 2048 / I 1408; 236B E 160 / H 5120 / I 1536; tensor-parallel shards of the 236B experts,
   I 768 and 192) at T = 1, 8, 64, 128 (decode) and 8192 (prefill). Each case belongs to a key
   ``(gemm, H, I, bucket)`` of pykernels/triton/moe_configs.py (bucket from rows per expert).

``--prefill-only`` runs part 3 alone at T = 8192 on Lite and 236B (~3 minutes): the table's large-bucket
entry of each shape against ``PREFILL_CANDIDATES``; with ``--compile-only`` it compiles just those.

Each GEMM candidate is timed alone (weights through pointer loads, TMA descriptors, or gate_up as one
wide dot) on a permutation computed beforehand, and checked against a bf16 torch per-expert loop
(relative error <= 1e-2; a wrong config is reported, never chosen). Every config is guarded: a compile
failure or a shared-memory overflow is reported and the sweep goes on.

Decode cases rotate 4 routings (different experts hit, so the weights come from HBM) and are timed as
CUDA-graph replays; prefill cases are timed with CUDA events. The JSON holds every timing with TFLOP/s
and weight TB/s, and per key the config with the lowest sum over its cases of (time / best time of the
case). The run ends by printing those as lines to paste into ``TABLE`` in pykernels/triton/moe_configs.py,
and the layout table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from bench.harness import Budget, time_cuda

# Short timings: the sweep compares configs; bench_moe publishes numbers.
SWEEP_BUDGET = Budget(warmup_s=0.003, min_reps=5, max_reps=25, seconds=0.02)
MAX_REL_ERR = 1e-2
TOP_K = 6
DECODE_SETS = 4

# (label, E, H, I): the direct layout's shapes (T = 1) and the layout comparison's models
DIRECT_SHAPES = [("lite", 64, 2048, 1408), ("236b", 160, 5120, 1536), ("tp2", 160, 5120, 768), ("tp8", 160, 5120, 192)]
LAYOUT_MODELS = [("lite", 64, 2048, 1408, "greedy", 1, 1), ("236b", 160, 5120, 1536, "group_limited_greedy", 8, 3)]
LAYOUT_T = (1, 2, 4, 8, 64, 128)

# (label, E, H, I, T)
CASES = [
    ("lite", 64, 2048, 1408, 8192),
    ("236b", 160, 5120, 1536, 8192),
    ("lite", 64, 2048, 1408, 1),
    ("lite", 64, 2048, 1408, 8),
    ("lite", 64, 2048, 1408, 64),
    ("lite", 64, 2048, 1408, 128),
    ("236b", 160, 5120, 1536, 1),
    ("236b", 160, 5120, 1536, 8),
    ("236b", 160, 5120, 1536, 64),
    ("236b", 160, 5120, 1536, 128),
    ("tp2", 160, 5120, 768, 8192),
    ("tp8", 160, 5120, 192, 8192),
    ("tp2", 160, 5120, 768, 64),
    ("tp8", 160, 5120, 192, 64),
]


# The large bucket's newer candidates (all of them with --prefill-only): the table's winners with deeper
# stages, half-height last tiles and other swizzle groups, and 64-row tiles with 256-wide MMAs.
# (block_m, block_n, block_k, group_m, num_warps, num_stages, tma, single_dot, split_tail)
PREFILL_CANDIDATES = {
    "gate_up": [(128, 128, 64, 8, 8, 3, False, True, True), (128, 128, 64, 8, 8, 4, True, False, True),
                (128, 128, 64, 4, 8, 3, True, False, True), (128, 128, 128, 8, 8, 2, True, False, True),
                (128, 128, 64, 16, 8, 3, True, False, True)],
    "down": [(128, 256, 64, 8, 8, 3, True, False, True), (128, 256, 64, 4, 8, 4, True, False, True),
             (128, 256, 128, 8, 8, 2, True, False, True), (128, 256, 64, 16, 8, 4, True, False, True)],
}


def candidates(gemm: str, bucket: str, prefill_only: bool = False, hidden: int = 0, inter: int = 0):
    """Configs tried for a (gemm, bucket): the table's default first, then the alternatives; with
    ``prefill_only`` ("large" bucket), the table's entry for (H, I) and the PREFILL_CANDIDATES only."""
    from pykernels.triton.moe_configs import DEFAULTS, TABLE
    from pykernels.triton.moe_configs import GemmConfig as C

    # Each list: pointer loads first, then TMA weight loads (tma=True), then gate_up as one wide dot.
    if bucket == "large":
        # split_tail (last field): an expert's last tile of <= BLOCK_M / 2 rows at half height. BLOCK_M 64
        # with wide N: less padding per expert (307 rows on 236B: 320 computed instead of 384), one
        # 64 x 256 MMA tile per program.
        extra = {
            "gate_up": [C(128, 64, 64, 8, 8, 3), C(128, 128, 64, 8, 8, 3), C(64, 128, 64, 8, 4, 4),
                        C(128, 64, 128, 8, 8, 3), C(64, 64, 64, 8, 4, 4),
                        C(128, 64, 64, 8, 8, 3, True), C(128, 128, 64, 8, 8, 3, True),
                        C(128, 64, 64, 8, 8, 3, False, True), C(128, 128, 64, 8, 8, 3, False, True),
                        *map(C._make, PREFILL_CANDIDATES["gate_up"])],
            "down": [C(128, 128, 64, 8, 8, 3), C(128, 256, 64, 8, 8, 3), C(64, 128, 64, 8, 4, 4),
                     C(128, 64, 64, 8, 4, 4), C(128, 128, 128, 8, 8, 2),
                     C(128, 128, 64, 8, 8, 3, True), C(128, 256, 64, 8, 8, 3, True),
                     *map(C._make, PREFILL_CANDIDATES["down"])],
        }[gemm]
    elif bucket == "medium":
        extra = [C(64, 64, 64, 8, 4, 4), C(64, 128, 64, 8, 4, 3), C(32, 64, 128, 4, 4, 4), C(128, 64, 64, 8, 8, 3)]
    elif bucket == "direct":
        # M is one row. gate_up: the slice items' I tile (block_n: more, smaller items balance the SMs better;
        # wider ones write fewer float32 parts), K step, TMA / pointer / one wide dot, stages, warps for the
        # whole kernel. down: block_n H-rows of w2 per step of an item's down GEMM, through TMA or pointers.
        extra = {
            "gate_up": [C(16, 16, 256, 1, 4, 4, True), C(16, 64, 64, 1, 4, 6, True),
                        C(16, 32, 256, 1, 4, 3, True), C(16, 64, 128, 1, 4, 3, True), C(16, 64, 128, 1, 8, 4, True),
                        C(16, 32, 128, 1, 4, 6, True), C(16, 64, 128, 1, 4, 4, False, True),
                        C(16, 32, 256, 1, 4, 4, False, True), C(16, 64, 128, 1, 4, 5, True),
                        C(16, 64, 128, 1, 4, 6, True)],
            "down": [C(16, 64, 64, 1, 4, 4), C(16, 256, 64, 1, 4, 4), C(16, 128, 64, 1, 4, 4, True),
                     C(16, 64, 64, 1, 4, 4, True), C(16, 256, 64, 1, 4, 4, True)],
        }[gemm]
    elif bucket == "small":
        extra = [C(16, 64, 128, 1, 4, 4), C(32, 32, 256, 1, 4, 4), C(64, 64, 128, 1, 4, 3), C(16, 32, 256, 1, 4, 4),
                 C(32, 64, 128, 1, 4, 4, True)]
        if gemm == "gate_up":
            extra += [C(32, 64, 128, 1, 4, 4, False, True)]
    else:
        extra = [C(16, 32, 256, 1, 4, 3), C(16, 64, 128, 1, 4, 4), C(16, 16, 256, 1, 4, 4), C(16, 32, 128, 1, 4, 6),
                 C(16, 16, 512, 1, 4, 3), C(16, 32, 256, 1, 4, 4, True), C(16, 64, 128, 1, 4, 4, True)]
        if gemm == "gate_up":
            extra += [C(16, 32, 256, 1, 4, 4, False, True)]
    first = DEFAULTS[(gemm, bucket)]
    if prefill_only and bucket == "large":
        first = TABLE.get((gemm, hidden, inter, bucket), first)
        extra = list(map(C._make, PREFILL_CANDIDATES[gemm]))
    return [first] + [c for c in dict.fromkeys(extra) if c != first]


def _rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _case_sets(E, H, I, T, w13, w2, n_sets, direct=False):
    """Routings (x, weights, permutation) and the bf16 torch loop's outputs for checking: h and the weighted
    route-order down rows of the sorted layout; with ``direct``, y of the direct layout."""
    import pykernels as pk
    from pykernels.triton.moe_permute import permute

    sets = []
    for s in range(n_sets):
        g = torch.Generator(device="cuda").manual_seed(100 + s)
        x = torch.randn(T, H, generator=g, device="cuda").to(torch.bfloat16)
        weights, ids = pk.moe_route(torch.randn(T, E, generator=g, device="cuda"), TOP_K)
        offsets, sorted_pair = permute(ids, E)
        pair = sorted_pair.long()
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
        xs = x[pair // TOP_K]
        h_ref = torch.empty(T * TOP_K, I, dtype=x.dtype, device="cuda")
        down_ref = torch.empty(T * TOP_K, H, dtype=x.dtype, device="cuda")
        start = 0
        for e, n in enumerate(counts):
            if n:
                gate_up = F.linear(xs[start:start + n], w13[e]).float()
                h_ref[start:start + n] = (F.silu(gate_up[:, :I]) * gate_up[:, I:]).to(x.dtype)
                down_ref[start:start + n] = F.linear(h_ref[start:start + n], w2[e])
                start += n
        flat_w = weights.reshape(-1).contiguous()
        w_sorted = flat_w[pair]
        buf_ref = torch.empty_like(down_ref)
        buf_ref[pair] = (down_ref.float() * w_sorted[:, None]).to(x.dtype)
        st = dict(x=x, ids=ids, weights=flat_w, offsets=offsets, sorted_pair=sorted_pair, h_ref=h_ref,
                  buf_ref=buf_ref, hit=sum(1 for n in counts if n))
        if direct:
            h_route = torch.empty_like(h_ref)  # weighted h in route order
            h_route[pair] = (h_ref.float() * w_sorted[:, None]).to(x.dtype)
            y_route = torch.zeros(T, H, dtype=torch.float32, device="cuda")
            for p, e in enumerate(ids.reshape(-1).tolist()):
                y_route[p // TOP_K] += F.linear(h_route[p], w2[e]).float()
            st.update(y_route=y_route.to(x.dtype))
        sets.append(st)
    return sets


def _try(gemm, cfg, sets, w13, w2, decode, direct=None):
    """(µs, error) of one config over the rotated sets, or raise. ``direct``: the other GEMM's config, and
    the time is the whole direct-layout moe_ffn (one kernel)."""
    from pykernels.triton import grouped_gemm

    rows = sets[0]["x"].shape[0] * TOP_K
    if direct is not None:
        pair = {gemm: cfg, "down" if gemm == "gate_up" else "gate_up": direct}

        def fn(i):
            s = sets[i]
            return grouped_gemm.moe_ffn_triton(s["x"], w13, w2, s["weights"], s["ids"], gate_up_config=pair["gate_up"],
                                               down_config=pair["down"], layout="direct")
        err = max(_rel(fn(i), sets[i]["y_route"]) for i in range(len(sets)))
    elif gemm == "gate_up":
        def fn(i):
            s = sets[i]
            return grouped_gemm._gate_up(s["x"], w13, cfg, "gather", s["offsets"], pair=s["sorted_pair"],
                                         num_rows=rows, top_k=TOP_K)
        err = max(_rel(fn(i), sets[i]["h_ref"]) for i in range(len(sets)))
    else:
        outs = [torch.empty_like(s["buf_ref"]) for s in sets]

        def fn(i):
            s = sets[i]
            grouped_gemm._down(s["h_ref"], w2, cfg, "gather", s["offsets"], outs[i], pair=s["sorted_pair"],
                               weights=s["weights"])
        for i in range(len(sets)):
            fn(i)
        err = max(_rel(outs[i], sets[i]["buf_ref"]) for i in range(len(sets)))
    t = time_cuda(fn, n_sets=len(sets), graph=decode, budget=SWEEP_BUDGET).median_us
    return t, err


def _weights(cache, E, H, I):
    """bf16 (w13, w2) of one shape, one shape held at a time."""
    if (E, H, I) not in cache:
        cache.clear()
        torch.cuda.empty_cache()
        g = torch.Generator(device="cuda").manual_seed(0)
        cache[(E, H, I)] = ((torch.randn(E, 2 * I, H, generator=g, device="cuda") / H**0.5).to(torch.bfloat16),
                            (torch.randn(E, H, I, generator=g, device="cuda") / I**0.5).to(torch.bfloat16))
    return cache[(E, H, I)]


def _sweep_case(report, scores, label, E, H, I, T, w13, w2, bucket, start, budget_s, prefill_only=False):
    """Time every candidate of the case's two GEMMs; record the case and each config's ratio to the case best."""
    from pykernels.triton.moe_configs import DEFAULTS, GemmConfig

    rows = T * TOP_K
    decode = T <= 128
    direct = bucket == "direct"
    sets = _case_sets(E, H, I, T, w13, w2, DECODE_SETS if decode else 1, direct)
    hit = sum(s["hit"] for s in sets) / len(sets)
    partner = DEFAULTS[("down", "direct")] if direct else None  # the other GEMM's config in the direct kernel
    for gemm in ("gate_up", "down"):
        key = (gemm, H, I, bucket)
        case = {"label": label, "E": E, "H": H, "I": I, "T": T, "gemm": gemm, "bucket": bucket,
                "experts_hit": hit, "results": []}
        if direct:
            # The whole FFN in one kernel; it reads an expert once per route using it (T = 1: once per hit expert).
            case["partner"] = partner._asdict()
            flops = 2 * rows * H * 3 * I
            weight_bytes = rows * 3 * H * I * 2
        else:
            flops = 2 * rows * H * (2 * I if gemm == "gate_up" else I)
            weight_bytes = hit * (2 if gemm == "gate_up" else 1) * H * I * 2
        for cfg in candidates(gemm, bucket, prefill_only, H, I):
            if time.monotonic() - start > budget_s:
                break
            entry = {"config": cfg._asdict()}
            try:
                t, err = _try(gemm, cfg, sets, w13, w2, decode, partner)
                entry.update(us=round(t, 3), rel_err=err, ok=err <= MAX_REL_ERR,
                             tflops=round(flops / t / 1e6, 1), weight_tbps=round(weight_bytes / t / 1e6, 3))
            except Exception as e:  # noqa: BLE001 - a failing config is reported, the sweep goes on
                entry.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
                if not isinstance(e, torch.OutOfMemoryError) and "out of resource" not in str(e):
                    traceback.print_exc(limit=2)
            case["results"].append(entry)
            print(f"{label:5} T={T:<5} {gemm:7} {bucket:7} {tuple(cfg)}: "
                  + (f"{entry['us']:9.1f} µs {entry['tflops']:7.1f} TFLOP/s {entry['weight_tbps']:6.2f} TB/s"
                     f" err {entry['rel_err']:.1e}" if "us" in entry else entry["error"][:120]), flush=True)
        good = [r for r in case["results"] if r.get("ok")]
        if good:
            best_us = min(r["us"] for r in good)
            case["best"] = min(good, key=lambda r: r["us"])["config"]
            for r in good:
                scores.setdefault(key, {}).setdefault(tuple(r["config"].values()), []).append(r["us"] / best_us)
            if direct and gemm == "gate_up":
                partner = GemmConfig(**case["best"])  # the down sweep runs with the best gate_up
        report["cases"].append(case)
    if direct and "best" in report["cases"][-1]:
        _direct_programs(report["cases"][-1], partner, GemmConfig(**report["cases"][-1]["best"]), sets, w13, w2)


def _direct_programs(case, cfg_gu, cfg_dn, sets, w13, w2) -> None:
    """The direct kernel with its best configs at 1, 2 and 3 programs per SM, then at the table's programs per
    SM with DIRECT_PDL on and off (µs; the module's values are restored)."""
    from pykernels.triton import moe_direct

    keep = moe_direct.DIRECT_PROGRAMS_PER_SM, moe_direct.DIRECT_PDL
    case["programs_per_sm"], case["pdl"] = {}, {}
    runs = [("programs_per_sm", n, n, keep[1]) for n in (1, 2, 3)] + [("pdl", p, keep[0], p) for p in (False, True)]
    try:
        for field, key, programs, pdl in runs:
            moe_direct.DIRECT_PROGRAMS_PER_SM, moe_direct.DIRECT_PDL = programs, pdl
            try:
                t, err = _try("down", cfg_dn, sets, w13, w2, True, cfg_gu)
                case[field][key] = {"us": round(t, 3), "rel_err": err, "ok": err <= MAX_REL_ERR}
            except Exception as e:  # noqa: BLE001 - e.g. two programs' shared memory exceeds an SM's
                case[field][key] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"direct {case['label']}: {field} {key}: {case[field][key]}", flush=True)
    finally:
        moe_direct.DIRECT_PROGRAMS_PER_SM, moe_direct.DIRECT_PDL = keep


def _timeline(report, cache) -> None:
    """The direct kernel's timeline at T = 1 with the table's configs (Lite and 236B): per item the global
    timer at its start, at the end of its first phase (a whole unit's h; a down chunk's or a sum item's wait)
    and at its end. Prints and records, in µs from the first item's start: the whole units' h and parts
    phases (mean, max) and their ends, the split units' h pieces and down chunks (start, end), the sums
    (start, waited, end) and the span; with every item's raw (start, phase, end, SM) of the last run."""
    import triton

    from pykernels.triton import moe_configs, moe_direct

    report["timeline"] = []
    for label, E, H, I in DIRECT_SHAPES[:2]:
        w13, w2 = _weights(cache, E, H, I)
        cfg_gu, cfg_dn = (moe_configs.pick(g, H, I, TOP_K, E, 2, direct=True) for g in ("gate_up", "down"))
        units = TOP_K * triton.cdiv(I, cfg_gu.block_n)
        head, split = moe_direct.direct_split(units, torch.cuda.get_device_properties(0).multi_processor_count,
                                                cfg_gu.block_n)
        pieces = (units - head) * split
        for st in _case_sets(E, H, I, 1, w13, w2, DECODE_SETS, direct=True):
            y = torch.empty(1, H, dtype=torch.bfloat16, device="cuda")
            timeline = torch.zeros(4096, 4, dtype=torch.int64, device="cuda")
            for _ in range(3):  # the last run is recorded; the weights were read by the other sets' runs
                moe_direct.moe_ffn_direct(st["x"], w13, w2, st["weights"], st["ids"].view(-1), y, TOP_K, cfg_gu,
                                          cfg_dn, timeline)
            torch.cuda.synchronize()
            rows = timeline[timeline[:, 0] > 0].cpu()
            t = (rows[:, :3] - rows[:, 0].min()).double() / 1e3  # µs
            whole, hp = t[:head], t[head:head + pieces]
            dc, sm = t[head + pieces:head + 2 * pieces], t[head + 2 * pieces:]
            row = {"label": label, "whole_units": head, "h_pieces": pieces, "down_chunks": pieces,
                   "sum_items": len(sm), "sms": len(set(rows[:, 3].tolist())),
                   "h_mean": whole[:, 1].sub(whole[:, 0]).mean().item(),
                   "h_max": whole[:, 1].sub(whole[:, 0]).max().item(),
                   "parts_mean": whole[:, 2].sub(whole[:, 1]).mean().item(),
                   "parts_max": whole[:, 2].sub(whole[:, 1]).max().item(),
                   "whole_first_end": whole[:, 2].min().item(), "whole_last_end": whole[:, 2].max().item()}
            if pieces:
                row.update(pieces_first_start=hp[:, 0].min().item(), pieces_last_end=hp[:, 2].max().item(),
                           piece_mean=hp[:, 2].sub(hp[:, 0]).mean().item(),
                           chunks_waited=dc[:, 1].max().item(), chunks_last_end=dc[:, 2].max().item(),
                           chunk_mean=dc[:, 2].sub(dc[:, 1]).mean().item())
            row.update(sums_start=sm[:, 0].min().item(), sums_waited=sm[:, 1].max().item(),
                       span=t[:, 2].max().item())
            report["timeline"].append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
            print("timeline " + "  ".join(f"{k} {v}" for k, v in report["timeline"][-1].items()), flush=True)
        report["timeline"][-1]["items"] = [[round(a, 3) for a in r[:3]] + [int(r[3])] for r in
                                           torch.cat([t, rows[:, 3:].double()], 1).tolist()]


def _copy_gbps() -> float:
    """Device-to-device copy bandwidth (read + write bytes), measured here: the layouts' ceiling."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_cuda(lambda i: dst.copy_(src), budget=SWEEP_BUDGET).median_us
    del src, dst
    return 2 * n / t / 1e3


def _layouts(report, cache, start, budget_s, copy_gbps):
    """moe_ffn's whole step in each row layout with the table's configs: µs and % of copy over the hit weights."""
    import pykernels as pk
    from pykernels.triton.grouped_gemm import LAYOUTS, moe_ffn_triton

    for label, E, H, I, method, n_group, topk_group in LAYOUT_MODELS:
        w13, w2 = _weights(cache, E, H, I)
        for T in LAYOUT_T:
            if time.monotonic() - start > budget_s:
                return
            sets = []
            for s in range(DECODE_SETS):
                g = torch.Generator(device="cuda").manual_seed(200 + s)
                x = torch.randn(T, H, generator=g, device="cuda").to(torch.bfloat16)
                tw, ids = pk.moe_route(torch.randn(T, E, generator=g, device="cuda"), TOP_K, method=method,
                                       n_group=n_group, topk_group=topk_group)
                sets.append((x, tw, ids, int(torch.unique(ids).numel())))
            hit = sum(st[3] for st in sets) / len(sets)
            weight_bytes = hit * 3 * H * I * 2
            row = {"label": label, "E": E, "H": H, "I": I, "T": T, "experts_hit": hit, "copy_gbps": round(copy_gbps)}
            ref = [moe_ffn_triton(x, w13, w2, tw, ids, layout="sorted") for x, tw, ids, _ in sets]
            for layout in LAYOUTS:
                try:
                    def fn(i, layout=layout):
                        x, tw, ids, _ = sets[i]
                        return moe_ffn_triton(x, w13, w2, tw, ids, layout=layout)

                    err = max(_rel(fn(i), ref[i]) for i in range(len(sets)))
                    t = time_cuda(fn, n_sets=len(sets), graph=True, budget=SWEEP_BUDGET).median_us
                    row[layout] = {"us": round(t, 2), "frac_copy": round(weight_bytes / t / 1e3 / copy_gbps, 4),
                                   "rel_err_vs_sorted": err, "ok": err <= MAX_REL_ERR}
                except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
                    row[layout] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            report["layouts"].append(row)
            print(f"layouts {label:5} T={T:<4} " + "  ".join(
                f"{k} {row[k]['us']:8.1f} µs {100 * row[k]['frac_copy']:5.1f} %" if "us" in row[k] else f"{k} failed"
                for k in LAYOUTS), flush=True)
            del sets, ref


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--budget-s", type=float, default=240.0, help="stop starting new configs after this many seconds")
    p.add_argument("--only", help="run only the cases whose label contains this (lite, 236b, tp2, tp8), or the layouts")
    p.add_argument("--decode-only", action="store_true", help="skip the prefill (T = 8192) GEMM cases")
    p.add_argument("--prefill-only", action="store_true",
                   help="only the prefill (T = 8192) GEMM cases, with the table's config and PREFILL_CANDIDATES")
    p.add_argument("--timeline", action="store_true", help="only the direct kernel's timeline at T = 1 (Lite, 236B)")
    p.add_argument("--compile-only", action="store_true",
                   help="no GPU needed: compile every candidate for sm_90a and report shared memory, registers, spills")
    args = p.parse_args(argv)
    if args.compile_only:
        return compile_report(args.out, args.prefill_only)
    if not torch.cuda.is_available():
        print("tune_moe: needs a CUDA GPU", file=sys.stderr)
        return 2
    from pykernels.triton.moe_configs import bucket_of

    start = time.monotonic()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": [], "layouts": [],
              "best": {}}
    cache = {}
    scores: dict[tuple, dict] = {}  # key -> config -> list of (time / best of case)

    def save():
        _summarise(report, scores)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    if args.timeline:
        _timeline(report, cache)
        save()
        return 0
    if args.decode_only and args.prefill_only:
        p.error("--decode-only and --prefill-only exclude each other")
    work = [] if args.prefill_only else [(label, E, H, I, 1, "direct") for label, E, H, I in DIRECT_SHAPES]
    work += [] if args.prefill_only else [("layouts",)]
    work += [(label, E, H, I, T, bucket_of(T * TOP_K, E)) for label, E, H, I, T in CASES
             if not (args.decode_only and T > 128)
             and not (args.prefill_only and (T <= 128 or label not in ("lite", "236b")))]
    for item in work:
        if time.monotonic() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: stopping before {item}")
            break
        if item[0] == "layouts":
            if not args.only or args.only == "layouts":
                report["copy_gbps"] = _copy_gbps()
                _layouts(report, cache, start, args.budget_s, report["copy_gbps"])
        else:
            label, E, H, I, T, bucket = item
            if args.only and args.only not in label:
                continue
            w13, w2 = _weights(cache, E, H, I)
            _sweep_case(report, scores, label, E, H, I, T, w13, w2, bucket, start, args.budget_s, args.prefill_only)
        save()
    save()
    print(f"\nwrote {args.out} after {time.monotonic() - start:.0f} s; paste into TABLE in pykernels/triton/moe_configs.py:")
    for line in report["best"].values():
        print("    " + line["paste"])
    _print_layouts(report)
    return 0


def _print_layouts(report) -> None:
    """The layout comparison as a table, and the token count up to which the direct layout wins."""
    from pykernels.triton.grouped_gemm import LAYOUTS

    if not report["layouts"]:
        return
    print(f"\nmoe_ffn layouts, % of copy ({report.get('copy_gbps', 0):.0f} GB/s) over the hit experts' weights:")
    print(f"{'model':6} {'T':>4} " + " ".join(f"{k:>18}" for k in LAYOUTS))
    direct_wins = {}
    for row in report["layouts"]:
        cells = [f"{row[k]['us']:8.1f} µs {100 * row[k]['frac_copy']:5.1f}%" if row[k].get("ok") else f"{'failed':>18}"
                 for k in LAYOUTS]
        print(f"{row['label']:6} {row['T']:>4} " + " ".join(f"{c:>18}" for c in cells))
        if row["direct"].get("ok") and row["sorted"].get("ok") and row["direct"]["us"] < row["sorted"]["us"]:
            direct_wins.setdefault(row["label"], []).append(row["T"])
    for label, ts in direct_wins.items():
        print(f"direct beats sorted on {label} at T = {ts}: DIRECT_MAX_TOKENS = {max((t for t in ts if all(u in ts for u in LAYOUT_T if u <= t)), default=0)}")


# Hopper's opt-in shared memory per block (227 KiB): a config above it fails at launch.
SM90_MAX_SHARED = 232448


def compile_report(out_path: str, prefill_only: bool = False) -> int:
    """Compile each candidate's kernels (bf16, H and I multiples of 16 as at the model's shapes) for sm_90a
    without a GPU: gate_up and down in moe_ffn's sorted ("gather") and padded row layouts for the bucket
    candidates, the direct layout's kernel for the "direct" candidates (each with the other GEMM's default).
    Writes shared bytes, registers, stack/local bytes (spills, from the bundled cuobjdump) and the number
    of multi-buffered shared-memory allocations (pipelined operands: a load inside a k loop that feeds an
    address leaves none) per kernel; exit 1 when one overflows shared memory, spills or is not pipelined.
    ``prefill_only``: the large bucket's PREFILL_CANDIDATES alone, in grouped_ffn's "sorted" and moe_ffn's
    "gather" row layouts."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pykernels.triton import grouped_gemm, moe_direct
    from pykernels.triton.moe_configs import DEFAULTS, GemmConfig

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    aligned = {"x_ptr", "w13_ptr", "h_ptr", "map_ptr", "pair_ptr", "w2_ptr", "out_ptr", "y_ptr", "ids_ptr",
               "weights_ptr", "sync_ptr", "part_ptr", "hbuf_ptr", "hidden", "inter", "stride_xm", "stride_we",
               "stride_wn", "stride_hm", "stride_om", "stride_ym", "up_shift", "stride_w13e", "stride_w13n", "stride_w2e",
               "stride_w2n"}
    ints = ("num_rows", "num_pairs", "num_tokens", "hidden", "inter", "num_experts", "head_units", "top_k", "stride_xm",
            "stride_wn", "stride_hm", "stride_om", "stride_ym", "up_shift", "num_m_tiles", "stride_w13n", "stride_w2n")
    variants = []  # (name, kernel, rows, config)
    for gemm in ("gate_up", "down") if prefill_only else ():
        for c in map(GemmConfig._make, PREFILL_CANDIDATES[gemm]):
            variants += [(gemm, gemm, "sorted", c), (gemm, gemm, "gather", c)]
    for b in () if prefill_only else ("decode", "small", "medium", "large"):
        for gemm in ("gate_up", "down"):
            for c in candidates(gemm, b):
                variants += [(gemm, gemm, "gather", c), (gemm, gemm, "padded", c)]
    if not prefill_only:  # the direct kernel: each gate_up candidate with the default down tile, and vice versa
        default_gu, default_dn = DEFAULTS[("gate_up", "direct")], DEFAULTS[("down", "direct")]
        variants += [("direct", "direct", None, (c, default_dn)) for c in candidates("gate_up", "direct")]
        variants += [("direct", "direct", None, (default_gu, c)) for c in candidates("down", "direct")]
    kernels = {"gate_up": grouped_gemm._gate_up_kernel, "down": grouped_gemm._down_kernel,
               "direct": moe_direct._direct_kernel}
    rows, bad = [], 0
    for name, which, layout, cfg in sorted(set(variants), key=str):
        kernel = kernels[which]

        def desc(c):
            return f"tensordesc<bf16[{c.block_n}, {c.block_k}]>" if c.tma else "*bf16"
        if which == "direct":
            gu, dn = cfg
            split = moe_direct.direct_split(144, 132, gu.block_n)[1]  # 236B at T = 1 on the H200
            descs = {"w13_desc": desc(gu), "w2_desc": desc(dn._replace(block_k=gu.block_n))}
            consts = dict(TOP_K=TOP_K, GU_EVEN_K=True, GU_BLOCK_M=gu.block_m, GU_BLOCK_N=gu.block_n,
                          GU_BLOCK_K=gu.block_k, GU_TMA=gu.tma, GU_SINGLE_DOT=gu.single_dot and not gu.tma,
                          DN_BLOCK_H=dn.block_n, DN_TMA=dn.tma, DN_EVEN=True, SUM_BLOCK_J=32, SUM_BLOCK_C=64,
                          SPLIT=split, PIECE_K=moe_direct.piece_k(gu.block_n, split, 2),
                          PIECE_STAGES=moe_direct._PIECE_STAGES, DOT_PRECISION="tf32", TIMELINE=False,
                          PDL=moe_direct.DIRECT_PDL)
            shown = {"gate_up": gu._asdict(), "down": dn._asdict()}
            cfg = gu  # num_warps, num_stages
        else:
            descs = {"w13_desc": desc(cfg), "w2_desc": desc(cfg)}
            shown = cfg._asdict()
            consts = dict(EVEN_K=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                          DOT_PRECISION="tf32", USE_TMA=cfg.tma, ROWS=layout, PAD=cfg.block_m, BLOCK_E=256,
                          GROUP_M=cfg.group_m, SPLIT_TAIL=cfg.split_tail and layout != "padded")
            if which == "gate_up":
                consts.update(SINGLE_DOT=cfg.single_dot and not cfg.tma)
        sig = {}
        for arg in kernel.arg_names:
            if arg in consts:
                sig[arg] = "constexpr"
            elif arg in descs:
                sig[arg] = descs[arg]
            elif arg in ("stride_we", "stride_w13e", "stride_w2e"):
                sig[arg] = "i64"
            elif arg in ints:
                sig[arg] = "i32"
            elif arg in ("map_ptr", "pair_ptr", "ids_ptr", "sync_ptr"):
                sig[arg] = "*i32"
            else:
                sig[arg] = "*fp32" if arg in ("weights_ptr", "part_ptr") else "*bf16"
        attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in sig if n in aligned}
        entry = {"kernel": name, "rows": layout, "config": shown}
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                                      target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            entry["shared"] = compiled.metadata.shared
            # Multi-buffered operands: shared allocations of num_stages - 1 (or num_stages) tiles, one per
            # pipelined load.
            allocs = [line for line in compiled.asm["ttgir"].splitlines() if "ttg.local_alloc" in line]
            multi = re.compile(rf"memdesc<({cfg.num_stages - 1}|{cfg.num_stages})x\d+x\d+x")
            entry["pipelined_buffers"] = sum(bool(multi.search(line)) for line in allocs)
            with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
                f.write(compiled.asm["cubin"])
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
            os.unlink(f.name)
            fields = dict(item.split(":", 1) for line in usage.splitlines() if "REG:" in line for item in line.split())
            entry.update(registers=int(fields["REG"]), stack=int(fields["STACK"]), local=int(fields["LOCAL"]))
            entry["ok"] = (entry["shared"] <= SM90_MAX_SHARED and entry["stack"] == 0 and entry["local"] == 0
                           and (cfg.num_stages < 2 or entry["pipelined_buffers"] > 0))
        except Exception as e:  # noqa: BLE001 - reported per config
            entry.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        bad += not entry["ok"]
        rows.append(entry)
        print(f"{name:10} {str(layout):7} {shown}: "
              + (f"shared {entry['shared']:6d}  registers {entry['registers']:3d}  stack {entry['stack']}"
                 f"  local {entry['local']}  pipelined operands {entry['pipelined_buffers']}" if "local" in entry
                 else entry.get("error", "")) + ("" if entry["ok"] else "   <-- NOT OK"), flush=True)
    routes = [] if prefill_only else _compile_route_kernels(cuobjdump)
    bad += sum(not r["ok"] for r in routes)
    with open(out_path, "w") as f:
        json.dump({"triton": triton.__version__, "target": "sm_90a", "configs": rows, "moe_route": routes}, f, indent=1)
    print(f"{len(rows) + len(routes)} kernels, {bad} not ok; wrote {out_path}")
    return 1 if bad else 0


def _compile_route_kernels(cuobjdump: str) -> list[dict]:
    """The routing kernel at the bar's shapes (float32 logits, top-6) at its default launches: registers, spills
    and shared memory (one-warp programs need none); bench/tune_route.py compiles every launch shape."""
    from bench.tune_route import compile_kernel, describe

    out = []
    for T, E, n_group, topk_group in [(64, 64, 1, 1), (8192, 64, 1, 1), (64, 160, 8, 3), (8192, 160, 8, 3)]:
        out.append(compile_kernel(T, E, n_group, topk_group, cuobjdump=cuobjdump))
        print(describe(out[-1]), flush=True)
    return out


def _summarise(report, scores) -> None:
    """Per key, the config with the lowest sum of (time / case best) over the cases where it ran and was right."""
    from pykernels.triton.moe_configs import GemmConfig

    for key, per_config in scores.items():
        cases = max(len(v) for v in per_config.values())
        complete = {c: v for c, v in per_config.items() if len(v) == cases}
        cfg, ratios = min(complete.items(), key=lambda kv: sum(kv[1]))
        gemm, H, I, bucket = key
        report["best"][f"{gemm} H{H} I{I} {bucket}"] = {
            "config": GemmConfig(*cfg)._asdict(), "cases": cases, "mean_ratio_to_case_best": sum(ratios) / cases,
            "paste": f'("{gemm}", {H}, {I}, "{bucket}"): GemmConfig{tuple(cfg)},',
        }


if __name__ == "__main__":
    sys.exit(main())
