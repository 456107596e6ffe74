"""Config validation happens at the edge: every invalid layout is a one-line, actionable error,
raised in this process, before any rank exists."""

from __future__ import annotations

import pytest

from pretrain.config import ConfigError, compose, validate


def test_presets_compose_and_validate():
    assert str(validate(compose(["model=tiny", "parallel=tp2pp2"]), 4)) == "TP2xPP2xDP1"
    layout = validate(compose(["model=neo_2b", "parallel=tp4pp2", "train.global_batch_size=64"]), 32)
    assert (layout.dp, layout.num_microbatches, layout.layers_per_stage) == (4, 16, (20, 20))
    nine = compose(["model=neo_9b", "parallel=tp8pp1", "train.global_batch_size=32"])
    assert nine.model.num_layers == 42 and not nine.model.tie_word_embeddings
    assert validate(nine, 64).dp == 8


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel=tp2pp2"], 6, "world size 6 is not divisible by parallel.tp*parallel.pp = 2*2 = 4"),
        (["parallel.tp=3"], 3, "model.num_attention_heads=4 is not divisible by parallel.tp=3"),
        (["parallel.tp=4", "model.num_attention_heads=8"], 4, "model.num_kv_heads=2 (KV groups) is not divisible by parallel.tp=4"),
        (["parallel.pp=4"], 4, "6 decoder layers do not split evenly over parallel.pp=4 stages; set parallel.pipeline_split (e.g. [2, 2, 1, 1])"),
        (["parallel.pp=2", "parallel.pipeline_split=[4,1]"], 2, "parallel.pipeline_split=[4, 1] must list 2 positive layer counts summing to 6"),
        (["parallel.pp=2", "optim.zero_stage=2"], 2, "optim.zero_stage=2 cannot be used with pipeline parallelism (parallel.pp=2)"),
        (["optim.zero_stage=3", "train.global_batch_size=4"], 2, "optim.zero_stage=3 cannot accumulate 2 micro-batches"),
        (["train.global_batch_size=6"], 4, "train.global_batch_size=6 must be a multiple of train.micro_batch_size*DP = 1*4 = 4"),
        (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel=true needs parallel.tp > 1"),
        (["model.num_kv_heads=3"], 1, "model.num_attention_heads=4 is not a multiple of model.num_kv_heads=3"),
    ],
)
def test_invalid_layouts_are_one_line_errors(overrides, world, message):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides), world)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_explicit_pipeline_split_is_accepted():
    cfg = compose(["parallel.pp=4", "parallel.pipeline_split=[2,2,1,1]"])
    assert validate(cfg, 4).layers_per_stage == (2, 2, 1, 1)


def test_unknown_keys_are_rejected_by_the_schema():
    with pytest.raises(ConfigError, match="unknown config key 'paralel'"):
        compose(["+paralel.tp=2"])
    with pytest.raises(ConfigError, match="unknown config key 'model.hiden_size' .known under 'model': hidden_size"):
        compose(["+model.hiden_size=3"])
    with pytest.raises(Exception, match="tpp"):
        compose(["parallel.tpp=2"])


def test_cluster_presets_carry_the_gpu_facts():
    """Training (MFU), pretrain.plan and slurm.submit read the GPUs' facts from one place."""
    generic = compose([]).cluster
    assert (generic.gpu_memory_gb, generic.peak_tflops, generic.intra_node_gbps, generic.inter_node_gbps) == (0, 0, 0, 0)
    h100 = compose(["cluster=h100_80gb", "cluster.nodes=4"]).cluster
    assert (h100.nodes, h100.gpus_per_node, h100.gpu_memory_gb, h100.peak_tflops) == (4, 8, 80, 989)
    h200 = compose(["cluster=h200_141gb"]).cluster
    assert (h200.gpu_memory_gb, h200.peak_tflops) == (141, 989)
    assert h200.intra_node_gbps > h200.inter_node_gbps > 0
