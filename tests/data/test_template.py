"""Template, labels and loss mask on hand-checked samples; image blocks and patches on real shards."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.data.images import ImageError, decode_image, image_patches
from pretrain.data.task_encoder import NeoTaskEncoder, encode_document
from pretrain.data.template import ChatTemplate
from pretrain.model.vision_embed import normalize_image
from tests.data.conftest import png_bytes

BLOCK = "<img>{}</img>"


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def sp(tok, token: str) -> int:
    return tok.convert_tokens_to_ids(token)


def check_shift(doc, pad_id: int, supervised_tokens: np.ndarray) -> None:
    """labels = next token inside the document; loss_mask[i] <=> token i+1 is supervised."""
    assert doc.labels[:-1].tolist() == doc.tokens[1:].tolist()
    assert doc.labels[-1] == pad_id and not doc.loss_mask[-1]
    assert doc.loss_mask[:-1].tolist() == supervised_tokens[1:].tolist()


def image_entry(h: int, w: int) -> dict:
    return {
        "orig_size": [h, w],
        "size": [h, w],
        "grid": [h // 32, w // 32],
        "num_tokens": (h // 32) * (w // 32),
    }


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return NeoTaskEncoder(tokenizer, seq_len=4096)


def test_conversation_with_system_turn(tokenizer, encoder):
    tok = tokenizer
    meta = {
        "kind": "conversation",
        "conversations": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "<image>\nWhich color does the square have?"},
            {"role": "assistant", "content": "blue"},
        ],
        "images": [image_entry(64, 96)],
    }
    doc = encode_document(encoder, meta, [png_bytes(64, 96)])
    IS, IE = sp(tok, "<|im_start|>"), sp(tok, "<|im_end|>")
    nl = ids(tok, "\n")
    block = [sp(tok, "<img>")] + [sp(tok, "<IMG_CONTEXT>")] * 6 + [sp(tok, "</img>")]
    system = [IS] + ids(tok, "system\n") + ids(tok, "Answer in one word.") + [IE] + nl
    user = [IS] + ids(tok, "user\n") + block + ids(tok, "\nWhich color does the square have?") + [IE] + nl
    answer = ids(tok, "blue") + [IE] + nl
    assistant_head = [IS] + ids(tok, "assistant\n")
    expected = system + user + assistant_head + answer
    assert doc.tokens.tolist() == expected
    # The rendered string, decoded back: exactly ChatML with the image block expanded.
    text = tok.decode(doc.tokens.tolist())
    assert text == (
        "<|im_start|>system\nAnswer in one word.<|im_end|>\n"
        "<|im_start|>user\n"
        + BLOCK.format("<IMG_CONTEXT>" * 6)
        + "\nWhich color does the square have?<|im_end|>\n"
        "<|im_start|>assistant\nblue<|im_end|>\n"
    )
    # ... and tokenising that string in one go gives the same ids (piecewise tokenisation is exact here).
    assert ids(tok, text) == expected
    supervised = np.array([False] * (len(expected) - len(answer)) + [True] * len(answer))
    check_shift(doc, encoder.pad_id, supervised)
    # The last supervised targets are the answer, <|im_end|> and "\n"; nothing from system/user.
    targets = doc.labels[doc.loss_mask].tolist()
    assert targets == answer[:]
    assert tok.decode(targets) == "blue<|im_end|>\n"
    # Image layout: one image, its 6 context tokens carry image id 0.
    assert doc.image_grids.tolist() == [[2, 3]]
    ctx = doc.tokens == sp(tok, "<IMG_CONTEXT>")
    assert (doc.image_ids[ctx] == 0).all() and (doc.image_ids[~ctx] == -1).all() and ctx.sum() == 6
    assert doc.patches.shape == (4 * 6, 768)


def test_multi_turn_supervises_every_assistant_turn(tokenizer, encoder):
    tok = tokenizer
    meta = {
        "kind": "conversation",
        "conversations": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Count to two."},
            {"role": "assistant", "content": "1 2"},
        ],
        "images": [],
    }
    doc = encode_document(encoder, meta, [])
    assert doc.patches is None and doc.image_grids.shape == (0, 2)
    assert tok.decode(doc.labels[doc.loss_mask].tolist()) == "Hello.<|im_end|>\n1 2<|im_end|>\n"
    # Unsupervised targets are exactly the system/user turns and the assistant headers.
    unsup = tok.decode(doc.labels[:-1][~doc.loss_mask[:-1]].tolist())
    assert (
        unsup
        == "user\nHi<|im_end|>\n<|im_start|>assistant\n<|im_start|>user\nCount to two.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_multi_image_blocks_follow_tags_and_grids(tokenizer, encoder):
    tok = tokenizer
    meta = {
        "kind": "conversation",
        "conversations": [
            {"role": "user", "content": "<image>\n<image>\nWhich has more shapes?"},
            {"role": "assistant", "content": "first"},
        ],
        "images": [image_entry(64, 64), image_entry(96, 192)],
    }
    doc = encode_document(encoder, meta, [png_bytes(64, 64, 1), png_bytes(96, 192, 2)])
    tokens = doc.tokens
    ctx_id = sp(tok, "<IMG_CONTEXT>")
    starts = np.flatnonzero(tokens == sp(tok, "<img>"))
    ends = np.flatnonzero(tokens == sp(tok, "</img>"))
    assert len(starts) == len(ends) == 2
    for i, (s, e, n) in enumerate(zip(starts, ends, (4, 18))):
        assert e - s - 1 == n
        assert (tokens[s + 1 : e] == ctx_id).all() and (doc.image_ids[s + 1 : e] == i).all()
    assert (doc.image_ids[tokens != ctx_id] == -1).all()
    assert doc.image_grids.tolist() == [[2, 2], [3, 6]]
    assert doc.patches.shape == (4 * (4 + 18), 768)
    assert tok.decode(tokens[ends[0] + 1 : starts[1]].tolist()) == "\n"


def test_caption_image_then_supervised_caption_and_eos(tokenizer, encoder):
    tok = tokenizer
    caption = "A red circle on a white background."
    meta = {"kind": "caption", "text": caption, "images": [image_entry(32, 64)]}
    doc = encode_document(encoder, meta, [png_bytes(32, 64)])
    eos = tok.eos_token_id
    block = [sp(tok, "<img>")] + [sp(tok, "<IMG_CONTEXT>")] * 2 + [sp(tok, "</img>")]
    expected = block + ids(tok, caption) + [eos]
    assert doc.tokens.tolist() == expected
    supervised = np.array([False] * len(block) + [True] * (len(expected) - len(block)))
    check_shift(doc, encoder.pad_id, supervised)
    assert doc.labels[doc.loss_mask].tolist() == ids(tok, caption) + [eos]
    assert doc.loss_mask[len(block) - 1]  # "</img>" predicts the first caption token


def test_text_all_supervised_with_eos(tokenizer, encoder):
    tok = tokenizer
    text = "Two plus three is five, written 5."
    doc = encode_document(encoder, {"kind": "text", "text": text, "images": []}, [])
    expected = ids(tok, text) + [tok.eos_token_id]
    assert doc.tokens.tolist() == expected
    check_shift(doc, encoder.pad_id, np.ones(len(expected), dtype=bool))
    assert doc.loss_mask.sum() == len(expected) - 1
    assert doc.image_grids.shape == (0, 2) and doc.patches is None


def test_generation_prompt(tokenizer):
    tok = tokenizer
    template = ChatTemplate(tok)
    meta = {
        "kind": "conversation",
        "conversations": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>\nWhat shape?"},
            {"role": "assistant", "content": "circle"},
        ],
        "images": [image_entry(64, 32)],
    }
    from pretrain.data import build_prompt

    prompt = build_prompt(template, meta, [png_bytes(64, 32)])
    assert tok.decode(prompt.tokens.tolist()) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        + BLOCK.format("<IMG_CONTEXT>" * 2)
        + "\nWhat shape?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.tokens.dtype == torch.long and prompt.image_ids.shape == prompt.tokens.shape
    assert prompt.image_grids.tolist() == [[2, 1]]
    assert (prompt.image_ids >= 0).sum() == 2 and prompt.patches.shape == (8, 768)
    # Caption samples prompt with their image block alone; text samples have no prompt.
    cap = build_prompt(
        template, {"kind": "caption", "text": "x", "images": [image_entry(32, 32)]}, [png_bytes(32, 32)]
    )
    assert tok.decode(cap.tokens.tolist()) == BLOCK.format("<IMG_CONTEXT>")
    with pytest.raises(ValueError, match="kind 'text'"):
        build_prompt(template, {"kind": "text", "text": "x", "images": []}, [])


def shard_samples(data_dir):
    for shard in sorted(data_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for m in tar:
                key, _, suffix = m.name.partition(".")
                members.setdefault(key, {})[suffix] = tar.extractfile(m).read()
        yield from members.items()


def test_real_shards_image_blocks_match_json(synthetic, tokenizer, encoder):
    """Every synthetic sample: one block per image with the JSON's num_tokens, its grid, and
    4 * grid cells patches; patch k is the k-th 16x16 tile row-major of the normalised image."""
    ctx_id, start_id = sp(tokenizer, "<IMG_CONTEXT>"), sp(tokenizer, "<img>")
    kinds = set()
    checked_pixels = False
    for key, parts in shard_samples(synthetic):
        meta = json.loads(parts["json"])
        kinds.add((meta["kind"], len(meta["images"])))
        images = [parts[f"img{i}.jpg"] for i in range(len(meta["images"]))]
        doc = encode_document(encoder, meta, images, key)
        assert (doc.tokens == ctx_id).sum() == meta["num_image_tokens"]
        assert (doc.tokens == start_id).sum() == len(meta["images"])
        assert doc.image_grids.tolist() == [e["grid"] for e in meta["images"]]
        for i, e in enumerate(meta["images"]):
            assert (doc.image_ids == i).sum() == e["num_tokens"]
        cells = sum(e["num_tokens"] for e in meta["images"])
        assert (doc.patches is None) == (cells == 0)
        if cells:
            assert doc.patches.shape == (4 * cells, 768)
        if cells and not checked_pixels:
            pixels = normalize_image(Image.open(io.BytesIO(images[0])))
            gh, gw = meta["images"][0]["grid"]
            for k in (0, 1, 2 * gw, 4 * gh * gw - 1):  # first, second, next patch row, last
                r, c = divmod(k, 2 * gw)
                tile = pixels[:, 16 * r : 16 * r + 16, 16 * c : 16 * c + 16].reshape(-1)
                assert torch.equal(doc.patches[k], tile)
            checked_pixels = True
    assert {("caption", 1), ("conversation", 1), ("conversation", 2), ("text", 0)} <= kinds


def test_image_checks():
    data = png_bytes(64, 96)
    assert decode_image(data, [64, 96]).size == (96, 64)
    with pytest.raises(ImageError, match="recorded 64x64"):
        decode_image(data, [64, 64])
    with pytest.raises(ImageError, match="cannot decode"):
        decode_image(data[: len(data) // 2], [64, 96])
    with pytest.raises(ImageError, match="cannot decode"):
        decode_image(b"GIF89a" + bytes(100), [64, 96])
    with pytest.raises(ImageError, match="token grid"):
        image_patches(decode_image(data, [64, 96]), [3, 2])


def test_template_rejects_inconsistent_samples(tokenizer):
    template = ChatTemplate(tokenizer)
    conv = {"kind": "conversation", "conversations": [{"role": "user", "content": "<image>"}], "images": []}
    with pytest.raises(ValueError, match="more <image> tags"):
        template.render(conv)
    bad_grid = {
        "kind": "caption",
        "text": "x",
        "images": [{"size": [64, 64], "grid": [2, 2], "num_tokens": 5}],
    }
    with pytest.raises(ValueError, match="does not match grid"):
        template.render(bad_grid)
