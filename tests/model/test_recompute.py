"""Activation recompute (``train.recompute``): ``selective`` and ``full`` give the loss and gradients
of ``none`` exactly, also with the stage-1 freezing, and keep less for backward.

One process here: TP1PP1 equality on packed multimodal micro-batches (and one plain causal text
micro-batch, which has no mask), and the bytes one decoder layer of the tiny model keeps for
backward at seq 4096. TP2PP2 with sequence parallelism rides on the four-process launch of
tests/model/test_neo.py (``test_recompute_tp2pp2_sp``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from pretrain.config import ConfigError, compose, validate
from pretrain.distributed import spawn
from pretrain.model.batch import collate
from pretrain.model.config import NeoModelConfig
from tests.model.packed_batches import packed_rows, text_rows
from tests.model.test_neo import RANDOM_NEO, RECOMPUTE, STAGE1_ROLES

TINY = Path(__file__).parents[2] / "conf" / "model" / "tiny.yaml"
SEQ = 4096


def _grads(model) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _saved_bytes_per_layer(model, batch) -> list[int]:
    """Bytes of the activations each decoder layer adds to what autograd keeps for backward, in one
    training forward: distinct storages, each counted in the layer that first saves it, parameters
    left out. So the per-micro-batch mask and RoPE tables, shared by all layers, count in the first
    layer only; a layer's input counts in that layer (its norm keeps it, or the checkpoint does)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    owner: dict[int, tuple[int, int]] = {}  # storage -> (layer, bytes)
    current = [-1]

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if current[0] >= 0 and ptr not in params and ptr not in owner:
            owner[ptr] = (current[0], t.untyped_storage().nbytes())
        return t

    hooks = []
    for i, layer in enumerate(model.decoder.layers):
        hooks.append(layer.register_forward_pre_hook(lambda *_, i=i: current.__setitem__(0, i)))
        hooks.append(layer.register_forward_hook(lambda *_: current.__setitem__(0, -1)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch).sum()
    for h in hooks:
        h.remove()
    del loss
    per_layer = [0] * len(model.decoder.layers)
    for layer, nbytes in owner.values():
        per_layer[layer] += nbytes
    return per_layer


def _body():
    from pretrain.distributed import runtime
    from pretrain.model.neo import NeoModel, transformer_config
    from pretrain.model.roles import set_trainable
    from pretrain.schedule import finalize_grads, forward_backward

    out = {"runs": {}, "bytes": {}}
    rows = packed_rows(4, 40, RANDOM_NEO.vocab_size, seed=3, patch_dim=3 * 16 * 16)
    micro = [collate([r]) for r in rows] + [collate(text_rows(1, 40, RANDOM_NEO.vocab_size, seed=1))]
    assert micro[-1].causal  # attention without a mask (None) goes through the recompute as well
    with runtime.model_parallel(1, 1, seed=11):
        weights = NeoModel(transformer_config(RANDOM_NEO), RANDOM_NEO).state_dict()
        for mode in RECOMPUTE:
            model = NeoModel(transformer_config(RANDOM_NEO), RANDOM_NEO, recompute=mode)
            model.load_state_dict(weights)
            for trainable in ("all", "stage1"):
                if trainable == "stage1":
                    set_trainable(model, STAGE1_ROLES)
                model.zero_grad(set_to_none=True)
                loss = forward_backward(model, micro)
                finalize_grads(model)
                out["runs"][mode, trainable] = (loss, _grads(model))

        tiny = NeoModelConfig(**yaml.safe_load(TINY.read_text()))
        batch = collate(packed_rows(1, SEQ, tiny.vocab_size, seed=0, patch_dim=3 * tiny.patch_size ** 2))
        assert batch.has_images and not batch.causal
        for mode in RECOMPUTE:
            model = NeoModel(transformer_config(tiny), tiny, recompute=mode)
            out["bytes"][mode] = _saved_bytes_per_layer(model, batch)
    return out


def test_recompute_tp1pp1():
    result = spawn.run(_body, 1, timeout=300)[0]

    # Equality: the recompute runs the same kernels on the same inputs, so bit for bit.
    runs = result["runs"]
    for trainable in ("all", "stage1"):
        loss, grads = runs["none", trainable]
        assert sum(g is not None for g in grads.values()) > 0
        for mode in ("selective", "full"):
            other_loss, other = runs[mode, trainable]
            assert other_loss == loss, (mode, trainable, other_loss, loss)
            for name, g in grads.items():
                assert (g is None) == (other[name] is None), (mode, trainable, name)
                assert g is None or torch.equal(g, other[name]), (mode, trainable, name)
    frozen = [n for n, g in runs["full", "stage1"][1].items() if g is None]
    assert any(".mlp." in n for n in frozen) and not any("linear_qk_hw" in n for n in frozen)
    print(f"loss {runs['none', 'all'][0]:.6f}: none, selective, full bit-identical (loss and every "
          "gradient), all trainable and stage 1")

    # Memory: bytes a middle layer keeps per token (layer 0 also holds the shared mask and tables).
    per_token = {mode: result["bytes"][mode][2] / SEQ for mode in RECOMPUTE}
    print("saved for backward per decoder layer per token, tiny seq 4096: "
          + ", ".join(f"{mode} {b:.0f} B" for mode, b in per_token.items()))
    assert all(len(set(result["bytes"][mode][1:])) == 1 for mode in RECOMPUTE), result["bytes"]
    assert per_token["full"] * 4 <= per_token["none"]
    assert per_token["selective"] < per_token["none"]


def test_config_accepts_the_three_modes_only():
    for mode in RECOMPUTE:
        validate(compose([f"train.recompute={mode}"]), 1)
    with pytest.raises(ConfigError, match="^train.recompute='sometimes' must be none, selective or full$"):
        validate(compose(["train.recompute=sometimes"]), 1)
