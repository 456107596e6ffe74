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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule

from pretrain.model.native_rope import apply_native_rope
from pretrain.model.norm import RMSNorm

# Norms replicated over TP whose gradient on each rank covers only that rank's heads: the trainer
# sums their gradients over the tensor-parallel group (megatron does the same for its QK-norms).
TP_PARTIAL_GRAD = "tp_partial_grad"


def core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked out) v with GQA.

    q [s, b, nq, 2d], k [s, b, nkv, 2d], v [s, b, nkv, d], masked [b, 1, s, s] (True = masked).
    Returns [s, b, nq*d]. V is zero-padded to Q/K's width: torch's fused attention kernels need
    one head dim for q, k and v (with a narrower V, SDPA falls back to the unfused math path that
    materialises every score, 2.4-3.6x slower on CPU); the padded half of the output is zero and
    dropped. On GPU a FlexAttention block mask is the next step (it can skip masked blocks).
    """
    d = v.shape[-1]
    out = F.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3),
        k.permute(1, 2, 0, 3),
        F.pad(v, (0, q.shape[-1] - d)).permute(1, 2, 0, 3),
        attn_mask=~masked,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )[..., :d]  # [b, nq, s, d]
    s, b = q.shape[0], q.shape[1]
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


@dataclass
class NativeAttentionSubmodules:
    linear_qkv: type = ColumnParallelLinear
    linear_qk_hw: type = ColumnParallelLinear
    linear_proj: type = RowParallelLinear
    norm: type = RMSNorm


class NativeSelfAttention(MegatronModule):
    """Self-attention of a NEO decoder layer. Called by megatron's TransformerLayer; reads the
    Native-RoPE table from ``rotary_pos_cos``/``rotary_pos_sin`` ([s, b, 1, 2d], built once per
    micro-batch by the model) and the native mask from ``attention_mask``."""

    def __init__(self, config, submodules: NativeAttentionSubmodules, layer_number: int, **unused):
        super().__init__(config=config)
        self.layer_number = layer_number
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

    def _thw(self, t: torch.Tensor, hw: torch.Tensor, norm_t, norm_h, norm_w) -> torch.Tensor:
        half = self.head_dim // 2
        return torch.cat([norm_t(t), norm_h(hw[..., :half]), norm_w(hw[..., half:])], dim=-1)

    def forward(self, hidden_states, attention_mask, rotary_pos_cos=None, rotary_pos_sin=None, **unused):
        qkv, _ = self.linear_qkv(hidden_states)
        qk_hw, _ = self.linear_qk_hw(hidden_states)
        s, b = qkv.shape[:2]
        q, k, v = qkv.view(s, b, self.nkv, -1).split(self.qkv_split, dim=-1)
        q_hw, k_hw = qk_hw.view(s, b, self.nkv, -1).split(self.hw_split, dim=-1)
        d = self.head_dim
        q = self._thw(q.reshape(s, b, self.nq, d), q_hw.reshape(s, b, self.nq, d),
                      self.q_layernorm, self.q_layernorm_h, self.q_layernorm_w)
        k = self._thw(k, k_hw, self.k_layernorm, self.k_layernorm_h, self.k_layernorm_w)
        q = apply_native_rope(q, rotary_pos_cos, rotary_pos_sin, d)
        k = apply_native_rope(k, rotary_pos_cos, rotary_pos_sin, d)
        context = core_attention(q, k, v.contiguous(), attention_mask, 1.0 / math.sqrt(d))
        return self.linear_proj(context)  # (output, bias=None): what TransformerLayer expects
