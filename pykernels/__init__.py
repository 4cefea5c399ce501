"""pykernels: DeepSeek-V2 inference kernels for NVIDIA Hopper.

Every op has a pure-torch reference (the oracle), a Triton backend and, where it pays, a CUDA C++
backend; ``backend=None`` picks the fastest correct one for the device. See DESIGN.md for the contract.
"""
from pykernels import ep
from pykernels.mla_decode import mla_decode
from pykernels.moe_ffn import grouped_ffn, moe_ffn
from pykernels.moe_gate import moe_gate
from pykernels.moe_route import moe_route
from pykernels.rope import YarnRotary, apply_rotary, rope_and_cache

__version__ = "0.1.0"

__all__ = [
    "mla_decode",
    "YarnRotary",
    "apply_rotary",
    "rope_and_cache",
    "moe_gate",
    "moe_route",
    "moe_ffn",
    "grouped_ffn",
    "ep",
]
