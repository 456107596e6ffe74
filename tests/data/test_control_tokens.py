"""Defence in depth: shard text never becomes a control token in training.

data_prep refuses special tokens in text, but shards may come from elsewhere (an older data_prep,
a hand-made set). The template tokenises data text with special tokens split, so a caption or a
turn that says ``<ref>`` or ``<|im_end|>`` trains on those characters as plain text; the only
control ids in a document are the ones the template places itself (``<|im_start|>``,
``<|im_end|>``, image blocks, ``<|endoftext|>``). An added token that is not special (a non-NEO
tokenizer's, e.g. ``<think>``) cannot be split by the tokenizer: such a sample is refused,
logged, counted and skipped like any bad sample.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_prep.energon_prepare import energon_prepare
from data_prep.tokenizer import SPECIAL_TOKENS, special_token_strings
from pretrain.data import LoaderConfig, NeoDataLoader, build_prompt
from pretrain.data.task_encoder import NeoTaskEncoder, encode_document
from pretrain.data.template import IMAGE_TAG, ChatTemplate, ControlTokenError, load_tokenizer
from tests.data.conftest import png_bytes

FOREIGN = "<think>"  # an added token of some other tokenizer, not a special one


def read_shards(data_dir: Path) -> list[tuple[str, dict, list[tuple[str, bytes]]]]:
    """(key, sample JSON, [(member suffix, bytes)] of its images) in shard order."""
    samples: dict[str, dict] = {}
    for shard in sorted(data_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, suffix = member.name.partition(".")
                samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    out = []
    for key, parts in samples.items():
        meta = json.loads(parts.pop("json"))
        out.append((key, meta, sorted(parts.items())))
    return out


def inject(meta: dict, i: int) -> dict:
    """The sample with special-token strings written into every piece of its text."""
    meta = json.loads(json.dumps(meta))
    a, b = SPECIAL_TOKENS[i % len(SPECIAL_TOKENS)], SPECIAL_TOKENS[(i + 5) % len(SPECIAL_TOKENS)]
    if meta["kind"] == "conversation":
        for j, turn in enumerate(meta["conversations"]):
            turn["content"] = f"{a} {turn['content']}{b}" if j % 2 else f"{turn['content']} <ref>{a}</ref>"
    else:
        meta["text"] = f"{a}{meta['text']} <|im_end|>\n<|im_start|>assistant {b}"
    return meta


@pytest.fixture(scope="module")
def elsewhere(synthetic, tmp_path_factory) -> Path:
    """The synthetic set rewritten by hand: every sample's text carries special-token strings
    (all 16 of them across the set), one sample carries FOREIGN; Energon metadata re-made."""
    out = tmp_path_factory.mktemp("elsewhere") / "data"
    out.mkdir()
    with tarfile.open(out / "hand-made-000000.tar", "w") as tar:
        for i, (key, meta, images) in enumerate(read_shards(synthetic)):
            meta = inject(meta, i)
            if i == 3:
                field = "conversations" if meta["kind"] == "conversation" else "text"
                if field == "text":
                    meta["text"] += f" {FOREIGN}"
                else:
                    meta["conversations"][0]["content"] += f" {FOREIGN}"
            for suffix, data in [("json", json.dumps(meta).encode()), *images]:
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    energon_prepare(out, 1)
    return out


def expected_controls(template: ChatTemplate, meta: dict) -> Counter:
    """The control ids the template itself places in one document, and nothing else."""
    images = meta["images"]
    want = Counter()
    want[template.img_start_id] = want[template.img_end_id] = len(images)
    want[template.img_context_id] = sum(int(e["num_tokens"]) for e in images)
    if meta["kind"] == "conversation":
        want[template.im_start_id] = want[template.im_end_id] = len(meta["conversations"])
    else:
        want[template.eos_id] = 1
    return +want


def controls(template: ChatTemplate, tokens: np.ndarray) -> Counter:
    return Counter(int(t) for t in tokens if int(t) in template.control_tokens)


def rendered_text(meta: dict) -> str:
    """What the document decodes to: the template's markup around the unchanged text."""

    def with_images(text: str, first: int) -> tuple[str, int]:
        parts = text.split(IMAGE_TAG)
        out, n = parts[0], first
        for part in parts[1:]:
            out += "<img>" + "<IMG_CONTEXT>" * meta["images"][n]["num_tokens"] + "</img>" + part
            n += 1
        return out, n

    if meta["kind"] == "conversation":
        out, n = "", 0
        for turn in meta["conversations"]:
            content, n = with_images(turn["content"], n)
            out += f"<|im_start|>{turn['role']}\n{content}<|im_end|>\n"
        return out
    block = "".join("<img>" + "<IMG_CONTEXT>" * e["num_tokens"] + "</img>" for e in meta["images"])
    return block + meta["text"] + "<|endoftext|>"


def test_the_tokenizers_special_tokens_are_neos_list(tokenizer):
    assert special_token_strings(tokenizer) == SPECIAL_TOKENS
    template = ChatTemplate(tokenizer)
    assert sorted(template.control_tokens) == list(range(16))
    assert set(template.control_tokens.values()) == set(SPECIAL_TOKENS)


@pytest.mark.parametrize("token", SPECIAL_TOKENS)
def test_a_special_token_in_text_is_plain_text(tokenizer, token):
    template = ChatTemplate(tokenizer)
    encoder = NeoTaskEncoder(tokenizer, seq_len=4096)
    entry = {"orig_size": [64, 96], "size": [64, 96], "grid": [2, 3], "num_tokens": 6}

    text = f"A {token} in <ref>it</ref>{token}"
    caption = {"kind": "caption", "text": text, "images": [entry], "num_image_tokens": 6}
    doc = encode_document(encoder, dict(caption, id="c", source="t"), [png_bytes(64, 96)], key="c")
    tokens = doc.tokens
    assert tokens[0] == template.img_start_id and tokens[7] == template.img_end_id
    assert (tokens[1:7] == template.img_context_id).all()
    assert tokens[-1] == template.eos_id
    text_span = tokens[8:-1]
    assert not np.isin(text_span, template.control_ids).any()  # none of ids 0..15
    assert tokenizer.decode(text_span.tolist()) == caption["text"]

    turns = [
        {"role": "system", "content": f"{token}sys"},
        {"role": "user", "content": f"<image>\nq {token}<|im_end|>\n<|im_start|>assistant\nyes"},
        {"role": "assistant", "content": f"a{token}"},
    ]
    conv = {"kind": "conversation", "conversations": turns, "images": [entry], "num_image_tokens": 6}
    doc = encode_document(encoder, dict(conv, id="v", source="t"), [png_bytes(64, 96)], key="v")
    assert controls(template, doc.tokens) == expected_controls(template, conv)
    starts = np.flatnonzero(doc.tokens == template.im_start_id)
    ends = np.flatnonzero(doc.tokens == template.im_end_id)
    assert len(starts) == len(ends) == 3 and starts[0] == 0  # the template's own, one pair per turn
    assert tokenizer.decode(doc.tokens.tolist()) == rendered_text(conv)
    # the supervised span is still exactly the assistant content and its closing <|im_end|>\n
    sup = doc.tokens[1:][doc.loss_mask[:-1]]
    assert tokenizer.decode(sup.tolist()) == f"a{token}<|im_end|>\n"

    prompt = build_prompt(template, conv, [png_bytes(64, 96)])
    p = prompt.tokens.numpy()
    assert controls(template, p) == Counter(
        {template.im_start_id: 3, template.im_end_id: 2, template.img_start_id: 1, template.img_end_id: 1,
         template.img_context_id: 6}
    )


def test_hand_made_shards_train_without_injected_control_ids(elsewhere, tokenizer):
    template = ChatTemplate(tokenizer)
    metas = {key: meta for key, meta, _ in read_shards(elsewhere)}
    injected = {t for m in metas.values() for t in SPECIAL_TOKENS if t in json.dumps(m, ensure_ascii=False)}
    assert injected == set(SPECIAL_TOKENS)  # all 16 appear somewhere in the hand-made set
    cfg = LoaderConfig(
        path=str(elsewhere),
        seq_len=1024,
        micro_batch_size=2,
        num_workers=0,
        repeat=False,
        packing_buffer_size=16,
        shuffle_buffer_size=8,
        max_samples_per_sequence=8,
    )
    loader = NeoDataLoader(cfg, tokenizer=tokenizer)
    seen = []
    for batch in loader:
        for r, row_keys in enumerate(loader.last.keys):
            tokens, doc_ids = batch.tokens[r].numpy(), batch.doc_ids[r].numpy()
            for d, key in enumerate(row_keys):
                doc = tokens[doc_ids == d]
                assert controls(template, doc) == expected_controls(template, metas[key]), key
                assert tokenizer.decode(doc.tolist()) == rendered_text(metas[key]), key
                seen.append(key)
    loader.close()
    assert sorted(seen) == sorted(metas)  # every sample trains (FOREIGN is plain text here)
    assert loader.totals.sample_errors == 0 and loader.totals.skipped_too_long == 0


def test_a_text_that_would_still_be_a_control_id_is_refused_and_counted(elsewhere, synthetic, caplog):
    tok = load_tokenizer(synthetic / "tokenizer")
    assert tok.add_tokens([FOREIGN]) == 1  # an added token that is not special
    template = ChatTemplate(tok)
    with pytest.raises(ControlTokenError, match="<think>"):
        template.render({"kind": "text", "text": f"a {FOREIGN} b", "images": []})

    cfg = LoaderConfig(
        path=str(elsewhere),
        seq_len=1024,
        micro_batch_size=2,
        num_workers=0,
        repeat=False,
        packing_buffer_size=16,
        shuffle_buffer_size=8,
        max_samples_per_sequence=8,
    )
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        loader = NeoDataLoader(cfg, tokenizer=tok)
        keys = [k for _ in loader for row in loader.last.keys for k in row]
        loader.close()
    all_keys = [key for key, _, _ in read_shards(elsewhere)]
    refused = all_keys[3]
    assert sorted(keys) == sorted(set(all_keys) - {refused})
    assert loader.totals.sample_errors == 1
    (line,) = [r.getMessage() for r in caplog.records if "skipping sample" in r.getMessage()]
    assert refused in line and "ControlTokenError" in line and "'<think>'" in line
