"""The synthetic data set: deterministic, disjoint splits, answers that are right and need the image."""

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from data_prep.cli import main
from data_prep.synthetic import (
    ANSWER_HINT,
    COLORS,
    DEFAULT_MIX,
    QA_TYPES,
    SYNTHETIC_MAX_PIXELS,
    SYNTHETIC_MIN_PIXELS,
    caption_for,
    make_items,
    parse_mix,
    render_scene,
    scene_fingerprint,
    split_of,
)
from tests.data_prep.helpers import read_samples


def expected_answer(item):
    """Recompute the answer from the scene, independently of the generator's own logic."""
    question = item.conversations[0]["content"]
    scenes = item.extra["scenes"]
    if item.extra["qa_type"] == "compare":
        a, b = (len(s["objects"]) for s in scenes)
        return "first" if a > b else "second"
    objs = scenes[0]["objects"]
    for shape in ("circle", "square", "triangle", "diamond"):
        if f"the {shape}?" in question or f"the {shape} have?" in question:
            (o,) = [o for o in objs if o["shape"] == shape]
            return o["color"]
    for color in COLORS:
        if f"the {color} object?" in question or f"shape is {color}?" in question:
            (o,) = [o for o in objs if o["color"] == color]
            return o["shape"]
        for shape in ("circle", "square", "triangle", "diamond"):
            if f"the {color} {shape} on the left" in question:
                (o,) = [o for o in objs if o["color"] == color and o["shape"] == shape]
                return "left" if o["cx"] < scenes[0]["w"] / 2 else "right"
            if f"the {color} {shape} at the top" in question:
                (o,) = [o for o in objs if o["color"] == color and o["shape"] == shape]
                return "top" if o["cy"] < scenes[0]["h"] / 2 else "bottom"
        if f"How many {color} shapes" in question:
            return str(sum(o["color"] == color for o in objs))
    for shape in ("circle", "square", "triangle", "diamond"):
        if f"How many {shape}s" in question:
            return str(sum(o["shape"] == shape for o in objs))
    if "How many shapes" in question:
        return str(len(objs))
    raise AssertionError(f"unrecognised question {question!r}")


@pytest.fixture(scope="module")
def train_items():
    return make_items(400, 7, "train", DEFAULT_MIX)


def test_deterministic_by_seed(train_items):
    again = make_items(50, 7, "train", DEFAULT_MIX)
    assert [i.__dict__ for i in again] == [i.__dict__ for i in train_items[:50]]
    other = make_items(50, 8, "train", DEFAULT_MIX)
    assert [i.extra for i in other] != [i.extra for i in train_items[:50]]


def test_heldout_never_overlaps_train(train_items):
    heldout = make_items(400, 7, "heldout", DEFAULT_MIX) + make_items(100, 123, "heldout", DEFAULT_MIX)

    def content(items):
        scenes = {scene_fingerprint(s) for i in items for s in i.extra.get("scenes", [])}
        texts = {i.text for i in items if i.kind == "text"}
        return scenes, texts

    train_scenes, train_texts = content(train_items)
    held_scenes, held_texts = content(heldout)
    assert train_scenes and held_scenes and train_texts and held_texts
    assert not train_scenes & held_scenes and not train_texts & held_texts
    assert all(split_of(f) == "heldout" for f in held_scenes)
    assert all(split_of(f) == "train" for f in train_scenes)


def test_answers_are_correct_one_word_and_cover_every_type(train_items):
    convs = [i for i in train_items if i.kind == "conversation"]
    assert Counter(i.extra["qa_type"] for i in convs).keys() == set(QA_TYPES)
    for item in convs:
        answer = item.extra["answer"]
        assert item.conversations[1]["content"] == answer and len(answer.split()) == 1
        assert expected_answer(item) == answer, item.conversations
        assert item.conversations[0]["content"].count("<image>") == len(item.images)
    kinds = Counter(i.kind for i in train_items)
    assert set(kinds) == {"caption", "conversation", "text"}
    assert kinds["conversation"] > kinds["caption"] > kinds["text"]


def test_answer_hint_is_the_only_difference_without_it(train_items):
    plain = make_items(len(train_items), 7, "train", DEFAULT_MIX, answer_hint=False)
    asked = 0
    for with_hint, without in zip(train_items, plain):
        assert (with_hint.extra, with_hint.text) == (without.extra, without.text)
        if with_hint.kind == "conversation":
            question = with_hint.conversations[0]["content"]
            assert question.endswith(ANSWER_HINT) and ANSWER_HINT not in without.conversations[0]["content"]
            assert without.conversations[0]["content"] == question[: -len(ANSWER_HINT)]
            assert without.conversations[1] == with_hint.conversations[1]
            asked += 1
    assert asked > 100


def test_images_show_what_the_text_says(train_items):
    sizes = set()
    for item in train_items[:120]:
        for scene in item.extra.get("scenes", []):
            img = Image.open(io.BytesIO(render_scene(scene)))
            assert img.size == (scene["w"], scene["h"]) and 64 <= min(img.size) and max(img.size) <= 256
            sizes.add(round(scene["w"] / scene["h"], 1))
            arr = np.asarray(img.convert("RGB"))
            for o in scene["objects"]:
                assert tuple(arr[o["cy"], o["cx"]]) == COLORS[o["color"]]
            if item.kind == "caption":
                assert item.text == caption_for(scene)
                for o in scene["objects"]:
                    assert f"{o['color']} {o['shape']}" in item.text
    assert len(sizes) >= 5  # many aspect ratios


def test_parse_mix():
    assert parse_mix(None) == DEFAULT_MIX
    assert parse_mix("conversation=1") == {"caption": 0.0, "conversation": 1.0, "text": 0.0}
    for bad in ("pictures=1", "caption=-1", "caption=0"):
        with pytest.raises(ValueError):
            parse_mix(bad)
    items = make_items(30, 1, "train", parse_mix("caption=1"))
    assert {i.kind for i in items} == {"caption"}


def test_synthetic_cli_builds_a_self_contained_data_set(tmp_path):
    train = tmp_path / "train"
    common = ["--seed", "2", "--workers", "1", "--no-energon", "--no-progress"]
    assert main(["synthetic", "--output", str(train), "--num", "30", "--vocab-size", "600", *common]) == 0
    out = tmp_path / "heldout"
    heldout = [
        "--output",
        str(out),
        "--num",
        "40",
        "--split",
        "heldout",
        "--no-answer-hint",
        "--tokenizer",
        str(train / "tokenizer"),
    ]
    assert main(["synthetic", *heldout, *common]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):  # one vocabulary for both splits
        assert (out / "tokenizer" / name).read_bytes() == (train / "tokenizer" / name).read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["written"] == 40 and manifest["counts"]["rejected"] == 0
    assert manifest["build"]["image"]["min_pixels"] == SYNTHETIC_MIN_PIXELS
    assert manifest["build"]["image"]["max_pixels"] == SYNTHETIC_MAX_PIXELS
    assert manifest["build"]["generator"]["split"] == "heldout"
    assert manifest["build"]["generator"]["answer_hint"] is False
    assert manifest["stats"]["text_tokens_per_sample"]["count"] == 40
    for parts in read_samples(out).values():
        sample = json.loads(parts["json"])
        assert sample["id"].startswith("synthetic-heldout-s2-") and sample["text_tokens"] > 0
        assert all(ANSWER_HINT not in turn["content"] for turn in sample.get("conversations", []))
        for info in sample["images"]:
            h, w = info["size"]
            assert SYNTHETIC_MIN_PIXELS <= h * w <= SYNTHETIC_MAX_PIXELS and h % 32 == 0 and w % 32 == 0

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == 1 and tok.eos_token_id == tok.pad_token_id == 0
    assert tok.decode(tok("A red circle on the left.")["input_ids"]) == "A red circle on the left."
