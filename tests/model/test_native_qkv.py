"""The fused query/key/value preparation of native attention (``NativeQKV``) against the same
maths written with the readable pieces: per-part ``RMSNorm`` modules, ``apply_native_rope`` and a
zero-padded V. Values and gradients, float64 (exact maths) and float32/bf16 (rounding only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.model.native_attention import NativeQKV
from pretrain.model.native_rope import apply_native_rope, native_rope_cos_sin
from pretrain.model.norm import RMSNorm

S, B, NKV, G, D = 6, 2, 2, 3, 16
EPS = 1e-6


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(S, B, NKV, G + 2, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    qk_hw = torch.randn(S, B, NKV, G + 1, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    norms = [(1 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
             for n in (D, D // 2, D // 2, D, D // 2, D // 2)]  # q t|h|w, k t|h|w
    positions = torch.randint(0, 300, (3, B, S), generator=g)
    cos, sin = native_rope_cos_sin(positions, D, 1e6, 1e4)
    return qkv, qk_hw, norms, cos, sin


def _weight(norms):
    q, k = torch.cat(norms[:3]), torch.cat(norms[3:])
    return torch.cat([q.expand(G, -1), k[None]])


def _fused(qkv, qk_hw, norms, cos, sin):
    return NativeQKV.apply(qkv, qk_hw, _weight(norms), cos.unsqueeze(2), sin.unsqueeze(2), EPS)


def _rms(x, w):
    return torch.func.functional_call(RMSNorm(x.shape[-1], eps=EPS), {"weight": w}, (x,))


def _plain(qkv, qk_hw, norms, cos, sin):
    def thw(t, hw, w_t, w_h, w_w):
        return torch.cat([_rms(t, w_t), _rms(hw[..., : D // 2], w_h), _rms(hw[..., D // 2:], w_w)], dim=-1)

    q = thw(qkv[..., :G, :], qk_hw[..., :G, :], *norms[:3]).reshape(S, B, NKV * G, 2 * D)
    k = thw(qkv[..., G, :], qk_hw[..., G, :], *norms[3:])
    q, k = (apply_native_rope(x, cos, sin, D) for x in (q, k))
    return q, k, F.pad(qkv[..., G + 1, :], (0, D))


def _values_and_grads(fn, inputs, upstream):
    qkv, qk_hw, norms, cos, sin = inputs
    outs = fn(qkv, qk_hw, norms, cos, sin)
    leaves = [qkv, qk_hw, *norms]
    grads = torch.autograd.grad(outs, leaves, [u.to(o.dtype) for u, o in zip(upstream, outs)])
    return [o.detach() for o in outs], grads


def _upstream():
    g = torch.Generator().manual_seed(9)
    shapes = [(S, B, NKV * G, 2 * D), (S, B, NKV, 2 * D), (S, B, NKV, 2 * D)]
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_matches_the_plain_modules(dtype, tol):
    up = _upstream()
    fused = _values_and_grads(_fused, _inputs(dtype), up)
    plain = _values_and_grads(_plain, _inputs(dtype), up)
    for a, b in zip(fused[0] + list(fused[1]), plain[0] + list(plain[1])):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert (a - b).abs().max() <= tol * (1 + b.abs().max()), (a - b).abs().max()


def test_gradcheck():
    qkv, qk_hw, norms, cos, sin = _inputs(torch.float64)
    cos, sin = cos.double(), sin.double()
    assert torch.autograd.gradcheck(lambda a, b, *n: _fused(a, b, list(n), cos, sin), (qkv, qk_hw, *norms))


def test_bf16_close_to_float32():
    up = _upstream()
    got = _values_and_grads(_fused, _inputs(torch.bfloat16), up)
    ref = _values_and_grads(_plain, _inputs(torch.bfloat16), up)
    for a, b in zip(got[0] + list(got[1]), ref[0] + list(ref[1])):
        assert a.dtype == torch.bfloat16
        # Both round to bf16 at the same points; float32 sums in another order move a gradient by
        # about one bf16 rounding (2^-8) at most.
        assert (a.float() - b.float()).abs().max() <= 2 ** -7 * (1 + b.float().abs().max())
