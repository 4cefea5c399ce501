"""End-to-end throughput of the model on pykernels (chunked prefill, CUDA-graph decode) against transformers.

    python -m bench e2e --preset lite [--checkpoint DIR] --batch 1,32,64 --prompt-len 512 --context 4096 \\
        --new-tokens 128 [--peer-new-tokens 16] [--layers N] [--no-peer] [--no-write] [--json PATH]

Weights are random (bf16 on a GPU, float32 on a CPU, seed 0) unless ``--checkpoint`` names a Hugging Face
checkpoint directory. For each batch size B:

- prefill: B random prompts of ``--prompt-len`` tokens through ``Engine.prefill`` (chunked, fused glue,
  batched flash-style attention), timed after one warm-up run of the same shape. Against the FLOP bound:
  ``profiles.cost_model.model_prefill`` FLOPs over the bf16 matmul ceiling measured in the same run.
- context: each sequence is then extended to ``--context`` tokens by appending cache rows of random
  values (N(0, 1), the scale of the normalised latents) instead of running the model over them: decode
  costs the same per step whatever the rows hold, and a real 4096-token prefill of 64 sequences would
  take most of the time budget.
- decode: ``--new-tokens - 1`` CUDA-graph steps (the first new token comes from the prefill), timed
  after a few warm-up steps; ms/step, tokens/s, and the fraction of the bandwidth bound:
  ``cost_model.model_decode_step`` bytes (activated weights + KV cache read and written, at the mean
  context of the timed steps) over the copy ceiling measured in the same run.
- peer: transformers' ``DeepseekV2ForCausalLM.generate`` (greedy, its own random bf16 weights) on a
  config built from ours, with the same batch and prompts: prefill = ``generate(max_new_tokens=1)``;
  decode ms/step = the median of the N - 1 step times of ``generate(N)``, N = ``--peer-new-tokens``
  (a logits processor stamps the clock as each token's logits arrive). Its step is host-bound (about
  9 ms of kernels per step at batch 1 under torch.profiler) and uneven: 76 to 711 ms within one
  ``generate(16)`` at batch 1 on an H200 host (e2e.json @d77dfcb), so the median, not the mean, is the
  stable figure; the records keep the mean, min and max beside it. Its
  context is the prompt (``--prompt-len``), not ``--context``: eager attention over a 4096-token context
  at batch 64 does not fit the time budget, and a shorter context only flatters the peer.

Plus the issue's bar case, prefill of 8 x 1024 tokens (on by default; ``--no-prefill-bar`` skips it).

Expert parallelism: ``torchrun --nproc-per-node 2 -m bench e2e --preset v2-236b --layers N --ep 2``. Every rank
holds all non-expert weights of the first N layers and its half of the routed experts, and runs its own
batch (``--batch`` is per rank; attention is data-parallel); the MoE layers dispatch and combine over a
``pk.ep.Buffer`` (the nvlink backend on one host: its low-latency mode inside the decode graphs; otherwise
NCCL, eager). Rank 0 records the slowest rank's times, the per-layer time (step time / N, embedding and
lm_head included) and an extrapolation to all layers of the preset, stated as such; the bandwidth bound is
per rank (``decode_bytes_per_rank``). There is no transformers peer for this run.

Records (bench/results/<device>/e2e.json): ``model.prefill`` and ``model.decode`` with shape
``{preset, batch, context}`` (prefill: context = prompt length), backend ``pykernels`` with the peer, and
the peer's own rows (backend ``transformers``) so each row's NVML window covers only its own run;
``extra`` holds ``tokens_per_s`` and ``frac_bound``.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bench.harness import DEFAULT_RESULTS_DIR, Context

SUITE = "e2e"

# Decode steps run before the timed ones (graph capture happens before these).
DECODE_WARMUP_STEPS = 3
PEER_NAME = "transformers generate"
BAR_PREFILL = (8, 1024)  # the prefill case: 8 sequences of 1024 tokens
# Prefill chunk of an expert-parallel run: sizes the dispatch buffer (236B: ~10 KB a row per source and parity).
EP_CHUNK_TOKENS = 8192


@dataclass
class E2EArgs:
    preset: str = "lite"
    checkpoint: str | None = None
    batches: tuple[int, ...] = (1, 32, 64)
    prompt_len: int = 512
    context: int = 4096
    new_tokens: int = 128
    peer_new_tokens: int = 16
    layers: int | None = None
    peer: bool = True
    prefill_bar: bool = True
    ep: int = 1

    def validate(self) -> None:
        for name in ("prompt_len", "context", "new_tokens", "peer_new_tokens"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")
        if self.new_tokens < 2 or self.peer_new_tokens < 2:
            raise ValueError("--new-tokens and --peer-new-tokens: expected at least 2 (one from the prefill, "
                             "one or more from decode steps)")
        if self.context < self.prompt_len:
            raise ValueError(f"--context: expected at least --prompt-len ({self.prompt_len}), got {self.context}")
        if not self.batches or any(b <= 0 for b in self.batches):
            raise ValueError(f"--batch: expected positive batch sizes, got {self.batches}")
        if self.layers is not None and self.layers <= 0:
            raise ValueError(f"--layers: expected a positive number of layers, got {self.layers}")
        if self.ep <= 0:
            raise ValueError(f"--ep: expected a positive number of ranks, got {self.ep}")
        if self.ep > 1 and self.checkpoint:
            raise ValueError("--ep: expert-parallel runs use random weights (no sharded checkpoint loading)")


def default_args(ctx: Context) -> E2EArgs:
    """What ``python -m bench`` runs: the issue's Lite runs on a GPU (fewer with --quick), tiny on a CPU."""
    if not ctx.on_gpu:
        return E2EArgs(preset="tiny", batches=(1, 2), prompt_len=8, context=24, new_tokens=4, peer_new_tokens=3,
                       prefill_bar=False)
    if ctx.quick:
        return E2EArgs(batches=(1, 32), context=1024, new_tokens=32, peer_new_tokens=4)
    return E2EArgs()


def run(ctx: Context) -> None:
    run_e2e(ctx, default_args(ctx))


def _build_model(ctx: Context, args: E2EArgs):
    """(model, label) from the checkpoint or the preset (first ``args.layers`` layers, ``args.ep`` ranks)."""
    from model import DeepseekV2, DeepseekV2Config

    dtype = torch.bfloat16 if ctx.on_gpu else torch.float32
    if args.checkpoint:
        t0 = time.perf_counter()
        model = DeepseekV2.from_pretrained(args.checkpoint, dtype=dtype, device=ctx.device)
        ctx.note(f"loaded {args.checkpoint} in {time.perf_counter() - t0:.1f} s")
        return model, args.checkpoint.rstrip("/").split("/")[-1]
    cfg = DeepseekV2Config.from_preset(args.preset)
    if args.layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    rank = torch.distributed.get_rank() if args.ep > 1 else 0
    return DeepseekV2.random(cfg, seed=rank, dtype=dtype, device=ctx.device, ep_size=args.ep), args.preset


# ---- the run -------------------------------------------------------------------------------------------

def run_e2e(ctx: Context, args: E2EArgs) -> None:
    from model import attention

    args.validate()
    device = ctx.device
    model, label = _build_model(ctx, args)
    cfg = model.cfg
    dtype_name = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[model.dtype]
    c = ctx.ceilings
    ctx.note(f"model: {label}, {cfg.num_hidden_layers} layers, {model.num_parameters() / 1e9:.2f} B parameters, "
             f"{dtype_name}, random weights: {not args.checkpoint}; ceilings: copy {c.copy_gbps:.0f} GB/s, "
             f"mm {c.mm_tflops:.0f} TFLOP/s")
    shape_extra = {"layers": cfg.num_hidden_layers} if args.layers is not None else {}

    choice = attention.choose(device, model.dtype, cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim,
                              model.softmax_scale())
    candidates = attention.report(device, model.dtype, cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim)
    ctx.note(f"prefill attention: {choice}; " + (
        f"candidates at S = L = {attention.PROBE_LEN}: " + ", ".join(
            f"{k} {v:.1f} us" if isinstance(v, float) else f"{k} ({v})" for k, v in candidates.items())
        if candidates else "nothing measured (torch's own SDPA dispatch off CUDA)"))
    attention_info = {"attention": choice, "attention_candidates_us": candidates}

    peer = _Peer.make(model, ctx) if args.peer else _Peer(None, "disabled (--no-peer)")
    if peer.hf is None:
        ctx.note(f"peer: {PEER_NAME} missing: {peer.reason}")

    cases: list[tuple[int, int, bool]] = []  # (batch, prompt length, decode too)
    if args.prefill_bar:
        cases.append((BAR_PREFILL[0], BAR_PREFILL[1], False))
    cases += [(b, args.prompt_len, True) for b in args.batches]
    for batch, prompt_len, decode in cases:
        shape_p = {"preset": label, "batch": batch, "context": prompt_len, **shape_extra}
        shape_d = {"preset": label, "batch": batch, "context": args.context, **shape_extra}
        if not ctx.want(shape_p) and not (decode and ctx.want(shape_d)):
            continue
        prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len),
                                generator=torch.Generator().manual_seed(batch))
        # Each record is made right after its run, so its NVML window (since the previous record) is that run.
        peer_p, t1 = _peer_prefill(ctx, peer, prompts, shape_p, dtype_name)
        peer_d = _peer_decode(ctx, peer, prompts, t1, args.peer_new_tokens, shape_d, dtype_name) if decode else None
        run = _run_ours(model, prompts, args, decode)
        _record_prefill(ctx, cfg, next(run), shape_p, dtype_name, peer_p, attention_info)
        if decode:
            _record_decode(ctx, cfg, next(run), shape_d, dtype_name, args, peer_d)
        run.close()
        if ctx.on_gpu:
            torch.cuda.empty_cache()


def run_e2e_ep(ctx: Context, args: E2EArgs) -> None:
    """The expert-parallel run (see the module doc); every rank of the default process group calls it."""
    import torch.distributed as dist

    import pykernels as pk

    args.validate()
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != args.ep:
        raise ValueError(f"--ep: expected the process group's size {world}, got {args.ep}")
    model, label = _build_model(ctx, args)
    cfg = model.cfg
    dtype_name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[model.dtype]
    chunk = min(EP_CHUNK_TOKENS, max(args.batches) * args.prompt_len)
    prefill_buf = pk.ep.Buffer(None, cfg.hidden_size, cfg.n_routed_experts, chunk, dtype=model.dtype,
                               device=ctx.device)
    decode_buf = pk.ep.Buffer(None, cfg.hidden_size, cfg.n_routed_experts, max(args.batches), dtype=model.dtype,
                              device=ctx.device)
    model.set_expert_parallel(prefill_buf, decode_buf)
    graphs = ctx.on_gpu and decode_buf.backend == "nvlink"
    ctx.note(f"model: {label}, {cfg.num_hidden_layers} of {_preset_layers(args.preset)} layers, experts over {world} "
             f"ranks ({model.num_parameters() / 1e9:.2f} B parameters on this rank), {dtype_name}; EP backend "
             f"{decode_buf.backend}, decode in CUDA graphs: {graphs}")
    shape_extra = {"layers": cfg.num_hidden_layers, "ep": world}
    no_peer = (PEER_NAME, None, "transformers has no expert-parallel generate")
    for batch in args.batches:
        shape_p = {"preset": label, "batch": batch, "context": args.prompt_len, **shape_extra}
        shape_d = {"preset": label, "batch": batch, "context": args.context, **shape_extra}
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len),
                                generator=torch.Generator().manual_seed(1000 * rank + batch))
        run = _run_ours(model, prompts, args, True, use_graphs=graphs, chunk_tokens=chunk, barrier=dist.barrier)
        ours = _slowest_rank(next(run), "prefill_s")
        _record_prefill(ctx, cfg, ours, shape_p, dtype_name, no_peer, {"ep_backend": prefill_buf.backend})
        ours = _slowest_rank(next(run), "decode_s")
        step_s = ours["decode_s"] / ours["steps"]
        per_layer = step_s / cfg.num_hidden_layers
        all_layers = _preset_layers(args.preset)
        _record_decode(ctx, cfg, ours, shape_d, dtype_name, args, no_peer, ep=world, extra={
            "ep_backend": decode_buf.backend, "per_layer_us": round(per_layer * 1e6, 2),
            f"extrapolated_{all_layers}_layers_ms": round(per_layer * all_layers * 1e3, 3),
            "extrapolation": f"per_layer_us x {all_layers}: an extrapolation from {cfg.num_hidden_layers} layers "
                             "(embedding and lm_head counted in each layer's share), not a measurement",
            "tokens_per_s_all_ranks": round(world * batch / step_s, 1)})
        ctx.note(f"  per layer {per_layer * 1e6:,.1f} us; {all_layers} layers extrapolated: "
                 f"{per_layer * all_layers * 1e3:,.2f} ms/step, {world * batch / (per_layer * all_layers):,.0f} "
                 f"tok/s over {world} ranks (an extrapolation, not a measurement)")
        run.close()
        if ctx.on_gpu:
            torch.cuda.empty_cache()
    for buf in (decode_buf, prefill_buf):
        buf.close()


def _preset_layers(preset: str) -> int:
    from model import DeepseekV2Config

    return DeepseekV2Config.from_preset(preset).num_hidden_layers


def _slowest_rank(times: dict[str, float], key: str) -> dict[str, float]:
    """``times`` with ``times[key]`` replaced by its maximum over the ranks."""
    import torch.distributed as dist

    t = torch.tensor([times[key]], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {**times, key: float(t.item())}


def decode_bytes_per_rank(cfg, batch: int, context: int, ranks: int, elem_bytes: int) -> int:
    """Minimal bytes one rank moves in an expert-parallel decode step: every non-expert weight, its share
    (1 / ranks) of the distinct experts the batch of all ranks hits (uniform routing), and its own batch's
    KV cache read and write (``cost_model.model_decode_step`` with the other ranks' experts taken out)."""
    from profiles import cost_model

    p = cost_model.model_params(cfg)
    whole = cost_model.model_decode_step(cfg, batch, context, elem_bytes)
    hit_one = cost_model.expected_experts_hit(p.num_experts, p.top_k, batch)
    hit_all = cost_model.expected_experts_hit(p.num_experts, p.top_k, batch * ranks)
    experts = p.num_moe_layers * p.expert * elem_bytes
    return round(whole.bytes - experts * hit_one + experts * hit_all / ranks)


def _run_ours(model, prompts: torch.Tensor, args: E2EArgs, decode: bool, *, use_graphs: bool | None = None,
              chunk_tokens: int | None = None, barrier=lambda: None) -> Iterator[dict[str, float]]:
    """Yields the prefill timing (warm-up run, then the timed one), then, with ``decode``, the decode
    timing (context fill, graph capture, warm-up steps, timed steps). ``barrier`` lines ranks up before
    each timed part."""
    from model.engine import DEFAULT_CHUNK_TOKENS, Engine

    batch, prompt_len = prompts.shape
    steps = args.new_tokens - 1
    extra = (args.context - prompt_len) if decode else 0
    reserve = extra + DECODE_WARMUP_STEPS + steps if decode else 0
    engine = Engine(model, batch, prompt_len + reserve, buckets=[batch], use_graphs=use_graphs,
                    chunk_tokens=chunk_tokens or DEFAULT_CHUNK_TOKENS)
    rows = list(range(batch))
    engine.prefill(prompts, rows, reserve)  # warm-up: kernels compiled for these shapes
    for r in rows:
        engine.cache.release(r)
    barrier()
    t0 = _now(model.device)
    engine.prefill(prompts, rows, reserve)
    yield {"prefill_s": _now(model.device) - t0, "batch": batch, "prompt_len": prompt_len}
    if extra:
        fill_context(engine.cache, extra)
    engine.runner.capture([batch])
    engine.decode(DECODE_WARMUP_STEPS, batch)
    _now(model.device)
    barrier()
    t0 = _now(model.device)
    engine.decode(steps, batch)
    yield {"decode_s": _now(model.device) - t0, "steps": steps, "batch": batch,
           "mean_context": args.context + DECODE_WARMUP_STEPS + (steps + 1) / 2, "graphs": engine.runner.use_graphs}


def _now(device: torch.device) -> float:
    """Wall clock after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def fill_context(cache, extra: int) -> None:
    """Append ``extra`` tokens to every sequence of ``cache`` whose rows are random N(0, 1) values, not
    computed ones (see the module doc). Blocks must already be reserved or free."""
    step = cache.append([extra] * cache.batch_size)
    g = torch.Generator(device=cache.device).manual_seed(1)
    rows = cache.kv.view(cache.kv.shape[0], -1, cache.kv.shape[-1])  # [layers, slots, C + R]
    for layer in range(rows.shape[0]):
        values = torch.randn(step.slot_mapping.numel(), rows.shape[-1], generator=g, device=cache.device,
                             dtype=torch.float32)
        rows[layer].index_copy_(0, step.slot_mapping, values.to(rows.dtype))


def _record_prefill(ctx, cfg, ours, shape, dtype_name, peer, attention_info) -> None:
    from profiles import cost_model

    batch, prompt_len, t = ours["batch"], ours["prompt_len"], ours["prefill_s"]
    tokens = batch * prompt_len
    cost = cost_model.model_prefill(cfg, tokens, elem_bytes=_elem_bytes(dtype_name), seq_len=prompt_len)
    frac = cost.flops / (ctx.ceilings.mm_tflops * 1e12) / t
    backend = "pykernels-ep" if "ep" in shape else "pykernels"
    rec = ctx.record(op="model.prefill", backend=backend, shape=shape, dtype=dtype_name, time_us=t * 1e6,
                     bytes=cost.bytes, flops=cost.flops, peer=peer,
                     extra={"tokens_per_s": round(tokens / t, 1), "frac_bound": round(frac, 4), "bound": "flops",
                            **attention_info})
    ctx.note(f"batch {batch} x {prompt_len}: prefill {tokens / t:,.0f} tok/s, {t * 1e3:.1f} ms "
             f"({100 * frac:.1f} % of the FLOP bound); {_peer_text(peer)}{_nvml_text(rec)}")


def _record_decode(ctx, cfg, ours, shape, dtype_name, args, peer, *, ep: int = 1,
                   extra: dict[str, Any] | None = None) -> None:
    from profiles import cost_model

    batch, steps = ours["batch"], ours["steps"]
    step_s = ours["decode_s"] / steps
    context, elem = round(ours["mean_context"]), _elem_bytes(dtype_name)
    cost = cost_model.model_decode_step(cfg, batch, context, elem_bytes=elem)
    nbytes = cost.bytes if ep == 1 else decode_bytes_per_rank(cfg, batch, context, ep, elem)
    frac = nbytes / (ctx.ceilings.copy_gbps * 1e9) / step_s
    rec = ctx.record(op="model.decode", backend="pykernels" if ep == 1 else "pykernels-ep", shape=shape,
                     dtype=dtype_name, time_us=step_s * 1e6, bytes=nbytes, flops=cost.flops, peer=peer,
                     extra={"tokens_per_s": round(batch / step_s, 1), "frac_bound": round(frac, 4),
                            "bound": "bytes" if ep == 1 else "bytes per rank", "ms_per_step": round(step_s * 1e3, 4),
                            "steps": steps, "mean_context": ours["mean_context"], "cuda_graphs": ours["graphs"],
                            "context_fill": "random cache rows past the prompt", **(extra or {})})
    ctx.note(f"batch {batch}, context {args.context}: decode {batch / step_s:,.1f} tok/s, {step_s * 1e3:.3f} ms/step "
             f"({100 * frac:.1f} % of the bandwidth bound); {_peer_text(peer)}{_nvml_text(rec)}")


def _elem_bytes(dtype_name: str) -> int:
    return {"bf16": 2, "fp16": 2, "fp32": 4}[dtype_name]


def _peer_text(peer: tuple) -> str:
    if peer[1] is None:
        return f"{PEER_NAME} missing ({peer[2]})"
    return f"{PEER_NAME} {peer[1] / 1e3:,.1f} ms"


def _nvml_text(rec: dict) -> str:
    nv = rec.get("nvml") or {}
    if not nv.get("samples"):
        return ""
    return (f"; SM clock {nv['sm_clock_mhz']['mean']:.0f} MHz (min {nv['sm_clock_mhz']['min']:.0f}), "
            f"power {nv['power_w']['mean']:.0f} W (max {nv['power_w']['max']:.0f})"
            + (f", throttle: {', '.join(nv['throttle_reasons'])}" if nv.get("throttle_reasons") else ""))


# ---- the peer ------------------------------------------------------------------------------------------

class _Peer:
    """transformers' DeepseekV2ForCausalLM on a config built from ours, or why it is missing."""

    def __init__(self, hf: Any, reason: str | None):
        self.hf, self.reason = hf, reason

    @classmethod
    def make(cls, model, ctx: Context) -> _Peer:
        try:
            import transformers
            from transformers import DeepseekV2ForCausalLM
        except Exception as e:  # noqa: BLE001 - reported as the peer's absence
            return cls(None, f"transformers not importable: {type(e).__name__}: {e}")
        try:
            hf_cfg = hf_config(model.cfg)
            previous = torch.get_default_dtype()
            torch.set_default_dtype(model.dtype)
            try:
                with torch.device(model.device):
                    hf = DeepseekV2ForCausalLM(hf_cfg).eval()
            finally:
                torch.set_default_dtype(previous)
            randomize(hf)
            hf.generation_config.eos_token_id = None
            hf.generation_config.pad_token_id = 0
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return cls(None, "out of memory building the transformers model")
        except Exception as e:  # noqa: BLE001
            return cls(None, f"building the transformers model failed: {type(e).__name__}: {str(e)[:200]}")
        ctx.note(f"peer: transformers {transformers.__version__} DeepseekV2ForCausalLM, attention "
                 f"{hf.config._attn_implementation}, experts {_experts_implementation(hf)}, random "
                 f"{str(model.dtype).removeprefix('torch.')} weights")
        peer = cls(hf, None)
        peer._generate(torch.zeros(1, 4, dtype=torch.int64, device=model.device), 2)  # warm-up
        return peer

    @torch.no_grad()
    def prefill_s(self, prompts: torch.Tensor) -> float:
        """Seconds of ``generate(max_new_tokens=1)`` (the second run of the shape)."""
        ids = prompts.to(self.hf.device)
        self._generate(ids, 1)  # first run of this shape: one-time costs out of the timing
        return self._generate(ids, 1)

    @torch.no_grad()
    def decode_steps_s(self, prompts: torch.Tensor, new_tokens: int) -> list[float]:
        """Seconds of each of the ``new_tokens - 1`` decode steps of ``generate(new_tokens)``."""
        clock = _StepClock()
        self._generate(prompts.to(self.hf.device), new_tokens, clock)
        return [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]

    def _generate(self, ids: torch.Tensor, n: int, clock: _StepClock | None = None) -> float:
        t0 = _now(ids.device)
        self.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, logits_processor=[clock] if clock else None)
        return _now(ids.device) - t0


class _StepClock:
    """A logits processor that leaves the logits alone and stamps the clock (after the device's queued
    work) each time ``generate`` hands it a new token's logits: the gaps are the decode steps."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(_now(scores.device))
        return scores


def _peer_prefill(ctx, peer: _Peer, prompts, shape, dtype_name) -> tuple[tuple, float | None]:
    """Time and record the peer's prefill -> (our record's ``peer`` argument, its seconds or None)."""
    if peer.hf is None:
        return (PEER_NAME, None, peer.reason), None
    try:
        t = peer.prefill_s(prompts)
    except Exception as e:  # noqa: BLE001 - the peer is reported missing, the run goes on
        return (PEER_NAME, None, _failure(ctx, e)), None
    batch, prompt_len = prompts.shape
    ctx.record(op="model.prefill", backend="transformers", shape=shape, dtype=dtype_name, time_us=t * 1e6,
               extra={"tokens_per_s": round(batch * prompt_len / t, 1), "what": "generate(max_new_tokens=1)",
                      "attention": peer.hf.config._attn_implementation,
                      "experts": _experts_implementation(peer.hf)})
    return (PEER_NAME, t * 1e6), t


def _peer_decode(ctx, peer: _Peer, prompts, prefill_s, new_tokens, shape, dtype_name) -> tuple:
    """Time and record the peer's decode steps -> our record's ``peer`` argument."""
    if peer.hf is None or prefill_s is None:
        return PEER_NAME, None, peer.reason or "its prefill failed"
    try:
        steps = peer.decode_steps_s(prompts, new_tokens)
    except Exception as e:  # noqa: BLE001
        return PEER_NAME, None, _failure(ctx, e)
    s = statistics.median(steps)
    batch, prompt_len = prompts.shape
    ctx.record(op="model.decode", backend="transformers", shape=shape, dtype=dtype_name, time_us=s * 1e6,
               extra={"tokens_per_s": round(batch / s, 1), "ms_per_step": round(s * 1e3, 4),
                      "ms_per_step_mean_min_max": [round(f(steps) * 1e3, 4) for f in (statistics.mean, min, max)],
                      "context_used": f"the prompt ({prompt_len} tokens), not the shape's context",
                      "new_tokens": new_tokens, "attention": peer.hf.config._attn_implementation,
                      "experts": _experts_implementation(peer.hf)})
    return PEER_NAME, s * 1e6


def _experts_implementation(hf) -> str | None:
    """The expert FFN path transformers chose ("grouped_mm", "eager", ...; None where the version has no
    choice): it sets how many launches and host syncs a peer step makes, so the records say it."""
    return getattr(hf.config, "_experts_implementation", None)


def _failure(ctx, e: Exception) -> str:
    if ctx.on_gpu:
        torch.cuda.empty_cache()
    return "out of memory" if isinstance(e, torch.OutOfMemoryError) else f"{type(e).__name__}: {str(e)[:200]}"


def hf_config(cfg):
    """transformers' DeepseekV2Config with our config's values (rope scaling as ``rope_parameters``)."""
    from transformers import DeepseekV2Config as HFConfig

    if cfg.rope_scaling is None:
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:
        rope = {"rope_type": cfg.rope_scaling["type"], "rope_theta": cfg.rope_theta,
                **{k: v for k, v in cfg.rope_scaling.items() if k != "type"}}
    fields = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
              "num_attention_heads", "n_shared_experts", "n_routed_experts", "num_experts_per_tok",
              "routed_scaling_factor", "topk_method", "n_group", "topk_group", "norm_topk_prob",
              "first_k_dense_replace", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
              "v_head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
              "eos_token_id")
    return HFConfig(num_key_value_heads=cfg.num_attention_heads, rope_parameters=rope,
                    **{f: getattr(cfg, f) for f in fields})


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights std in^-0.5 (matrices, stacked experts), 1 for norms: finite activations of unit scale."""
    torch.manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        elif name.endswith("embed_tokens.weight"):
            p.normal_(0.0, 1.0)
        else:
            p.normal_(0.0, p.shape[-1] ** -0.5)


# ---- `python -m bench e2e` -----------------------------------------------------------------------------

def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    """Options left out take ``default_args``: the issue's Lite runs on a GPU, the tiny preset on a CPU."""
    p = argparse.ArgumentParser(prog="python -m bench e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", help="model preset (GPU default lite, CPU tiny; ignored with --checkpoint)")
    p.add_argument("--checkpoint", help="Hugging Face checkpoint directory instead of random weights")
    p.add_argument("--batch", type=_ints, dest="batches", help="batch sizes, e.g. 1,32,64 (per rank with --ep)")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--context", type=int, help="KV length at the start of decode")
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--peer-new-tokens", type=int,
                   help="tokens transformers generates per batch (its decode is ~100x slower than ours)")
    p.add_argument("--layers", type=int, help="keep only the first N layers (shape records say so)")
    p.add_argument("--no-peer", action="store_true", help="skip transformers")
    p.add_argument("--no-prefill-bar", action="store_true",
                   help=f"skip the {BAR_PREFILL[0]} x {BAR_PREFILL[1]} prefill")
    p.add_argument("--ep", type=int, help="expert-parallel ranks (launch with torchrun --nproc-per-node EP)")
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS_DIR))
    p.add_argument("--no-write", action="store_true", help="do not touch the results files")
    p.add_argument("--json", metavar="PATH", help="also write this run's records to PATH")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from bench import results

    a = parser().parse_args(argv)
    rank, device = 0, None
    if a.ep is not None and a.ep > 1:
        try:
            rank, device = _init_distributed(a.ep)
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
    ctx = Context(device=device, quick=not torch.cuda.is_available(),
                  results_dir=None if a.no_write or rank else a.results_dir, echo=rank == 0)
    given = {k: v for k, v in vars(a).items()
             if v is not None and k in {f.name for f in dataclasses.fields(E2EArgs)}}
    args = dataclasses.replace(default_args(ctx), **given)
    if a.no_peer:
        args.peer = False
    if a.no_prefill_bar:
        args.prefill_bar = False
    try:
        args.validate()
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    ctx.note(f"device: {ctx.device_name} ({ctx.slug}); torch {torch.__version__}")
    t0 = time.perf_counter()
    try:
        with ctx.suite_run(SUITE):
            (run_e2e_ep if args.ep > 1 else run_e2e)(ctx, args)
    except Exception:  # noqa: BLE001 - reported; nothing is recorded for a failed run
        print(f"!! e2e failed on rank {rank}, nothing recorded:\n{traceback.format_exc()}", file=sys.stderr)
        return 1
    if args.ep > 1:
        torch.distributed.destroy_process_group()
    recs = ctx.suite_records(SUITE)
    ctx.note(f"-- e2e: {len(recs)} records in {time.perf_counter() - t0:.1f} s\n{results.format_table(recs)}")
    if a.json and rank == 0:
        results.write_json(a.json, recs)
    return 0


def _init_distributed(ranks: int) -> tuple[int, torch.device]:
    """The default process group of a torchrun launch of ``ranks`` processes -> (rank, this rank's device)."""
    import os

    import torch.distributed as dist

    from pykernels.ep.buffer import disable_multicast

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != ranks:
        raise ValueError(f"--ep: expected {ranks} processes (torchrun --nproc-per-node {ranks} -m bench e2e ...), "
                         f"WORLD_SIZE is {world}")
    if torch.cuda.is_available():
        disable_multicast()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), device
