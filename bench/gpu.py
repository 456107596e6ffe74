"""GPU benchmark: NEO-2B-shaped training steps in bf16 on one GPU, against transformers' Qwen3.

Skipped (with the reason in the table) when ``torch.cuda.is_available()`` is False. On a GPU,
inside one spawned rank (NCCL, megatron layout TP1PP1), for seq 8k and 16k, batch 1:

- text: ``NeoModel`` with neo_2b's layer shapes and no pre-Buffer (all 40 layers native
  attention) against ``Qwen3ForCausalLM`` of identical shapes and weights (sdpa);
- multimodal: the real neo_2b layout (12 pre-Buffer + 28 post-LLM layers, patch embedding) on
  packed rows of caption documents with images (ours only), at seq 8k, 16k and 32k, with full
  activation recompute: the path packed training takes, attention through FlexAttention with the
  native block mask. A step whose attention ran any other kernel (a dense or math fallback) fails
  the case loudly instead of reporting its numbers;
- a 4-layer slice of neo_9b's shapes (text, ours vs transformers).
When a model does not fit, the same shapes are retried with fewer layers (8, then 4) and the
result says how many layers ran. Reported per case: tokens/s (median of interleaved steps), MFU
against ``--peak-tflops`` (989: H100/H200 dense bf16) on useful FLOPs (``pretrain.flops.step_flops``:
allowed attention pairs, supervised LM-head tokens) and the baseline's from
``torch.utils.flop_counter`` (it has no NEO architecture to count), the attention kernels seen in a
profiler trace, and the memory high-water mark of each model's step (its weights + the step's peak).

    python -m bench.gpu [--quick] [--peak-tflops 989]
    python -m bench.gpu --cpu-dry-run     # the same code on CPU at toy sizes (checks the code path)
"""

from __future__ import annotations

import argparse
import gc
import os
from dataclasses import asdict, replace

import torch

from bench.results import Result, skipped

PEAK_TFLOPS = 989.0  # H100 SXM / H200 dense bf16
LADDER = (8, 4)  # layer counts to fall back to when the whole model does not fit


def _attention_path(step, device: str) -> str:
    """The attention kernels a step ran, from a profiler trace (GPU kernel names)."""
    if device != "cuda":
        return "n/a on CPU"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
    names = [e.key for e in prof.key_averages()]
    kinds = {
        "FlashAttention": ("flash",),
        "memory-efficient (cutlass fmha)": ("fmha", "efficient_attention", "mem_efficient"),
        "cuDNN attention": ("cudnn_sdpa", "cudnn::", "sdpa_cudnn"),
        "FlexAttention (Triton)": ("flex", "triton_tem"),
    }
    found = [kind for kind, pats in kinds.items() if any(p in n.lower() for n in names for p in pats)]
    if not found:
        return "math (bmm + softmax)"
    example = next(n for n in names if any(p in n.lower() for pats in kinds.values() for p in pats))
    return f"{', '.join(found)} (e.g. {example[:60]})"


def _executed_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _step_memory_gb(step, device: str) -> float:
    """Peak bytes a step allocates on top of what is resident before it."""
    if device != "cuda":
        return float("nan")
    _sync(device)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    _sync(device)
    return (torch.cuda.max_memory_allocated() - before) / 1e9


def _param_gb(module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 1e9


def _measure(label: str, neo, seq: int, text: bool, dtype, device: str, repeats: int, warmup: int,
             peak_tflops: float, note: str) -> list[dict]:
    from bench.batches import counts, multimodal_batch, text_batch
    from bench.model_step import build_neo, ours_step, qwen3_twin, twin_step
    from bench.timing import interleaved, median
    from pretrain.flops import step_flops
    from pretrain.model.roles import ROLES

    def released(step, module):
        def call():
            step()
            module.zero_grad(set_to_none=True)
            _sync(device)
        return call

    model = build_neo(neo, dtype=dtype, device=device, init=False, recompute="none" if text else "full")
    if text:
        twin = qwen3_twin(model, neo, dtype, device)
        batch = text_batch(1, seq, neo.vocab_size, seed=1).to(device)
        candidates = {"ours": released(ours_step(model, batch), model), "hf": released(twin_step(twin, batch), twin)}
    else:
        twin = None
        grids = ((16, 16), (24, 32), (32, 24), (12, 20))
        batch = multimodal_batch(1, seq, neo.vocab_size, 3 * neo.patch_size ** 2, seed=2, grids=grids).to(device)
        candidates = {"ours": released(ours_step(model, batch), model)}
    real, image = counts(batch)
    secs = interleaved(candidates, repeats, warmup)
    flops = step_flops(neo, [batch], ROLES).total
    ours_t = median(secs["ours"])
    ours_mfu = flops / ours_t / (peak_tflops * 1e12)
    mem = {k: _step_memory_gb(step, device) for k, step in candidates.items()}
    paths = {k: _attention_path(step, device) for k, step in candidates.items()}
    if device == "cuda" and not text and not paths["ours"].startswith("FlexAttention"):
        raise RuntimeError(f"{label} s{seq}: the packed multimodal step ran attention as {paths['ours']}, not "
                           "FlexAttention with the native block mask: a dense or math fallback, not a result")
    weights = {"ours": _param_gb(model), **({"hf": _param_gb(twin)} if twin is not None else {})}
    layers = f"{neo.pre_buffer_layers}+{neo.post_llm_layers} layers" if neo.pre_buffer_layers else f"{neo.num_layers} layers"
    where = f"{label} ({layers}) s{seq} b1 {str(dtype).removeprefix('torch.')}"
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    common = f"{device_name}; median of {len(secs['ours'])} interleaved steps{note}"
    out = []
    if text:
        hf_t = median(secs["hf"])
        hf_flops = _executed_flops(candidates["hf"])
        ours_exec = _executed_flops(candidates["ours"])
        hf_mfu = hf_flops / hf_t / (peak_tflops * 1e12)
        out.append(Result(
            name=f"gpu/text fwd+bwd {where}", value=real / ours_t, unit="tokens/s", baseline_value=real / hf_t,
            notes=(f"vs transformers Qwen3ForCausalLM (sdpa), identical shapes and weights; attention: ours "
                   f"{paths['ours']}; transformers {paths['hf']}; {common}"),
        ))
        out.append(Result(
            name=f"gpu/MFU text {where}", value=ours_mfu, unit=f"of {peak_tflops:.0f} TFLOP/s", baseline_value=hf_mfu,
            notes=(f"ours: step_flops ({flops / 1e12:.1f} useful TFLOP/step); transformers: torch FlopCounterMode "
                   f"({hf_flops / 1e12:.1f} TFLOP/step executed; ours executed {ours_exec / 1e12:.1f})"),
        ))
        out.append(Result(
            name=f"gpu/memory high-water text {where}", value=weights["ours"] + mem["ours"],
            unit="GB (lower is better)", baseline_value=weights["hf"] + mem["hf"],
            notes=(f"weights + peak allocated during one fwd+bwd step (ours {weights['ours']:.1f} + {mem['ours']:.1f} GB, "
                   f"transformers {weights['hf']:.1f} + {mem['hf']:.1f} GB); no activation recomputation"),
        ))
    else:
        out.append(Result(
            name=f"gpu/multimodal fwd+bwd {where}", value=real / ours_t, unit="tokens/s",
            notes=(f"MFU {100 * ours_mfu:.1f}% of {peak_tflops:.0f} TFLOP/s on useful FLOPs (step_flops); full "
                   f"recompute; {image} image tokens in "
                   f"{batch.image_grids.shape[0]} images, fill {real / seq:.2f}; attention {paths['ours']}; memory "
                   f"high-water {weights['ours'] + mem['ours']:.1f} GB (weights {weights['ours']:.1f}); {common}"),
        ))
    return [asdict(r) for r in out]


def _with_fallback(label: str, neo, seq: int, text: bool, dtype, device: str, repeats: int, warmup: int,
                   peak_tflops: float, ladder: tuple[int, ...]) -> list[dict]:
    """The whole model, then fewer layers of the same shapes while it runs out of memory."""
    note, tries = "", [neo] + [_slice(neo, n) for n in ladder if n < neo.num_layers]
    for i, shape in enumerate(tries):
        try:
            return _measure(label, shape, seq, text, dtype, device, repeats, warmup, peak_tflops, note)
        except torch.cuda.OutOfMemoryError:
            note = f"; {shape.num_layers} layers ran out of memory, so fewer layers"
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return [asdict(skipped(f"gpu/{'text' if text else 'multimodal'} fwd+bwd {label} s{seq}", "tokens/s",
                           f"out of memory even with {tries[-1].num_layers} layers"))]


def _slice(neo, layers: int):
    pre = min(neo.pre_buffer_layers, layers // 2)
    return replace(neo, pre_buffer_layers=pre, post_llm_layers=layers - pre)


def cases(quick: bool):
    from bench.model_step import preset

    neo2b, neo9b = preset("neo_2b"), preset("neo_9b")
    seqs = (1024,) if quick else (8192, 16384)
    text_2b = replace(neo2b, pre_buffer_layers=0, post_llm_layers=2 if quick else neo2b.num_layers)
    out = [("neo_2b-shape", text_2b, seq, True) for seq in seqs]
    out += [("neo_2b", _slice(neo2b, 4) if quick else neo2b, seq, False) for seq in (seqs if quick else (8192, 16384, 32768))]
    out += [("neo_9b-shape slice", replace(neo9b, pre_buffer_layers=0, post_llm_layers=2 if quick else 4), seq, True)
            for seq in seqs]
    return out


def _rank_body(case_list, dtype_name: str, device: str, repeats: int, warmup: int, peak_tflops: float,
               ladder: tuple[int, ...]) -> list[dict]:
    from pretrain.distributed import runtime

    dtype = getattr(torch, dtype_name)
    out = []
    with runtime.model_parallel(1, 1, seed=1234):
        for label, neo, seq, text in case_list:
            out += _with_fallback(label, neo, seq, text, dtype, device, repeats, warmup, peak_tflops, ladder)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    return out


def run(quick: bool = False, peak_tflops: float = PEAK_TFLOPS) -> list[Result]:
    if not torch.cuda.is_available():
        reason = ("torch.cuda.is_available() is False: no GPU on this machine; run `make bench` on a GPU node "
                  "(same script: bf16, neo_2b shapes, text at seq 8k/16k, packed multimodal with FlexAttention "
                  "at 8k/16k/32k)")
        if quick:  # the smoke test: run the code path on CPU at toy sizes; its numbers mean nothing
            cpu_dry_run()
            reason += "; --quick ran its code path on CPU at toy sizes"
        return [skipped("gpu/text, multimodal, MFU, memory (neo_2b shapes, seq 8k and 16k, bf16)", "tokens/s", reason)]
    from pretrain.distributed import spawn

    values = spawn.run(_rank_body, 1, args=(cases(quick), "bfloat16", "cuda", 3 if quick else 5, 2, peak_tflops,
                                             LADDER), timeout=1800)[0]
    return [Result(**v) for v in values]


def cpu_dry_run() -> list[Result]:
    """The GPU code path on CPU at toy sizes, fp32: catches mistakes without a GPU (smoke test)."""
    from bench.model_step import preset
    from pretrain.distributed import spawn

    tiny = preset("tiny")
    case_list = [("tiny-shape", replace(tiny, pre_buffer_layers=0), 64, True), ("tiny", tiny, 1024, False)]
    values = spawn.run(_rank_body, 1, args=(case_list, "float32", "cpu", 1, 1, PEAK_TFLOPS, (2,)), timeout=300)[0]
    return [Result(**v) for v in values]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=float(os.environ.get("NEO_PEAK_TFLOPS", PEAK_TFLOPS)))
    ap.add_argument("--cpu-dry-run", action="store_true")
    args = ap.parse_args()
    from bench.results import markdown_table

    print(markdown_table(cpu_dry_run() if args.cpu_dry_run else run(args.quick, args.peak_tflops)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
