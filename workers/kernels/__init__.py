"""Sink-statistics kernels: chunked PyTorch reference (any device) and fused Triton kernels (CUDA).

``key_mass_stats`` is the entry point the attention processors call; it picks the Triton path
for CUDA inputs when triton imports, else the PyTorch path (env SINKSCOPE_KERNEL=torch|triton).
"""

from .mass import (
    KeyMassStats,
    attention_with_lse,
    kernel_choice,
    key_mass_stats,
    key_mass_stats_torch,
    remove_keys,
    removed_mass,
)

__all__ = [
    "KeyMassStats",
    "attention_with_lse",
    "kernel_choice",
    "key_mass_stats",
    "key_mass_stats_torch",
    "remove_keys",
    "removed_mass",
]
