"""A crafted checkpoint never runs code: every pickled file of a real checkpoint, replaced by a
payload that would create a marker file, is refused with one line naming the file and the class,
under the commands that load it (resume, init.checkpoint, to-hf, evaluate). The attacker also
rewrites the manifest (it is unsigned), so the restricted unpickling is what stops them; without
that rewrite the manifest check refuses first. Real checkpoints still resume, convert and evaluate:
tests/train/test_training_runs.py (TP1PP1, TP2PP2, DP2) and the demo.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TRAIN = ["model=tiny", "stage=stage2_midtrain", "train.seq_len=256", "train.global_batch_size=2",
         "checkpoint.every=2", "data.num_workers=0", "wandb.mode=disabled", "log.every=1"]


class Payload:
    """Unpickling this runs ``touch MARKER``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """(a real 1-process checkpoint at step 2, the data set it was trained on)."""
    from data_prep.cli import main as data_prep

    root = tmp_path_factory.mktemp("untrusted")
    data = root / "data"
    assert data_prep(["synthetic", "--output", str(data), "--num", "40", "--seed", "1", "--no-progress",
                      "--workers", "1"]) == 0
    done = _run("pretrain.train", *TRAIN, f"data.path={data}", "train.steps=2", f"run_dir={root / 'run'}")
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run" / "checkpoints" / "step_00000002", data


def _rewrite_manifest(ckpt: Path) -> None:
    """What a forger does after editing files: the manifest is unsigned."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for rel, meta in manifest["files"].items():
        data = (ckpt / rel).read_bytes()
        meta.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _craft_metadata(ckpt: Path, marker: Path) -> None:
    (ckpt / "model" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))


def _craft_distcp_item(ckpt: Path, marker: Path) -> None:
    """Replace one non-tensor item (an ``_extra_state``) inside a .distcp shard with a torch.save'd
    payload, moving the offsets of the items after it (the metadata is ours: plain pickle here)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta_path = ckpt / "model" / ".metadata"
    metadata = pickle.loads(meta_path.read_bytes())
    byte_items = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    target_index, target = next((i, s) for i, s in metadata.storage_data.items() if i.fqn in byte_items)
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    evil = buffer.getvalue()
    shard = ckpt / "model" / target.relative_path
    raw = shard.read_bytes()
    shard.write_bytes(raw[:target.offset] + evil + raw[target.offset + target.length:])
    shift = len(evil) - target.length
    for index, info in metadata.storage_data.items():
        if info.relative_path == target.relative_path and info.offset > target.offset:
            info.offset += shift
    target.length = len(evil)
    metadata.storage_data[target_index] = target
    meta_path.write_bytes(pickle.dumps(metadata))


def _craft_torch_file(relative: str):
    def craft(ckpt: Path, marker: Path) -> None:
        [path] = sorted(ckpt.glob(relative))[:1] or [None]
        assert path is not None, relative
        torch.save({"state": Payload(marker)}, path)
    return craft


WEIGHTS_FILES = {"model/.metadata": _craft_metadata, "model/*.distcp (a non-tensor item)": _craft_distcp_item}
RESUME_ONLY_FILES = {
    "optimizer/zero/*optim_states.pt": _craft_torch_file("optimizer/zero/*optim_states.pt"),
    "rng/rank_00000.pt": _craft_torch_file("rng/rank_00000.pt"),
}


def _load(entry: str, ckpt: Path, data: Path, tmp: Path) -> subprocess.CompletedProcess:
    if entry == "resume":
        return _run("pretrain.train", *TRAIN, f"data.path={data}", "train.steps=3", f"run_dir={tmp / 'run'}",
                    f"checkpoint.resume={ckpt}")
    if entry == "init.checkpoint":
        return _run("pretrain.train", *TRAIN, f"data.path={data}", "train.steps=1", f"run_dir={tmp / 'run'}",
                    f"init.checkpoint={ckpt}")
    if entry == "to-hf":
        return _run("pretrain.convert", "to-hf", str(ckpt), str(tmp / "hf"))
    return _run("pretrain.evaluate", str(ckpt), "--data", str(data), "--max-samples", "2")


def _assert_refused(done: subprocess.CompletedProcess, marker: Path, *needles: str) -> None:
    assert not marker.exists(), "the payload ran"
    assert done.returncode in (1, 2), (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith(("error:", "config error:"))]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), done.stderr[-3000:]


# Every command that loads weights, with the weights' own pickle; the non-tensor items of the
# shards under one of them (the same check_weights runs for all four); the optimizer and RNG
# files under resume, the one command that reads them.
CASES = [("model/.metadata", entry) for entry in ("resume", "init.checkpoint", "to-hf", "evaluate")] \
    + [("model/*.distcp (a non-tensor item)", "to-hf")] + [(name, "resume") for name in RESUME_ONLY_FILES]


@pytest.mark.parametrize("name, entry", CASES)
def test_crafted_pickle_is_refused_and_never_runs(base, tmp_path, name, entry):
    source, data = base
    ckpt = tmp_path / "step_00000002"
    shutil.copytree(source, ckpt)
    marker = tmp_path / "PWNED"
    {**WEIGHTS_FILES, **RESUME_ONLY_FILES}[name](ckpt, marker)
    _rewrite_manifest(ckpt)
    done = _load(entry, ckpt, data, tmp_path)
    _assert_refused(done, marker, "refused to load: it asks for posix.system")


def test_deepspeed_model_states_file_goes_through_the_whitelist_too(base, tmp_path):
    """DeepSpeed reads both of its files through the engine's checkpoint engine, which resume swaps
    for the restricted one: the model-states file is refused like the optimizer file above."""
    from pretrain.checkpoint.restricted import UntrustedCheckpointError, restricted_checkpoint_engine

    source, _ = base
    path = tmp_path / "mp_rank_00_model_states.pt"
    shutil.copy(source / "optimizer" / "zero" / path.name, path)
    engine = restricted_checkpoint_engine(None)
    assert "module" in engine.load(str(path))  # the real file loads
    marker = tmp_path / "PWNED"
    torch.save({"module": Payload(marker)}, path)
    with pytest.raises(UntrustedCheckpointError, match="asks for posix.system"):
        engine.load(str(path))
    assert not marker.exists()


def test_flipped_bytes_fail_the_manifest(base, tmp_path):
    source, data = base
    ckpt = tmp_path / "step_00000002"
    shutil.copytree(source, ckpt)
    shard = sorted((ckpt / "model").glob("*.distcp"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-4096:] = bytes(b ^ 0xFF for b in raw[-4096:])
    shard.write_bytes(bytes(raw))
    _assert_refused(_load("to-hf", ckpt, data, tmp_path), tmp_path / "none",
                    f"model/{shard.name} does not match its sha256")


def test_a_file_the_manifest_does_not_list_is_refused(base, tmp_path):
    source, data = base
    ckpt = tmp_path / "step_00000002"
    shutil.copytree(source, ckpt)
    (ckpt / "optimizer" / "zero" / "bf16_zero_pp_rank_9_mp_rank_00_optim_states.pt").write_bytes(b"\0" * 64)
    _assert_refused(_load("evaluate", ckpt, data, tmp_path), tmp_path / "none",
                    "bf16_zero_pp_rank_9_mp_rank_00_optim_states.pt is not in the manifest")
