"""Training checkpoints that never lose a run.

One directory per step under ``checkpoint.dir``::

    step_00000120/
      model/        weights, megatron dist_checkpointing (reshardable to any TP/PP layout)
      optimizer/    DeepSpeed ZeRO state (fp32 master partitions, Adam moments, LR scheduler)
      data/dp_00000.json   Energon loader state of each data-parallel rank (+ the layout it needs)
      rng/rank_00000.pt    RNG states of every rank (CPU, CUDA, megatron's tracker)
      trainer.json  step, consumed samples, skip counters, W&B run id, layout
      config.yaml   the resolved run config;  tokenizer/  the tokenizer the run used
      manifest.json every file with its size and sha256 -- written LAST
    latest          name of the newest complete checkpoint -- written after the rename
    last_good.json  the checkpoint written last before a streak of skipped steps or a loss spike
                    (``pin_last_good``): rotation never deletes it

Atomicity: everything is written under ``step_N.tmp``; when every rank is done, rank 0 writes the
manifest, fsyncs, renames the directory to ``step_N`` and only then updates ``latest``. A directory
without a valid manifest is never loaded; a crash mid-save leaves the previous checkpoint as the
newest valid one, and the next save of that step starts from a clean temporary directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
LAST_GOOD = "last_good.json"


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded (damaged, incomplete, crafted). One line."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_manifest(directory: Path, step: int) -> None:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    (directory / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))


def verify(directory: Path, deep: bool = True) -> str | None:
    """None if ``directory`` is a complete checkpoint, else why not (one line): every file the
    manifest lists is there with its size and sha256 (``deep``), and no file is there that it does
    not list. This catches corruption and truncation, not a forger, who can rewrite the manifest;
    against that, nothing in a checkpoint is loaded as code (``restricted``)."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "no manifest (incomplete save)"
    try:
        files = json.loads(manifest.read_text())["files"]
        listed = {rel: (int(meta["bytes"]), str(meta["sha256"])) for rel, meta in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return f"unreadable manifest: {type(err).__name__}"
    for rel, (size, sha) in listed.items():
        path = directory / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"the manifest names a file outside the checkpoint: {rel!r}"
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, the manifest says {size}"
        if deep and _sha256(path) != sha:
            return f"{rel} does not match its sha256"
    extra = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                   if (p.is_file() or p.is_symlink()) and p.name != MANIFEST
                   and p.relative_to(directory).as_posix() not in listed)
    if extra:
        return f"{extra[0]} is not in the manifest" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def find_resumable(root: Path, log=print) -> Path | None:
    """The newest checkpoint under ``root`` that verifies; broken newer ones are reported."""
    for _, path in reversed(list_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            return path
        log(f"checkpoint {path} is not usable ({problem}); trying the previous one")
    return None


def prepare_save(root: Path, step: int) -> Path:
    """Collective. A fresh temporary directory for step ``step`` (rank 0 creates it)."""
    tmp = root / (step_dir_name(step) + ".tmp")
    if dist.get_rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed save: never mix two attempts
        tmp.mkdir(parents=True)
    dist.barrier()
    return tmp


def commit_save(root: Path, tmp: Path, step: int, keep: int, protected: set[str]) -> Path:
    """Collective. Manifest, fsync, rename, ``latest``, then prune old checkpoints."""
    dist.barrier()  # every rank has written its part
    final = root / step_dir_name(step)
    if dist.get_rank() == 0:
        write_manifest(tmp, step)
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, root / "latest")
        _prune(root, keep, protected | {final.name})
    dist.barrier()
    return final


def _prune(root: Path, keep: int, protected: set[str]) -> None:
    """Keep the newest ``keep`` complete checkpoints plus the protected ones (stage ends) and the
    pinned last good one (``last_good.json``)."""
    protected = protected | ({pinned} if (pinned := last_good(root)) else set())
    complete = [p for _, p in list_checkpoints(root) if (p / MANIFEST).is_file()]
    for path in complete[:-keep] if keep > 0 else []:
        if path.name not in protected:
            shutil.rmtree(path, ignore_errors=True)


def pin_last_good(root: Path, checkpoint: Path, reason: str) -> bool:
    """Rank 0. Record ``checkpoint`` in ``root/last_good.json`` as the newest checkpoint before a
    streak of skipped steps or a loss spike (``reason``): rotation keeps it until another such
    event pins a newer one. Only a checkpoint under ``root`` can be pinned (rotation deletes
    nothing elsewhere); returns whether it was."""
    checkpoint = Path(checkpoint)
    if not STEP_DIR.match(checkpoint.name) or checkpoint.parent.resolve() != Path(root).resolve():
        return False
    record = {"checkpoint": checkpoint.name, "path": str(checkpoint), "reason": reason}
    tmp = Path(root) / (LAST_GOOD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, Path(root) / LAST_GOOD)
    return True


def last_good(root: Path) -> str | None:
    """The name of the pinned last good checkpoint (``pin_last_good``), or None."""
    try:
        name = json.loads((Path(root) / LAST_GOOD).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and STEP_DIR.match(name) else None


def rng_state() -> dict:
    """Every RNG state of this rank (CPU, CUDA, megatron's tracker), as ``save_rng`` stores it."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def save_rng(path: Path) -> None:
    torch.save(rng_state(), path)


def load_rng(path: Path) -> None:
    from pretrain.checkpoint.restricted import load_torch

    set_rng_state(load_torch(path, path))


def fault_point(where: str, step: int) -> None:
    """Crash-test hook: with NEO_FAULT="<where>:<step>:<rank>" in the environment, that rank dies
    by SIGKILL right here (no cleanup, no Python exception), as a preempted or OOM-killed rank
    would. Unset in normal runs: one environment lookup."""
    spec = os.environ.get("NEO_FAULT")
    if spec and spec == f"{where}:{step}:{dist.get_rank()}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def resolve(path: str | Path, log=print) -> Path:
    """A checkpoint given as its step directory, or as a directory of checkpoints (its newest
    complete one), checked against its manifest. Every tool that loads one (``init.checkpoint``,
    ``pretrain.convert to-hf``, ``pretrain.evaluate``) goes through here."""
    path = Path(path)
    if (path / "model").is_dir() and (path / "config.yaml").is_file():
        problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is not usable: {problem}")
        return path
    found = find_resumable(path, log)
    if found is None:
        raise CheckpointError(f"{path} is neither a checkpoint nor a directory holding a complete one")
    return found
