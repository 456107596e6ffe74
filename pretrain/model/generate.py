"""Greedy generation for evaluation: full recompute per new token (correctness first; the
prompts of our evaluations are short), many prompts per forward pass. Runs on one pipeline
stage (PP=1) at any TP size."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from megatron.core import parallel_state

from pretrain.model.batch import PackedRow, collate


def greedy_generate(model, prompt: torch.Tensor, image_ids: torch.Tensor | None = None,
                    image_grids: torch.Tensor | None = None, patches: torch.Tensor | None = None,
                    max_new_tokens: int = 16, eos_token_id: int | None = None) -> list[int]:
    """Continue one prompt ([s] token ids, images already expanded into <img> + context tokens
    + </img>, with ``image_ids`` marking the context tokens) and return the new token ids."""
    return greedy_generate_many(model, [(prompt, image_ids, image_grids, patches)], max_new_tokens, eos_token_id)[0]


@torch.no_grad()
def greedy_generate_many(model, prompts: Sequence[tuple], max_new_tokens: int = 16, eos_token_id: int | None = None,
                         batch_size: int = 32) -> list[list[int]]:
    """``greedy_generate`` for many prompts (tuples of its arguments): each forward pass carries up
    to ``batch_size`` unfinished prompts as right-padded rows of one micro-batch (padding is a
    document of its own, so no prompt sees another); rows leave the batch when they emit EOS."""
    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("greedy generation needs the whole model on one stage: load the checkpoint at PP=1")
    was_training = model.training
    device = next(model.parameters()).device  # prompts are built on the host, the model may be on a GPU
    model.eval()
    new: list[list[int]] = [[] for _ in prompts]
    # Similar lengths share a batch: less padding.
    order = sorted(range(len(prompts)), key=lambda i: prompts[i][0].numel())
    for start in range(0, len(order), batch_size):
        active = order[start:start + batch_size]
        for _ in range(max_new_tokens):
            rows = [_row(prompts[i], new[i]) for i in active]
            length = max(r.tokens.numel() for r in rows)
            batch = collate([_pad(r, length) for r in rows]).to(device)
            logits = model(batch, return_logits=True)  # [b, s, V]
            last = torch.tensor([r.tokens.numel() - 1 for r in rows], device=device)
            picked = logits[torch.arange(len(rows), device=device), last].argmax(-1).tolist()
            for i, token in zip(active, picked):
                new[i].append(token)
            active = [i for i in active if new[i][-1] != eos_token_id]
            if not active:
                break
    model.train(was_training)
    return new


def _row(prompt: tuple, generated: list[int]) -> PackedRow:
    tokens, image_ids, grids, patches = prompt
    tokens = torch.cat([tokens.view(-1), tokens.new_tensor(generated)])
    n = tokens.numel()
    ids = torch.full((n,), -1, dtype=torch.long)
    if image_ids is not None:
        ids[: image_ids.numel()] = image_ids.view(-1)
    grids = grids.long().view(-1, 2) if grids is not None else torch.zeros(0, 2, dtype=torch.long)
    return PackedRow(tokens=tokens, labels=tokens, loss_mask=torch.zeros(n, dtype=torch.bool),
                     doc_ids=torch.zeros(n, dtype=torch.long), image_ids=ids, image_grids=grids, patches=patches)


def _pad(row: PackedRow, length: int) -> PackedRow:
    pad = length - row.tokens.numel()
    if not pad:
        return row
    fill = lambda t, v: torch.cat([t, t.new_full((pad,), v)])  # noqa: E731
    return PackedRow(tokens=fill(row.tokens, 0), labels=fill(row.labels, 0), loss_mask=fill(row.loss_mask, False),
                     doc_ids=fill(row.doc_ids, -1), image_ids=fill(row.image_ids, -1), image_grids=row.image_grids,
                     patches=row.patches)
