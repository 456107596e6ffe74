"""The sizes of the GPU check: the real ones (one H200, about 8 minutes in all) and a tiny CPU
version of the same code path (NEO_GPU_CHECK_CPU=1), chosen once per session.

GPU: neo_2b's layer widths (hidden 2048, 16 heads, 8 KV groups, head_dim 128, FFN 6144, patch
embedding 1024 wide) with 2 pre-Buffer + 2 post-LLM layers and a 2048-row vocabulary (the synthetic
tokenizer has 1024 tokens + NEO's specials), seq 16384, 4 micro-batches of one row per step (the
bf16 run accumulates 4 gradients in fp32), images of 2048-2133 tokens (smart-resized to at least
2 Mpixel, one token = 32x32 px), so a sample has 2.1k (one image) to 4.3k (two images) tokens; a
row packs about 7 of them (fill ~0.9), and ~97% of its tokens are pixels (measured on this data).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    name: str
    model: tuple[str, ...]  # Hydra overrides that pick the model shape
    seq_len: int
    steps: int  # of every training run but the fp32 one (one step)
    global_batch: int  # rows per step, one row per micro-batch
    samples: int  # synthetic samples built (Energon repeats them)
    min_pixels: int  # smart-resize floor: the image size in tokens is about min_pixels / 1024
    max_pixels: int
    data_workers: int  # loader processes per rank: they decode and patchify the large images
    packing_buffer: int  # samples per first-fit round
    launch_timeout_s: int  # one torchrun launch, start-up to exit
    launch_env: tuple[tuple[str, str], ...]  # added to every launch's environment
    # Limits of the performance rows; None: reported only (the CPU version has no meaningful ones).
    max_memory_gb: float | None
    min_mfu: float | None
    max_wall_s: float | None  # the whole check at TP1 (data, init, every launch)


GPU = Sizes(
    name="gpu (neo_2b widths, 2+2 layers, seq 16384, bf16)",
    model=("model=neo_2b", "model.pre_buffer_layers=2", "model.post_llm_layers=2", "model.vocab_size=2048"),
    seq_len=16384,
    steps=20,
    global_batch=4,
    samples=400,
    min_pixels=2048 * 1024,
    max_pixels=4096 * 1024,
    data_workers=4,
    packing_buffer=64,
    launch_timeout_s=420,
    launch_env=(),
    # Expected peak, TP1: weights bf16 + fp32 gradient buffers + fp32 master and Adam moments for
    # ~240M parameters = 240M x (2 + 4 + 12) B = 4.3 GB; activations with full recompute (one
    # layer's worth at 16k: MLP 16k x 6144 x 3 x 2 B = 0.6 GB, q/k/v and attention a few 100 MB,
    # fp32 logits 16k x 2048 x 4 B = 0.13 GB, patches 0.2 GB) stay under a few GB; without recompute
    # 4 layers keep ~1.5 GB each. 40 GB leaves room for DeepSpeed's buckets and the allocator and
    # still flags a step that keeps something per token it should not (e.g. an s x s mask: 16k^2 x
    # 4 B = 1 GB per copy).
    max_memory_gb=40.0,
    # A floor that catches gross failures only (a math-kernel or host fallback, a loop waiting on
    # the loader), not a performance target: 4 small layers at seq 16k leave much of an H200 idle.
    min_mfu=0.05,
    max_wall_s=480.0,
)

CPU = Sizes(
    name="cpu (tiny model, seq 512; NEO_GPU_CHECK_CPU=1)",
    model=("model=tiny",),
    seq_len=512,
    steps=8,
    global_batch=4,
    samples=160,
    min_pixels=128 * 1024,
    max_pixels=256 * 1024,
    data_workers=1,
    packing_buffer=32,
    launch_timeout_s=600,
    # torchrun sets OMP_NUM_THREADS=1 only for 2+ processes. A 1-process run on 2 busy cores with
    # 2 OpenMP threads and a loader worker stalls for 15-25 s per step now and then (seen here:
    # 0.5 s steps otherwise); one thread keeps it at 0.6 s.
    launch_env=(("OMP_NUM_THREADS", "1"),),
    max_memory_gb=None,
    min_mfu=None,
    max_wall_s=None,
)

CPU_MODE = os.environ.get("NEO_GPU_CHECK_CPU") == "1"
SIZES = CPU if CPU_MODE else GPU

# Dense bf16 TFLOP/s per GPU, for MFU (cluster.peak_tflops; the trainer reports no MFU without one).
# First match in the CUDA device name wins; an unknown GPU gets no MFU row check.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def gpu_name_and_peak() -> tuple[str, float | None]:
    """(CUDA device 0's name, its dense bf16 peak or None), or ("cpu", None) without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name(0)
    return name, next((peak for key, peak in PEAK_TFLOPS if key in name), None)
