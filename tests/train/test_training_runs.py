"""Real training runs of the tiny preset on synthetic shards, launched as users launch them
(``python -m pretrain.train`` / ``torchrun``), and what must hold between them:

  A  TP1PP1, stage 1 from an HF Qwen3 (init.hf_llm), W&B offline
  B  A again, stopped by SIGUSR1 mid-run (exit 85), then restarted: bit-identical to A
  C  TP2PP2, 4 processes, W&B offline: the TP1PP1 trajectory within rounding
  E  C's step-2 checkpoint resumed at TP1PP1 with checkpoint.load_optimizer=false
  F  TP1PP2xDP2, 4 processes (ZeRO-1 really shards over DP)
  G  F with rank 1 SIGKILLed in the middle of the step-4 save, then restarted: bit-identical to F
Every run is fp32 on CPU (bf16 runs: tests/train/test_precision.py); runs share module-scoped
fixtures so each is launched once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.checkpoint.checkpointer import list_checkpoints
from tests.wandb_offline import history

pytestmark = pytest.mark.slow

STEPS = 4


def _overrides(data: Path, hf: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["model=tiny", "stage=stage1_prebuffer", f"data.path={data}", f"init.hf_llm={hf}", f"run_dir={run_dir}",
            f"train.steps={STEPS}", "train.seq_len=128", "train.global_batch_size=4", "checkpoint.every=2",
            "data.num_workers=0", "wandb.mode=disabled", *extra]


def _command(nproc: int, overrides: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "pretrain.train", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "pretrain.train", *overrides]


def _train(nproc: int, overrides: list[str], env: dict | None = None, expect: int = 0, timeout: int = 600) -> str:
    out = subprocess.run(_command(nproc, overrides), capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    log = out.stdout + out.stderr
    assert out.returncode == expect, f"exit {out.returncode} (expected {expect}):\n{log[-6000:]}"
    return log


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in _metrics(run_dir)}


def _export(ckpt: Path, out: Path) -> dict[str, torch.Tensor]:
    done = subprocess.run([sys.executable, "-m", "pretrain.convert", "to-hf", str(ckpt), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(out / "model.safetensors")


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from data_prep.cli import main as data_prep

    out = tmp_path_factory.mktemp("train") / "synthetic"
    assert data_prep(["synthetic", "--output", str(out), "--num", "160", "--seed", "3", "--no-progress", "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def hf_qwen3(data, tmp_path_factory) -> Path:
    """A random HF Qwen3 with the tiny preset's post-LLM shape and the data set's tokenizer."""
    from pretrain.convert.hf import write_random_qwen3

    return write_random_qwen3(compose_tiny(), tmp_path_factory.mktemp("qwen3") / "tiny-qwen3", data / "tokenizer")


@pytest.fixture(scope="module")
def run_a(data, hf_qwen3, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("A") / "run"
    _train(1, _overrides(data, hf_qwen3, run, "wandb.mode=offline"))
    return run


@pytest.fixture(scope="module")
def run_c(data, hf_qwen3, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("C") / "run"
    _train(4, _overrides(data, hf_qwen3, run, "parallel.tp=2", "parallel.pp=2", "wandb.mode=offline"))
    return run


@pytest.fixture(scope="module")
def run_f(data, hf_qwen3, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("F") / "run"
    _train(4, _overrides(data, hf_qwen3, run, "parallel.pp=2"))
    return run


# ---------------------------------------------------------------------------------------- tests


def _check_stage1(run: Path, hf_qwen3: Path, tmp_path: Path) -> None:
    losses = _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1], losses
    # The W&B offline run holds the same metrics (read from its .wandb file).
    logged = {int(r["_step"]): r["loss"] for r in history(run) if "loss" in r}
    assert logged == pytest.approx(losses, rel=1e-6)
    # Stage 1 freezes the post-LLM: its Qwen3 weights come out exactly as they went in, and
    # everything trainable moved.
    final = _export(run / "checkpoints" / f"step_{STEPS:08d}", tmp_path / "final_hf")
    qwen = load_file(hf_qwen3 / "model.safetensors")
    pre = compose_tiny().pre_buffer_layers
    for key, value in qwen.items():
        if key == "lm_head.weight":
            continue
        ours = key.replace("model.", "language_model.model.", 1)
        if ours.startswith("language_model.model.layers."):
            parts = ours.split(".")
            parts[3] = str(int(parts[3]) + pre)
            ours = ".".join(parts)
        assert torch.equal(final[ours], value), f"frozen {key} changed"
    start = _export(run / "init_from_hf", tmp_path / "start_hf")
    trainable = [k for k in final if k.startswith("vision_model.") or "_hw" in k or "norm_h" in k or "norm_w" in k
                 or any(k.startswith(f"language_model.model.layers.{i}.") for i in range(pre))]
    moved = [k for k in trainable if not torch.equal(final[k], start[k])]
    assert len(moved) == len(trainable) > 0, set(trainable) - set(moved)
    # ... and moved by optimizer steps from the loaded weights, not from somewhere else: an AdamW
    # step moves an element by at most a few learning rates (this caught ZeRO restoring its own
    # copy of the initial random weights over the loaded ones).
    bound = 3 * sum(row["lr"] for row in _metrics(run))
    worst = max((final[k] - start[k]).abs().max().item() for k in trainable)
    assert worst < bound, f"a trainable weight moved {worst:.3g} in {STEPS} steps (bound {bound:.3g})"


def compose_tiny():
    from pretrain.config import compose

    return compose(["model=tiny"]).model


def test_stage1_tp1pp1_learns_freezes_and_logs(run_a, hf_qwen3, tmp_path):
    _check_stage1(run_a, hf_qwen3, tmp_path)
    print("A losses:", _losses(run_a))


def test_stage1_tp2pp2_learns_freezes_and_logs(run_c, hf_qwen3, tmp_path):
    _check_stage1(run_c, hf_qwen3, tmp_path)


def test_tp2pp2_trajectory_matches_tp1pp1(run_a, run_c):
    """Same weights, same data order (DP=1 in both), different layout: the same computation up to
    fp32 summation order. Step 1: loss 1e-6, grad norm 1e-5. Later steps: 1e-4, because AdamW's
    early updates are ~lr*sign(g) and turn rounding-level gradient differences of near-zero
    components into lr-sized ones (PLATFORM.md measured the same effect)."""
    a, c = _metrics(run_a), _metrics(run_c)
    assert c[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-6)
    assert c[0]["grad_norm"] == pytest.approx(a[0]["grad_norm"], rel=1e-5)
    for ra, rc in zip(a[1:], c[1:]):
        assert rc["loss"] == pytest.approx(ra["loss"], rel=1e-4), (ra, rc)
        assert rc["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3), (ra, rc)


def test_sigusr1_checkpoints_exits_85_and_resumes_exactly(data, hf_qwen3, run_a, tmp_path):
    run = tmp_path / "B"
    overrides = _overrides(data, hf_qwen3, run, "checkpoint.every=100")
    proc = subprocess.Popen(_command(1, overrides), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(_metrics(run)) >= 1:
            proc.send_signal(signal.SIGUSR1)
            break
        time.sleep(0.2)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 85, log[-4000:]
    stopped = max(_losses(run))
    assert stopped < STEPS and (run / "checkpoints" / f"step_{stopped:08d}" / "manifest.json").is_file()
    assert "exiting with 85" in log
    log = _train(1, overrides)
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:08d}'}" in log
    assert _losses(run) == _losses(run_a)  # bit-exact, fp32 on CPU


def test_tp2pp2_checkpoint_resumes_at_tp1pp1_without_optimizer(data, hf_qwen3, run_c, tmp_path):
    """Weights reshard from TP2PP2 to TP1PP1: the step-3 loss computed at TP1PP1 from C's step-2
    checkpoint equals C's own step-3 loss (same weights, same data) up to fp32 rounding."""
    run = tmp_path / "E"
    ckpt = run_c / "checkpoints" / "step_00000002"
    refused = _train(1, _overrides(data, hf_qwen3, run, f"checkpoint.resume={ckpt}"), expect=2)
    assert "checkpoint.load_optimizer=false" in refused
    _train(1, _overrides(data, hf_qwen3, run, f"checkpoint.resume={ckpt}", "checkpoint.load_optimizer=false"))
    assert _losses(run)[3] == pytest.approx(_losses(run_c)[3], rel=1e-5)


def test_zero1_partitions_optimizer_state_over_dp(run_f):
    """Each DP rank's ZeRO-1 file holds half of its stage's fp32 master weights (+ Adam moments)."""
    opt = run_f / "checkpoints" / f"step_{STEPS:08d}" / "optimizer" / "zero"
    for mp in (0, 1):
        sizes = []
        for dp in (0, 1):
            state = torch.load(opt / f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt", weights_only=False)
            part = state["optimizer_state_dict"]["single_partition_of_fp32_groups"]
            assert all(t.dtype == torch.float32 for t in part)
            sizes.append(sum(t.numel() for t in part))
        trainable = torch.load(opt / f"mp_rank_{mp:02d}_model_states.pt", weights_only=False)["module"]
        total = sum(t.numel() for t in trainable.values() if torch.is_tensor(t))
        assert abs(sizes[0] - total / 2) <= 64 and abs(sizes[1] - total / 2) <= 64, (sizes, total)


def test_kill9_during_save_loses_nothing(data, hf_qwen3, run_f, tmp_path):
    run = tmp_path / "G"
    overrides = _overrides(data, hf_qwen3, run, "parallel.pp=2")
    log = subprocess.run(_command(4, overrides), capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NEO_FAULT": f"save:{STEPS}:1"})
    assert log.returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / "step_00000002" / "manifest.json").is_file()
    assert not (ckpts / f"step_{STEPS:08d}").exists()  # the interrupted save never looks complete
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    out = _train(4, overrides)
    assert "resumed from" in out and "step_00000002" in out
    assert _losses(run) == _losses(run_f)  # bit-exact, fp32 on CPU, DP=2


def test_non_finite_steps_are_skipped_then_the_run_stops(data, hf_qwen3, tmp_path):
    """An absurd learning rate makes the weights blow up after the first update: the following
    non-finite steps are skipped and counted, and after train.max_skipped_steps in a row the run
    stops with a clear error and without a checkpoint of those steps."""
    run = tmp_path / "nan"
    log = _train(1, _overrides(data, hf_qwen3, run, "optim.lr=1e30", "optim.warmup=0", "train.steps=6",
                               "train.max_skipped_steps=2", "checkpoint.every=1"), expect=1)
    assert "non-finite loss or gradients, update skipped" in log
    assert "2 non-finite steps in a row (train.max_skipped_steps)" in log
    # Step 1's update blew the weights up: the check before its checkpoint sees it, so nothing of
    # this run is saved, and the stop message says there is no earlier checkpoint to go back to.
    assert "step 1: its weights give" in log
    assert list_checkpoints(run / "checkpoints") == []
    assert "No checkpoint of this run comes before the trouble" in log
