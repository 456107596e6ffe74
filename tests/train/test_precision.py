"""Mixed precision: a bf16 run accumulates its gradients over micro-batches, and reduces them over
data parallelism, in fp32 (pretrain/optim/zero.py), as megatron does.

One 2-process launch (DP2, 16 micro-batches per rank) computes the gradient of one global batch
three ways from the same bf16-representable weights:
  fp32      an fp32 model (the reference),
  trainer   a bf16 model through the trainer's path (DeepSpeed's BF16 optimizer, fp32 buffers),
  bf16-acc  a bf16 model whose gradients accumulate and reduce in bf16 (what DeepSpeed's default
            bf16 mode did before: p.grad in bf16 summed micro-batch after micro-batch).
And a bf16 training run that learns and resumes bit-exactly from a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.distributed import spawn
from pretrain.model.batch import collate
from pretrain.model.config import NeoModelConfig
from tests.model.packed_batches import packed_rows

pytestmark = pytest.mark.slow

MICRO, SEQ, DP = 16, 96, 2
NEO = NeoModelConfig(hidden_size=64, pre_buffer_layers=1, post_llm_layers=1, num_attention_heads=4,
                     num_kv_heads=2, head_dim=16, ffn_hidden_size=96, vocab_size=256, vision_hidden_size=32)


def _gradients_body():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from pretrain.config import OptimConfig
    from pretrain.distributed import runtime
    from pretrain.model.neo import NeoModel, transformer_config
    from pretrain.optim.zero import build_engine, main_grads
    from pretrain.schedule import finalize_grads, forward_backward

    def build(dtype, init=False):
        return NeoModel(transformer_config(NEO, dtype=dtype, init_weights=init), NEO)

    def named(pairs, model):
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: g.detach().float().clone() for p, g in pairs}

    rows = packed_rows(MICRO * DP, SEQ, NEO.vocab_size, seed=5, patch_dim=3 * NEO.patch_size ** 2)
    rank = dist.get_rank()
    micro = [collate([r]) for r in rows[rank * MICRO:(rank + 1) * MICRO]]
    out = {}
    with runtime.model_parallel(1, 1, seed=3):
        reference = build(torch.float32, init=True)
        with torch.no_grad():
            for p in reference.parameters():
                p.copy_(p.bfloat16().float())  # weights that bf16 holds exactly: the same model in both
        weights = reference.state_dict()

        out["loss_fp32"] = forward_backward(reference, micro)
        finalize_grads(reference)  # sums over DP
        out["fp32"] = {n: p.grad.clone() for n, p in reference.named_parameters()}

        model = build(torch.bfloat16)
        model.load_state_dict(weights)
        engine, _ = build_engine(model, OptimConfig(), total_steps=10, micro_batch_size=1,
                                 num_microbatches=MICRO, bf16=True)
        out["loss_trainer"] = forward_backward(model, micro, grad_scale=DP)
        grads = main_grads(engine)
        finalize_grads(model, grads, reduce_data_parallel=False)
        engine.set_gradient_accumulation_boundary(True)
        engine.allreduce_gradients()  # DeepSpeed averages over DP, hence grad_scale=DP above
        out["trainer"] = named(grads, model)
        out["trainer_dtypes"] = sorted({str(g.dtype) for _, g in grads})
        engine.destroy()

        # The bf16 model's per-micro-batch gradients, summed exactly (float64) over micro-batches and DP.
        exact_model = build(torch.bfloat16)
        exact_model.load_state_dict(weights)
        exact = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in exact_model.named_parameters()}

        def capture(name):
            def hook(p):
                exact[name] += p.grad.double()
                p.grad = None
            return hook

        for n, p in exact_model.named_parameters():
            p.register_post_accumulate_grad_hook(capture(n))
        forward_backward(exact_model, micro, grad_scale=DP)
        for g in exact.values():
            dist.all_reduce(g)
            g /= DP
        out["exact"] = exact

        naive = build(torch.bfloat16)
        naive.load_state_dict(weights)
        forward_backward(naive, micro)
        finalize_grads(naive)  # p.grad: bf16 accumulation, bf16 sum over DP
        out["bf16-acc"] = {n: p.grad.float() for n, p in naive.named_parameters()}
        out["grad_dtype_bf16_acc"] = str(next(naive.parameters()).grad.dtype)
        out["dp"] = ps.get_data_parallel_world_size()
    return out


def _relative(a: dict, b: dict) -> float:
    num = sum((a[n] - b[n]).double().square().sum() for n in b)
    return float((num / sum(g.double().square().sum() for g in b.values())).sqrt())


@pytest.fixture(scope="module")
def gradients():
    return spawn.run(_gradients_body, DP, timeout=300)


def test_bf16_gradients_accumulate_and_reduce_in_fp32(gradients):
    out = gradients[0]
    assert out["dp"] == DP and out["trainer_dtypes"] == ["torch.float32"]
    assert out["grad_dtype_bf16_acc"] == "torch.bfloat16"
    # Accumulation alone: against the exact sum of the same bf16 per-micro-batch gradients.
    acc_trainer, acc_naive = _relative(out["trainer"], out["exact"]), _relative(out["bf16-acc"], out["exact"])
    # End to end: against the fp32 model (bf16 matmuls and activations dominate this one).
    e2e_trainer, e2e_naive = _relative(out["trainer"], out["fp32"]), _relative(out["bf16-acc"], out["fp32"])
    print(f"\nrelative gradient error after {MICRO} micro-batches x DP{DP}: accumulation alone (against the exact "
          f"sum of the bf16 micro-batch gradients): fp32 accumulation {acc_trainer:.2e}, bf16 accumulation "
          f"{acc_naive:.2e}; against the fp32 model: {e2e_trainer:.2e} and {e2e_naive:.2e}")
    assert acc_trainer <= 1e-6, acc_trainer
    assert acc_naive > 1e-3, acc_naive  # the test would see a regression to bf16 accumulation
    assert e2e_trainer < 2e-2 and e2e_trainer < e2e_naive, (e2e_trainer, e2e_naive)
    assert abs(out["loss_trainer"] - out["loss_fp32"]) <= 1e-2 * abs(out["loss_fp32"])
    # The same global gradient on both DP ranks.
    assert all(torch.equal(gradients[1]["trainer"][n], g) for n, g in out["trainer"].items())


def _run(*overrides: str) -> list[dict]:
    import json
    import subprocess
    import sys

    args = dict(o.split("=", 1) for o in overrides)
    done = subprocess.run([sys.executable, "-m", "pretrain.train", *overrides], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return [json.loads(line) for line in (Path(args["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


def test_bf16_run_learns_and_resumes_bit_exactly(tmp_path):
    """A bf16 run (fp32 gradient accumulation, fp32 master weights in DeepSpeed's BF16 optimizer) and
    the same run resumed from its step-2 checkpoint in a fresh process: identical losses."""
    from data_prep.cli import main as data_prep

    data = tmp_path / "synthetic"
    assert data_prep(["synthetic", "--output", str(data), "--num", "80", "--seed", "3", "--no-progress",
                      "--workers", "1"]) == 0
    common = ["model=tiny", "stage=stage2_midtrain", f"data.path={data}", "train.steps=4", "train.seq_len=256",
              "train.global_batch_size=4", "checkpoint.every=2", "data.num_workers=0", "wandb.mode=disabled",
              "train.dtype=bfloat16"]
    straight = _run(*common, f"run_dir={tmp_path / 'straight'}")
    losses = [row["loss"] for row in straight]
    assert losses[-1] < losses[0], losses
    # A bf16 run logs pretrain.plan's memory prediction next to the measured memory.
    assert all(0 < row["planned_memory_gb"] < 1 for row in straight), straight
    step2 = tmp_path / "straight" / "checkpoints" / "step_00000002"
    optimizer = step2 / "optimizer" / "zero" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert optimizer.is_file()  # the BF16 optimizer (fp32 accumulation), not ZeRO's bf16-gradient one
    resumed = _run(*common, f"run_dir={tmp_path / 'resumed'}", f"checkpoint.resume={step2}")
    assert [row["step"] for row in resumed] == [3, 4]
    assert [row["loss"] for row in resumed] == losses[2:]  # bit-exact
    assert [row["grad_norm"] for row in resumed] == [row["grad_norm"] for row in straight[2:]]
