"""Parameter roles: what a training stage may train or must freeze, by meaning not by name.

    vision       patch and dense embeddings (pixels -> tokens)
    pre_buffer   every parameter of the pre-Buffer decoder layers
    post_llm_hw  the post-LLM's new H/W projections and their h/w norms
    post_llm     the post-LLM's original Qwen3 weights (attention, QK-norms, MLP, layer norms)
    embedding    word embeddings
    lm_head      the output projection (the same tensor as ``embedding`` when tied)
    final_norm   the final RMSNorm
Stage 1 trains vision + pre_buffer + post_llm_hw and freezes the rest (shared/spec/NEO_MODEL.md).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

ROLES = ("vision", "pre_buffer", "post_llm_hw", "post_llm", "embedding", "lm_head", "final_norm")
_HW_PARTS = ("linear_qk_hw.", "q_layernorm_h.", "q_layernorm_w.", "k_layernorm_h.", "k_layernorm_w.")


def param_roles(model: torch.nn.Module) -> dict[str, str]:
    """Role of every parameter of this rank's part of a NeoModel, by parameter name."""
    pre_buffer = model.neo.pre_buffer_layers
    layer_numbers = {i: layer.layer_number for i, layer in enumerate(model.decoder.layers)}  # 1-based, global
    roles = {}
    for name, _ in model.named_parameters():
        if name.startswith("vision."):
            role = "vision"
        elif name.startswith("embedding."):
            role = "embedding"
        elif name.startswith("output_layer."):
            role = "embedding" if model.share_embeddings_and_output_weights else "lm_head"
        elif name.startswith("decoder.final_layernorm."):
            role = "final_norm"
        elif name.startswith("decoder.layers."):
            number = layer_numbers[int(name.split(".")[2])]
            if number <= pre_buffer:
                role = "pre_buffer"
            else:
                role = "post_llm_hw" if any(part in name for part in _HW_PARTS) else "post_llm"
        else:
            raise ValueError(f"parameter {name} has no role: teach pretrain/model/roles.py about it")
        roles[name] = role
    return roles


def set_trainable(model: torch.nn.Module, trainable: Iterable[str]) -> dict[str, int]:
    """requires_grad = (role in trainable) for every parameter; returns parameter counts per role
    on this rank. Tied embeddings train only if both ``embedding`` and ``lm_head`` do."""
    trainable = set(trainable)
    unknown = trainable - set(ROLES)
    if unknown:
        raise ValueError(f"unknown parameter roles {sorted(unknown)}; known: {', '.join(ROLES)}")
    if model.share_embeddings_and_output_weights and len(trainable & {"embedding", "lm_head"}) == 1:
        raise ValueError("with tied word embeddings, 'embedding' and 'lm_head' are one tensor: train both or neither")
    counts = dict.fromkeys(ROLES, 0)
    params = dict(model.named_parameters())
    for name, role in param_roles(model).items():
        params[name].requires_grad_(role in trainable)
        counts[role] += params[name].numel()
    return counts
