"""Every configuration mistake ends in one line, ``config error: ...``, and exit status 2: never a
traceback. Hydra's and OmegaConf's own errors (a value of the wrong type, an unknown key, an
unknown group option), numbers that parse but cannot run, a model no GPU holds, and the inputs
the run reads (data directory, tokenizer, init.checkpoint), all checked before any process group
exists (so ``pretrain.train.main`` runs them in this process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import ConfigError, compose, validate
from pretrain.train import main

REPO = Path(__file__).resolve().parents[1]


def plain_tokenizer(out: Path, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>")) -> Path:
    """An HF tokenizer with only some of NEO's special tokens (none of the image ones)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from data_prep.tokenizer import save_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["a red square and a blue circle"] * 20, trainer=trainer)
    save_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0]), out)
    return out


def neo_tokenizer(out: Path) -> Path:
    from data_prep.tokenizer import train_tokenizer

    return train_tokenizer(["a red square and a blue circle"] * 20, out, vocab_size=300)


def energon_dir(root: Path) -> Path:
    """What the pre-flight check takes for a finished build (it looks at .nv-meta/dataset.yaml;
    the loader checks the metadata itself later)."""
    (root / ".nv-meta").mkdir(parents=True)
    (root / ".nv-meta" / "dataset.yaml").write_text("{}\n")
    return root


def one_config_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("config error: "), err
    return lines[0]


@pytest.mark.parametrize("override, needles", [
    ("train.steps=abc", ["train.steps=abc", "could not be converted to Integer"]),
    ("train.stepz=3", ["Could not override 'train.stepz'", "unknown config key 'train.stepz'", "steps, seq_len"]),
    ("+train.stepz=3", ["unknown config key 'train.stepz'"]),
    ("model=nope", ["Could not find 'model/nope' (available options in 'model': neo_2b, neo_9b, tiny)"]),
    ("train.seq_len=0", ["train.seq_len=0 must be >= 2"]),
    ("optim.lr=nan", ["optim.lr=nan must be a finite number > 0"]),
    ("optim.lr=-1", ["optim.lr=-1.0 must be a finite number > 0"]),
    ("data.num_workers=-1", ["data.num_workers=-1 must be >= 0"]),
    ("model.vocab_size=1e9", ["model.vocab_size=1e9", "could not be converted to Integer"]),
    ("model.vocab_size=1000000000", ["model.vocab_size=1000000000 is beyond 1,048,576"]),
    ("optim.warmup=-5", ["optim.warmup=-5.0 must be >= 0"]),
    ("optim.warmup=2.5", ["optim.warmup=2.5 is a number of steps"]),
    ("optim.clip_grad=nan", ["optim.clip_grad=nan must be a finite number >= 0"]),
    ("optim.weight_decay=-1", ["optim.weight_decay=-1.0 must be a finite number >= 0"]),
    ("optim.min_lr_ratio=2", ["optim.min_lr_ratio=2.0 must be in [0, 1]"]),
    ("optim.beta2=1", ["optim.beta2=1.0 must be in [0, 1)"]),
    ("train.spike_factor=0.5", ["train.spike_factor=0.5 must be a finite number > 1"]),
    ("train.loss_ceiling_factor=nan", ["train.loss_ceiling_factor=nan must be a finite number > 1"]),
    ("train.spike_window=0", ["train.spike_window=0 must be >= 1"]),
    ("train.global_batch_size=0", ["train.global_batch_size=0 must be a multiple"]),
    ("model.num_kv_heads=0", ["model.num_kv_heads=0 must be >= 1"]),
    ("model.hidden_size=40000000", ["507.4B parameters on one rank", "more than any GPU holds"]),
    ("parallel.tp=abc", ["parallel.tp=abc"]),
    ("train.steps=", ["train.steps=: Value '' of type 'str' could not be converted to Integer"]),
    ("optim=", ["optim=: Invalid type assigned"]),
    ("train.steps=[1", ["no viable alternative at input '[1'"]),
])
def test_bad_values_are_one_line(capsys, override, needles):
    line = one_config_error(capsys, ["model=tiny", override])
    for needle in needles:
        assert needle in line, line


def test_compose_raises_config_error_not_hydras():
    with pytest.raises(ConfigError, match="could not be converted to Integer"):
        compose(["train.steps=abc"])
    with pytest.raises(ConfigError, match="Could not find 'model/nope'"):
        compose(["model=nope"])


def test_numbers_that_run_still_validate():
    cfg = compose(["model=tiny", "optim.clip_grad=0", "optim.weight_decay=0", "data.num_workers=0",
                   "optim.warmup=0.05", "train.seq_len=2", "optim.min_lr_ratio=1"])
    assert str(validate(cfg, 1)) == "TP1xPP1xDP1"
    # The real presets are far below the per-rank bound, even on one GPU.
    validate(compose(["model=neo_9b", "train.global_batch_size=8"]), 1)


def test_nonexistent_init_checkpoint_is_an_error(capsys, tmp_path):
    line = one_config_error(capsys, ["model=tiny", f"init.checkpoint={tmp_path / 'nonexistent'}",
                                     f"data.path={energon_dir(tmp_path / 'data')}"])
    assert f"init.checkpoint={tmp_path / 'nonexistent'} does not exist" in line
    line = one_config_error(capsys, ["model=tiny", f"init.hf_llm={tmp_path / 'no-qwen'}"])
    assert "init.hf_llm=" in line and "does not exist" in line


def test_data_directory_problems(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is an empty directory" in one_config_error(capsys, ["model=tiny", f"data.path={empty}"])
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "data-000000.tar").write_bytes(b"\0" * 512)  # shards written, then the build died
    line = one_config_error(capsys, ["model=tiny", f"data.path={killed}"])
    assert "incomplete data_prep build" in line and "rerun it" in line and "--no-energon" not in line
    (killed / "manifest.json").write_text("{}")  # a finished build made with --no-energon
    assert "run data_prep without --no-energon" in one_config_error(capsys, ["model=tiny", f"data.path={killed}"])
    assert "does not exist" in one_config_error(capsys, ["model=tiny", f"data.path={tmp_path / 'nowhere'}"])
    assert "data.path is not set" in one_config_error(capsys, ["model=tiny"])


def test_tokenizer_without_neo_special_tokens(capsys, tmp_path):
    data = energon_dir(tmp_path / "data")
    plain = plain_tokenizer(tmp_path / "plain")
    line = one_config_error(capsys, ["model=tiny", f"data.path={data}", f"tokenizer.path={plain}"])
    assert "lacks NEO's special tokens <IMG_CONTEXT>, <img>, </img>:" in line, line
    line = one_config_error(capsys, ["model=tiny", f"data.path={data}"])  # <data.path>/tokenizer: absent
    assert f"no tokenizer at {data / 'tokenizer'}" in line


def test_good_inputs_pass_the_preflight(tmp_path):
    from pretrain.train import check_inputs

    data = energon_dir(tmp_path / "data")
    neo_tokenizer(data / "tokenizer")
    check_inputs(compose(["model=tiny", f"data.path={data}"]))


@pytest.mark.parametrize("override, needle", [
    ("train.steps=abc", "train.steps=abc"),
    ("model.vocab_size=1000000000", "model.vocab_size=1000000000 is beyond"),
    ("model=nope", "model/nope"),
])
def test_python_m_pretrain_train_exits_2_with_one_line(override, needle):
    done = subprocess.run([sys.executable, "-m", "pretrain.train", "model=tiny", override], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == "", done.stderr
    assert len(lines) == 1 and lines[0].startswith("config error: ") and needle in lines[0], done.stderr
