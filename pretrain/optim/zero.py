"""DeepSpeed ZeRO-1 driven after megatron's schedule has run backward.

megatron's pipeline schedule runs forward and backward itself; DeepSpeed then only reduces
gradients over data parallelism (``allreduce_gradients``), clips by the global norm across every
model-parallel rank and steps AdamW on its 1/DP partition of the fp32 optimizer state. DeepSpeed
learns the Megatron groups through ``MegatronMpu``; only trainable parameters enter the optimizer.

Mixed precision as megatron does it. In a bf16 run the weights and activations are bf16, but every
gradient accumulates in fp32: DeepSpeed's BF16 optimizer (what ZeRO-1 becomes with
``grad_accum_dtype=fp32``) keeps one fp32 gradient buffer per parameter group, and a hook on each
bf16 weight adds its gradient into that buffer the moment a micro-batch's backward has produced it,
then frees the bf16 copy (``immediate_grad_update``). The reduction over DP runs on those fp32
buffers in fp32 (``communication_data_type``), and the fp32 master weights and Adam state are
partitioned over DP as in ZeRO-1. ``main_grads`` names where each gradient lives, fp32 or bf16 run.
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from pretrain.optim.lr_schedule import lr_factor, warmup_steps
from pretrain.schedule import param_grads


class MegatronMpu:
    """The process-group interface DeepSpeed expects, over megatron's parallel_state. The
    model-parallel rank (unique per TP x PP rank) names DeepSpeed's checkpoint files."""

    get_model_parallel_rank = staticmethod(lambda: dist.get_rank(ps.get_model_parallel_group()))
    get_model_parallel_world_size = staticmethod(lambda: dist.get_world_size(ps.get_model_parallel_group()))
    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only; no decay on norms and biases (1-D tensors).

    Every model-parallel rank must end up with the same number of groups: DeepSpeed ZeRO-1
    all-reduces the gradient norm once per group over the TP x PP group, so a rank with an extra
    group (say, per-role learning rates where only the first pipeline stage holds the vision
    weights) deadlocks the step."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_engine(model: torch.nn.Module, optim, total_steps: int, micro_batch_size: int, num_microbatches: int,
                 bf16: bool):
    """(engine, lr_scheduler) for ``model`` with ZeRO stage ``optim.zero_stage`` (0 or 1 here)."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # The tied LM head on the last of several stages is a copy of the first stage's embedding:
    # count it once in the global gradient norm.
    if ps.get_pipeline_model_parallel_world_size() > 1 and model.share_embeddings_and_output_weights \
            and model.post_process and not model.pre_process:
        model.output_layer.weight.ds_pipe_replicated = True
    groups = param_groups(model, optim.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    warm = warmup_steps(total_steps, optim.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warm, optim.min_lr_ratio))
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": num_microbatches,
        "train_batch_size": micro_batch_size * num_microbatches * ps.get_data_parallel_world_size(),
        "gradient_clipping": optim.clip_grad,
        "zero_optimization": {"stage": optim.zero_stage, "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7},
        "bf16": {"enabled": bf16, "immediate_grad_update": True},
        # Accumulate over micro-batches and reduce over DP in fp32 (bf16 would lose 0.5-1.6% of
        # the gradient over 16-256 micro-batches); with bf16 weights this selects BF16_Optimizer.
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32",
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    with _quiet():
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, mpu=MegatronMpu(),
            dist_init_required=False)
    return engine, scheduler


def load_optimizer_state(engine, directory: str) -> None:
    """The ZeRO optimizer and LR-schedule state that ``engine.save_checkpoint(directory, tag="zero")``
    wrote (the weights come from our own checkpoint, loaded before the engine was built). DeepSpeed
    would unpickle its files with ``weights_only=False``; its loader is swapped for a restricted one
    (pretrain/checkpoint/restricted.py)."""
    from pretrain.checkpoint.restricted import restricted_checkpoint_engine

    engine.checkpoint_engine = restricted_checkpoint_engine(engine._config)
    with _quiet():
        engine.load_checkpoint(directory, tag="zero", load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=True)


def _quiet():
    """DeepSpeed's BF16 optimizer prints memory reports and debug lines to stdout unconditionally;
    the training log is for people. Its warnings and errors still reach stderr through logging."""
    return contextlib.redirect_stdout(io.StringIO())


def main_grads(engine) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, the tensor its gradient accumulates in) for every trainable parameter, after the
    schedule's backward: the fp32 buffer of DeepSpeed's BF16 optimizer in bf16 runs, ``p.grad``
    (zeros if this rank produced none) in fp32 runs. TP/embedding sums, the finite check and
    DeepSpeed's DP reduction, clipping and step all read these same tensors.

    A parameter whose micro-batches gave it no gradient here (vision weights on a rank that saw no
    image) still takes part: its peers' gradients arrive in the reductions. The BF16 optimizer
    would leave it out of the gradient norm and clipping, differently on each DP rank, so it is
    marked as having a gradient."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "fp32_groups_gradients"):  # BF16_Optimizer
        pairs = []
        for i, group in enumerate(optimizer.bf16_groups):
            pairs += [(p, g.view(p.shape)) for p, g in zip(group, optimizer.fp32_groups_gradients[i])]
            optimizer.fp32_groups_has_gradients[i] = [True] * len(group)
        return pairs
    return param_grads(engine.module)
