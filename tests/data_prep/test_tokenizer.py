"""The demo tokenizer: byte-level BPE with NEO's special tokens in order, ChatML, deterministic."""

import filecmp

import pytest

from data_prep.cli import main
from data_prep.schema import EOS_TOKEN, NEO_SPECIAL_TOKENS
from data_prep.tokenizer import TextTokenCounter, train_tokenizer
from tests.data_prep.helpers import build, write_jsonl

TEXTS = [
    f"The {c} {s} number {i} is here."
    for i in range(60)
    for c in ("red", "blue")
    for s in ("circle", "square")
]


def test_special_tokens_chat_template_and_determinism(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    a = train_tokenizer(TEXTS, tmp_path / "a", vocab_size=400)
    b = train_tokenizer(TEXTS, tmp_path / "b", vocab_size=400)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(a / name, b / name, shallow=False)
    tok = AutoTokenizer.from_pretrained(a)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.convert_tokens_to_ids([EOS_TOKEN, *NEO_SPECIAL_TOKENS]) == list(range(16))
    assert tok.eos_token == tok.pad_token == EOS_TOKEN
    tokens = tok.convert_ids_to_tokens(
        tok("<|im_start|>user\n<img><IMG_CONTEXT></img>hi<|im_end|>")["input_ids"]
    )
    assert tokens[0] == "<|im_start|>" and tokens[-1] == "<|im_end|>"
    at = tokens.index("<img>")
    assert tokens[at : at + 3] == ["<img>", "<IMG_CONTEXT>", "</img>"]
    for marker in ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"):
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], tokenize=False
    )
    assert rendered == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    assert tok.decode(tok("The red circle.")["input_ids"]) == "The red circle."
    with pytest.raises(FileExistsError):
        train_tokenizer(TEXTS, a, vocab_size=400)


def test_tokenizer_cli_from_a_built_data_set(tmp_path):
    ann = write_jsonl(tmp_path / "t.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(TEXTS)])
    build("text", [ann], tmp_path / "data")
    argv = ["tokenizer", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "tok")]
    assert main([*argv, "--vocab-size", "300"]) == 0
    counter = TextTokenCounter(tmp_path / "tok")
    n = counter.count({"kind": "text", "text": "The red circle number 3 is here."})
    assert 0 < n < len("The red circle number 3 is here.")
    # text_tokens in samples counts the text between <image> tags only
    turns = [{"role": "user", "content": "<image>\nThe red"}, {"role": "assistant", "content": "circle"}]
    pieces = [counter.count({"kind": "text", "text": t}) for t in ("\nThe red", "circle")]
    assert counter.count({"kind": "conversation", "conversations": turns}) == sum(pieces)
