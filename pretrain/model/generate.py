"""Greedy generation for evaluation: full recompute per new token (correctness first; the
prompts of our evaluations are short). Runs on one pipeline stage (PP=1) at any TP size."""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from pretrain.model.batch import NeoBatch


@torch.no_grad()
def greedy_generate(model, prompt: torch.Tensor, image_ids: torch.Tensor | None = None,
                    image_grids: torch.Tensor | None = None, patches: torch.Tensor | None = None,
                    max_new_tokens: int = 16, eos_token_id: int | None = None) -> list[int]:
    """Continue one prompt ([s] token ids, images already expanded into <img> + context tokens
    + </img>, with ``image_ids`` marking the context tokens) and return the new token ids."""
    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("greedy_generate needs the whole model on one stage: load the checkpoint at PP=1")
    was_training = model.training
    model.eval()
    tokens = prompt.view(1, -1)
    images = (image_ids if image_ids is not None else torch.full_like(prompt, -1)).view(1, -1)
    grids = image_grids if image_grids is not None else torch.zeros(0, 2, dtype=torch.long)
    new: list[int] = []
    for _ in range(max_new_tokens):
        batch = NeoBatch(tokens=tokens, labels=tokens, loss_mask=torch.zeros_like(tokens, dtype=torch.bool),
                         doc_ids=torch.zeros_like(tokens), image_ids=images, image_grids=grids, patches=patches)
        logits = model(batch, return_logits=True)
        next_id = int(logits[0, -1].argmax())
        new.append(next_id)
        if next_id == eos_token_id:
            break
        tokens = torch.cat([tokens, tokens.new_tensor([[next_id]])], dim=1)
        images = torch.cat([images, images.new_tensor([[-1]])], dim=1)
    model.train(was_training)
    return new
