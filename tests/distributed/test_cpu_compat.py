"""The CPU compatibility layer, in a fresh interpreter (it patches process-wide state)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

SCRIPT = r"""
import torch
from pretrain.distributed import cpu_compat
assert cpu_compat.apply() and cpu_compat.apply()  # idempotent
assert torch.zeros(2, device="cuda").device.type == "cpu"
assert torch.empty(3, device=torch.device("cuda", 0)).device.type == "cpu"
x = torch.ones(2)
assert x.cuda() is x and x.to("cuda").device.type == "cpu"
assert torch.cuda.current_device() == "cpu"
torch.cuda.synchronize()
# megatron's RNG tracker forks the "CUDA" generator: it must be the CPU one, reproducibly.
from megatron.core.tensor_parallel import random as r
torch.cuda.manual_seed(7); a = torch.rand(3)
state = r._get_cuda_rng_state(); b = torch.rand(3)
r._set_cuda_rng_state(state); assert torch.equal(torch.rand(3), b)
torch.cuda.manual_seed(7); assert torch.equal(torch.rand(3), a)
torch.manual_seed(3)  # must not recurse through manual_seed_all
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is only applied when CUDA is absent")
def test_cpu_compat_redirects_cuda_to_cpu():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
