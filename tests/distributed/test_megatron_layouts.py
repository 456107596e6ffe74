"""Megatron's real pipeline schedule at four 4-rank layouts, in ONE launch, against one process.

Tolerance: 1e-6 relative on the loss and on the global gradient norm. The layouts compute the
same fp32 function of the same weights; only the order of additions differs (row-parallel
all-reduces split matmul sums across ranks, data-parallel averaging sums per-rank means). Measured:
at most 1e-7 relative (one or two ulp of a loss of ~4.9), so 1e-6 leaves a 10x margin while a real
error is far larger: a missed TP reduction of the QK-norm gradients alone moved the norm by 4e-6.
"""

from __future__ import annotations

import pytest

from pretrain.distributed import spawn

LAYOUTS = [(2, 2), (2, 1), (1, 2), (1, 1)]  # (tp, pp) at 4 ranks: TP2xPP2, TP2xDP2, PP2xDP2, DP4


def _body(ckpt_dir: str):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from pretrain.distributed import runtime
    from tests.distributed import tiny_gpt

    tokens, labels = tiny_gpt.global_batch()
    out = {}
    with runtime.model_parallel(1, 1):
        model = tiny_gpt.build()
        out["reference"] = tiny_gpt.loss_and_grad_norm(model, tokens, labels, split_over_dp=False)
        dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    for tp, pp in LAYOUTS:
        with runtime.model_parallel(tp, pp):
            model = tiny_gpt.build()
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
            loss, grad_norm = tiny_gpt.loss_and_grad_norm(model, tokens, labels)
            out[f"TP{tp}PP{pp}"] = (loss, grad_norm, ps.is_pipeline_last_stage())
    return out


@pytest.mark.slow
def test_layouts_match_single_process(tmp_path):
    (tmp_path / "ref_ckpt").mkdir()
    per_rank = spawn.run(_body, 4, args=(str(tmp_path / "ref_ckpt"),), timeout=300)
    ref_loss, ref_norm = per_rank[0]["reference"]
    assert all(r["reference"] == (ref_loss, ref_norm) for r in per_rank)
    for tp, pp in LAYOUTS:
        name = f"TP{tp}PP{pp}"
        losses = [r[name][0] for r in per_rank if r[name][2]]
        norms = [r[name][1] for r in per_rank]
        assert len(losses) == 4 // pp
        for loss in losses:
            print(f"{name}: loss {loss:.9f} vs {ref_loss:.9f} (rel {abs(loss - ref_loss) / ref_loss:.2e})")
            assert loss == pytest.approx(ref_loss, rel=1e-6), name
        for norm in norms:
            print(f"{name}: grad norm {norm:.9f} vs {ref_norm:.9f} (rel {abs(norm - ref_norm) / ref_norm:.2e})")
            assert norm == pytest.approx(ref_norm, rel=1e-6), name
