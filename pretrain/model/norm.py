"""RMSNorm with Qwen3's exact numerics, usable in megatron layer specs."""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    """x / rms(x) in float32, cast back, then scaled: the order HF Qwen3 uses, so bf16 results
    match the reference bit for bit, not just approximately.

    Built by megatron's ``build_module`` with ``(config=..., hidden_size=..., eps=...)``. Its weight
    is marked ``sequence_parallel`` when the config is, so its (partial) gradients are summed over
    the tensor-parallel group like megatron's own norms.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, config=None):
        super().__init__()
        self.eps = eps
        dtype = getattr(config, "params_dtype", torch.float32)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        if config is not None and getattr(config, "sequence_parallel", False):
            self.weight.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.promote_types(dtype, torch.float32))  # float32 (float64 stays: tests)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
