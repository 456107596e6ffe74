"""Model step benchmark on CPU: forward + backward tokens/s of our NEO against transformers' Qwen3.

Text path: ``NeoModel`` with no pre-Buffer at TP1PP1 (the post-LLM alone, which *is* a Qwen3 once
the H/W key projection is zero) against ``transformers.Qwen3ForCausalLM`` of identical shapes
holding IDENTICAL weights (mapped with pretrain/convert/mapping.py; the logits are compared
before timing), the same batch, fp32, the same ``torch.set_num_threads``, in the same process,
steps interleaved. Ours runs the real training path: ``pretrain.schedule.forward_backward``
(megatron's schedule, weighted loss) on one micro-batch; theirs ``model(input_ids, labels).loss
.backward()``. The rows are plain causal text, so ours takes its causal fast path (``NeoBatch.causal``:
no mask, SDPA ``is_causal`` like theirs). Note that ours does more arithmetic for the same tokens:
NEO's queries/keys are 2*head_dim wide (T + H/W parts; V is zero-padded to that width for the fused
kernel) and every layer has the H/W projection (``pretrain.flops.step_flops`` counts it); the executed-GFLOP/s
rows compare the two per unit of arithmetic actually executed.

Multimodal path: a full NEO (pre-Buffer + post-LLM + patch embedding) on packed rows of caption
documents with images, at the ``tiny`` preset and at a larger CPU size; no baseline exists (the
reference NEO has no packed-document path), so the notes give the achieved GFLOP/s instead.

Everything runs inside one spawned rank (pretrain/distributed/spawn.py), so megatron has a real
process group exactly as in training.

    python -m bench.model_step [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bench.results import Result
from pretrain.model.config import NeoModelConfig

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    name: str
    neo: NeoModelConfig
    rows: int
    seq_len: int


def preset(name: str) -> NeoModelConfig:
    import yaml

    return NeoModelConfig(**yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text()))


def cpu_medium(pre_buffer_layers: int = 2) -> NeoModelConfig:
    """A CPU-sized NEO between ``tiny`` and anything real: hidden 512, 8 decoder layers."""
    return replace(preset("tiny"), hidden_size=512, pre_buffer_layers=pre_buffer_layers,
                   post_llm_layers=8 - pre_buffer_layers, num_attention_heads=8, num_kv_heads=4, head_dim=64,
                   ffn_hidden_size=1536, vocab_size=8192, vision_hidden_size=256)


def text_cases(quick: bool) -> list[Case]:
    tiny = replace(preset("tiny"), pre_buffer_layers=0)
    if quick:
        return [Case("tiny", tiny, rows=2, seq_len=64)]
    return [Case("tiny", tiny, rows=4, seq_len=256), Case("h512-l8", cpu_medium(0), rows=1, seq_len=256)]


def multimodal_cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("tiny", preset("tiny"), rows=1, seq_len=128)]
    return [Case("tiny", preset("tiny"), rows=2, seq_len=512), Case("h512-l8", cpu_medium(2), rows=1, seq_len=512)]


# ----------------------------------------------------------------------------------- models


def build_neo(neo: NeoModelConfig, dtype: torch.dtype = torch.float32, device: str = "cpu", init: bool = True,
              recompute: str = "none"):
    """A TP1PP1 ``NeoModel`` (inside an initialised megatron layout) on ``device``."""
    from pretrain.model.neo import NeoModel, transformer_config

    model = NeoModel(transformer_config(neo, dtype=dtype, init_weights=init), neo, recompute=recompute).to(device)
    if not init:  # big models: random weights drawn on the device, not on the host
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.fill_(1.0 if "norm" in name else 0.0)
                else:
                    p.normal_(0.0, neo.init_std)
    return model


def qwen3_twin(model, neo: NeoModelConfig, dtype: torch.dtype = torch.float32, device: str = "cpu",
               attn_implementation: str = "sdpa"):
    """transformers' Qwen3ForCausalLM holding exactly ``model``'s weights.

    The H/W key projection of ``model`` is zeroed first (as ``from-hf`` initialises it): the H/W
    half of every attention score is then 0 and ``model`` computes Qwen3's function. Requires
    ``neo.pre_buffer_layers == 0`` (mapping.neo_hf_to_qwen3 refuses otherwise)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from pretrain.convert import hf_config, mapping
    from pretrain.convert.hf import load_full_state_dict

    ours = {k: v.detach() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    hf = mapping.ours_to_neo_hf(ours, neo)
    for key in hf:
        if key.endswith("k_proj_hw.weight"):
            hf[key] = torch.zeros_like(hf[key])
    load_full_state_dict(model, mapping.neo_hf_to_ours(hf, neo))
    config = Qwen3Config(**hf_config.to_qwen3(neo, str(dtype).removeprefix("torch.")))
    config._attn_implementation = attn_implementation
    with torch.device(device):
        twin = Qwen3ForCausalLM(config).to(dtype)
    missing, unexpected = twin.load_state_dict(mapping.neo_hf_to_qwen3(hf, neo), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"Qwen3 twin does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if neo.tie_word_embeddings:
        twin.tie_weights()
    return twin.train()


def max_logit_diff(model, twin, batch) -> float:
    """max |ours - theirs| over the logits of a text batch (same weights, so ~1e-6 in fp32)."""
    from pretrain.schedule import forward_logits

    ours = forward_logits(model, [batch])[0]
    with torch.no_grad():
        theirs = twin(input_ids=batch.tokens).logits.float()
    return (ours.float() - theirs).abs().max().item()


def executed_flops(step, dense_attention: bool = True) -> float:
    """FLOPs one call of ``step`` executes, by torch's FlopCounterMode. ``dense_attention`` runs
    attention through SDPA's math backend for the count, so that both models' attention is counted
    the same way (the CPU flash kernel is invisible to the counter) and as dense s*s work."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    math_only = sdpa_kernel([SDPBackend.MATH]) if dense_attention else contextlib.nullcontext()
    with math_only, FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def ours_step(model, batch):
    from pretrain.schedule import forward_backward

    def step():
        model.zero_grad(set_to_none=True)
        forward_backward(model, [batch], reduction="token")

    return step


def twin_step(twin, batch):
    def step():
        twin.zero_grad(set_to_none=True)
        twin(input_ids=batch.tokens, labels=batch.tokens).loss.backward()

    return step


# --------------------------------------------------------------------------------- rank body


def _rank_body(text: list[Case], multimodal: list[Case], threads: int, repeats: int, warmup: int,
               budget_s: float | None) -> list[dict]:
    from bench.batches import counts, multimodal_batch, text_batch
    from bench.timing import interleaved, median, paired_ratio, spread
    from pretrain.distributed import runtime
    from pretrain.flops import step_flops
    from pretrain.model.roles import ROLES

    torch.set_num_threads(threads)
    out = []
    with runtime.model_parallel(1, 1, seed=1234):
        for case in text:
            neo = case.neo
            model = build_neo(neo)
            twin = qwen3_twin(model, neo)
            batch = text_batch(case.rows, case.seq_len, neo.vocab_size, seed=1)
            diff = max_logit_diff(model, twin, batch)
            steps = {"ours": ours_step(model, batch), "hf": twin_step(twin, batch)}
            work = {k: executed_flops(step) for k, step in steps.items()}
            cpu: dict[str, list[float]] = {}
            secs = interleaved(steps, repeats, warmup, budget_s=budget_s, cpu_seconds=cpu)
            tokens = batch.tokens.numel()
            ours_s, hf_s = median(secs["ours"]), median(secs["hf"])
            flops = step_flops(neo, [batch], ROLES).total
            where = f"{case.name} (b{case.rows} s{case.seq_len})"
            out.append(asdict(Result(
                name=f"model/text fwd+bwd {where}",
                value=tokens / ours_s, unit="tokens/s", baseline_value=tokens / hf_s,
                notes=(f"vs transformers Qwen3ForCausalLM (sdpa), identical weights (max logit diff {diff:.1e}), "
                       f"fp32, {threads} threads, median of {len(secs['ours'])} interleaved steps "
                       f"(ours {spread(secs['ours'])}; hf {spread(secs['hf'])}); other estimates of the ratio: median of "
                       f"per-round ratios {paired_ratio(secs['ours'], secs['hf']):.2f}, ratio of the minima "
                       f"{min(secs['hf']) / min(secs['ours']):.2f}, ratio of median CPU seconds per step "
                       f"{median(cpu['hf']) / median(cpu['ours']):.2f}; "
                       f"ours {flops / ours_s / 1e9:.1f} useful GFLOP/s by step_flops (incl. NEO's H/W work)"),
            )))
            # Of ours, the zero half of V (padded to Q/K's width for the fused kernel) in P@V forward and
            # the two matching backward products, counted dense like the rest: executed, but not useful.
            pad = 3 * 2 * case.rows * neo.num_attention_heads * case.seq_len ** 2 * neo.head_dim * neo.num_layers
            useful = (work["ours"] - pad) / ours_s / (work["hf"] / hf_s)
            out.append(asdict(Result(
                name=f"model/text executed GFLOP/s {where}",
                value=work["ours"] / ours_s / 1e9, unit="GFLOP/s", baseline_value=work["hf"] / hf_s / 1e9,
                notes=(f"the same steps per unit of arithmetic: torch FlopCounterMode, attention counted dense; ours "
                       f"executes {work['ours'] / 1e9:.2f} GFLOP/step, transformers {work['hf'] / 1e9:.2f} "
                       f"({work['ours'] / work['hf']:.2f}x: NEO's 2*head_dim Q/K and H/W projection); "
                       f"{pad / 1e9:.2f} GFLOP of ours are V's zero padding: without them the ratio is {useful:.2f}"),
            )))
            del model, twin
        for case in multimodal:
            neo = case.neo
            model = build_neo(neo)
            batch = multimodal_batch(case.rows, case.seq_len, neo.vocab_size, 3 * neo.patch_size ** 2, seed=2)
            real, image = counts(batch)
            cpu = {}
            secs = interleaved({"ours": ours_step(model, batch)}, repeats, warmup, budget_s=budget_s and budget_s / 2,
                               cpu_seconds=cpu)["ours"]
            t = median(secs)
            flops = step_flops(neo, [batch], ROLES).total
            out.append(asdict(Result(
                name=f"model/multimodal fwd+bwd {case.name} (b{case.rows} s{case.seq_len})",
                value=real / t, unit="tokens/s",
                notes=(f"{neo.pre_buffer_layers}+{neo.post_llm_layers} layers h{neo.hidden_size}, "
                       f"{batch.image_grids.shape[0]} images ({image} image tokens) in "
                       f"{int(batch.doc_ids.max()) + 1}+ docs/row, fill {real / batch.tokens.numel():.2f}; "
                       f"real tokens counted; {flops / t / 1e9:.1f} useful GFLOP/s (step_flops: allowed attention pairs); "
                       f"fp32, {threads} threads, median ({spread(secs)}; {real / median(cpu['ours']):.0f} tokens per "
                       f"CPU-second, which outside load does not inflate); no baseline: transformers has no NEO "
                       f"model"),
            )))
            del model
    return out


def run(quick: bool = False, threads: int | None = None, repeats: int | None = None) -> list[Result]:
    from pretrain.distributed import spawn

    threads = threads or min(2, os.cpu_count() or 1)
    repeats = repeats or (2 if quick else 8)
    warmup = 1 if quick else 2
    budget_s = None if quick else 20.0  # timed seconds per comparison: more rounds for short steps
    values = spawn.run(_rank_body, 1, args=(text_cases(quick), multimodal_cases(quick), threads, repeats, warmup,
                                            budget_s), timeout=900)[0]
    return [Result(**v) for v in values]


# ---------------------------------------------------------------------------------- profile


def _profile_body(case: Case, threads: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    from bench.batches import text_batch
    from pretrain.distributed import runtime

    torch.set_num_threads(threads)
    report = []
    with runtime.model_parallel(1, 1, seed=1234):
        model = build_neo(case.neo)
        twin = qwen3_twin(model, case.neo)
        batch = text_batch(case.rows, case.seq_len, case.neo.vocab_size, seed=1)
        for label, step in (("ours", ours_step(model, batch)), ("transformers", twin_step(twin, batch))):
            step()
            step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            report.append(f"===== {label}: {case.name} b{case.rows} s{case.seq_len}")
            report.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    return "\n".join(report)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of one step of each, instead of timing")
    ap.add_argument("--rows", type=int, default=25, help="profile table rows")
    args = ap.parse_args()
    from pretrain.distributed import spawn

    threads = args.threads or min(2, os.cpu_count() or 1)
    if args.profile:
        for case in text_cases(args.quick):
            print(spawn.run(_profile_body, 1, args=(case, threads, args.rows), timeout=600)[0])
        return 0
    from bench.results import markdown_table

    print(markdown_table(run(args.quick, threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
