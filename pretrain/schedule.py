"""One global batch through megatron's pipeline schedule, with NEO's weighted loss normalised over
the WHOLE global batch, and the gradient synchronisation megatron's DDP would otherwise do.

Normalisation: loss = sum over the global batch of w*ce / sum over the global batch of w. Each
data-parallel rank knows the weights of its own micro-batches before running them, so one
all-reduce of the local weight sums gives the global denominator W up front; every micro-batch
then contributes sum(w*ce)/W, and summing (not averaging) gradients over DP yields exactly the
gradient of the global loss, however samples fall into micro-batches and ranks. (The reference
normalises per micro-batch per GPU, which weights samples by how they were packed.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from pretrain.model.batch import NeoBatch
from pretrain.model.loss import token_weights
from pretrain.model.native_attention import TP_PARTIAL_GRAD


def global_weight_sum(micro_batches: list[NeoBatch], reduction: str) -> torch.Tensor:
    """Sum of the loss weights of the whole global batch (all micro-batches of all DP ranks)."""
    local = sum(token_weights(b.loss_mask, b.doc_ids, reduction).sum() for b in micro_batches)
    total = torch.as_tensor(local, dtype=torch.float64).reshape(1)
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return total


def forward_backward(model, micro_batches: list[NeoBatch], reduction: str = "square",
                     forward_only: bool = False, grad_scale: float = 1.0) -> float | None:
    """Run the schedule over this rank's micro-batches; return the global loss on last-stage ranks
    (the same value on every DP rank), None elsewhere. Gradients are left unsynchronised: call
    ``finalize_grads`` (or let DeepSpeed reduce over DP) before stepping. ``grad_scale`` multiplies
    the gradients (not the reported loss): DP-size when the DP reduction averages, as DeepSpeed's does."""
    if not micro_batches:
        raise ValueError("no micro-batches to run")
    denominator = global_weight_sum(micro_batches, reduction).float()
    n_micro = len(micro_batches)
    seq_len, mbs = micro_batches[0].tokens.shape[1], micro_batches[0].tokens.shape[0]

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        ce = model(batch)

        def loss_func(per_token: torch.Tensor):
            w = token_weights(batch.loss_mask, batch.doc_ids, reduction)
            contribution = (per_token * w).sum() / denominator
            # The schedule divides what we return by the number of micro-batches: undo it, so the
            # backward sees exactly sum(w*ce)/W.
            return contribution * (n_micro * grad_scale), {"loss": contribution.detach().clone()}

        return ce, loss_func

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=n_micro,
        seq_length=seq_len,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )
    if not ps.is_pipeline_last_stage():
        return None
    loss = torch.stack([o["loss"] for o in outputs]).sum().reshape(1)
    dist.all_reduce(loss, group=ps.get_data_parallel_group())
    return loss.item()


def _sum(tensors: list[torch.Tensor], group) -> None:
    """All-reduce (sum) ``tensors`` over ``group`` as one flat buffer."""
    if not tensors or dist.get_world_size(group) == 1:
        return
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    for t, synced in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        t.copy_(synced)


def param_grads(model) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, ``p.grad``) for every trainable parameter; a parameter that got no gradient here
    (e.g. vision weights on a rank whose micro-batches had no image) gets zeros, so every rank
    reduces the same flat buffers. Training passes DeepSpeed's buffers instead (optim.zero.main_grads)."""
    pairs = []
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            pairs.append((p, p.grad))
    return pairs


def finalize_grads(model, grads: list[tuple[torch.nn.Parameter, torch.Tensor]] | None = None,
                   reduce_data_parallel: bool = True) -> None:
    """Make every gradient whole: per-head norms and sequence-parallel norms summed over TP, the
    tied embedding summed over its first/last-stage copies, and (optionally) everything summed
    over DP. Megatron's DDP + finalize_model_grads do the same for megatron's own optimizer.
    ``grads`` pairs each trainable parameter with the tensor holding its accumulated gradient
    (default: ``param_grads``)."""
    grads = param_grads(model) if grads is None else grads
    partial = [g for p, g in grads if getattr(p, TP_PARTIAL_GRAD, False) or getattr(p, "sequence_parallel", False)]
    _sum(partial, ps.get_tensor_model_parallel_group())
    if (ps.get_pipeline_model_parallel_world_size() > 1 and model.share_embeddings_and_output_weights
            and ps.is_rank_in_embedding_group()):
        shared = model.shared_embedding_or_output_weight()
        _sum([g for p, g in grads if p is shared], ps.get_embedding_group())
    if reduce_data_parallel:
        _sum([g for _, g in grads], ps.get_data_parallel_group())


@torch.no_grad()
def forward_logits(model, micro_batches: list[NeoBatch]) -> list[torch.Tensor] | None:
    """Full-vocabulary logits [b, s, V] per micro-batch through the pipeline (evaluation, tests);
    a list on last-stage ranks, None elsewhere."""
    logits: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        out = model(next(data_iterator), return_logits=True)

        def keep(output: torch.Tensor):
            logits.append(output.detach())
            return output.new_zeros(()), {}

        return out, keep

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=micro_batches[0].tokens.shape[1],
        micro_batch_size=micro_batches[0].tokens.shape[0],
        forward_only=True,
    )
    return logits if ps.is_pipeline_last_stage() else None
