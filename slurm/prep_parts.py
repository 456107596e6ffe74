"""Which parts of a partitioned data_prep build are complete, read from the file system alone.

``python -m data_prep build ... --output OUT --parts N --part I`` builds part I into
``OUT/parts/part-IIIII/`` and writes its ``manifest.json`` last: its presence means the part is
complete, whatever SLURM says about the task that built it. ``python -m data_prep merge OUT``
writes ``OUT/manifest.json`` last and then removes ``parts/``: a merged build has all its parts.
``slurm.submit_prep --missing`` and ``slurm.status`` both go by this, so that a part is
resubmitted exactly when it is not there. (data_prep's merge checks more: sizes, same build.)
"""

from __future__ import annotations

from pathlib import Path

from data_prep.manifest import MANIFEST_NAME
from data_prep.parts import part_dir


def merged(output: Path) -> bool:
    return (Path(output) / MANIFEST_NAME).is_file()


def complete_parts(output: Path, parts: int) -> list[int]:
    if merged(output):
        return list(range(parts))
    return [i for i in range(parts) if (part_dir(output, i) / MANIFEST_NAME).is_file()]


def missing_parts(output: Path, parts: int) -> list[int]:
    done = set(complete_parts(output, parts))
    return [i for i in range(parts) if i not in done]
