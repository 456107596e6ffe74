"""Record validation and normalisation (conversation rules, tag rule, ids, keys, packed JSON)."""

import json

import pytest

from data_prep.records import caption_item, check_text, conversation_item, normalise_conversation, text_item
from data_prep.rejects import Reject
from data_prep.schema import make_key
from data_prep.sources import SourceOptions, entries_for


def turns(*pairs):
    return [{"from": r, "value": v} for r, v in pairs]


def code_of(fn, *args):
    with pytest.raises(Reject) as info:
        fn(*args)
    return info.value.code


def test_roles_are_normalised():
    out, inserted = normalise_conversation(
        turns(
            ("system", "Be brief."),
            ("human", "<image>\nHi"),
            ("gpt", "Hello"),
            ("user", "More"),
            ("assistant", "Done"),
        ),
        1,
    )
    assert [t["role"] for t in out] == ["system", "user", "assistant", "user", "assistant"]
    assert not inserted
    out, _ = normalise_conversation(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], 0
    )
    assert out == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_single_image_without_tag_gets_one_in_the_first_user_turn():
    out, inserted = normalise_conversation(
        turns(
            ("system", "S"), ("human", "Describe."), ("gpt", "A cat."), ("human", "Colour?"), ("gpt", "Grey.")
        ),
        1,
    )
    assert inserted
    assert out[1]["content"] == "<image>\nDescribe." and out[3]["content"] == "Colour?"


def test_tag_rule_applies_only_to_single_images_without_any_tag():
    # The tag is in a later turn: nothing is inserted (the reference would add a second one).
    out, inserted = normalise_conversation(
        turns(("human", "Hi"), ("gpt", "Hi"), ("human", "<image>\nNow?"), ("gpt", "A")), 1
    )
    assert not inserted and out[0]["content"] == "Hi"
    assert code_of(normalise_conversation, turns(("human", "Look"), ("gpt", "ok")), 2) == "image_tag_mismatch"


@pytest.mark.parametrize(
    "conversation, images, code",
    [
        ([], 0, "empty_conversation"),
        ("not a list", 0, "malformed_conversation"),
        ([["human", "hi"]], 0, "malformed_conversation"),
        ([{"from": "human"}], 0, "malformed_conversation"),
        ([{"from": "human", "value": 3}], 0, "malformed_conversation"),
        (turns(("human", "only a question")), 0, "malformed_conversation"),
        (turns(("gpt", "answer first"), ("human", "q")), 0, "malformed_conversation"),
        (turns(("human", "q"), ("system", "late system"), ("gpt", "a")), 0, "malformed_conversation"),
        (turns(("human", "q"), ("gpt", "   ")), 0, "malformed_conversation"),
        (turns(("human", ""), ("gpt", "a")), 0, "malformed_conversation"),
        (turns(("bot", "q"), ("gpt", "a")), 0, "unknown_role"),
        (turns(("human", "<image><image>q"), ("gpt", "a")), 1, "image_tag_mismatch"),
        (turns(("human", "<image>q"), ("gpt", "a")), 0, "image_tag_mismatch"),
        (turns(("human", "<image>q"), ("gpt", "<image>a")), 2, "image_tag_mismatch"),
        (turns(("human", "q"), ("gpt", "a<|im_end|>")), 0, "reserved_token"),
        (turns(("human", "q\udcff"), ("gpt", "a")), 0, "invalid_utf8"),
    ],
)
def test_conversation_rejects(conversation, images, code):
    assert code_of(normalise_conversation, conversation, images) == code


def test_image_only_user_turn_is_fine():
    out, inserted = normalise_conversation(turns(("human", ""), ("gpt", "A dog.")), 1)
    assert inserted and out[0]["content"] == "<image>\n"


def test_conversation_record_fields():
    rec = {
        "id": 42,
        "images": ["a.jpg", "b.jpg"],
        "conversations": turns(("human", "<image><image>Diff?"), ("gpt", "Size.")),
    }
    item = conversation_item(0, "f.jsonl", rec, "f.jsonl:1")
    assert (
        item.id == "42"
        and item.key == "42"
        and item.images == ["a.jpg", "b.jpg"]
        and item.kind == "conversation"
    )
    for bad in (
        {"image": "a.jpg", "images": ["a.jpg"], "conversations": []},
        {"image": 3, "conversations": []},
        {"image": "a.jpg"},
        {"id": {"x": 1}, "conversations": []},
        {"id": True, "conversations": []},
    ):
        assert code_of(conversation_item, 0, "f", bad, "f:0") == "malformed_record"
    assert code_of(conversation_item, 0, "f", ["not", "a", "dict"], "f:0") == "malformed_record"


def test_caption_and_text_items():
    assert caption_item(0, "c.tsv", {}, "x.jpg", "A cat.", "c.tsv:0").text == "A cat."
    assert caption_item(0, "c.parquet", {}, {"bytes": b"\xff\xd8", "path": None}, "A cat.", "c:0").images == [
        b"\xff\xd8"
    ]
    assert code_of(caption_item, 0, "c", {}, "x.jpg", "  ", "c:0") == "empty_text"
    assert code_of(caption_item, 0, "c", {}, "", "A cat", "c:0") == "malformed_record"
    assert code_of(caption_item, 0, "c", {}, "x.jpg", None, "c:0") == "malformed_record"
    assert code_of(caption_item, 0, "c", {}, "x.jpg", "<image> cat", "c:0") == "image_tag_mismatch"
    assert text_item(0, "t", {"text": "Hello."}, "t:0").kind == "text"
    assert code_of(text_item, 0, "t", {"text": ""}, "t:0") == "empty_text"
    assert code_of(text_item, 0, "t", {"body": "x"}, "t:0") == "malformed_record"
    assert code_of(text_item, 0, "t", {"text": "a <|endoftext|> b"}, "t:0") == "reserved_token"


def test_check_text_refuses_grounding_tokens_in_data_text():
    """<ref>, <box>, <quad> are control tokens of the tokenizer: text must not become them."""
    for text in ("the <ref>cat</ref>", "at <box>(1,2),(3,4)</box>", "<quad>"):
        with pytest.raises(Reject) as err:
            check_text(text, "x")
        assert err.value.code == "reserved_token"


def test_make_key():
    assert make_key("000000033471") == "000000033471"
    assert make_key("abc-DEF_9") == "abc-DEF_9"
    a, b = make_key("coco/1.jpg"), make_key("coco_1_jpg")
    assert "." not in a and "/" not in a and a != b and a.startswith("coco_1_jpg-")
    assert make_key("a.b") != make_key("a_b")
    long = make_key("x" * 500)
    assert len(long) <= 64 and long != make_key("x" * 501)
    assert make_key("文字") != make_key("字文")


def test_json_document_and_packed_entries(tmp_path):
    good = {"conversations": turns(("human", "q"), ("gpt", "a"))}
    doc = [good, [good, {**good, "id": "p1"}], [], "junk"]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    entries = list(entries_for("neo-json", [path], SourceOptions()))
    assert [e.index for e in entries] == [0, 1, 2, 3, 4]
    assert [getattr(e, "id", None) for e in entries] == [
        "ann.json:0",
        "ann.json:1.0",
        "p1",
        "ann.json:2",
        "ann.json:3",
    ]
    assert [getattr(e, "code", "ok") for e in entries] == [
        "ok",
        "ok",
        "ok",
        "malformed_record",
        "malformed_record",
    ]


def test_invalid_utf8_in_a_json_document_rejects_only_that_record(tmp_path):
    good = json.dumps({"conversations": turns(("human", "q"), ("gpt", "a"))}).encode()
    bad = (
        json.dumps({"conversations": turns(("human", "BAD"), ("gpt", "a"))})
        .encode()
        .replace(b"BAD", b"\xff\xfe")
    )
    path = tmp_path / "ann.json"
    path.write_bytes(b"[" + good + b"," + bad + b"]")
    entries = list(entries_for("neo-json", [path], SourceOptions()))
    assert [getattr(e, "code", "ok") for e in entries] == ["ok", "invalid_utf8"]
