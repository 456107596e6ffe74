"""Acceptance 2: every stored sample read back with plain webdataset and with Energon equals
what was written (image bytes decode to the recorded size, JSON intact)."""

import io
import json
import warnings

import pytest
from PIL import Image

from data_prep.cli import main
from data_prep.schema import validate_sample
from tests.data_prep.energon_reader import read_with_energon
from tests.data_prep.helpers import build, conv, exif_rotated_jpeg, jpeg, read_samples, write, write_jsonl


def check_sample(parts: dict[str, bytes], ext: str) -> dict:
    sample = json.loads(parts["json"].decode("utf-8"))
    assert validate_sample(sample) == []
    assert set(parts) == {"json"} | {f"img{i}.{ext}" for i in range(len(sample["images"]))}
    for i, info in enumerate(sample["images"]):
        img = Image.open(io.BytesIO(parts[f"img{i}.{ext}"]))
        img.load()
        assert img.mode == "RGB" and [img.height, img.width] == info["size"]
        assert info["size"][0] % 32 == 0 and info["size"][1] % 32 == 0
    return sample


def read_with_webdataset(output):
    import webdataset as wds

    urls = [str(p) for p in sorted(output.glob("*.tar"))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)  # no decoders: raw bytes
        return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")} for s in dataset}


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "synthetic"
    argv = ["synthetic", "--output", str(out), "--num", "60", "--seed", "3", "--workers", "2"]
    assert main([*argv, "--shard-max-samples", "25", "--no-progress"]) == 0
    return out


def test_synthetic_round_trip_webdataset_and_energon(synthetic_dir):
    written = read_samples(synthetic_dir)  # the bytes in the tars, read with tarfile
    assert len(written) == 60 and len(list(synthetic_dir.glob("*.tar"))) == 3
    via_wds = read_with_webdataset(synthetic_dir)
    via_energon = read_with_energon(synthetic_dir)
    assert list(via_wds) == list(written)  # same keys, same (input) order
    assert set(via_energon) == set(written)
    for key, parts in written.items():
        assert via_wds[key] == parts
        assert via_energon[key] == parts
        sample = check_sample(parts, "jpg")
        assert sample["id"] == key  # synthetic ids are already safe keys
    kinds = {json.loads(p["json"])["kind"] for p in written.values()}
    assert kinds == {"caption", "conversation", "text"}


def test_real_files_round_trip_png(tmp_path):
    root = tmp_path / "img"
    write(root / "a.jpg", jpeg(300, 200))
    write(root / "b.jpg", exif_rotated_jpeg(130, 70))
    ann = write_jsonl(
        tmp_path / "ann.jsonl",
        [
            conv("a.jpg", id="coco/000001.jpg"),
            conv(["a.jpg", "b.jpg"], question="<image> vs <image>?", id="pair"),
            conv(None, question="Just text?", id="t"),
        ],
    )
    out = tmp_path / "out"
    manifest = build("neo-json", [ann], out, image_root=root, energon=True, image_format="png")
    assert manifest["image_extension"] == "png" and manifest["counts"]["written"] == 3
    written = read_samples(out)
    via_wds, via_energon = read_with_webdataset(out), read_with_energon(out)
    assert via_wds == written and via_energon == written
    samples = {s["id"]: s for s in (check_sample(p, "png") for p in written.values())}
    assert samples["pair"]["images"][1]["orig_size"] == [130, 70]  # EXIF-upright
    key = next(k for k, p in written.items() if json.loads(p["json"])["id"] == "coco/000001.jpg")
    assert "." not in key and "/" not in key
