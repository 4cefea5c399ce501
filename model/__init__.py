"""The minimal DeepSeek-V2 model on top of pykernels (gpt-fast spirit: small readable files).

    from model import DeepseekV2, DeepseekV2Config
    cfg = DeepseekV2Config.from_preset("lite")
    m = DeepseekV2.random(cfg, seed=0)          # or DeepseekV2.from_pretrained(checkpoint_dir)
    logits = m(input_ids)                       # [B, S] -> [B, S, vocab]

    engine = Engine(m, max_batch=32, max_seq_len=4096)    # the fast path: chunked prefill, CUDA-graph decode
    engine.generate(prompts, max_new_tokens=128).tokens
"""
from model.cache import PagedLatentCache
from model.config import DeepseekV2Config
from model.model import DeepseekV2
from model.engine import Engine
from model.graphs import DecodeGraphs
from model.weights import CheckpointError

__all__ = ["DeepseekV2", "DeepseekV2Config", "PagedLatentCache", "CheckpointError", "Engine", "DecodeGraphs"]
