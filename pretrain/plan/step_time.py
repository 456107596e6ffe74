"""Estimated time of one training step of a layout: compute, TP communication, pipeline bubble and
the DP gradient reduction. An estimate to rank layouts by, with every assumption stated:

compute      the stage's useful FLOPs (``pretrain.flops``: the same count as MFU) plus what
             recompute adds (``full``: each layer's forward again; ``selective``: the attention's
             forward again), over TP ranks, at ``efficiency`` x the GPU's dense bf16 peak
             (``cluster.peak_tflops``). The planned micro-batch is an upper bound: one document
             filling each sequence (causal attention over all of it), every token supervised.
TP           per decoder layer two all-reduces of the [tokens, hidden] bf16 activations forward
             and two backward (with sequence parallelism an all-gather and a reduce-scatter each:
             the same bytes), two more with ``full`` recompute; ring cost 2(TP-1)/TP x bytes over
             the link bandwidth; not overlapped with compute.
pipeline     1F1B: (M + PP - 1) micro-batch slots of the slowest stage (M micro-batches per
             step), each slot also sending the stage's output forward and its gradient back
             (bf16 [tokens, hidden], / TP with SP); the bubble is the (PP - 1) extra slots.
DP           after the last backward: an all-reduce of the fp32 gradients (``optim/zero.py``:
             fp32 communication) and, after the ZeRO-1 step, an all-gather of the updated bf16
             weights; ring costs over the slowest link of the DP group.

Links: megatron orders ranks TP, then DP, then PP (TP neighbours adjacent). A group whose ranks
fit in one node's span uses ``cluster.intra_node_gbps`` (NVLink), else ``cluster.inter_node_gbps``
(the per-GPU network); both are effective bus bandwidths in Gbit/s, as nccl-tests report them
(x 8 for their GB/s).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pretrain.flops import BatchWork, layer_flops, work_flops
from pretrain.model.config import NeoModelConfig


@dataclass(frozen=True)
class Links:
    gpus_per_node: int
    intra_gbps: float
    inter_gbps: float

    def bytes_per_s(self, span: int) -> float:
        """Bandwidth of a group whose ranks lie within ``span`` consecutive ranks."""
        return (self.intra_gbps if span <= self.gpus_per_node else self.inter_gbps) * 1e9 / 8


@dataclass(frozen=True)
class StepTime:
    compute: float
    tp_comm: float
    pp_comm: float
    bubble: float
    dp_comm: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def parts(self) -> dict[str, float]:
        return {"total": self.total, **asdict(self)}


def planned_work(tokens_per_row: int, rows: int) -> BatchWork:
    """The time estimate's micro-batch (module docstring)."""
    return BatchWork(tokens=rows * tokens_per_row, supervised=rows * tokens_per_row, image_tokens=0,
                     attention_pairs=rows * tokens_per_row * (tokens_per_row + 1) // 2)


def step_time(neo: NeoModelConfig, trainable: tuple[str, ...], *, tp: int, pp: int, dp: int, split: tuple[int, ...],
              micro_batch_size: int, micro_batches: int, seq_len: int, recompute: str, sp: bool,
              trainable_bytes_per_rank: list[int], peak_tflops: float, efficiency: float, links: Links) -> StepTime:
    """``trainable_bytes_per_rank``: fp32 gradient buffer bytes of a rank of each stage."""
    work = planned_work(seq_len, micro_batch_size)
    layers = layer_flops(neo, work, trainable)
    whole = work_flops(neo, work, trainable)
    rate = tp * peak_tflops * 1e12 * efficiency
    act_bytes = 2 * work.tokens * neo.hidden_size
    tp_bw = links.bytes_per_s(tp)
    ring = 2 * (tp - 1) / tp if tp > 1 else 0.0
    per_collective = ring * act_bytes / tp_bw

    slots, comm = [], []
    start = 0
    for stage, n in enumerate(split):
        mine = layers[start:start + n]
        start += n
        flops = sum(x.total for x in mine)
        if recompute == "full":
            flops += sum(x.forward for x in mine)
        elif recompute == "selective":
            flops += sum(x.attention_forward for x in mine)
        collectives = n * (4 + (2 if recompute == "full" else 0))
        if stage == 0:
            flops += whole.vision_forward + whole.vision_backward
            collectives += 1  # the vocab-parallel embedding's all-reduce
        if stage == pp - 1:
            flops += whole.lm_head_forward + whole.lm_head_backward
        slots.append(flops / rate)
        comm.append(collectives * per_collective)
    slowest = max(range(pp), key=lambda r: slots[r] + comm[r])
    p2p = 0.0
    if pp > 1:
        p2p = 2 * act_bytes / (tp if sp else 1) / links.bytes_per_s(tp * dp * pp)
    slot = slots[slowest] + comm[slowest] + p2p

    grads = max(trainable_bytes_per_rank)
    dp_time = 0.0
    if dp > 1:
        dp_bw = links.bytes_per_s(tp * dp)
        dp_time = (2 * (dp - 1) / dp * grads + (dp - 1) / dp * grads / 2) / dp_bw
    return StepTime(compute=micro_batches * slots[slowest], tp_comm=micro_batches * comm[slowest],
                    pp_comm=micro_batches * p2p, bubble=(pp - 1) * slot, dp_comm=dp_time)


def useful_flops(neo: NeoModelConfig, trainable: tuple[str, ...], seq_len: int, micro_batch_size: int,
                 micro_batches: int, dp: int) -> int:
    """Useful FLOPs of one whole step (all DP ranks) of the planned micro-batches: MFU's numerator."""
    return dp * micro_batches * work_flops(neo, planned_work(seq_len, micro_batch_size), trainable).total
