"""A small serving engine on the fast path: chunked prefill, CUDA-graph decode, continuous batching.

    engine = Engine(model, max_batch=32, max_seq_len=4096)
    result = engine.generate(prompts, max_new_tokens=128)      # any number of prompts, any lengths
    result.tokens, result.prefill_tok_s, result.decode_tok_s

The scheduler: every sequence gets a row of the paged cache (``max_batch`` rows) and, when admitted, the
blocks for its prompt plus ``max_new_tokens - 1`` tokens (the last new token is never appended;
``cache.reserve``), so decode steps never allocate. Admitted prompts are prefilled together, in chunks of
at most ``chunk_tokens`` tokens (a longer prompt is split across chunks; a later chunk attends to the
earlier ones through the cache). Then the live rows decode in
bursts of CUDA-graph steps (model/graphs.py) with no host work per token; a burst lasts until the next
sequence is done, its row is released, and waiting prompts are admitted into the free rows (continuous
batching). Sequences finish by count; ``eos_token_id`` cuts the returned tokens after the first eos.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.cache import DEFAULT_BLOCK_SIZE
from model.graphs import DecodeGraphs
from model.model import DeepseekV2

# Prompt tokens per prefill call: big enough that the GEMMs run at full rate, small enough that the
# activations (~60 KB a token on Lite) stay in the low GB.
DEFAULT_CHUNK_TOKENS = 16384


@dataclass
class EngineResult:
    tokens: list[list[int]]   # generated ids per prompt (cut after eos_token_id when given)
    prefill_s: float          # wall time of the prefill calls (first tokens included)
    decode_s: float           # wall time of the decode bursts
    prompt_tokens: int
    decode_tokens: int        # tokens made by decode steps (the first token of each prompt comes from prefill)
    decode_steps: int         # graph replays

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


class Engine:
    """Owns a paged latent cache of ``max_batch`` rows of up to ``max_seq_len`` tokens, and the decode graphs."""

    def __init__(self, model: DeepseekV2, max_batch: int, max_seq_len: int, *,
                 block_size: int = DEFAULT_BLOCK_SIZE, num_blocks: int | None = None,
                 buckets: Sequence[int] | None = None, use_graphs: bool | None = None,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens: expected a positive integer, got {chunk_tokens!r}")
        self.model = model
        self.cache = model.new_cache(max_batch, max_seq_len, block_size=block_size, num_blocks=num_blocks)
        self.runner = DecodeGraphs(model, self.cache, buckets=buckets, use_graphs=use_graphs)
        self.chunk_tokens = chunk_tokens

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- the two phases --------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int] | torch.Tensor], rows: Sequence[int],
                room: int) -> torch.Tensor:
        """Reserve blocks for each prompt plus ``room`` more tokens (one per later decode step) in its (empty)
        row, prefill in chunks, and set each row's next input to its first generated token -> those tokens,
        int64 [len(prompts)] on the device."""
        rows = list(rows)
        if len(rows) != len(prompts):
            raise ValueError(f"rows: expected one row per prompt ({len(prompts)}), got {len(rows)}")
        cache = self.cache
        ids = [torch.as_tensor(p, dtype=torch.int64).flatten() for p in prompts]
        for i, (r, p) in enumerate(zip(rows, ids)):
            if not 0 <= r < cache.batch_size or cache.lengths[r] > 0:
                raise ValueError(f"rows[{i}]: expected an empty row in [0, {cache.batch_size}), got {r}")
            if p.numel() == 0:
                raise ValueError(f"prompts[{i}]: expected at least one token, got none")
            if p.numel() + room > cache.max_seq_len:
                raise ValueError(f"prompts[{i}]: {p.numel()} tokens + room {room} exceed the engine's "
                                 f"max_seq_len {cache.max_seq_len}")
        for r, p in zip(rows, ids):
            cache.reserve(r, p.numel() + room)
        first: dict[int, torch.Tensor] = {}
        done = [0] * len(ids)  # tokens of each prompt prefilled so far
        while len(first) < len(ids):
            budget, pieces, piece_rows, ends = self.chunk_tokens, [], [], []
            for i, p in enumerate(ids):
                if done[i] == p.numel():
                    continue
                take = min(p.numel() - done[i], budget)
                pieces.append(p[done[i]: done[i] + take])
                piece_rows.append(rows[i])
                done[i] += take
                ends.append(i if done[i] == p.numel() else None)
                budget -= take
                if budget == 0:
                    break
            next_ids = self.model.prefill(pieces, cache, rows=piece_rows).argmax(-1)  # [pieces]
            for j, i in enumerate(ends):
                if i is not None:
                    first[i] = next_ids[j]
        tokens = torch.stack([first[i] for i in range(len(ids))])  # [len(prompts)]
        self.runner.input_ids[torch.tensor(rows, device=self.device)] = tokens
        return tokens

    @torch.no_grad()
    def decode(self, steps: int, n: int) -> torch.Tensor:
        """``steps`` decode steps of rows 0..n-1 -> the tokens, int64 [steps, n] on the device (garbage in
        padding rows)."""
        out = torch.empty(steps, n, dtype=torch.int64, device=self.device)
        for t in range(steps):
            out[t].copy_(self.runner.step(n))
        return out

    # ---- the scheduler ---------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int] | torch.Tensor], max_new_tokens: int, *,
                 eos_token_id: int | None = None) -> EngineResult:
        """Greedy generation of ``max_new_tokens`` tokens for every prompt (see the module doc)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
        cache = self.cache
        if any(cache.lengths):
            raise RuntimeError("generate needs an empty engine; rows are still in use")
        waiting = deque(range(len(prompts)))
        owner: list[int | None] = [None] * cache.batch_size  # request of each row
        left = [0] * cache.batch_size  # decode steps each row still needs
        firsts: list[tuple[torch.Tensor, list[int]]] = []  # (first tokens [k], their requests)
        bursts: list[tuple[torch.Tensor, list[int | None]]] = []  # (tokens [steps, n], owner of each row)
        prefill_s = decode_s = 0.0
        decode_tokens = steps_run = 0
        while waiting or any(o is not None for o in owner):
            free = [r for r, o in enumerate(owner) if o is None]
            admit = [(free[i], waiting.popleft()) for i in range(min(len(free), len(waiting)))]
            if admit:
                t0 = self._now()
                first = self.prefill([prompts[q] for _, q in admit], [r for r, _ in admit], max_new_tokens - 1)
                prefill_s += self._now() - t0
                firsts.append((first, [q for _, q in admit]))
                for r, q in admit:
                    owner[r], left[r] = q, max_new_tokens - 1
                    if left[r] == 0:
                        owner[r] = None
                        cache.release(r)
            live = [r for r, o in enumerate(owner) if o is not None]
            if not live:
                continue
            steps, n = min(left[r] for r in live), max(live) + 1
            t0 = self._now()
            bursts.append((self.decode(steps, n), owner[:n]))
            decode_s += self._now() - t0
            decode_tokens += steps * len(live)
            steps_run += steps
            for r in live:
                left[r] -= steps
                if left[r] == 0:
                    owner[r] = None
                    cache.release(r)
        tokens: list[list[int]] = [[] for _ in prompts]
        for first, reqs in firsts:
            for q, t in zip(reqs, first.tolist()):
                tokens[q].append(t)
        for burst, owners in bursts:
            for r, row in enumerate(burst.t().tolist()):
                if owners[r] is not None:
                    tokens[owners[r]].extend(row)
        if eos_token_id is not None:
            tokens = [t[: t.index(eos_token_id) + 1] if eos_token_id in t else t for t in tokens]
        return EngineResult(tokens=tokens, prefill_s=prefill_s, decode_s=decode_s,
                            prompt_tokens=sum(len(p) for p in prompts), decode_tokens=decode_tokens,
                            decode_steps=steps_run)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
