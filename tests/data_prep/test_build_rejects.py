"""Acceptance 1: every reject reason through a real build. No crash, the right reason, counts
reconcile (inputs = written + rejected) in the manifest and in rejects.jsonl."""

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.rejects import REASONS
from data_prep.sources import SourceOptions
from tests.data_prep.helpers import (
    build,
    conv,
    encode,
    exif_rotated_jpeg,
    jpeg,
    noise_rgb,
    read_rejects,
    sample_json,
    write,
    write_jsonl,
)


@pytest.fixture
def image_root(tmp_path):
    """A folder of real image files, good and bad."""
    root = tmp_path / "images"
    write(root / "good.jpg", jpeg(96, 64))
    write(root / "good2.png", encode(Image.new("RGB", (64, 64), (0, 200, 0)), "PNG"))
    write(root / "cmyk.jpg", encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG"))
    alpha = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    alpha.paste((0, 0, 0, 0), (0, 0, 32, 64))
    write(root / "alpha.png", encode(alpha, "PNG"))
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0, 255, 255, 0] + [0, 0, 0] * 254)
    write(root / "palette.gif", encode(palette, "GIF", transparency=0))
    write(root / "exif.jpg", exif_rotated_jpeg(96, 64))
    import numpy as np

    write(root / "gray16.png", encode(Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)), "PNG"))
    full = encode(noise_rgb(200, 200), "JPEG", quality=90)
    write(root / "truncated.jpg", full[: len(full) // 2])
    write(root / "text.jpg", b"definitely not a JPEG\n")
    write(root / "empty.jpg", b"")
    write(root / "wide.png", encode(Image.new("RGB", (30000, 2)), "PNG"))
    write(root / "bomb.png", encode(Image.new("RGB", (800, 800)), "PNG"))
    write(root / "float.tif", encode(Image.new("F", (32, 32), 0.5), "TIFF"))
    (root / "folder.jpg").mkdir()
    return root


def test_every_reject_reason_neo_json(tmp_path, image_root):
    ok = "<image>\nWhat is this?"
    records = [
        conv("good.jpg", id="ok-1"),  # written
        conv("good.jpg", question="Describe the picture.", id="ok-notag"),  # written, tag inserted
        conv(["good.jpg", "good2.png"], question="<image>\n<image>\nSame?", id="ok-two"),  # written
        conv(None, question="No image here?", id="ok-text-conv"),  # written, 0 images
        conv("cmyk.jpg", id="ok-cmyk"),
        conv("alpha.png", id="ok-alpha"),
        conv("palette.gif", id="ok-palette"),
        conv("exif.jpg", id="ok-exif"),
        conv("gray16.png", id="ok-gray16"),  # written
        [conv("good.jpg", id="packed-a"), conv("good2.png", id="packed-b")],  # 2 inputs, both written
        conv("missing.jpg", id="r-missing"),
        conv("folder.jpg", id="r-directory"),
        conv("truncated.jpg", id="r-truncated"),
        conv("text.jpg", id="r-text"),
        conv("empty.jpg", id="r-empty"),
        conv("wide.png", id="r-wide"),
        conv("bomb.png", id="r-bomb"),
        conv("float.tif", id="r-float"),
        conv(["good.jpg", "truncated.jpg"], question="<image><image>x", id="r-second-image-bad"),
        conv("good.jpg", question="<image><image>two tags", id="r-tags"),
        conv(None, question="<image>\nno image", id="r-tag-no-image"),
        {"id": "r-empty-conv", "image": "good.jpg", "conversations": []},
        {"id": "r-no-assistant", "image": "good.jpg", "conversations": [{"from": "human", "value": ok}]},
        {
            "id": "r-role",
            "image": "good.jpg",
            "conversations": [{"from": "robot", "value": ok}, {"from": "gpt", "value": "a"}],
        },
        conv("good.jpg", answer="a <|im_end|> b", id="r-reserved"),
        conv("good.jpg", id="ok-1"),  # duplicate key
        "a string, not a record",  # malformed_record
        [],  # empty packed entry
        b'{"id": "r-json", "image": "good.jpg", "conversations": [',  # malformed_json
        json.dumps(conv("good.jpg", question="<image>BAD", id="r-utf8"))
        .encode()
        .replace(b"BAD", b"\xc3\x28"),
    ]
    ann = write_jsonl(tmp_path / "ann.jsonl", records)
    out = tmp_path / "out"
    manifest = build("neo-json", [ann], out, image_root=image_root, max_image_pixels=500_000)

    expected = Counter(
        {
            "missing_image": 1,
            "not_a_regular_file": 1,
            "corrupt_image": 3,
            "zero_size": 1,
            "aspect_ratio": 1,
            "decompression_bomb": 1,
            "unsupported_image": 1,
            "image_tag_mismatch": 2,
            "empty_conversation": 1,
            "malformed_conversation": 1,
            "unknown_role": 1,
            "reserved_token": 1,
            "duplicate_key": 1,
            "malformed_record": 2,
            "malformed_json": 1,
            "invalid_utf8": 1,
        }
    )
    counts = manifest["counts"]
    assert counts["inputs"] == 11 + sum(expected.values()) == 31  # 30 lines, one packed pair
    assert counts["written"] == 11 and counts["rejected"] == sum(expected.values())
    assert counts["inputs"] == counts["written"] + counts["rejected"] and counts["reconciled"]
    assert counts["image_tag_inserted"] == 1
    assert manifest["rejects"] == {code: expected.get(code, 0) for code in REASONS}
    assert set(manifest["rejects"]) == set(REASONS)

    rejects = read_rejects(out)
    assert Counter(r["reason"] for r in rejects) == expected
    assert [r["index"] for r in rejects] == sorted(r["index"] for r in rejects)  # input order
    by_id = {r["id"]: r for r in rejects}
    assert (
        by_id["r-truncated"]["reason"] == "corrupt_image" and "truncated" in by_id["r-truncated"]["message"]
    )
    assert by_id["r-second-image-bad"]["message"].startswith("image 1:")
    assert by_id["ok-1"]["reason"] == "duplicate_key" and "#0" in by_id["ok-1"]["message"]
    assert by_id["r-bomb"]["reason"] == "decompression_bomb"
    assert by_id["r-wide"]["reason"] == "aspect_ratio"
    assert by_id["r-tags"]["record"]["id"] == "r-tags"  # the record itself is in the report
    assert by_id["ann.jsonl:30"]["reason"] == "invalid_utf8" and "\\xc3" in by_id["ann.jsonl:30"]["record"]

    samples = {s["id"]: s for s in sample_json(out)}
    assert set(samples) == {
        "ok-1",
        "ok-notag",
        "ok-two",
        "ok-text-conv",
        "ok-cmyk",
        "ok-alpha",
        "ok-palette",
        "ok-exif",
        "ok-gray16",
        "packed-a",
        "packed-b",
    }
    assert samples["ok-notag"]["conversations"][0]["content"] == "<image>\nDescribe the picture."
    assert samples["ok-notag"]["image_tag_inserted"] is True and "image_tag_inserted" not in samples["ok-1"]
    assert samples["ok-exif"]["images"][0]["orig_size"] == [96, 64]
    assert samples["ok-two"]["num_image_tokens"] == 6 + 4
    assert samples["ok-text-conv"]["images"] == [] and samples["ok-text-conv"]["num_image_tokens"] == 0


def test_captions_tsv_csv_parquet(tmp_path, image_root):
    tsv = tmp_path / "caps.tsv"
    tsv.write_bytes(
        b"url\tcaption\n"
        b'good.jpg\tA red "quoted" rectangle.\n'
        b"\n"  # blank line: not an input
        b"missing.jpg\tNothing.\n"
        b"good2.png\t   \n"  # empty caption
        b"good2.png\tone\ttoo many fields\n"  # malformed row
        b"good2.png\tBad \xff bytes\n"  # invalid UTF-8
        b"cmyk.jpg\tA CMYK square.\n"
    )
    manifest = build(
        "captions",
        [tsv],
        tmp_path / "tsv",
        image_root=image_root,
        source_options=SourceOptions(image_column="url"),
    )
    assert (manifest["counts"]["inputs"], manifest["counts"]["written"]) == (6, 2)
    assert {k: v for k, v in manifest["rejects"].items() if v} == {
        "missing_image": 1,
        "empty_text": 1,
        "malformed_record": 1,
        "invalid_utf8": 1,
    }
    texts = [s["text"] for s in sample_json(tmp_path / "tsv")]
    assert texts == ['A red "quoted" rectangle.', "A CMYK square."]  # exact text, in input order
    assert all(s["kind"] == "caption" and len(s["images"]) == 1 for s in sample_json(tmp_path / "tsv"))

    csv_path = tmp_path / "caps.csv"
    csv_path.write_text(
        'key,image,caption\nk1,good.jpg,"Comma, inside"\nk2,text.jpg,Broken\n', encoding="utf-8"
    )
    manifest = build(
        "captions",
        [csv_path],
        tmp_path / "csv",
        image_root=image_root,
        source_options=SourceOptions(id_column="key"),
    )
    assert manifest["counts"]["written"] == 1 and manifest["rejects"]["corrupt_image"] == 1
    assert [(s["id"], s["text"]) for s in sample_json(tmp_path / "csv")] == [("k1", "Comma, inside")]

    table = pa.table(
        {
            "image": [
                {"bytes": jpeg(64, 64), "path": None},
                {"bytes": None, "path": "good2.png"},
                {"bytes": b"garbage", "path": None},
                None,
            ],
            "caption": ["Embedded bytes.", "A path.", "Garbage.", "No image."],
        }
    )
    pq.write_table(table, tmp_path / "caps.parquet")
    manifest = build("captions", [tmp_path / "caps.parquet"], tmp_path / "pq", image_root=image_root)
    assert manifest["counts"]["written"] == 2
    assert {k: v for k, v in manifest["rejects"].items() if v} == {"corrupt_image": 1, "malformed_record": 1}
    garbage = [r for r in read_rejects(tmp_path / "pq") if r["reason"] == "corrupt_image"][0]
    assert garbage["record"]["image"]["bytes"]["__bytes__"] == 7  # bytes are summarised, not dumped


def test_text_only(tmp_path):
    ann = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"id": "a", "text": "Plain text sample."},
            {"id": "b", "text": ""},
            {"text": 5},
            {"id": "d", "text": "<image> x"},
            {"id": "e", "text": "Second good one."},
        ],
    )
    manifest = build("text", [ann], tmp_path / "out")
    assert manifest["counts"]["by_kind"] == {"caption": 0, "conversation": 0, "text": 2}
    assert {k: v for k, v in manifest["rejects"].items() if v} == {
        "empty_text": 1,
        "malformed_record": 1,
        "image_tag_mismatch": 1,
    }
    assert [s["text"] for s in sample_json(tmp_path / "out")] == ["Plain text sample.", "Second good one."]
    stats = manifest["stats"]
    assert stats["text_chars_per_sample"]["total"] == len("Plain text sample.") + len("Second good one.")
    assert stats["text_tokens_per_sample"] is None  # no --tokenizer given
    assert stats["image_tokens_per_sample"] == {
        "count": 2,
        "total": 0,
        "min": 0,
        "max": 0,
        "mean": 0.0,
        "p50": 0,
        "p90": 0,
        "p99": 0,
    }


def test_all_rejected_still_reconciles(tmp_path, image_root):
    ann = write_jsonl(tmp_path / "a.jsonl", [conv("missing.jpg", id="x"), conv("text.jpg", id="y")])
    manifest = build("neo-json", [ann], tmp_path / "out", image_root=image_root, energon=True)
    assert (
        manifest["counts"]["written"] == 0
        and manifest["counts"]["rejected"] == 2
        and manifest["shards"] == []
    )
    assert len(read_rejects(tmp_path / "out")) == 2
