"""The paged latent cache: prefill then decode (absorbed MLA through pk.mla_decode) gives the logits of the
full forward without a cache (naive MLA); naive and absorbed attention agree; greedy generation."""
from __future__ import annotations

import math

import pytest
import torch

from model import DeepseekV2, DeepseekV2Config, PagedLatentCache
from pykernels import _backend
from model.generate import greedy
from model_cases import rel_err, small_cfg

FP32_REL_ERR = 1e-5


def poisoned_cache(m: DeepseekV2, batch: int, max_len: int, block_size: int) -> PagedLatentCache:
    """A cache whose every row starts as NaN: reading a row that was never written shows up in the logits."""
    cache = m.new_cache(batch, max_len, block_size=block_size)
    cache.kv.fill_(math.nan)
    return cache


@pytest.mark.parametrize("block_size", [16, 64])
def test_decode_matches_full_forward(block_size):
    """Prompts of different lengths in one batch, then one token at a time across block boundaries."""
    cfg = small_cfg()
    m = DeepseekV2.random(cfg, seed=0)
    lengths = [5, 2 * block_size - 3, 1, block_size]  # ends inside, just before, at the start, at a boundary
    steps = 7
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (n + steps,), generator=g) for n in lengths]
    cache = poisoned_cache(m, len(lengths), max(lengths) + steps, block_size)
    with torch.no_grad():
        full = [m(s[None])[0] for s in seqs]  # [n + steps, vocab] each, no cache
        last = m.prefill([s[:n] for s, n in zip(seqs, lengths)], cache)  # [B, vocab]
        for b, n in enumerate(lengths):
            assert rel_err(last[b], full[b][n - 1]) <= FP32_REL_ERR, (b, n)
        for t in range(steps):
            ids = torch.stack([s[n + t] for s, n in zip(seqs, lengths)])[:, None]  # [B, 1]
            out = m.decode(ids, cache)[:, 0]  # [B, vocab]
            for b, n in enumerate(lengths):
                err = rel_err(out[b], full[b][n + t])
                assert err <= FP32_REL_ERR, (t, b, n, err)
    assert cache.lengths == [n + steps for n in lengths]
    # blocks were handed out as sequences grew, so at least one sequence owns non-contiguous blocks
    assert any(blocks != list(range(blocks[0], blocks[0] + len(blocks))) for blocks in cache.blocks)


def test_multi_token_decode_and_chunked_prefill():
    """decode with q_len = 3 (causal inside the step) and a prompt prefilled in two chunks."""
    cfg = small_cfg(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1)
    m = DeepseekV2.random(cfg, seed=2)
    g = torch.Generator().manual_seed(3)
    seqs = torch.randint(0, cfg.vocab_size, (2, 40), generator=g)
    cache = poisoned_cache(m, 2, 40, 16)
    with torch.no_grad():
        full = m(seqs)  # [2, 40, vocab]
        m.prefill([seqs[0, :10], seqs[1, :23]], cache)
        last = m.prefill([seqs[0, 10:23], seqs[1, 23:24]], cache)  # second chunk sees the first
        assert rel_err(last, full[:, [22, 23]].diagonal(dim1=0, dim2=1).t()) <= FP32_REL_ERR
        # both sequences now hold 23 and 24 tokens: decode 3 tokens each in one step
        ids = torch.stack([seqs[0, 23:26], seqs[1, 24:27]])  # [2, 3]
        out = m.decode(ids, cache)  # [2, 3, vocab]
    assert rel_err(out[0], full[0, 23:26]) <= FP32_REL_ERR
    assert rel_err(out[1], full[1, 24:27]) <= FP32_REL_ERR


def test_naive_and_absorbed_attention_agree():
    """One MLA layer on the same cache contents: naive (decompress K/V) vs absorbed (576-wide latent)."""
    cfg = small_cfg(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                    num_attention_heads=4, hidden_size=64)
    m = DeepseekV2.random(cfg, seed=4)
    attn = m.layers[0].self_attn
    rope, scale = m.rope(), m.softmax_scale()
    g = torch.Generator().manual_seed(5)
    caches = [m.new_cache(3, 64, block_size=16) for _ in range(2)]
    context = torch.randn(3 * 30, cfg.hidden_size, generator=g)  # 30 earlier tokens per sequence
    new = torch.randn(3 * 2, cfg.hidden_size, generator=g)  # 2 new tokens per sequence
    with torch.no_grad():
        outs = []
        for cache, form in zip(caches, ("naive", "absorbed")):
            attn.prefill(context, cache.append([30, 30, 30]), cache.layer(0), rope, scale)
            step = cache.append([2, 2, 2])
            run = attn.prefill if form == "naive" else attn.decode
            outs.append(run(new, step, cache.layer(0), rope, scale))
    assert rel_err(outs[1], outs[0]) <= FP32_REL_ERR
    assert torch.equal(caches[0].kv, caches[1].kv)  # both forms wrote the same cache rows


def test_greedy_matches_argmax_of_full_forward():
    cfg = small_cfg()
    m = DeepseekV2.random(cfg, seed=6)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], list(range(20, 37))]
    r = greedy(m, prompts, max_new_tokens=6, block_size=16)
    assert [len(t) for t in r.tokens] == [6, 6, 6]
    assert r.prefill_s > 0 and r.decode_s > 0 and r.prompt_tokens == 25 and r.new_tokens == 18
    with torch.no_grad():
        for p, gen in zip(prompts, r.tokens):
            seq = list(p)
            for _ in range(6):
                seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
            assert gen == seq[len(p):]
    cut = greedy(m, prompts, max_new_tokens=6, block_size=16, eos_token_id=r.tokens[0][2])
    assert cut.tokens[0] == r.tokens[0][:3]


def test_tiny_preset_decode():
    """The "tiny" preset (real MLA widths 512 + 64, q_lora_rank, group-limited gate) through the cache."""
    cfg = DeepseekV2Config.from_preset("tiny")
    m = DeepseekV2.random(cfg, seed=0)
    seqs = torch.randint(0, cfg.vocab_size, (2, 70), generator=torch.Generator().manual_seed(7))
    cache = poisoned_cache(m, 2, 70, 64)
    with torch.no_grad():
        full = m(seqs)
        m.prefill([seqs[0, :62], seqs[1, :3]], cache)
        for t in range(3):
            out = m.decode(torch.stack([seqs[0, 62 + t], seqs[1, 3 + t]])[:, None], cache)[:, 0]
            assert rel_err(out[0], full[0, 62 + t]) <= FP32_REL_ERR
            assert rel_err(out[1], full[1, 3 + t]) <= FP32_REL_ERR


@pytest.mark.skipif(not _backend.triton_usable(torch.device("cpu")), reason="needs TRITON_INTERPRET=1 on the CPU")
def test_triton_backend_interpreted():
    """backend="triton" reaches every op (Triton interpreter, float32): cached logits == torch reference.

    Widths are powers of two (kv_lora_rank 64, rope 16) as the Triton MLA kernel requires (it works on
    quarters of the value columns, each at least 16 wide).
    """
    cfg = small_cfg(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, kv_lora_rank=64,
                    qk_rope_head_dim=16)
    ref = DeepseekV2.random(cfg, seed=8, backend="torch")
    m = DeepseekV2.random(cfg, seed=8, backend="triton")
    seqs = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(9))
    cache = poisoned_cache(m, 2, 11, 16)
    with torch.no_grad():
        full = ref(seqs)
        last = m.prefill([seqs[0, :9], seqs[1, :4]], cache)
        out = m.decode(torch.stack([seqs[0, 9], seqs[1, 4]])[:, None], cache)[:, 0]
    assert rel_err(torch.stack([last[0], out[0]]), full[0, 8:10]) <= FP32_REL_ERR
    assert rel_err(torch.stack([last[1], out[1]]), full[1, 3:5]) <= FP32_REL_ERR


@pytest.mark.parametrize("block_size", [0, 8, 48, 100, 64.0, True])
def test_bad_block_size(block_size):
    with pytest.raises(ValueError, match="block_size"):
        PagedLatentCache(small_cfg(), 2, 64, block_size=block_size, dtype=torch.float32)


def test_cache_limits():
    cache = PagedLatentCache(small_cfg(), 2, 40, block_size=16, num_blocks=4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"counts\[1\].*max_seq_len"):
        cache.append([1, 41])
    with pytest.raises(ValueError, match="counts: expected 2 entries"):
        cache.append([1])
    cache.append([33, 0])  # 3 blocks
    with pytest.raises(RuntimeError, match="cache full"):
        cache.append([0, 17])  # needs 2 more
    step = cache.append([0, 16])
    assert step.starts == [0, 0, 16] and cache.cache_seqlens.tolist() == [33, 16]
    assert step.slot_mapping.tolist() == [3 * 16 + i for i in range(16)]


@pytest.mark.parametrize("V", [2048, 3 * 1024, 1000, 1024])
def test_two_stage_argmax_is_torch_argmax(V):
    """The decode step's two-stage argmax equals torch's argmax, ties included (the first maximum wins)."""
    from model.graphs import first_argmax

    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(V)).to(torch.bfloat16)
    logits[1, V - 1] = logits[1, 3] = 50.0  # a tie across groups: the lower index wins
    logits[2, 7] = logits[2, 9] = 50.0  # a tie inside one group
    logits[3].fill_(0.5)  # every column ties
    assert torch.equal(first_argmax(logits), logits.argmax(-1))
