"""Read the metrics a W&B offline run recorded, from its ``.wandb`` file (no network, no log grep).

The file is W&B's record log: a 7-byte header (":W&B", magic, version), then LevelDB-style
32 KiB blocks of chunks (crc32 4 bytes, length 2, type 1: full/first/middle/last) carrying
protobuf ``Record`` messages. Recent wandb versions dropped their Python reader, so the tests
carry this small one.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER, CHUNK_HEADER = 32768, 7, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = HEADER, b""
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if length == 0 and kind == 0:
            pos += left  # zero padding up to the next block
            continue
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def history(run_dir: Path) -> list[dict]:
    """Every logged row of the (single) offline run under ``run_dir/wandb``, in order."""
    files = sorted(Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb"))
    rows = []
    for f in files:
        for rec in records(f):
            if rec.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows
