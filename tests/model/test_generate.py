"""Batched greedy generation (what ``pretrain.evaluate`` runs): prompts of different lengths, with
and without images, share right-padded micro-batches, and each must continue exactly as it does
alone. (Generation against transformers' ``generate`` is checked in test_neo.py.)"""

from __future__ import annotations

import torch

from pretrain.distributed import spawn
from pretrain.model.config import NeoModelConfig

NEO = NeoModelConfig(hidden_size=64, pre_buffer_layers=1, post_llm_layers=1, num_attention_heads=4, num_kv_heads=2,
                     head_dim=16, ffn_hidden_size=96, vocab_size=256, vision_hidden_size=32)
IMG_START, IMG_CONTEXT, IMG_END = 3, 4, 5


def _prompt(seed: int, grids: list[tuple[int, int]]):
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(8, 256, (n,), generator=g).tolist()  # noqa: E731
    tokens, ids = text(int(torch.randint(2, 9, (1,), generator=g))), []
    ids = [-1] * len(tokens)
    for i, (gh, gw) in enumerate(grids):
        tokens += [IMG_START] + [IMG_CONTEXT] * (gh * gw) + [IMG_END] + text(3)
        ids += [-1] + [i] * (gh * gw) + [-1] * 4
    patches = torch.randn(sum(4 * gh * gw for gh, gw in grids), 3 * 16 * 16, generator=g) if grids else None
    return torch.tensor(tokens), torch.tensor(ids), torch.tensor(grids, dtype=torch.long).view(-1, 2), patches


def _body():
    from pretrain.distributed import runtime
    from pretrain.model.generate import greedy_generate, greedy_generate_many
    from pretrain.model.neo import NeoModel, transformer_config

    prompts = [_prompt(0, [(2, 3)]), _prompt(1, []), _prompt(2, [(1, 1), (3, 2)]), _prompt(3, [(2, 2)]),
               _prompt(4, [])]
    with runtime.model_parallel(1, 1, seed=7):
        model = NeoModel(transformer_config(NEO), NEO)
        alone = [greedy_generate(model, *p, max_new_tokens=6, eos_token_id=None) for p in prompts]
        together = greedy_generate_many(model, prompts, max_new_tokens=6, eos_token_id=None, batch_size=3)
        # An EOS ends one row early without disturbing the others.
        eos = alone[2][1]
        stopped = greedy_generate_many(model, prompts, max_new_tokens=6, eos_token_id=eos, batch_size=5)
    return alone, together, stopped, eos


def test_batched_generation_matches_one_prompt_at_a_time():
    alone, together, stopped, eos = spawn.run(_body, 1, timeout=300)[0]
    assert all(len(a) == 6 for a in alone)
    assert together == alone
    for a, s in zip(alone, stopped):
        cut = a.index(eos) + 1 if eos in a else len(a)
        assert s == a[:cut]
    assert stopped[2][-1] == eos and len(stopped[2]) <= 2
