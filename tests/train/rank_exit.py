"""``python -m tests.train.rank_exit OUT_DIR <pretrain.train overrides>``: ``pretrain.train``'s
``main`` in this very process, its exit code also written to ``OUT_DIR/rank_<RANK>``.

torchrun reports none of its processes' exit codes when it was signalled (it exits 1 with a
SignalException), so a test that wants to see every rank exit 85 launches this instead of
``-m pretrain.train``. Nothing else changes: no extra process, the same signal handlers, the same
data-loader workers under the same rank.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    out, overrides = Path(argv[0]), argv[1:]
    from pretrain.train import main as train_main

    code = 1  # an exception escaping main (a crash) counts as 1, as the interpreter would exit
    try:
        code = train_main(overrides)
    finally:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank_{os.environ.get('RANK', '0')}").write_text(f"{code}\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
