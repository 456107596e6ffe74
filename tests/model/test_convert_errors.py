"""`python -m pretrain.convert from-hf` refuses a source that does not fit its config.json, in one
line, before writing anything: a Qwen3 missing a tensor (which would otherwise keep its random
init, silently), one holding a tensor the mapping would not use, a tensor of the wrong shape, a
config.json missing a field or not JSON; the same for a reference NEO checkpoint, whose complete
round trip still converts exactly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pretrain.convert.hf import write_random_qwen3
from pretrain.model.config import NeoModelConfig

# A tiny Qwen3 of 4 layers (so that layers.3 exists), tied embeddings, no tokenizer.
TINY = NeoModelConfig(hidden_size=64, pre_buffer_layers=0, post_llm_layers=4, num_attention_heads=4,
                      num_kv_heads=2, head_dim=16, ffn_hidden_size=96, vocab_size=256, vision_hidden_size=32)


def convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.convert", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def one_error_line(proc: subprocess.CompletedProcess, code: int) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == code, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    return write_random_qwen3(TINY, tmp_path_factory.mktemp("convert_errors") / "qwen3")


@pytest.fixture
def copy(qwen3, tmp_path) -> Path:
    target = tmp_path / "qwen3"
    shutil.copytree(qwen3, target)
    return target


def edit_weights(directory: Path, change) -> None:
    path = directory / "model.safetensors"
    sd = load_file(path)
    change(sd)
    save_file(sd, path, metadata={"format": "pt"})


def test_qwen3_missing_a_tensor_is_refused(copy, tmp_path):
    edit_weights(copy, lambda sd: sd.pop("model.layers.3.mlp.down_proj.weight"))
    out = tmp_path / "out"
    line = one_error_line(convert("from-hf", copy, out), 1)
    assert "1 tensor(s) missing (model.layers.3.mlp.down_proj.weight)" in line, line
    assert "re-download" in line and not out.exists()


def test_qwen3_missing_many_tensors_lists_the_first_few_and_the_count(copy, tmp_path):
    def drop_layer_3(sd):
        for key in [k for k in sd if k.startswith("model.layers.3.")]:
            del sd[key]

    edit_weights(copy, drop_layer_3)
    line = one_error_line(convert("from-hf", copy, tmp_path / "out"), 1)
    assert "11 tensor(s) missing (model.layers.3.input_layernorm.weight, " in line and ", ...)" in line, line


def test_qwen3_with_an_unexpected_tensor_is_refused(copy, tmp_path):
    def add(sd):
        sd["model.layers.4.mlp.down_proj.weight"] = torch.zeros(64, 96)  # a fifth layer config.json lacks
        sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)  # attention biases: not a Qwen3 tensor

    edit_weights(copy, add)
    out = tmp_path / "out"
    line = one_error_line(convert("from-hf", copy, out), 1)
    assert "2 tensor(s) it should not have (model.layers.0.self_attn.q_proj.bias, " \
           "model.layers.4.mlp.down_proj.weight)" in line, line
    assert not out.exists()


def test_qwen3_tensor_of_the_wrong_shape_is_refused(copy, tmp_path):
    edit_weights(copy, lambda sd: sd.update({"model.layers.1.self_attn.q_proj.weight": torch.zeros(32, 64)}))
    line = one_error_line(convert("from-hf", copy, tmp_path / "out"), 1)
    assert "1 tensor(s) of the wrong shape (model.layers.1.self_attn.q_proj.weight [32, 64] not [64, 64])" \
        in line, line


@pytest.mark.parametrize("key", ["num_hidden_layers", "hidden_size", "num_key_value_heads",
                                 "intermediate_size"])
def test_config_missing_a_key_is_one_line(copy, tmp_path, key):
    config = json.loads((copy / "config.json").read_text())
    del config[key]
    (copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    line = one_error_line(convert("from-hf", copy, out), 1)
    assert f"config.json has no '{key}'" in line and "re-download" in line, line
    assert not out.exists()


@pytest.mark.parametrize("text,expected", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "not an object"),
    ('{"model_type": "qwen3", "hidden_size": "64"}', "'hidden_size' is '64', not an integer"),
], ids=["not-json", "list", "string-int"])
def test_damaged_config_is_one_line(copy, tmp_path, text, expected):
    (copy / "config.json").write_text(text)
    line = one_error_line(convert("from-hf", copy, tmp_path / "out"), 1)
    assert expected in line, line


def test_truncated_safetensors_is_one_line(copy, tmp_path):
    path = copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    line = one_error_line(convert("from-hf", copy, tmp_path / "out"), 1)
    assert "is not a readable safetensors file" in line, line


# ------------------------------------------------------------------------ the reference NEO layout


@pytest.fixture(scope="module")
def neo_hf(qwen3, tmp_path_factory) -> Path:
    """Qwen3 -> ours (1 pre-Buffer layer, narrow vision) -> the reference NEO HF layout."""
    work = tmp_path_factory.mktemp("neo_hf")
    done = convert("from-hf", qwen3, work / "ours", "--pre-buffer-layers", "1", "--vision-hidden-size", "32")
    assert done.returncode == 0, done.stderr[-3000:]
    done = convert("to-hf", work / "ours", work / "neo_hf")
    assert done.returncode == 0, done.stderr[-3000:]
    return work / "neo_hf"


def test_neo_round_trip_is_exact(neo_hf, tmp_path):
    done = convert("from-hf", neo_hf, tmp_path / "again")
    assert done.returncode == 0, done.stderr[-3000:]
    done = convert("to-hf", tmp_path / "again", tmp_path / "again_hf")
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_file(neo_hf / "model.safetensors"), load_file(tmp_path / "again_hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_neo_missing_a_tensor_is_refused(neo_hf, tmp_path):
    copy = tmp_path / "neo_hf"
    shutil.copytree(neo_hf, copy)
    edit_weights(copy, lambda sd: sd.pop("language_model.model.layers.0.self_attn.q_proj_hw.weight"))
    out = tmp_path / "out"
    line = one_error_line(convert("from-hf", copy, out), 1)
    assert "1 tensor(s) missing (language_model.model.layers.0.self_attn.q_proj_hw.weight)" in line, line
    assert not out.exists()
