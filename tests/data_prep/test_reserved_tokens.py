"""Special-token injection: data text that holds any special token of the tokenizer is refused.

Every added/special token of the tokenizer (not a hand-picked few) in a caption, a conversation
turn (user, assistant or system) or a text document is a ``reserved_token`` reject naming the
token, and the build's counts still reconcile. Without a tokenizer data_prep refuses NEO's own
list (the one the tokenizer is built from); given ``--tokenizer`` it also refuses that
tokenizer's whole added vocabulary. Text that only looks like a token is kept, unchanged.
"""

from __future__ import annotations

import csv
import re
import shutil
from collections import Counter

import pytest

from data_prep.records import check_text
from data_prep.rejects import Reject
from data_prep.tokenizer import (
    SPECIAL_TOKENS,
    TextTokenCounter,
    reserved_pattern,
    special_token_strings,
    train_tokenizer,
)
from tests.data_prep.helpers import build, jpeg, read_rejects, sample_json, write, write_jsonl

TEXTS = [
    f"The {c} {s} number {i} is here." for i in range(40) for c in ("red", "blue") for s in ("circle", "box")
]

LOOK_ALIKES = [
    "<refx",
    "< ref >",
    "<REF>",
    "<ref >",
    "</ref",
    "ref>",
    "<|im_end",
    "im_end|>",
    "<|im_end |>",
    "<| im_start |>",
    "<img >",
    "<IMG_CONTEXT",
    "<img_context>",
    "&lt;ref&gt;",
    "\uff1cref\uff1e",  # fullwidth < >
    "<|endoftext|",
    "<|plugin||>x",  # holds no whole token: '<|plugin|' is followed by '|>', not '>'
    "<image >",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_tokenizer(TEXTS, tmp_path_factory.mktemp("tok") / "tok", vocab_size=300)


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    write(root / "a.jpg", jpeg())
    return root


def counts_reconcile(manifest: dict) -> dict:
    counts = manifest["counts"]
    assert counts["inputs"] == counts["written"] + counts["rejected"] and counts["reconciled"]
    return counts


def test_the_parametrized_list_is_the_tokenizers_whole_added_vocabulary(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    added = {getattr(t, "content", str(t)) for t in tok.added_tokens_decoder.values()}
    assert set(SPECIAL_TOKENS) == added == set(tok.all_special_tokens)
    assert len(SPECIAL_TOKENS) == 16
    assert special_token_strings(tok) == SPECIAL_TOKENS  # id order: <|endoftext|> = 0, then 1..15
    assert TextTokenCounter(tokenizer_dir).special_tokens == SPECIAL_TOKENS


@pytest.mark.parametrize("token", SPECIAL_TOKENS)
def test_check_text_refuses_every_special_token(token):
    for text in (token, f"a {token} b", f"x{token}y", f"{token}{token}"):
        with pytest.raises(Reject) as info:
            check_text(text, "caption")
        assert info.value.code == "reserved_token"
        assert repr(token) in info.value.message and "\n" not in info.value.message


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": role, "value": value} for role, value in pairs]


@pytest.mark.parametrize("token", SPECIAL_TOKENS)
def test_build_rejects_each_special_token_in_every_kind_of_text(token, tmp_path, images):
    records = [
        {"id": "user", "image": "a.jpg", "conversations": turns(("human", f"Look: {token}"), ("gpt", "A."))},
        {"id": "assistant", "image": "a.jpg", "conversations": turns(("human", "Q?"), ("gpt", f"A{token}"))},
        {
            "id": "system",
            "image": "a.jpg",
            "conversations": turns(("system", f"{token} be nice"), ("human", "Q?"), ("gpt", "A.")),
        },
        {
            "id": "later-turn",
            "images": ["a.jpg"],
            "conversations": turns(
                ("human", "<image>Q?"), ("gpt", "A."), ("human", f"and {token}?"), ("gpt", "B.")
            ),
        },
        {"id": "ok", "image": "a.jpg", "conversations": turns(("human", "What is it?"), ("gpt", "A box."))},
    ]
    ann = write_jsonl(tmp_path / "conv.jsonl", records)
    manifest = build("neo-json", [ann], tmp_path / "conv", image_root=images)
    counts = counts_reconcile(manifest)
    assert (counts["inputs"], counts["written"], counts["rejected"]) == (5, 1, 4)
    assert manifest["rejects"]["reserved_token"] == 4
    rejects = read_rejects(tmp_path / "conv")
    assert [r["id"] for r in rejects] == ["user", "assistant", "system", "later-turn"]
    for r in rejects:
        assert r["reason"] == "reserved_token" and repr(token) in r["message"] and "\n" not in r["message"]

    texts = [{"id": "bad", "text": f"Some {token} text."}, {"id": "ok", "text": "Fine."}]
    docs = write_jsonl(tmp_path / "text.jsonl", texts)
    manifest = build("text", [docs], tmp_path / "text")
    counts = counts_reconcile(manifest)
    assert (counts["written"], counts["rejected"], manifest["rejects"]["reserved_token"]) == (1, 1, 1)
    assert repr(token) in read_rejects(tmp_path / "text")[0]["message"]

    table = tmp_path / "captions.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerows([["image", "caption"], ["a.jpg", f"A {token} caption"], ["a.jpg", "A red box."]])
    manifest = build("captions", [table], tmp_path / "cap", image_root=images)
    counts = counts_reconcile(manifest)
    assert (counts["written"], counts["rejected"], manifest["rejects"]["reserved_token"]) == (1, 1, 1)
    assert [s["text"] for s in sample_json(tmp_path / "cap")] == ["A red box."]


def test_look_alikes_are_kept_unchanged(tmp_path, images, tokenizer_dir):
    records = [{"id": f"t{i}", "text": f"before {s} after"} for i, s in enumerate(LOOK_ALIKES)]
    ann = write_jsonl(tmp_path / "t.jsonl", records)
    for tokenizer in (None, tokenizer_dir):  # the fallback list and the tokenizer's own
        out = tmp_path / ("with-tok" if tokenizer else "no-tok")
        manifest = build("text", [ann], out, tokenizer=tokenizer)
        counts = counts_reconcile(manifest)
        assert counts["rejected"] == 0 and counts["written"] == len(LOOK_ALIKES)
        assert sorted(s["text"] for s in sample_json(out)) == sorted(r["text"] for r in records)
    conv = [
        {
            "id": f"c{i}",
            "image": "a.jpg",
            "conversations": [{"from": "human", "value": s}, {"from": "gpt", "value": f"It says {s}."}],
        }
        for i, s in enumerate(LOOK_ALIKES)
    ]
    ann = write_jsonl(tmp_path / "c.jsonl", conv)
    manifest = build("neo-json", [ann], tmp_path / "conv", image_root=images)
    assert counts_reconcile(manifest)["rejected"] == 0


def test_a_configured_tokenizer_adds_its_whole_added_vocabulary(tmp_path, tokenizer_dir):
    """A Qwen-style tokenizer carries more added tokens than NEO's list, special or not: given
    ``--tokenizer``, every one of them is refused too (in the build workers)."""
    from tokenizers import AddedToken, Tokenizer

    extra_dir = tmp_path / "qwen-like"
    shutil.copytree(tokenizer_dir, extra_dir)
    tok = Tokenizer.from_file(str(extra_dir / "tokenizer.json"))
    tok.add_tokens([AddedToken("<think>", special=False)])
    tok.add_special_tokens([AddedToken("<|vision_start|>", special=True)])
    tok.save(str(extra_dir / "tokenizer.json"))
    counter = TextTokenCounter(extra_dir)
    assert set(counter.special_tokens) == {*SPECIAL_TOKENS, "<think>", "<|vision_start|>"}

    records = [
        {"id": "think", "text": "Let me <think> about it."},
        {"id": "vision", "text": "x <|vision_start|> y"},
        {"id": "neo", "text": "the <ref>cat</ref>"},
        {"id": "ok", "text": "A plain sentence."},
    ]
    ann = write_jsonl(tmp_path / "t.jsonl", records)
    manifest = build("text", [ann], tmp_path / "out", tokenizer=extra_dir)
    counts = counts_reconcile(manifest)
    assert (counts["inputs"], counts["written"], counts["rejected"]) == (4, 1, 3)
    assert manifest["rejects"]["reserved_token"] == 3
    rejects = {r["id"]: r for r in read_rejects(tmp_path / "out")}
    assert Counter(r["reason"] for r in rejects.values()) == {"reserved_token": 3}
    assert "'<think>'" in rejects["think"]["message"]
    assert "'<|vision_start|>'" in rejects["vision"]["message"]
    assert "'<ref>'" in rejects["neo"]["message"]
    (kept,) = sample_json(tmp_path / "out")
    assert kept["id"] == "ok" and kept["text_tokens"] > 0

    # Without a tokenizer data_prep can only know NEO's list: the foreign tokens pass, NEO's not.
    manifest = build("text", [ann], tmp_path / "no-tok")
    assert counts_reconcile(manifest)["rejected"] == 1
    assert read_rejects(tmp_path / "no-tok")[0]["id"] == "neo"


def test_reserved_pattern_names_the_longest_token_and_never_the_image_tag():
    pattern = reserved_pattern(["<a>", "<a>b", "<image>", "", "a.b"])  # one token a prefix of another
    assert isinstance(pattern, re.Pattern)
    assert pattern.search("x<a>by").group() == "<a>b"
    assert pattern.search("x<a>y").group() == "<a>"
    assert pattern.search("axb") is None  # tokens are literals, not regular expressions
    assert pattern.search("<image>") is None  # data_prep's image tag, split off before tokenising
    assert reserved_pattern([]).search("anything <ref>") is None
