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
  config built from ours, with the same batch and prompts: prefill = ``generate(max_new_tokens=1)``,
  decode ms/step = (``generate(N)`` - ``generate(1)``) / (N - 1) with N = ``--peer-new-tokens``. Its
  context is the prompt (``--prompt-len``), not ``--context``: eager attention over a 4096-token context
  at batch 64 does not fit the time budget, and a shorter context only flatters the peer.

Plus the issue's bar case, prefill of 8 x 1024 tokens (``--prefill-bar``, on by default for the lite preset).

Records (bench/results/<device>/e2e.json): ``model.prefill`` and ``model.decode`` with shape
``{preset, batch, context}`` (prefill: context = prompt length), backend ``pykernels`` with the peer, and
the peer's own rows (backend ``transformers``) so each row's NVML window covers only its own run;
``extra`` holds ``tokens_per_s`` and ``frac_bound``.
"""
from __future__ import annotations

import argparse
import dataclasses
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


# ---- the run -------------------------------------------------------------------------------------------

def run_e2e(ctx: Context, args: E2EArgs) -> None:
    from model import DeepseekV2, DeepseekV2Config
    from model import attention

    args.validate()
    device = ctx.device
    dtype = torch.bfloat16 if ctx.on_gpu else torch.float32
    if args.checkpoint:
        t0 = time.perf_counter()
        model = DeepseekV2.from_pretrained(args.checkpoint, dtype=dtype, device=device)
        label = args.checkpoint.rstrip("/").split("/")[-1]
        ctx.note(f"loaded {args.checkpoint} in {time.perf_counter() - t0:.1f} s")
    else:
        cfg = DeepseekV2Config.from_preset(args.preset)
        if args.layers is not None:
            cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
        model = DeepseekV2.random(cfg, seed=0, dtype=dtype, device=device)
        label = args.preset
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


def _run_ours(model, prompts: torch.Tensor, args: E2EArgs, decode: bool) -> Iterator[dict[str, float]]:
    """Yields the prefill timing (warm-up run, then the timed one), then, with ``decode``, the decode
    timing (context fill, graph capture, warm-up steps, timed steps)."""
    from model.engine import Engine

    batch, prompt_len = prompts.shape
    steps = args.new_tokens - 1
    extra = (args.context - prompt_len) if decode else 0
    reserve = extra + DECODE_WARMUP_STEPS + steps if decode else 0
    engine = Engine(model, batch, prompt_len + reserve, buckets=[batch])
    rows = list(range(batch))
    engine.prefill(prompts, rows, reserve)  # warm-up: kernels compiled for these shapes
    for r in rows:
        engine.cache.release(r)
    t0 = _now(model.device)
    engine.prefill(prompts, rows, reserve)
    yield {"prefill_s": _now(model.device) - t0, "batch": batch, "prompt_len": prompt_len}
    if extra:
        fill_context(engine.cache, extra)
    engine.runner.capture([batch])
    engine.decode(DECODE_WARMUP_STEPS, batch)
    t0 = _now(model.device)
    engine.decode(steps, batch)
    yield {"decode_s": _now(model.device) - t0, "steps": steps, "batch": batch,
           "mean_context": args.context + DECODE_WARMUP_STEPS + (steps + 1) / 2}


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
    rec = ctx.record(op="model.prefill", backend="pykernels", shape=shape, dtype=dtype_name, time_us=t * 1e6,
                     bytes=cost.bytes, flops=cost.flops, peer=peer,
                     extra={"tokens_per_s": round(tokens / t, 1), "frac_bound": round(frac, 4), "bound": "flops",
                            **attention_info})
    ctx.note(f"batch {batch} x {prompt_len}: prefill {tokens / t:,.0f} tok/s, {t * 1e3:.1f} ms "
             f"({100 * frac:.1f} % of the FLOP bound); {_peer_text(peer)}{_nvml_text(rec)}")


def _record_decode(ctx, cfg, ours, shape, dtype_name, args, peer) -> None:
    from profiles import cost_model

    batch, steps = ours["batch"], ours["steps"]
    step_s = ours["decode_s"] / steps
    cost = cost_model.model_decode_step(cfg, batch, round(ours["mean_context"]), elem_bytes=_elem_bytes(dtype_name))
    frac = cost.bytes / (ctx.ceilings.copy_gbps * 1e9) / step_s
    rec = ctx.record(op="model.decode", backend="pykernels", shape=shape, dtype=dtype_name, time_us=step_s * 1e6,
                     bytes=cost.bytes, flops=cost.flops, peer=peer,
                     extra={"tokens_per_s": round(batch / step_s, 1), "frac_bound": round(frac, 4),
                            "bound": "bytes", "ms_per_step": round(step_s * 1e3, 4), "steps": steps,
                            "mean_context": ours["mean_context"], "cuda_graphs": ctx.on_gpu,
                            "context_fill": "random cache rows past the prompt"})
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
                 f"{hf.config._attn_implementation}, random {str(model.dtype).removeprefix('torch.')} weights")
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
    def decode_step_s(self, prompts: torch.Tensor, new_tokens: int, prefill_s: float) -> float:
        """Seconds per decode step: (generate(new_tokens) - generate(1)) / (new_tokens - 1)."""
        return (self._generate(prompts.to(self.hf.device), new_tokens) - prefill_s) / (new_tokens - 1)

    def _generate(self, ids: torch.Tensor, n: int) -> float:
        t0 = _now(ids.device)
        self.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False)
        return _now(ids.device) - t0


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
                      "attention": peer.hf.config._attn_implementation})
    return (PEER_NAME, t * 1e6), t


def _peer_decode(ctx, peer: _Peer, prompts, prefill_s, new_tokens, shape, dtype_name) -> tuple:
    """Time and record the peer's decode steps -> our record's ``peer`` argument."""
    if peer.hf is None or prefill_s is None:
        return PEER_NAME, None, peer.reason or "its prefill failed"
    try:
        s = peer.decode_step_s(prompts, new_tokens, prefill_s)
    except Exception as e:  # noqa: BLE001
        return PEER_NAME, None, _failure(ctx, e)
    batch, prompt_len = prompts.shape
    ctx.record(op="model.decode", backend="transformers", shape=shape, dtype=dtype_name, time_us=s * 1e6,
               extra={"tokens_per_s": round(batch / s, 1), "ms_per_step": round(s * 1e3, 4),
                      "context_used": f"the prompt ({prompt_len} tokens), not the shape's context",
                      "new_tokens": new_tokens, "attention": peer.hf.config._attn_implementation})
    return PEER_NAME, s * 1e6


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
    p.add_argument("--batch", type=_ints, dest="batches", help="batch sizes, e.g. 1,32,64")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--context", type=int, help="KV length at the start of decode")
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--peer-new-tokens", type=int,
                   help="tokens transformers generates per batch (its decode is ~100x slower than ours)")
    p.add_argument("--layers", type=int, help="keep only the first N layers (shape records say so)")
    p.add_argument("--no-peer", action="store_true", help="skip transformers")
    p.add_argument("--no-prefill-bar", action="store_true", help=f"skip the {BAR_PREFILL[0]} x {BAR_PREFILL[1]} prefill")
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS_DIR))
    p.add_argument("--no-write", action="store_true", help="do not touch the results files")
    p.add_argument("--json", metavar="PATH", help="also write this run's records to PATH")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from bench import results

    a = parser().parse_args(argv)
    ctx = Context(quick=not torch.cuda.is_available(), results_dir=None if a.no_write else a.results_dir)
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
    ctx = Context(quick=not torch.cuda.is_available(), results_dir=None if a.no_write else a.results_dir)
    ctx.note(f"device: {ctx.device_name} ({ctx.slug}); torch {torch.__version__}")
    t0 = time.perf_counter()
    try:
        with ctx.suite_run(SUITE):
            run_e2e(ctx, args)
    except Exception:  # noqa: BLE001 - reported; nothing is recorded for a failed run
        ctx.note(f"!! e2e failed, nothing recorded:\n{traceback.format_exc()}")
        return 1
    recs = ctx.suite_records(SUITE)
    ctx.note(f"-- e2e: {len(recs)} records in {time.perf_counter() - t0:.1f} s\n{results.format_table(recs)}")
    if a.json:
        results.write_json(a.json, recs)
    return 0

