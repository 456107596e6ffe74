"""A small megatron-core GPT (Qwen3-like: RMSNorm, QK-norm, GQA, SwiGLU, RoPE, tied embeddings) and
one forward/backward through megatron's real pipeline schedule, for layout-equivalence tests."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

VOCAB, SEQ, GLOBAL_BATCH, MICRO_BATCH = 128, 32, 8, 1


def build(num_layers: int = 4):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=num_layers,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        ffn_hidden_size=128,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        qk_layernorm=True,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
        rotary_base=10000,
    )


def global_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def loss_and_grad_norm(model, tokens: torch.Tensor, labels: torch.Tensor, split_over_dp: bool = True):
    """Mean loss over the global batch and the global gradient norm, as the whole layout sees them.

    With ``split_over_dp`` each DP rank takes its slice of the batch and gradients are averaged over
    DP; without it every rank runs the whole batch alone (the single-process reference).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    dp = ps.get_data_parallel_world_size() if split_over_dp else 1
    dp_rank = ps.get_data_parallel_rank() if split_over_dp else 0
    rows = tokens.shape[0] // dp
    mine = slice(dp_rank * rows, (dp_rank + 1) * rows)
    micro = [(t, l) for t, l in zip(tokens[mine].split(MICRO_BATCH), labels[mine].split(MICRO_BATCH))]
    positions = torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCH, -1)

    def forward_step(data_iterator, model):
        t, l = next(data_iterator)
        out = model(t, positions, attention_mask=None, labels=l)

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    model.zero_grad(set_to_none=True)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro),
        model=[model],
        num_microbatches=len(micro),
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )

    params = [p for p in model.parameters() if p.grad is not None]
    if split_over_dp and dp > 1:
        for p in params:
            dist.all_reduce(p.grad, group=ps.get_data_parallel_group())
            p.grad /= dp
    # Per-head QK-norm weights are replicated over TP but each rank only sees its own heads: their
    # gradients are partial sums (megatron's finalize_model_grads sums them by name; so do we).
    if ps.get_tensor_model_parallel_world_size() > 1:
        for name, p in model.named_parameters():
            if p.grad is not None and ("q_layernorm" in name or "k_layernorm" in name):
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    shared = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp > 1 and shared is not None and ps.is_rank_in_embedding_group():
        dist.all_reduce(shared.grad, group=ps.get_embedding_group())
    sq = torch.zeros(())
    for p in params:
        counted_elsewhere = pp > 1 and p is shared and not ps.is_pipeline_first_stage()
        if param_is_not_tensor_parallel_duplicate(p) and not counted_elsewhere:
            sq += p.grad.float().pow(2).sum()
    if split_over_dp:
        dist.all_reduce(sq, group=ps.get_model_parallel_group())
    grad_norm = sq.sqrt().item()

    loss = None
    if ps.is_pipeline_last_stage():
        loss = torch.stack([d["loss"] for d in losses]).mean()
        if split_over_dp and dp > 1:
            dist.all_reduce(loss, group=ps.get_data_parallel_group())
            loss /= dp
        loss = loss.item()
    return loss, grad_norm
