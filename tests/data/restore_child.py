"""Child process for the restore test: a FRESH interpreter restores loader states and writes the
batches that follow. Usage: python -m tests.data.restore_child SPEC.json OUT.pt"""

from __future__ import annotations

import json
import sys

import torch


def main(spec_path: str, out_path: str) -> None:
    from pretrain.data import LoaderConfig, NeoDataLoader

    results = {}
    with open(spec_path) as f:
        runs = json.load(f)
    for run in runs:
        loader = NeoDataLoader(LoaderConfig(**run["config"]), dp_rank=run["dp_rank"], dp_size=run["dp_size"])
        with open(run["state"]) as f:
            loader.load_state_dict(json.load(f))
        batches = []
        for _ in range(run["batches"]):
            batch = next(loader)
            batches.append({"keys": loader.last.keys, **{k: v for k, v in vars(batch).items()}})
        results[run["name"]] = {"batches": batches, "stats": vars(loader.totals)}
        loader.close()
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
