"""NEO's native attention as a megatron module: column-parallel projections, QK-norms (t, h, w),
Native-RoPE, a core attention whose Q/K are twice as wide as V, and a row-parallel output
projection (shared/spec/NEO_MODEL.md, "Native attention").

Two fused projections, each laid out per KV group g (groups in order; G = heads / kv_heads):
    linear_qkv   [ q of the G query heads of g (G*d) | k_g (d) | v_g (d) ]   (megatron's layout)
    linear_qk_hw [ q_hw of those heads (G*d) | k_hw_g (d) ]
They are separate so that stage 1 can train the new H/W projections of the post-LLM while its
original Qwen3 q/k/v stay frozen (freezing is per tensor). Tensor parallelism splits whole KV
groups across ranks, so each rank's contiguous slice is self-contained and the global tensor
reshards to any TP size. q_hw / k_hw per head are [h half (d/2) | w half (d/2)].
The converters (pretrain/convert) own the mapping to HF names.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from torch.utils.checkpoint import checkpoint

from pretrain.model.masked_attention import NativeMask, masked_attention
from pretrain.model.native_rope import swap_halves
from pretrain.model.norm import RMSNorm

# Norms replicated over TP whose gradient on each rank covers only that rank's heads: the trainer
# sums their gradients over the tensor-parallel group (megatron does the same for its QK-norms).
TP_PARTIAL_GRAD = "tp_partial_grad"


def core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: NativeMask | None,
                   scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over the pairs NEO's mask allows, with GQA.

    q [s, b, nq, 2d], k [s, b, nkv, 2d], v [s, b, nkv, d] or zero-padded to 2d (``NativeQKV``
    pads it), ``mask`` the micro-batch's ``NativeMask`` (built once, shared by all layers): the
    work follows the allowed pairs (FlexAttention on CUDA, block-sparse kernel calls on CPU:
    pretrain/model/masked_attention.py). None for plain causal rows (``NeoBatch.causal``): SDPA's
    causal kernel, which skips the upper triangle (GPU flash kernels do; the CPU one in blocks of
    512 keys). Returns [s, b, nq*d].
    Why V is padded for SDPA: torch's fused attention kernels need one head dim for q, k and v (with
    a narrower V, SDPA falls back to the unfused math path that materialises every score, 2.4-3.6x
    slower on CPU); the padded half of the output is zero and dropped.
    """
    if mask is not None:
        return masked_attention(q, k, v, mask, scale)
    d = q.shape[-1] // 2
    if v.shape[-1] == d:
        v = F.pad(v, (0, d))
    out = F.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3),
        k.permute(1, 2, 0, 3),
        v.permute(1, 2, 0, 3),
        is_causal=True,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )[..., :d]  # [b, nq, s, d]
    s, b = q.shape[0], q.shape[1]
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


@functools.cache
def _quarter_sums_to_part_means(device: torch.device, dtype: torch.dtype, d: int) -> torch.Tensor:
    """[4, 4]: sums of squares of the quarters (t0, t1, h, w) of a 2d-wide head -> mean squares of
    its parts, in the order (t, t, h, w) so that each quarter gets the value its norm divides by."""
    t, hw = 1.0 / d, 2.0 / d
    return torch.tensor([[t, t, 0, 0], [t, t, 0, 0], [0, 0, hw, 0], [0, 0, 0, hw]], device=device, dtype=dtype)


class NativeQKV(torch.autograd.Function):
    """Everything between the projections and the attention kernel, as one autograd node:

        qkv [s, b, nkv, G+2, d] (per KV group: G query heads, key, value: megatron's layout),
        qk_hw [s, b, nkv, G+1, d], weight [G+1, 2d] (t|h|w norm weights per head),
        cos/sin [s, b, 1, 1, 2d] (``native_rope_cos_sin``)
        -> q [s, b, nq, 2d], k [s, b, nkv, 2d], v [s, b, nkv, 2d] (zero-padded for the kernel)

    Maths: q/k = concat(t, h|w) per head; RMSNorm of t over d, of h and w over d/2 each (float32,
    cast back, then scaled, as ``RMSNorm``); Native-RoPE (``apply_native_rope``). The same as those
    modules up to float32 rounding (tests/model/test_native_qkv.py). Why one node: written as
    modules these are ~40 small kernels forward and more backward, each a full pass over Q and K,
    which at CPU widths cost as much as the projections. Here the queries and keys of all heads
    go through each step together; the mean square of t is the average of its two halves', so one
    reduction over a [..., 4, d/2] view serves the three norms; the backward is written out, and
    gradients land in one buffer per projection instead of being sliced, zero-filled and summed.
    """

    @staticmethod
    def forward(ctx, qkv, qk_hw, weight, cos, sin, eps):
        s, b, nkv, g, d = qkv.shape
        g -= 2
        dtype = qkv.dtype
        x = torch.cat([qkv[..., : g + 1, :], qk_hw], dim=-1)  # [s, b, nkv, G+1, 2d]
        x32 = x.to(torch.promote_types(dtype, torch.float32)).unflatten(-1, (4, d // 2))
        sums = torch.linalg.vector_norm(x32, dim=-1).square()
        r = torch.rsqrt(sums @ _quarter_sums_to_part_means(x.device, x32.dtype, d) + eps)  # [..., 4]
        y = weight * (x32 * r.unsqueeze(-1)).flatten(-2).to(dtype)
        # RoPE: y*cos + swap_halves(y)*sin, written straight into the kernel's q and k buffers.
        rot_cos, swapped = y * cos, swap_halves(y)
        q = torch.empty(s, b, nkv * g, 2 * d, dtype=dtype, device=x.device)
        k = torch.empty(s, b, nkv, 2 * d, dtype=dtype, device=x.device)
        torch.addcmul(rot_cos[..., :g, :], swapped[..., :g, :], sin, out=q.view(s, b, nkv, g, 2 * d))
        torch.addcmul(rot_cos[..., g, :], swapped[..., g, :], sin.squeeze(-2), out=k)
        v = F.pad(qkv[..., g + 1, :], (0, d))
        ctx.save_for_backward(x, r, weight, cos, sin)
        ctx.eps = eps
        return q, k, v

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        x, r, weight, cos, sin = ctx.saved_tensors
        s, b, nkv, g1, d2 = x.shape
        g, d = g1 - 1, d2 // 2
        dtype = x.dtype
        compute = r.dtype  # float32, or float64 for float64 inputs (tests)
        grad = torch.cat([grad_q.unflatten(2, (nkv, g)), grad_k.unsqueeze(3)], dim=3).to(compute)
        # RoPE backward: cos is diagonal, swap_halves its own transpose (swap(g*sin) = swap(g)*swap(sin)).
        grad_y = torch.addcmul(grad * cos, swap_halves(grad), swap_halves(sin)).to(dtype)
        x32 = x.to(compute).unflatten(-1, (4, d // 2))
        grad_weight = None
        if ctx.needs_input_grad[2]:
            normed = (x32 * r.unsqueeze(-1)).flatten(-2).to(dtype)
            grad_weight = (grad_y * normed).sum_to_size(weight.shape)
        grad_n = (grad_y * weight).to(compute).unflatten(-1, (4, d // 2))
        # n = x * r, r = rsqrt(sums @ M + eps), sums = sum of squares per quarter.
        grad_r = torch.linalg.vecdot(grad_n, x32)
        grad_sums = (grad_r * r.pow(3) * -0.5) @ _quarter_sums_to_part_means(x.device, compute, d).t()
        grad_x = torch.addcmul(grad_n * r.unsqueeze(-1), x32, 2 * grad_sums.unsqueeze(-1)).flatten(-2).to(dtype)
        grad_qkv = torch.empty(s, b, nkv, g + 2, d, dtype=dtype, device=x.device)
        grad_qkv[..., : g + 1, :] = grad_x[..., :d]
        grad_qkv[..., g + 1, :] = grad_v[..., :d]
        return grad_qkv, grad_x[..., d:].contiguous(), grad_weight, None, None, None


@dataclass
class NativeAttentionSubmodules:
    linear_qkv: type = ColumnParallelLinear
    linear_qk_hw: type = ColumnParallelLinear
    linear_proj: type = RowParallelLinear
    norm: type = RMSNorm


class NativeSelfAttention(MegatronModule):
    """Self-attention of a NEO decoder layer. Called by megatron's TransformerLayer; reads the
    Native-RoPE table from ``rotary_pos_cos``/``rotary_pos_sin`` ([s, b, 1, 2d], built once per
    micro-batch by the model) and the native mask from ``attention_mask`` (the micro-batch's
    ``NativeMask``; None: plain causal)."""

    def __init__(self, config, submodules: NativeAttentionSubmodules, layer_number: int,
                 checkpoint_core_attention: bool = False, **unused):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.checkpoint_core_attention = checkpoint_core_attention
        tp = parallel_state.get_tensor_model_parallel_world_size()
        d = self.head_dim = config.kv_channels
        self.group = config.num_attention_heads // config.num_query_groups
        self.nq = config.num_attention_heads // tp
        self.nkv = config.num_query_groups // tp
        self.qkv_split = [self.group * d, d, d]  # q, k, v of one KV group
        self.hw_split = [self.group * d, d]  # q_hw, k_hw of one KV group
        column = dict(config=config, init_method=config.init_method, gather_output=False, bias=False,
                      skip_bias_add=False, is_expert=False)
        self.linear_qkv = submodules.linear_qkv(
            config.hidden_size, config.num_query_groups * sum(self.qkv_split), tp_comm_buffer_name="qkv", **column
        )
        self.linear_qk_hw = submodules.linear_qk_hw(
            config.hidden_size, config.num_query_groups * sum(self.hw_split), tp_comm_buffer_name="qk_hw", **column
        )
        norm = lambda size: submodules.norm(size, eps=config.layernorm_epsilon, config=config)  # noqa: E731
        self.q_layernorm, self.k_layernorm = norm(d), norm(d)
        self.q_layernorm_h, self.q_layernorm_w = norm(d // 2), norm(d // 2)
        self.k_layernorm_h, self.k_layernorm_w = norm(d // 2), norm(d // 2)
        for name in ("q_layernorm", "k_layernorm", "q_layernorm_h", "q_layernorm_w", "k_layernorm_h", "k_layernorm_w"):
            setattr(getattr(self, name).weight, TP_PARTIAL_GRAD, True)
        self.linear_proj = submodules.linear_proj(
            config.num_attention_heads * d,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
        )

    def _qk_norm_weight(self) -> torch.Tensor:
        """[G+1, 2d]: the t|h|w norm weights of the G query heads of a KV group, then of its key."""
        q = torch.cat([self.q_layernorm.weight, self.q_layernorm_h.weight, self.q_layernorm_w.weight])
        k = torch.cat([self.k_layernorm.weight, self.k_layernorm_h.weight, self.k_layernorm_w.weight])
        return torch.cat([q.expand(self.group, -1), k[None]])

    def forward(self, hidden_states, attention_mask, rotary_pos_cos=None, rotary_pos_sin=None, **unused):
        qkv, _ = self.linear_qkv(hidden_states)
        qk_hw, _ = self.linear_qk_hw(hidden_states)
        s, b = qkv.shape[:2]
        d, g = self.head_dim, self.group
        q, k, v = NativeQKV.apply(
            qkv.view(s, b, self.nkv, g + 2, d), qk_hw.view(s, b, self.nkv, g + 1, d), self._qk_norm_weight(),
            rotary_pos_cos.unsqueeze(2), rotary_pos_sin.unsqueeze(2), self.q_layernorm.eps,
        )
        scale = 1.0 / math.sqrt(d)
        if self.checkpoint_core_attention and self.training and torch.is_grad_enabled():
            # Selective recompute: backward keeps q, k, v and the shared mask, and runs the kernel
            # again instead of keeping what it saves (output and softmax statistics, or s*s scores).
            context = checkpoint(core_attention, q, k, v, attention_mask, scale, use_reentrant=False)
        else:
            context = core_attention(q, k, v, attention_mask, scale)
        return self.linear_proj(context)  # (output, bias=None): what TransformerLayer expects
