"""The planner's memory model against the real ranks (issue: the layout planner, acceptance 1).

One 4-process launch (gloo, bf16 as on GPUs) builds the real model and DeepSpeed ZeRO-1 engine at
TP1PP1 (DP4), TP2PP1 (DP2, SP), TP1PP2 (DP2) and TP2PP2 (DP1, SP), for the tiny model in stage 1
(frozen post-LLM) and an h512 model in stage 2 (everything trains, tied embeddings across the
pipeline), runs one real training step, and measures on every rank:
  - weight, fp32 gradient-buffer and optimizer-state bytes (the engine's own tensors),
  - activation bytes one micro-batch keeps for backward (saved-tensor hooks), at two sequence
    lengths, each recompute mode, for an image micro-batch and a supervised-text one.
The prediction comes from the planner in this process (meta-device model and the activation probe
on small copies, on the fake process group): the first three must be exact, activations within 10%.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pretrain.config import compose
from pretrain.distributed import spawn
from pretrain.model.config import NeoModelConfig
from pretrain.plan import stage_layer_kinds
from pretrain.plan.memory import state_bytes
from pretrain.plan.probe import activation_profile, stage_parameters

pytestmark = pytest.mark.slow

LAYOUTS = ((1, 1), (2, 1), (1, 2), (2, 2))
SEQS = (256, 512)
MODES = ("none", "selective", "full")
COMPOSITIONS = {"image": (True, False), "text": (False, True)}  # (image, supervised)
STAGE1 = ("vision", "pre_buffer", "post_llm_hw")
ALL = ("vision", "pre_buffer", "post_llm_hw", "post_llm", "embedding", "lm_head", "final_norm")


def _models() -> dict[str, tuple[NeoModelConfig, tuple[str, ...]]]:
    tiny = compose(["model=tiny"]).model
    h512 = replace(tiny, hidden_size=512, pre_buffer_layers=2, post_llm_layers=6, num_attention_heads=8,
                   num_kv_heads=4, head_dim=64, ffn_hidden_size=1536, vocab_size=8192, vision_hidden_size=256)
    return {"tiny": (tiny, STAGE1), "h512": (h512, ALL)}


def _body(models):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from pretrain.config import OptimConfig
    from pretrain.distributed import runtime
    from pretrain.model.neo import NeoModel, transformer_config
    from pretrain.model.roles import set_trainable
    from pretrain.optim.zero import build_engine, main_grads
    from pretrain.plan.probe import probe_batch, saved_bytes
    from pretrain.schedule import finalize_grads, forward_backward

    out = {}
    for name, (neo, trainable) in models.items():
        for tp, pp in LAYOUTS:
            sp = tp > 1
            with runtime.model_parallel(tp, pp, seed=5):
                rank = (ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_world_size())

                def build(recompute: str):
                    config = transformer_config(neo, tp=tp, pp=pp, sequence_parallel=sp, dtype=torch.bfloat16)
                    model = NeoModel(config, neo, recompute=recompute)
                    set_trainable(model, trainable)
                    return model

                model = build("none")
                engine, _ = build_engine(model, OptimConfig(), total_steps=10, micro_batch_size=1,
                                         num_microbatches=1, bf16=True)
                forward_backward(model, [probe_batch(neo, True, True, tokens=SEQS[0])], grad_scale=rank[1])
                grads = main_grads(engine)
                finalize_grads(model, grads, reduce_data_parallel=False)
                engine.set_gradient_accumulation_boundary(True)
                engine.allreduce_gradients()
                engine.step()
                opt = engine.optimizer
                state = [t for s in opt.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim]
                measured = {
                    "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
                    "gradients": sum(g.numel() * g.element_size() for g in opt.fp32_groups_gradients_flat),
                    "optimizer": sum(p.numel() * p.element_size() for p in opt.fp32_groups_flat_partition)
                    + sum(t.numel() * t.element_size() for t in state),
                    "activations": {},
                }
                engine.destroy()
                for mode in MODES:
                    model = build(mode)
                    model.train()
                    for seq in SEQS:
                        for kind, (image, supervised) in COMPOSITIONS.items():
                            batch = probe_batch(neo, image, supervised, tokens=seq)
                            hidden = None
                            if not ps.is_pipeline_first_stage():
                                hidden = torch.randn(seq // (tp if sp else 1), 1, neo.hidden_size,
                                                     dtype=torch.bfloat16, requires_grad=True)
                            measured["activations"][mode, seq, kind] = sum(saved_bytes(model, batch, hidden).values())
                out[name, tp, pp] = (rank, measured)
                dist.barrier()
    return out


@pytest.fixture(scope="module")
def measured():
    return spawn.run(_body, 4, args=(_models(),), timeout=900)


@pytest.mark.parametrize("model", ["tiny", "h512"])
def test_states_exact(measured, model):
    neo, trainable = _models()[model]
    for tp, pp in LAYOUTS:
        split = (neo.num_layers // pp,) * pp
        stages = stage_parameters(neo, trainable, tp, pp, split)
        for rank_out in measured:
            (stage, dp), real = rank_out[model, tp, pp]
            weights, gradients, optimizer = state_bytes(stages[stage], dp)
            got = {"weights": weights, "gradients": gradients, "optimizer": optimizer}
            want = {k: real[k] for k in got}
            assert got == want, f"{model} TP{tp}PP{pp} stage {stage}: predicted {got}, measured {want}"


@pytest.mark.parametrize("model", ["tiny", "h512"])
def test_activations_within_10_percent(measured, model):
    neo, trainable = _models()[model]
    worst = 0.0
    for tp, pp in LAYOUTS:
        sp = tp > 1
        split = (neo.num_layers // pp,) * pp
        kinds = stage_layer_kinds(neo, split)
        for mode in MODES:
            profile = activation_profile(neo, trainable, tp, sp, mode)
            for rank_out in measured:
                (stage, _), real = rank_out[model, tp, pp]
                for seq in SEQS:
                    for kind, (image, supervised) in COMPOSITIONS.items():
                        from pretrain.plan.probe import PROBE_IMAGE
                        n_img = PROBE_IMAGE[0] * PROBE_IMAGE[1] if image else 0
                        parts = profile.rank_bytes(kinds[stage], stage == 0, stage == pp - 1, seq, n_img,
                                                   seq if supervised else 0)
                        predicted, actual = sum(parts.values()), real["activations"][mode, seq, kind]
                        error = abs(predicted - actual) / actual
                        worst = max(worst, error)
                        assert error < 0.10, (f"{model} TP{tp}PP{pp} stage {stage} {mode} seq {seq} {kind}: "
                                              f"predicted {predicted:.0f} B, measured {actual} B ({100 * error:.1f}%)")
    print(f"{model}: worst activation error {100 * worst:.2f}%")
