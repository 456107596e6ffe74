"""Per-GPU memory of one training layout: what each byte is for, from the probe's measurements.

Every rank of a pipeline stage holds (bf16 run, DeepSpeed ZeRO-1 as ``optim/zero.py`` sets it up):

    weights      2 B per parameter of the rank (bf16)
    gradients    4 B per trainable element: the BF16 optimizer's fp32 accumulation buffer, one per
                 optimizer group, padded to a multiple of 2*DP elements (DeepSpeed's alignment)
    optimizer    12 B per element of this rank's 1/DP partition of those padded buffers: the fp32
                 master weights and Adam's two moments
    activations  what autograd keeps for backward, per micro-batch in flight, by the probe: the
                 decoder layers of the stage, the first stage's embeddings (patch embedding
                 included), the last stage's hidden state passed to the next stage
    mask/tables  the per-micro-batch tables the first layer of a stage keeps (Native-RoPE cos/sin,
                 the mask), per micro-batch in flight
    logits/loss  the last stage's final norm, LM head and loss, per micro-batch in flight, plus
                 the bf16 logits of the micro-batch being computed (2 B x tokens x vocab/TP)
    transient    the largest live temporary of backward: the bf16 gradient of the largest trainable
                 weight before it is added to its fp32 buffer, one DP-reduction bucket (5e7 fp32
                 elements) and, with ``full`` recompute, one layer's activations rebuilt for its
                 backward (with ``selective``, one layer's attention kernel state)
    reserve      stated, not measured: the CUDA context, NCCL's buffers, cuBLAS workspaces and
                 allocator fragmentation (``reserve_gb``)

Micro-batches in flight: 1F1B (megatron's schedule without interleaving) keeps at most
min(PP - r, M) micro-batches' activations on stage r (M micro-batches per step), and the stage
before the last keeps each one's output for the send (``pipeline``).

The planned micro-batch is the worst case of the stage, so that the plan holds for any batch the
loader can make: every token an image token on the first stage (the patch embedding's
activations), every token supervised on the last stage (the LM head's), whichever is larger on a
single stage. Token counts are ``micro_batch_size * seq_len``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pretrain.plan.probe import ActivationProfile, StageParameters

GB = 1e9
REDUCE_BUCKET = 5e7  # elements: "reduce_bucket_size" in optim/zero.py


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU of one rank, by what they hold."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    mask_tables: float
    logits_loss: float
    transient: float
    reserve: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def gb(self) -> dict[str, float]:
        return {"total": self.total / GB, **{k: v / GB for k, v in asdict(self).items()}}


def padded(n: int, dp: int) -> int:
    """Elements of DeepSpeed's flat buffer for ``n`` elements at DP ``dp``."""
    align = 2 * dp
    return -(-n // align) * align


def state_bytes(stage: StageParameters, dp: int) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes of one rank of ``stage``: exact, these are the
    buffers' sizes."""
    flat = [padded(n, dp) for n in stage.trainable_groups if n]
    return 2 * stage.params, 4 * sum(flat), 12 * sum(f // dp for f in flat)


def in_flight(pp: int, stage: int, micro_batches: int) -> int:
    return min(pp - stage, micro_batches)


def stage_memory(stage: int, stages: list[StageParameters], layers: list[tuple[int, int]], dp: int,
                 micro_batches: int, tokens: int, hidden: int, vocab_per_rank: int, tp: int, sp: bool,
                 profile: ActivationProfile, recompute_profile: ActivationProfile | None,
                 reserve_gb: float) -> Memory:
    """Memory of one rank of pipeline stage ``stage`` (0-based) of ``len(stages)``.

    ``layers[r]`` = (pre-Buffer, post-LLM) layers of stage r; ``profile`` measured at the run's
    recompute mode; ``recompute_profile`` at ``none`` (one layer rebuilt for its backward) or None."""
    pp = len(stages)
    first, last = stage == 0, stage == pp - 1
    weights, gradients, optimizer = state_bytes(stages[stage], dp)

    # The planned micro-batch (module docstring): all image tokens or all supervised, the larger.
    per_micro = max((profile.rank_bytes(layers[stage], first, last, tokens, i, u) for i, u in ((tokens, 0), (0, tokens))),
                    key=lambda parts: sum(parts.values()))
    flight = in_flight(pp, stage, micro_batches)
    # With PP the stage keeps each in-flight micro-batch's output until its backward (bf16 [s, b, h]).
    send = 0 if last else 2 * tokens * hidden / (tp if sp else 1)
    activations = flight * (per_micro["layers"] + per_micro["first"] + send)
    # The bf16 logits of the micro-batch being computed (the LM head runs on every token under SP,
    # on the supervised ones otherwise: all of them in the planned micro-batch).
    logits = 2 * tokens * vocab_per_rank if last else 0.0

    transient = 2 * stages[stage].largest_trainable + 4 * REDUCE_BUCKET
    if recompute_profile is not None and sum(layers[stage]):
        rebuilt = recompute_profile.rank_bytes(layers[stage], False, False, tokens, 0, 0)["layers"] / sum(layers[stage])
        kept = profile.rank_bytes(layers[stage], False, False, tokens, 0, 0)["layers"] / sum(layers[stage])
        transient += max(rebuilt - kept, 0.0)
    return Memory(
        weights=weights, gradients=gradients, optimizer=optimizer, activations=activations,
        mask_tables=flight * per_micro["shared"], logits_loss=flight * per_micro["last"] + logits,
        transient=transient, reserve=reserve_gb * GB,
    )
