"""Where a text training step spends its time: our NEO layer parts against transformers' Qwen3 parts.

Not part of ``make bench`` (it answers "why", not "how fast"): each part of one decoder layer and
of the head runs forward + backward on the same input, ours and theirs interleaved, identical
weights, fp32, and the medians are printed side by side:

    attention   NativeSelfAttention (Q/K 2*head_dim wide, H/W projection, Native-RoPE; causal text, so
                no mask, as the model runs it)
                vs Qwen3Attention (sdpa, causal)
    core attn   the attention kernel alone: our ``core_attention`` vs SDPA(is_causal) on head_dim
    core mask   our ``core_attention`` with the native mask (a ``NativeMask``) vs with none (the
                causal fast path for plain text, ``NeoBatch.causal``; the "qwen3" column is that path)
    mlp         megatron MLP (fused gate|up) vs Qwen3MLP
    layer       a whole decoder layer (megatron TransformerLayer) vs Qwen3DecoderLayer
    head+loss   final norm, LM head, cross-entropy
    mask+rope   per-micro-batch native positions, mask and rotary tables (ours only)

    python -m bench.model_breakdown [--rows 2] [--seq 512] [--repeats 8] [--model h512|tiny]
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import replace

import torch


def _body(rows: int, seq: int, repeats: int, threads: int, model_name: str = "h512") -> str:
    import torch.nn.functional as F

    from bench.batches import text_batch
    from bench.model_step import build_neo, cpu_medium, preset, qwen3_twin
    from bench.timing import interleaved, median
    from pretrain.distributed import runtime
    from pretrain.model.native_attention import core_attention
    from pretrain.model.native_rope import native_rope_cos_sin
    from pretrain.model.masked_attention import NativeMask
    from pretrain.model.positions import native_positions

    torch.set_num_threads(threads)
    neo = cpu_medium(0) if model_name == "h512" else replace(preset(model_name), pre_buffer_layers=0)
    title = (f"h{neo.hidden_size} heads {neo.num_attention_heads}/{neo.num_kv_heads} d{neo.head_dim} "
             f"ffn {neo.ffn_hidden_size} vocab {neo.vocab_size}; b{rows} s{seq}; {threads} threads; "
             f"median seconds of {repeats} interleaved fwd+bwd calls")
    lines = [title, f"{'part':<12}{'ours':>10}{'qwen3':>10}{'ours/qwen3 time':>18}"]
    with runtime.model_parallel(1, 1, seed=1234):
        model = build_neo(neo)
        twin = qwen3_twin(model, neo)
        batch = text_batch(rows, seq, neo.vocab_size, seed=1)
        g = torch.Generator().manual_seed(0)
        x_sbh = torch.randn(seq, rows, neo.hidden_size, generator=g).requires_grad_()
        x_bsh = x_sbh.detach().transpose(0, 1).contiguous().requires_grad_()
        positions = native_positions(batch.doc_ids, batch.image_ids, batch.image_grids)
        cos, sin = native_rope_cos_sin(positions, neo.head_dim, neo.rope_theta, neo.rope_theta_hw)
        # as NeoModel.forward
        mask = None if batch.causal else NativeMask.build(batch.doc_ids, batch.image_ids)
        pos_ids = torch.arange(seq)[None].expand(rows, seq)
        rope = twin.model.rotary_emb(x_bsh, pos_ids)
        ours_layer, their_layer = model.decoder.layers[0], twin.model.layers[0]

        def fb(fn, *inputs):
            def call():
                for t in inputs:
                    t.grad = None
                out = fn()
                out = out[0] if isinstance(out, tuple) else out
                out.float().square().mean().backward()
            return call

        d, nq, nkv = neo.head_dim, neo.num_attention_heads, neo.num_kv_heads
        q2 = torch.randn(seq, rows, nq, 2 * d, generator=g).requires_grad_()
        k2 = torch.randn(seq, rows, nkv, 2 * d, generator=g).requires_grad_()
        v1 = torch.randn(seq, rows, nkv, d, generator=g).requires_grad_()
        qh = q2.detach()[..., :d].permute(1, 2, 0, 3).contiguous().requires_grad_()
        kh = k2.detach()[..., :d].permute(1, 2, 0, 3).contiguous().requires_grad_()
        vh = v1.detach().permute(1, 2, 0, 3).contiguous().requires_grad_()
        scale = 1 / math.sqrt(d)
        parts = {
            "attention": (fb(lambda: ours_layer.self_attention(x_sbh, mask, rotary_pos_cos=cos, rotary_pos_sin=sin),
                             x_sbh),
                          fb(lambda: their_layer.self_attn(x_bsh, rope, None), x_bsh)),
            "core attn": (fb(lambda: core_attention(q2, k2, v1, mask, scale), q2, k2, v1),
                          fb(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                                                    enable_gqa=True), qh, kh, vh)),
            # What the causal fast path saves: the same kernel with the native mask (a packed batch)
            # against without it (NeoBatch.causal). Not a Qwen3 comparison.
            "core mask": (fb(lambda: core_attention(q2, k2, v1, NativeMask.build(batch.doc_ids, batch.image_ids), scale),
                             q2, k2, v1),
                          fb(lambda: core_attention(q2, k2, v1, None, scale), q2, k2, v1)),
            "mlp": (fb(lambda: ours_layer.mlp(x_sbh), x_sbh), fb(lambda: their_layer.mlp(x_bsh), x_bsh)),
            "layer": (fb(lambda: ours_layer(x_sbh, attention_mask=mask, rotary_pos_cos=cos, rotary_pos_sin=sin),
                         x_sbh),
                      fb(lambda: their_layer(x_bsh, attention_mask=None, position_embeddings=rope), x_bsh)),
        }

        def ours_head():
            for t in (x_sbh,):
                t.grad = None
            h = model.decoder.final_layernorm(x_sbh)
            logits, _ = model.output_layer(h, weight=model.shared_embedding_or_output_weight())
            from megatron.core import tensor_parallel

            tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch.labels.t().contiguous()).mean().backward()

        def their_head():
            x_bsh.grad = None
            h = twin.model.norm(x_bsh)
            twin.loss_function(twin.lm_head(h), batch.tokens, vocab_size=neo.vocab_size).backward()

        parts["head+loss"] = (ours_head, their_head)
        for name, (ours, theirs) in parts.items():
            secs = interleaved({"ours": ours, "theirs": theirs}, repeats, warmup=2)
            o, t = median(secs["ours"]), median(secs["theirs"])
            lines.append(f"{name:<12}{o:>10.4f}{t:>10.4f}{o / t:>18.2f}")

        def mask_rope():
            p = native_positions(batch.doc_ids, batch.image_ids, batch.image_grids)
            native_rope_cos_sin(p, neo.head_dim, neo.rope_theta, neo.rope_theta_hw)
            NativeMask.build(batch.doc_ids, batch.image_ids)

        secs = interleaved({"ours": mask_rope}, repeats, warmup=1)["ours"]
        lines.append(f"{'mask+rope':<12}{median(secs):>10.4f}{'-':>10}{'-':>18}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--model", default="h512", help="h512 (bench.model_step.cpu_medium) or a conf/model preset")
    args = ap.parse_args()
    from pretrain.distributed import spawn

    print(spawn.run(_body, 1, args=(args.rows, args.seq, args.repeats, args.threads, args.model), timeout=600)[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
