"""Greedy generation over the paged latent cache, with timing; a CPU smoke entry for ``python -m bench``.

    result = greedy(model, prompts, max_new_tokens=16)
    result.tokens          # one list of new token ids per prompt (cut after eos_token_id when given)
    result.decode_tok_s    # generated tokens per second over the decode steps

``python -m model.generate --preset tiny`` runs it on random weights.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.cache import DEFAULT_BLOCK_SIZE
from model.config import DeepseekV2Config
from model.model import DeepseekV2


@dataclass
class GreedyResult:
    tokens: list[list[int]]   # generated ids per prompt
    prefill_s: float          # wall time of the prefill (first token included)
    decode_s: float           # wall time of the remaining max_new_tokens - 1 decode steps
    prompt_tokens: int
    new_tokens: int           # batch * max_new_tokens (before cutting at eos)

    @property
    def decode_tok_s(self) -> float:
        steps = self.new_tokens - len(self.tokens)
        return steps / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy(model: DeepseekV2, prompts: Sequence[Sequence[int] | torch.Tensor], max_new_tokens: int, *,
           block_size: int = DEFAULT_BLOCK_SIZE, eos_token_id: int | None = None) -> GreedyResult:
    """Prefill every prompt, then decode ``max_new_tokens - 1`` steps of one token per sequence (argmax).

    Every sequence runs all steps (no host sync per step); tokens after ``eos_token_id`` are cut at the end.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    lengths = [len(p) for p in prompts]
    cache = model.new_cache(len(prompts), max(lengths) + max_new_tokens, block_size=block_size)
    device = model.device
    _sync(device)
    t0 = time.perf_counter()
    next_ids = model.prefill(prompts, cache).argmax(-1)  # [B]
    out = [next_ids]
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        next_ids = model.decode(next_ids[:, None], cache)[:, 0].argmax(-1)  # [B]
        out.append(next_ids)
    _sync(device)
    t2 = time.perf_counter()
    tokens = torch.stack(out, dim=1).tolist()  # [B, max_new_tokens]
    if eos_token_id is not None:
        tokens = [t[: t.index(eos_token_id) + 1] if eos_token_id in t else t for t in tokens]
    return GreedyResult(tokens=tokens, prefill_s=t1 - t0, decode_s=t2 - t1, prompt_tokens=sum(lengths),
                        new_tokens=len(prompts) * max_new_tokens)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Greedy generation with random weights (smoke run).")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--backend", default=None, choices=[None, "torch", "triton", "cuda"])
    args = parser.parse_args(argv)
    cfg = DeepseekV2Config.from_preset(args.preset)
    model = DeepseekV2.random(cfg, seed=0, dtype=getattr(torch, args.dtype), device=args.device,
                              backend=args.backend)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    greedy(model, prompts, 2)  # warm-up: first-call costs (op registration, kernel compilation)
    r = greedy(model, prompts, args.new_tokens)
    print(f"{args.preset} batch {args.batch} prompt {args.prompt_len} on {args.device} {args.dtype}: "
          f"prefill {r.prefill_s * 1e3:.1f} ms ({r.prefill_tok_s:.0f} tok/s), "
          f"decode {r.decode_tok_s:.1f} tok/s; first tokens {r.tokens[0][:8]}")


if __name__ == "__main__":
    main()
