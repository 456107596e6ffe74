"""Energon metadata for a finished build (`.nv-meta/` and a `.tar.idx` per shard).

Runs the real `energon prepare` CLI non-interactively in a child process: it forks its own
indexing pool, prints a sample preview and may call sys.exit, none of which belongs in ours.
It reads every tar header, so a truncated shard makes the build fail here, loudly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ENERGON_ARGS = (
    "--non-interactive",
    "--split-ratio",
    "1,0,0",
    "--sample-type",
    "CrudeWebdataset",
    "--no-progress",
)


class EnergonPrepareError(RuntimeError):
    pass


def energon_prepare(directory: Path, num_shards: int, timeout: float = 3600) -> None:
    workers = max(1, min(num_shards, os.cpu_count() or 1, 8))
    cmd = [
        sys.executable,
        "-m",
        "megatron.energon.cli.main",
        "prepare",
        str(directory),
        *ENERGON_ARGS,
        "--num-workers",
        str(workers),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnergonPrepareError(f"energon prepare could not run: {exc}") from None
    if proc.returncode != 0 or not (Path(directory) / ".nv-meta" / "dataset.yaml").is_file():
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise EnergonPrepareError(f"energon prepare failed (exit {proc.returncode}):\n{tail}")
