"""The minimal DeepSeek-V2 model on top of pykernels (gpt-fast spirit: small readable files).

    from model import DeepseekV2, DeepseekV2Config
    cfg = DeepseekV2Config.from_preset("lite")
    m = DeepseekV2.random(cfg, seed=0)          # or DeepseekV2.from_pretrained(checkpoint_dir)
    logits = m(input_ids)                       # [B, S] -> [B, S, vocab]
"""
from model.cache import PagedLatentCache
from model.config import DeepseekV2Config
from model.model import DeepseekV2
from model.weights import CheckpointError

__all__ = ["DeepseekV2", "DeepseekV2Config", "PagedLatentCache", "CheckpointError"]
