"""DeepSeek-V2: the whole model, without a cache (naive attention) and with the paged latent cache
(prefill in the naive form, decode in the absorbed form).

    m = DeepseekV2.from_pretrained(path, dtype=torch.bfloat16, device="cuda")   # HF checkpoint directory
    m = DeepseekV2.random(cfg, seed=0)                                            # no checkpoint
    m = DeepseekV2(cfg, device="meta")                                            # shapes only, no memory
    logits = m(input_ids)                                                         # [B, S] -> [B, S, vocab]

Two paths over the same weights. The reference path (``forward``, ``decode``, and ``prefill`` with
``backend="torch"``) is plain torch glue around the pykernels ops, written as the math reads. The fast path
(``prefill`` with any other backend, and ``decode_step``, which model/graphs.py captures in CUDA graphs)
uses the fused glue of model/layers.py: the same values with fewer kernels.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import pykernels as pk
from model import attention
from model.cache import PagedLatentCache
from model.config import DeepseekV2Config
from model.layers import MLA, MLP, Block, MoE, RMSNorm
from pykernels.profiling import nvtx_range

# Scale of the random initialisation of a [out, in] weight: std = in^-0.5 keeps activations O(1);
# norm weights are 1 + NORM_JITTER * N(0, 1) so that tests see them.
NORM_JITTER = 0.1


class DeepseekV2(nn.Module):
    """DeepSeek-V2 causal LM. Parameter names are the checkpoint's without the ``model.`` prefix, except
    the fused experts ``layers.N.mlp.w13`` / ``w2`` (see model/weights.py).

    ``backend`` (None, "torch", "triton", "cuda") is passed to every pykernels op call. The constructor
    leaves torch's default initialisation (``device="meta"``: no memory at all); use ``random`` or
    ``from_pretrained`` for weights. ``ep_size`` > 1: each MoE layer holds only this rank's share of the
    routed experts and needs ``set_expert_parallel`` before it runs (see model.layers.MoE).
    """

    def __init__(self, cfg: DeepseekV2Config, *, backend: str | None = None,
                 device: str | torch.device | None = None, ep_size: int = 1):
        super().__init__()
        if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size <= 0:
            raise ValueError(f"ep_size: expected a positive integer, got {ep_size!r}")
        self.cfg = cfg
        self.backend = backend
        self.ep_size = ep_size
        with torch.device(device if device is not None else "cpu"):
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.layers = nn.ModuleList(Block(cfg, i, backend, ep_size) for i in range(cfg.num_hidden_layers))
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._rope: pk.YarnRotary | None = None

    # ---- construction ---------------------------------------------------------------------------------

    @classmethod
    def random(cls, cfg: DeepseekV2Config, seed: int = 0, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", backend: str | None = None, ep_size: int = 1) -> DeepseekV2:
        """Random weights (a fixed function of seed, dtype, device and ep_size): std in^-0.5 for weights,
        N(0, 1) embeddings, norms near 1."""
        m = cls(cfg, backend=backend, device="meta", ep_size=ep_size)
        m.materialize(dtype, device)
        g = torch.Generator(device=torch.device(device)).manual_seed(seed)
        with torch.no_grad():
            for name, p in m.named_parameters():
                r = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
                if p.dim() == 1:
                    p.copy_(1 + NORM_JITTER * r)
                elif name == "embed_tokens.weight":
                    p.copy_(r)
                else:
                    p.copy_(r * p.shape[-1] ** -0.5)
        m.prepare_fast()
        return m

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                        device: str | torch.device = "cuda", backend: str | None = None) -> DeepseekV2:
        """Load a Hugging Face checkpoint directory (config.json + *.safetensors, optionally sharded with
        model.safetensors.index.json), with original per-expert keys or transformers 5's fused ones."""
        from model.weights import load_checkpoint

        cfg = DeepseekV2Config.from_json(path)
        m = cls(cfg, backend=backend, device="meta")
        m.materialize(dtype, device)
        load_checkpoint(m, path)
        m.prepare_fast()
        return m

    def materialize(self, dtype: torch.dtype, device: str | torch.device) -> None:
        """Replace meta (or any) parameters by uninitialised ones of ``dtype`` on ``device``.

        The MoE gate stays float32. Allocates each parameter once in its final dtype (``to_empty`` would
        allocate float32 first).
        """
        gates = {id(m.gate) for m in self.modules() if isinstance(m, MoE)}
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                want = torch.float32 if id(module) in gates else dtype
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=want, device=device),
                                                        requires_grad=False)
        for module in self.modules():
            if isinstance(module, (MLP, MLA)):
                module.fuse_storage()  # weights over one input in one allocation: one GEMM on the fast path
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._rope = None

    def set_expert_parallel(self, buffer, decode_buffer=None) -> None:
        """Run every MoE layer's routed experts over the ranks of ``buffer`` (a ``pk.ep.Buffer``; its group
        size is ``ep_size``); ``decode_buffer``, when given, serves ``decode_step`` (an nvlink buffer in its
        low-latency mode: no host synchronisation, CUDA-graph capturable)."""
        if self.ep_size == 1:
            raise ValueError("buffer: this model holds every expert (ep_size 1); build it with ep_size > 1")
        for module in self.modules():
            if isinstance(module, MoE):
                module.set_expert_parallel(buffer, decode_buffer)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def num_parameters(self) -> int:
        """Parameter count (tied embeddings once), as transformers counts it."""
        return sum(p.numel() for p in self.parameters())

    def rope(self) -> pk.YarnRotary:
        """The YaRN cos/sin table, built at first use, and moved along when the model moves."""
        if self._rope is None:
            self._rope = pk.YarnRotary.from_config(self.cfg, device=self.device)
        elif self._rope.device != self.device:
            self._rope = self._rope.to(self.device)
        return self._rope

    def softmax_scale(self) -> float:
        """(qk_nope + qk_rope)^-0.5 times the rope's yarn_get_mscale(factor, mscale_all_dim)^2."""
        return self.cfg.qk_head_dim ** -0.5 * self.rope().attention_scale_factor

    # ---- no cache -------------------------------------------------------------------------------------

    @nvtx_range("forward")
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] (positions 0..S-1 in every row) -> logits [B, S, vocab]."""
        B, S = input_ids.shape
        rope, scale = self.rope(), self.softmax_scale()
        positions = torch.arange(S, device=input_ids.device).repeat(B)  # [B * S]
        x = self.embed_tokens(input_ids)  # [B, S, D]
        for i, layer in enumerate(self.layers):
            with nvtx_range(f"layer {i}"):
                x = x + layer.self_attn(layer.input_layernorm(x), positions, rope, scale)
                x = layer.ffn(x)
        return self.lm_head(self.norm(x))

    # ---- with the paged latent cache ------------------------------------------------------------------

    def new_cache(self, batch_size: int, max_seq_len: int, **kwargs) -> PagedLatentCache:
        """A cache in the model's dtype and device (kwargs: block_size, num_blocks)."""
        return PagedLatentCache(self.cfg, batch_size, max_seq_len, dtype=self.dtype, device=self.device,
                                **kwargs)

    @property
    def fused(self) -> bool:
        """Whether ``prefill`` uses the fused glue (every backend but the "torch" reference)."""
        return self.backend != "torch"

    @nvtx_range("prefill")
    def prefill(self, prompts: Sequence[torch.Tensor | Sequence[int]], cache: PagedLatentCache,
                rows: Sequence[int] | None = None) -> torch.Tensor:
        """Append one prompt (>= 1 token) to each of the cache's sequences, or to the sequences ``rows``
        (one prompt each; the others are left alone) -> each prompt's last logits [len(prompts), vocab]."""
        if rows is None:
            if len(prompts) != cache.batch_size:
                raise ValueError(f"prompts: expected {cache.batch_size} prompts (the cache's batch size), "
                                 f"got {len(prompts)}")
            rows = range(cache.batch_size)
        rows = list(rows)
        if len(rows) != len(prompts):
            raise ValueError(f"rows: expected one row per prompt ({len(prompts)}), got {len(rows)}")
        if len(set(rows)) != len(rows) or any(not 0 <= r < cache.batch_size for r in rows):
            raise ValueError(f"rows: expected distinct sequence indices in [0, {cache.batch_size}), got {rows}")
        ids = [torch.as_tensor(p, dtype=torch.int64, device=self.device).flatten() for p in prompts]
        for b, p in enumerate(ids):
            if p.numel() == 0:
                raise ValueError(f"prompts[{b}]: expected at least one token, got none")
        counts = [0] * cache.batch_size
        for r, p in zip(rows, ids):
            counts[r] = p.numel()
        step = cache.append(counts)
        x = self.embed_tokens(torch.cat([ids[rows.index(r)] for r in sorted(rows)]))  # [T, D], row order
        rope, scale, fused = self.rope(), self.softmax_scale(), self.fused
        groups = attention.plan(step) if fused else None
        for i, layer in enumerate(self.layers):
            with nvtx_range(f"layer {i}"):
                h = layer.input_layernorm(x, fused)
                a = layer.self_attn.prefill(h, step, cache.layer(i), rope, scale, fused, groups)
                x = layer.ffn_fused(x + a) if fused else layer.ffn(x + a)
        last = torch.tensor([step.starts[r + 1] - 1 for r in rows], device=self.device)  # [len(rows)]
        return self.lm_head(self.norm(x[last], fused))

    @nvtx_range("decode step")
    def decode(self, input_ids: torch.Tensor, cache: PagedLatentCache) -> torch.Tensor:
        """input_ids [B, q_len] appended to the cache's B sequences -> logits [B, q_len, vocab] (absorbed MLA)."""
        B, q_len = input_ids.shape
        if B != cache.batch_size:
            raise ValueError(f"input_ids: expected {cache.batch_size} rows (the cache's batch size), got {B}")
        step = cache.append([q_len] * B)
        x = self.embed_tokens(input_ids.reshape(-1))  # [B * q_len, D]
        rope, scale = self.rope(), self.softmax_scale()
        for i, layer in enumerate(self.layers):
            with nvtx_range(f"layer {i}"):
                x = x + layer.self_attn.decode(layer.input_layernorm(x), step, cache.layer(i), rope, scale)
                x = layer.ffn(x)
        return self.lm_head(self.norm(x)).view(B, q_len, -1)

    # ---- the fast decode step ---------------------------------------------------------------------------

    @nvtx_range("decode step")
    def decode_step(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                    block_table: torch.Tensor, cache_seqlens: torch.Tensor, cache: PagedLatentCache) -> torch.Tensor:
        """One new token for each of B sequences, fused glue, no host work that reads device values
        (CUDA-graph capturable): input_ids int64 [B] -> logits [B, vocab].

        positions, slot_mapping int64 [B]: the new tokens' positions and cache rows (-1: padding, not
        written); block_table int32 [B, M] and cache_seqlens int32 [B] (lengths including the new token;
        0 for padding) as ``pk.mla_decode`` takes them. The cache bookkeeping is the caller's (model/graphs.py).
        """
        rope, scale = self.rope(), self.softmax_scale()
        x = self.embed_tokens(input_ids)  # [B, D]
        for i, layer in enumerate(self.layers):
            with nvtx_range(f"layer {i}"):
                attn = layer.self_attn
                a = attn.decode_fused(layer.input_layernorm(x, fused=True), positions, slot_mapping, block_table,
                                      cache_seqlens, cache.layer(i), rope, scale)  # [B, H * V]
                x = x.addmm_(a, attn.o_proj.weight.t())  # x += o_proj(a)
                x = layer.ffn_fused(x, decode=True)
        return self.lm_head(self.norm(x, fused=True))

    def prepare_fast(self) -> None:
        """Prepare the fast path's derived weights (W_UK, W_UV^T per layer; q+kv_a and gate+up where not fused at
        materialize): ``random`` and ``from_pretrained`` call it once, so neither a first step nor a CUDA-graph
        capture allocates them; after weights change in place, the next call prepares them again."""
        for layer in self.layers:
            layer.self_attn.absorbed()
            layer.self_attn.input_projection()
            mlps = [layer.mlp] if isinstance(layer.mlp, MLP) else [layer.mlp.shared_experts]
            for mlp in mlps:
                if mlp is not None:
                    mlp.gate_up()
