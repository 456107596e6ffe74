"""Useful FLOPs (pretrain/flops.py) against what torch's FlopCounterMode sees the real model do, and
the attention pair count against the native mask itself.

What FlopCounterMode counts on CPU differs from useful FLOPs in three known ways, each handled here:
- attention: the fused CPU kernel is not counted at all (and a dense kernel would count every pair
  of the row), so attention ops (``*scaled_dot_product*``) are left out and the pair count is
  checked against ``native_mask`` instead;
- padding: the model runs its matmuls on every slot of a row, so the formula is given every slot
  as a token (``BatchWork(tokens=b*s)``) for the comparison; useful FLOPs count real tokens only;
- NativeQKV's 4x4 mean-square matrix (``_quarter_sums_to_part_means``): 2*4*4 FLOPs per head per
  slot forward and again backward in every layer, arithmetic of the QK-norms, not a model matmul.
Everything else must match exactly.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pretrain.distributed import spawn
from pretrain.flops import BatchWork, step_flops, work_flops
from pretrain.metrics import Metrics
from pretrain.model.batch import NeoBatch, collate
from pretrain.model.config import NeoModelConfig
from pretrain.model.positions import native_mask
from pretrain.model.roles import ROLES
from tests.model.packed_batches import packed_rows, text_rows

NEO = NeoModelConfig(hidden_size=64, pre_buffer_layers=2, post_llm_layers=2, num_attention_heads=4,
                     num_kv_heads=2, head_dim=16, ffn_hidden_size=96, vocab_size=256, vision_hidden_size=32)
STAGE0 = ("post_llm", "embedding", "lm_head", "final_norm")
STAGE1 = ("vision", "pre_buffer", "post_llm_hw")
HW_ONLY = ("post_llm_hw",)  # nothing before the post-LLM trains: the pre-Buffer needs no backward


def _batches():
    return {
        "text": collate(text_rows(2, 24, NEO.vocab_size, seed=7)),
        "multimodal": collate(packed_rows(3, 40, NEO.vocab_size, seed=3, patch_dim=3 * NEO.patch_size ** 2)),
    }


CASES = [("text", ROLES), ("multimodal", ROLES), ("text", STAGE1), ("multimodal", STAGE1),
         ("multimodal", STAGE0), ("multimodal", HW_ONLY)]


# --------------------------------------------------------------------------------- the mask count


def _brute_force_pairs(doc_ids: torch.Tensor, image_ids: torch.Tensor) -> int:
    allowed = ~native_mask(doc_ids, image_ids)[:, 0]  # [b, q, k]
    real = doc_ids >= 0
    return int((allowed & real[:, :, None] & real[:, None, :]).sum())


def _layout_batch(docs: torch.Tensor, images: torch.Tensor) -> NeoBatch:
    zeros = torch.zeros_like(docs)
    return NeoBatch(tokens=zeros, labels=zeros, loss_mask=zeros.bool(), doc_ids=docs, image_ids=images,
                    image_grids=torch.zeros(0, 2, dtype=torch.long))


def test_attention_pairs_equal_the_native_mask():
    """The pair count step_flops uses (masked_attention.allowed_pairs) against the mask itself."""
    for seed in range(6):
        batch = collate(packed_rows(3, 48, 256, seed=seed, images=seed % 3 > 0))
        assert BatchWork.of(batch).attention_pairs == _brute_force_pairs(batch.doc_ids, batch.image_ids)
    # By hand: a document of 7 with a 3-token image (28 + 3), one of 2 (3), padding (nothing); an
    # all-padding row; a document id that recurs after another (the mask joins both runs).
    docs = torch.tensor([[0] * 7 + [1] * 2 + [-1] * 3, [-1] * 12, [0, 0, 1, 1, 0, 0] + [-1] * 6])
    images = torch.full_like(docs, -1)
    images[0, 2:5] = 0
    work = BatchWork.of(_layout_batch(docs, images))
    assert work.attention_pairs == 28 + 3 + 3 + 0 + 10 + 3 == _brute_force_pairs(docs, images)
    assert work.tokens == 9 + 0 + 6 and work.image_tokens == 3


def test_useful_work_of_a_batch():
    batch = _batches()["multimodal"]
    work = BatchWork.of(batch)
    real = batch.doc_ids >= 0
    assert 0 < work.tokens == int(real.sum()) < batch.tokens.numel()  # padding is not work
    assert work.image_tokens == int((batch.image_ids >= 0).sum()) > 0
    assert work.supervised == int(batch.loss_mask.sum()) < work.tokens
    assert work.attention_pairs == _brute_force_pairs(batch.doc_ids, batch.image_ids)
    total = step_flops(NEO, [batch, batch], ROLES)
    assert total == work_flops(NEO, work, ROLES) + work_flops(NEO, work, ROLES)
    assert total.attention_backward == 2 * total.attention_forward
    with pytest.raises(ValueError, match="unknown parameter roles"):
        step_flops(NEO, [batch], ["pre_bufer"])


def test_neo_2b_16k():
    """At neo_2b shapes: a fully trained 16k text document is the textbook 6N per token plus causal
    attention (3x forward over s(s+1)/2 pairs); stage 1 on a packed multimodal row counts far less
    (the old count, 3 * full-row forward FLOPs, said 649 TFLOP for either)."""
    neo = NeoModelConfig()
    s, layers, heads, d = 16384, neo.num_layers, neo.num_attention_heads, neo.head_dim
    sharded, _ = neo.layer_parameters()
    causal = s * (s + 1) // 2
    text = work_flops(neo, BatchWork(tokens=s, supervised=s, image_tokens=0, attention_pairs=causal), ROLES)
    six_n = 6 * s * (layers * sharded + neo.hidden_size * neo.vocab_size)
    assert text.total == six_n + 3 * layers * heads * 6 * d * causal
    assert 450e12 < text.total < 452e12
    # 8 documents, each with a 1024-token image, a quarter of the tokens supervised.
    docs = 8
    work = BatchWork(tokens=s, supervised=s // 4, image_tokens=docs * 1024,
                     attention_pairs=docs * (s // docs) * (s // docs + 1) // 2 + docs * 1024 * 1023 // 2)
    stage1, full = work_flops(neo, work, STAGE1), work_flops(neo, work, ROLES)
    # Frozen post-LLM: the same dX as a fully trained model, dW only of its H/W projections.
    hw = 2 * s * neo.hidden_size * (heads + neo.num_kv_heads) * d
    frozen_dw = neo.post_llm_layers * (2 * s * sharded - hw)
    assert stage1.decoder_forward == full.decoder_forward
    assert stage1.decoder_backward == full.decoder_backward - frozen_dw
    assert stage1.lm_head_backward == stage1.lm_head_forward == full.lm_head_backward // 2
    assert stage1.attention_forward < text.attention_forward / 6
    assert 210e12 < stage1.total < 215e12


# ---------------------------------------------------------------------- the model, counted by torch


def _counted_body():
    """Per case, FlopCounterMode's counts by op of one forward and of its backward (TP1PP1)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.distributed import runtime
    from pretrain.model.neo import NeoModel, transformer_config
    from pretrain.model.roles import set_trainable

    batches = _batches()
    out = []
    with runtime.model_parallel(1, 1, seed=3):
        model = NeoModel(transformer_config(NEO), NEO)
        for name, roles in CASES:
            set_trainable(model, roles)
            model.zero_grad(set_to_none=True)
            counts = []
            with FlopCounterMode(display=False) as forward:
                loss = model(batches[name]).sum()
            with FlopCounterMode(display=False) as backward:
                loss.backward()
            for counter in (forward, backward):
                counts.append({str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()})
            out.append(counts)
    return out


@pytest.fixture(scope="module")
def counted():
    return spawn.run(_counted_body, 1, timeout=300)[0]


@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=[f"{b}-{'+'.join(r) if r != ROLES else 'all'}" for b, r in CASES])
def test_matches_flop_counter_on_the_model(counted, case):
    name, roles = CASES[case]
    batch = _batches()[name]
    forward_ops, backward_ops = counted[case]
    for ops in (forward_ops, backward_ops):
        attention = {op for op in ops if "scaled_dot_product" in op}
        for op in attention:
            del ops[op]
        assert set(ops) <= {"aten.mm", "aten.addmm"}, (
            f"{ops}: attention seems to run through plain batched matmuls now, which this test cannot tell "
            "from the model's; count them apart (e.g. by the attention function's own ops) before comparing")
    slots = batch.tokens.numel()
    # The model's matmuls run on padding too: the formula gets every slot as a token.
    executed = dataclasses.replace(BatchWork.of(batch), tokens=slots)
    expected = work_flops(NEO, executed, roles)
    backprop_layers = NEO.num_layers - (NEO.pre_buffer_layers if roles == HW_ONLY else 0)
    norm_matrix = 2 * 4 * 4 * slots * (NEO.num_attention_heads + NEO.num_kv_heads)
    fwd = sum(forward_ops.values())
    bwd = sum(backward_ops.values())
    assert fwd == expected.forward - expected.attention_forward + NEO.num_layers * norm_matrix
    wasted = 0
    if roles == HW_ONLY:
        # Useful is less than executed here: megatron computes the input gradient of a trainable
        # linear even when its input needs none (the H/W projection of the first post-LLM layer).
        wasted = 2 * slots * NEO.hidden_size * (NEO.num_attention_heads + NEO.num_kv_heads) * NEO.head_dim
    assert bwd == expected.backward - expected.attention_backward + backprop_layers * norm_matrix + wasted


def test_stage_rules_by_part():
    batch = _batches()["multimodal"]
    full, stage1, stage0 = (step_flops(NEO, [batch], roles) for roles in (ROLES, STAGE1, STAGE0))
    assert full.forward == stage1.forward == stage0.forward
    # vision: dW of both convs + dX of the dense conv when it trains; nothing when frozen.
    assert stage0.vision_backward == 0 < stage1.vision_backward == full.vision_backward
    assert full.vision_backward < 2 * full.vision_forward  # no gradient into the pixels
    # stage 1's frozen head: dX only; the full model's: dX + dW.
    assert stage1.lm_head_backward == full.lm_head_forward
    assert full.lm_head_backward == 2 * full.lm_head_forward
    # every layer passes gradients in all three: attention backward is 2x forward everywhere.
    assert stage1.attention_backward == stage0.attention_backward == full.attention_backward
    assert full.decoder_backward == 2 * full.decoder_forward
    assert stage1.decoder_backward < full.decoder_backward and stage0.decoder_backward < full.decoder_backward
    text = step_flops(NEO, [_batches()["text"]], STAGE1)
    assert text.vision_forward == text.vision_backward == 0


# ---------------------------------------------------------------------------------------- metrics


def _metrics(tmp_path, peak: float) -> Metrics:
    cfg = type("Cfg", (), {})()
    cfg.log = type("Log", (), {"every": 1})()
    cfg.cluster = type("Cluster", (), {"peak_tflops": peak})()
    cfg.wandb = type("Wandb", (), {"mode": "disabled"})()
    cfg.train = type("Train", (), {"steps": 10})()
    return Metrics(cfg, tmp_path, enabled=True, run_id="t", world_size=4)


@pytest.mark.parametrize("peak", [0.0, 989.0])
def test_metrics_report_mfu_only_with_a_peak(tmp_path, capsys, peak):
    metrics = _metrics(tmp_path, peak)
    values = {"loss": 1.5, "lr": 1e-4, "grad_norm": 0.5, "pack_fill": 0.9}
    metrics.log(1, values, tokens=1000, samples=10, flops=4e12, steps_in_interval=1)
    metrics.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    line = capsys.readouterr().out
    assert row["tflops_per_device"] > 0 and " TFLOP/s/dev" in line
    if peak:
        assert row["mfu"] == pytest.approx(row["tflops_per_device"] / peak) and "MFU -" not in line
    else:
        assert "mfu" not in row and "MFU -" in line
