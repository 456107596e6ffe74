"""Useful model FLOPs of a training step: the numerator of TFLOP/s and MFU (and of the planner).

"Useful" means the arithmetic the model's maths needs for the tokens it was given, not what a
kernel happens to execute: attention only over the (query, key) pairs the native mask allows,
no work for padding, the LM head only where the loss is taken, no weight gradients for frozen
roles. Only matrix products count (norms, RoPE, softmax and the loss are a rounding error and not
what a peak TFLOP/s figure measures). Counts are for the WHOLE model (every pipeline stage, every
tensor-parallel shard) over the micro-batches given, i.e. one data-parallel rank's share of a step;
summed over data-parallel ranks and divided by the world size they give TFLOP/s per device.

Per micro-batch, with t real tokens (doc id >= 0), u supervised tokens (``loss_mask``), i image
tokens (<IMG_CONTEXT>; each merges m*m = 4 patches), P allowed attention pairs of real tokens
(``masked_attention.allowed_pairs``: per document L*(L+1)/2, plus n*(n-1)/2 per image of n tokens),
h hidden, d head dim, nq/nkv heads, V vocabulary, c = 3*16*16 pixels per patch,
v vision width, L layers:

    part        forward (per micro-batch)                  backward
    ----------  -----------------------------------------  --------------------------------------------
    decoder     2t * W per layer, W = the layer's matmul   dX: 1x forward of each matmul whose input needs
                weights (layer_parameters()[0]): qkv,      a gradient; dW: 1x forward of each matmul whose
                H/W q/k projection, out proj, SwiGLU MLP   weight trains (role pre_buffer, post_llm or
                                                           post_llm_hw for the H/W projection)
    attention   P * nq * (2*(2d) + 2d) per layer: QK^T     2x forward (dQ, dK from dS; dP, dV from dO) in
                over 2d-wide q/k, PV over d                every layer gradients pass through
    lm_head     2u * h * V                                 dX: 1x forward if the last hidden state needs a
                                                           gradient; dW: 1x forward if the head trains
                                                           (role ``embedding`` when tied, else ``lm_head``)
    vision      2 * 4i * c * v (patch conv)                only if ``vision`` trains: dW of both convs
                + 2i * 4v * h (2x2 dense conv)             (1x each) + dX of the dense conv (1x, to reach
                                                           the patch conv); no dX into the pixels

Which layers pass gradients: the input of layer 1 needs a gradient iff the word embeddings train or
``vision`` trains and the micro-batch has images; the output of a layer needs one iff its input did
or any of its weights train. The q/k/v and H/W projections get a dX iff the layer's input needs a
gradient or the layer's own weights (role pre_buffer / post_llm, its input norm among them) train;
the rest of the layer backpropagates as soon as either holds or its H/W projection trains. So
stage 1 (vision, pre-Buffer and post-LLM H/W train) backpropagates through the whole frozen
post-LLM (dX everywhere, dW only of the H/W projections), and its frozen head computes dX, no dW.

Not counted, being no part of the model's maths: recomputation (``selective``/``full`` recompute:
this is MFU, not hardware FLOPs utilisation), the zero half of V that the fused kernel is padded
with, masked pairs a dense or block kernel still computes, padding slots, the LM head on
unsupervised tokens (it runs on every token under sequence parallelism), and a dX megatron
computes for a trainable linear whose input needs none. The count is an exact integer sum;
tests/test_flops.py compares it with ``torch.utils.flop_counter.FlopCounterMode`` on the real model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

from pretrain.model.batch import NeoBatch
from pretrain.model.config import NeoModelConfig
from pretrain.model.masked_attention import allowed_pairs
from pretrain.model.roles import ROLES


@dataclass(frozen=True)
class BatchWork:
    """What a micro-batch asks of the model, in counts (no shapes, no padding)."""

    tokens: int  # real tokens: doc id >= 0
    supervised: int  # tokens the loss is taken at (the LM head runs on these only)
    image_tokens: int  # <IMG_CONTEXT> tokens (each from merge*merge patches)
    attention_pairs: int  # allowed (query, key) pairs of the native mask among real tokens

    @classmethod
    def of(cls, batch: NeoBatch) -> BatchWork:
        real = batch.doc_ids >= 0
        return cls(
            tokens=int(real.sum()),
            supervised=int((batch.loss_mask & real).sum()),
            image_tokens=int(((batch.image_ids >= 0) & real).sum()),
            attention_pairs=int(allowed_pairs(batch.doc_ids, batch.image_ids).sum()),
        )


@dataclass(frozen=True)
class StepFlops:
    """Useful FLOPs by part and pass, summed over micro-batches (see the module docstring)."""

    decoder_forward: int = 0  # dense matmuls of all decoder layers
    decoder_backward: int = 0
    attention_forward: int = 0  # QK^T and PV over allowed pairs, all layers
    attention_backward: int = 0
    lm_head_forward: int = 0
    lm_head_backward: int = 0
    vision_forward: int = 0
    vision_backward: int = 0

    @property
    def forward(self) -> int:
        return self.decoder_forward + self.attention_forward + self.lm_head_forward + self.vision_forward

    @property
    def backward(self) -> int:
        return self.decoder_backward + self.attention_backward + self.lm_head_backward + self.vision_backward

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def __add__(self, other: StepFlops) -> StepFlops:
        return StepFlops(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


def work_flops(neo: NeoModelConfig, work: BatchWork, trainable: Iterable[str]) -> StepFlops:
    """Useful FLOPs of one micro-batch's forward and backward (the formula of the module docstring)."""
    trainable = set(trainable)
    unknown = trainable - set(ROLES)
    if unknown:
        raise ValueError(f"unknown parameter roles {sorted(unknown)}; known: {', '.join(ROLES)}")
    h = neo.hidden_size
    merge = round(1 / neo.downsample_ratio)
    patch = 2 * merge * merge * work.image_tokens * 3 * neo.patch_size ** 2 * neo.vision_hidden_size
    dense = 2 * work.image_tokens * merge * merge * neo.vision_hidden_size * h
    vision_trains = "vision" in trainable and work.image_tokens > 0
    out = StepFlops(vision_forward=patch + dense, vision_backward=(patch + 2 * dense) if vision_trains else 0)

    per_layer, grad = _layer_flops(neo, work, trainable)
    for layer in per_layer:
        out += layer

    head = 2 * work.supervised * h * neo.vocab_size
    head_trains = ("embedding" if neo.tie_word_embeddings else "lm_head") in trainable
    grad = grad or "final_norm" in trainable
    return out + StepFlops(lm_head_forward=head, lm_head_backward=head * grad + head * head_trains)


def layer_flops(neo: NeoModelConfig, work: BatchWork, trainable: Iterable[str]) -> list[StepFlops]:
    """Useful FLOPs of each decoder layer (first to last) for one micro-batch: the pipeline stages'
    shares (the planner's step time)."""
    return _layer_flops(neo, work, set(trainable))[0]


def _layer_flops(neo: NeoModelConfig, work: BatchWork, trainable: set[str]) -> tuple[list[StepFlops], bool]:
    """(per-layer FLOPs, whether the last layer's output needs a gradient)."""
    h, d, nq, nkv = neo.hidden_size, neo.head_dim, neo.num_attention_heads, neo.num_kv_heads
    t = work.tokens
    # One decoder layer's matmuls, forward, for t tokens: the input projections (q/k/v and the
    # H/W q/k, both read the normed input), the H/W part alone (its own role in the post-LLM),
    # and the rest (output projection + SwiGLU MLP).
    sharded, _ = neo.layer_parameters()
    hw = 2 * t * h * (nq + nkv) * d
    inputs = 2 * t * h * (nq + 2 * nkv) * d + hw
    rest = 2 * t * sharded - inputs
    attention = work.attention_pairs * nq * (2 * (2 * d) + 2 * d)
    vision_trains = "vision" in trainable and work.image_tokens > 0
    grad = "embedding" in trainable or vision_trains  # does layer 1's input need a gradient?
    layers = []
    for number in range(1, neo.num_layers + 1):
        role = "pre_buffer" if number <= neo.pre_buffer_layers else "post_llm"
        role_hw = "pre_buffer" if number <= neo.pre_buffer_layers else "post_llm_hw"
        trains, hw_trains = role in trainable, role_hw in trainable
        bwd = attn_bwd = 0
        if grad or trains:  # dX of the input projections: their input (the normed hidden) needs it
            bwd += inputs
        if grad or trains or hw_trains:  # the rest of the layer backpropagates
            bwd += rest
            attn_bwd = 2 * attention
            grad = True
        bwd += (inputs - hw + rest) * trains + hw * hw_trains  # dW
        layers.append(StepFlops(decoder_forward=inputs + rest, decoder_backward=bwd,
                                attention_forward=attention, attention_backward=attn_bwd))
    return layers, grad


def step_flops(neo: NeoModelConfig, micro_batches: Iterable[NeoBatch], trainable: Iterable[str]) -> StepFlops:
    """Useful FLOPs of one training step over this rank's micro-batches (whole model: every
    pipeline stage and tensor-parallel shard), for a stage that trains the roles ``trainable``."""
    trainable = tuple(trainable)
    total = StepFlops()
    for batch in micro_batches:
        total += work_flops(neo, BatchWork.of(batch), trainable)
    return total
