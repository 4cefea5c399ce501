"""Roofline model and profiling tools: op cost models (``cost_model``), the GPU table, detection
and H800 projection (``hardware``), a background NVML sampler (``nvml``). ``python -m profiles``.
"""
