"""Shared helpers for the data_prep tests: real image files of every awkward kind, small builds."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_prep.build import BuildOptions, run_build
from data_prep.cli import main
from data_prep.images import ImageOptions
from data_prep.sources import SourceOptions, entries_for

def run_cli(*args) -> subprocess.CompletedProcess:
    """``python -m data_prep ARGS`` in a new process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def cli(capsys, *args) -> tuple[int, str, str]:
    """``data_prep.cli.main`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(stderr: str, command: str = "build") -> str:
    """The single line a failed ``data_prep COMMAND`` prints (asserted: one line, no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"data_prep {command}: error: "), lines[0]
    return lines[0]


# Small budgets keep every test image tiny (a 96x64 image stays 96x64).
SMALL = dict(min_pixels=32 * 32, max_pixels=256 * 256)


def noise_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def jpeg(width: int = 96, height: int = 64, color=(200, 40, 40), **kwargs) -> bytes:
    return encode(Image.new("RGB", (width, height), color), "JPEG", quality=95, **kwargs)


def exif_rotated_jpeg(width: int = 96, height: int = 64, orientation: int = 6) -> bytes:
    """A landscape-stored JPEG whose EXIF says 'rotate 90 degrees' (as phone cameras write)."""
    img = Image.new("RGB", (width, height), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, width // 2, height))  # left half red in storage order
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    lines = []
    for r in records:
        lines.append(r if isinstance(r, bytes) else json.dumps(r).encode("utf-8"))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def conv(images: Any, question: str = "<image>\nWhat is this?", answer: str = "A thing.", **extra) -> dict:
    record = {
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        **extra,
    }
    if images is not None:
        record["image"] = images
    return record


def build(
    fmt: str,
    annotations: list[Path],
    output: Path,
    *,
    image_root: Path | None = None,
    workers: int = 1,
    energon: bool = False,
    source_options: SourceOptions | None = None,
    tokenizer: Path | None = None,
    shard_max_samples: int = 10_000,
    shard_max_bytes: int = 1 << 30,
    overwrite: bool = False,
    **image_kwargs,
) -> dict:
    """Run a real build through the same code as the CLI; returns the manifest."""
    image = ImageOptions(**{**SMALL, **image_kwargs})
    options = BuildOptions(
        image=image,
        image_root=str(image_root) if image_root else None,
        workers=workers,
        progress=False,
        energon=energon,
        tokenizer=str(tokenizer) if tokenizer else None,
        shard_max_samples=shard_max_samples,
        shard_max_bytes=shard_max_bytes,
        overwrite=overwrite,
    )
    entries = entries_for(fmt, annotations, source_options or SourceOptions())
    return run_build(entries, output, options, {"command": "test", "source_format": fmt}).manifest


def read_rejects(output: Path) -> list[dict]:
    with open(output / "rejects.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_samples(output: Path) -> dict[str, dict[str, bytes]]:
    """Every sample as {key: {suffix: bytes}}, read with the standard library's tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(output.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, suffix = member.name.partition(".")
                samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return samples


def sample_json(output: Path) -> list[dict]:
    return [json.loads(parts["json"]) for parts in read_samples(output).values()]
