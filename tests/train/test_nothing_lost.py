"""Nothing lost: a diverging run keeps its last good checkpoint, and SIGTERM to torchrun saves.

  diverge   train to step 2; resume with optim.lr=1e30, checkpoint.load_optimizer=false,
            checkpoint.every=1, checkpoint.keep=2: no checkpoint of the blown-up weights is written,
            step 2 survives and is pinned, the stop names it; a restart from it with the first run's
            settings trains on (and rotation, keep=1, still keeps it)
  sigterm   `kill -TERM <torchrun>` on `torchrun --standalone --nproc_per_node=2 ... data.num_workers=2`:
            the loader workers live through it, both ranks write the checkpoint and exit 85,
            torchrun exits TORCHRUN_EXIT_AFTER_SIGNAL, exit_status.json says 85; the same command
            resumes from that step
and, without launching training: the loss rules, workers ignoring stop signals, rotation keeping
the pinned checkpoint, and the SLURM job script going by exit_status.json.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.checkpoint import checkpointer as ckpt
from tests.train.test_training_runs import _metrics, _overrides, _train, data, hf_qwen3  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
# torchrun (torch.distributed.elastic) after it forwarded a signal: its agent raises SignalException
# out of main, whatever its processes did (measured with torch 2.13: 1).
TORCHRUN_EXIT_AFTER_SIGNAL = 1


def _set(overrides: list[str], *changes: str) -> list[str]:
    """``overrides`` with the keys of ``changes`` replaced by them."""
    keys = {c.split("=", 1)[0] for c in changes}
    return [o for o in overrides if o.split("=", 1)[0] not in keys] + list(changes)


def _status(run: Path) -> dict:
    return json.loads((run / "exit_status.json").read_text())


def _saved(run: Path) -> list[int]:
    return [step for step, _ in ckpt.list_checkpoints(run / "checkpoints")]


# ------------------------------------------------------------------------ real training runs


@pytest.mark.slow
def test_divergence_keeps_the_last_good_checkpoint_and_names_it(data, hf_qwen3, tmp_path):  # noqa: F811
    run = tmp_path / "diverge"
    root = run / "checkpoints"
    good = root / "step_00000002"
    first = _set(_overrides(data, hf_qwen3, run), "train.steps=2")
    _train(1, first)
    assert _saved(run) == [2]

    blown = _set(first, "train.steps=8", "optim.lr=1e30", "optim.warmup=0", "checkpoint.load_optimizer=false",
                 "checkpoint.every=1", "checkpoint.keep=2", "train.max_skipped_steps=2")
    log = _train(1, blown, expect=1)
    print(log[-3000:])
    assert f"resumed from {good} at step 2" in log
    # Step 3 trained from good weights (its loss is fine) and blew them up: the check of its
    # checkpoint (those weights on step 4's batches) refused it, and nothing after it was saved.
    assert "step 3: its weights give" in log and "its checkpoint is not written" in log
    assert "update skipped" in log
    assert _saved(run) == [2], "a checkpoint of blown-up weights was written (or step 2 rotated away)"
    assert not list(root.glob("*.tmp"))
    assert (root / "latest").read_text().strip() == good.name
    assert ckpt.last_good(root) == good.name  # pinned: rotation keeps it
    assert ckpt.verify(good) is None
    # The stop says why, names the good checkpoint and how to restart from it.
    assert "steps in a row (train.max_skipped_steps): stopping without writing a checkpoint of these weights" in log
    assert f"The last good checkpoint is {good} (step 2; the trouble began at step 4)" in log
    assert f"checkpoint.resume={good}" in log
    status = _status(run)
    assert status["exit_code"] == 1 and status["outcome"] == "diverged" and status["last_good_checkpoint"] == str(good)

    # The restart the message asks for, with the first run's (sane) settings: it trains on from step 2.
    # keep=1: rotation deletes step 3 when step 4 is written, and keeps the pinned step 2.
    log = _train(1, _set(first, "train.steps=4", f"checkpoint.resume={good}", "checkpoint.every=1",
                         "checkpoint.keep=1"))
    assert f"resumed from {good} at step 2" in log
    rows = {r["step"]: r for r in _metrics(run)}  # the last row of each step: this run's
    assert all(math.isfinite(rows[s]["loss"]) and rows[s]["loss"] < 10 for s in (3, 4)), rows
    assert _saved(run) == [2, 4]
    assert _status(run)["outcome"] == "done"


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_exits_85_and_resumes(data, hf_qwen3, tmp_path):  # noqa: F811
    run = tmp_path / "term"
    overrides = _set(_overrides(data, hf_qwen3, run), "data.num_workers=2", "train.steps=6",
                     "checkpoint.every=100")
    codes = tmp_path / "rank_exit"
    # The README's launch command; tests.train.rank_exit is pretrain.train's main in the rank
    # process itself, recording its exit code (torchrun reports none after a signal).
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "tests.train.rank_exit", str(codes), *overrides]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    sent = None
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").is_file() and len(_metrics(run)) >= 1:
                os.kill(proc.pid, signal.SIGTERM)  # torchrun itself, as `kill -TERM <torchrun pid>`
                sent = time.monotonic()
                break
            time.sleep(0.2)
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(log[-4000:])
    assert sent is not None, f"the run ended (exit {proc.returncode}) before its first step was logged:\n{log[-4000:]}"
    assert "is killed by signal" not in log and "Unable to shutdown process" not in log, log[-6000:]
    stopped = _status(run)["step"]
    assert _status(run) | {"message": ""} == {
        "exit_code": 85, "outcome": "signal", "step": stopped, "message": "",
        "last_good_checkpoint": str(run / "checkpoints" / f"step_{stopped:08d}")}
    assert sorted(p.name for p in codes.iterdir()) == ["rank_0", "rank_1"]
    assert [p.read_text().strip() for p in sorted(codes.iterdir())] == ["85", "85"]
    assert proc.returncode == TORCHRUN_EXIT_AFTER_SIGNAL, log[-6000:]
    assert f"checkpoint written at step {stopped}; exiting with 85" in log
    assert 1 <= stopped < 6 and _saved(run) == [stopped]
    assert ckpt.verify(run / "checkpoints" / f"step_{stopped:08d}") is None
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"

    log = _train(2, overrides)  # the same command again (the real -m pretrain.train)
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in log
    assert sorted({r["step"] for r in _metrics(run)}) == list(range(1, 7))
    assert _status(run)["outcome"] == "done" and 6 in _saved(run)


# --------------------------------------------------------------------------- no training


def test_loss_rules():
    from pretrain.trainer import LossWatch

    watch = LossWatch(vocab_size=2048, window=5, factor=3.0, ceiling_factor=3.0)
    ceiling = 3 * math.log(2048)
    assert watch.above_ceiling(ceiling * 1.01) and watch.above_ceiling(1e29)
    assert not watch.above_ceiling(ceiling * 0.99) and not watch.above_ceiling(float("nan"))
    # The median rule needs a full window: at the start nothing but the ceiling fires.
    for loss in (8.0, 6.0, 4.0, 3.0):
        assert watch.spike(20.0) is None
        watch.add(loss)
    watch.add(2.5)
    assert watch.median() == 4.0
    assert watch.spike(11.9) is None and "median of the last 5" in watch.spike(12.1)
    # Skipped steps' losses never enter the window.
    watch.add(float("inf"))
    watch.add(ceiling * 2)
    assert list(watch.recent) == [8.0, 6.0, 4.0, 3.0, 2.5]
    # A lasting level shift is accepted after about window/2 steps.
    fired = []
    for _ in range(5):
        fired.append(watch.spike(15.0) is not None)
        watch.add(15.0)
    assert fired == [True, True, True, False, False]


def _sleepy_loader(protected: bool):
    import torch
    from torch.utils.data import DataLoader, Dataset

    from pretrain.data import workers

    class Slow(Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            time.sleep(0.05)
            return torch.tensor([i])

    loader = DataLoader(Slow(), batch_size=1, num_workers=2, multiprocessing_context="fork",
                        worker_init_fn=lambda worker_id: None)
    if protected:
        assert workers.protect(loader) and workers.protect(loader)  # idempotent
    return loader


def _kill_from_elsewhere(pid: int, sig: int) -> None:
    """As torchrun or scancel does: from a process that is not the worker's parent (torch's worker
    handler exits quietly on a SIGTERM from its parent, dies of one from anyone else)."""
    subprocess.run(["kill", f"-{int(sig)}", str(pid)], check=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_loader_workers_ignore_stop_signals(sig):
    """The signal torchrun's killpg (or scancel) sends the rank's whole group reaches the workers."""
    loader = _sleepy_loader(protected=True)
    it = iter(loader)
    got = [int(next(it))]
    for worker in it._workers:
        _kill_from_elsewhere(worker.pid, sig)
    got += [int(b) for b in it]
    assert sorted(got) == list(range(40))


def test_protected_workers_still_stop_when_their_rank_exits():
    """The rank's own SIGTERM (multiprocessing terminates daemonic children at exit, then waits)
    still ends a protected worker: a rank exiting 85 mid-epoch exits at once, not after a hang."""
    code = (
        "import sys, time\n"
        "from tests.train.test_nothing_lost import _sleepy_loader\n"
        "it = iter(_sleepy_loader(protected=True))\n"
        "next(it)\n"
        "sys.exit(85)\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 85, done.stderr[-3000:]
    assert time.monotonic() - started < 30


def test_unprotected_loader_workers_die_of_sigterm():
    """What the protection is for (torch's workers die of a SIGTERM their rank did not send)."""
    loader = _sleepy_loader(protected=False)
    it = iter(loader)
    next(it)
    with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid"):  # killed by signal: Terminated, or exited
        for worker in it._workers:
            _kill_from_elsewhere(worker.pid, signal.SIGTERM)
        for _ in it:
            pass


def test_rotation_keeps_the_pinned_last_good_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 3, 4, 5):
        (root / ckpt.step_dir_name(step)).mkdir(parents=True)
        (root / ckpt.step_dir_name(step) / ckpt.MANIFEST).write_text("{}")
    assert ckpt.pin_last_good(root, root / "step_00000002", "a loss spike at step 3")
    assert not ckpt.pin_last_good(root, tmp_path / "elsewhere" / "step_00000003", "not under root")
    assert ckpt.last_good(root) == "step_00000002"
    ckpt._prune(root, keep=1, protected={"step_00000005"})
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 5]
    (root / ckpt.LAST_GOOD).write_text("not json")
    assert ckpt.last_good(root) is None


def test_exit_status_and_exit_code_names_agree():
    from pretrain import trainer
    from slurm import render

    assert render.EXIT_STATUS_FILE == trainer.EXIT_STATUS_FILE
    assert render.REQUEUE_EXIT_CODE == trainer.REQUEUE_EXIT_CODE


# The SLURM job script after torchrun returns 1: it goes by the ranks' exit_status.json.


def _job_script(tmp_path: Path) -> tuple[Path, Path]:
    """The rendered job script with fake srun/scontrol on PATH: srun writes the exit status a
    trainer would have written and exits as torchrun does (1) once it gets USR1."""
    from slurm.render import JobSpec, render

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spec = JobSpec(stage="stage1_prebuffer", run_dir=run_dir, train_overrides=("model=tiny",), nodes=1,
                   procs_per_node=2, gpu=False, time="10", python=sys.executable, repo=REPO, workdir=tmp_path,
                   final_checkpoint=run_dir / "checkpoints" / "step_00000010")
    script = tmp_path / "job.sbatch"
    script.write_text(render(spec))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"""#!/bin/bash
trap 'echo "{{\\"exit_code\\": $STATUS_CODE, \\"outcome\\": \\"$STATUS_OUTCOME\\"}}" > {run_dir}/exit_status.json; exit 1' USR1
touch {tmp_path}/srun_started
for _ in $(seq 300); do sleep 0.1; done
exit 1
""")
    (bin_dir / "scontrol").write_text(f"""#!/bin/bash
echo "$*" >> {tmp_path}/scontrol.calls
[[ $1 == show ]] && echo node1
exit 0
""")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return script, bin_dir


@pytest.mark.parametrize("sig, code, outcome, want_rc, want_line, requeued", [
    ("TERM", 85, "signal", 85, "training wrote a checkpoint after SIGTERM and stopped (exit code 85)", False),
    ("USR1", 85, "signal", 0, "training stopped on a signal after writing a checkpoint (exit code 85); requeueing", True),
    ("USR1", 1, "diverged", 1, "training stopped because it diverged (exit code 1", False),
])
def test_job_script_goes_by_the_training_exit_status(tmp_path, sig, code, outcome, want_rc, want_line, requeued):
    script, bin_dir = _job_script(tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "node1", "STATUS_CODE": str(code), "STATUS_OUTCOME": outcome}
    (tmp_path / "run" / "exit_status.json").write_text('{"exit_code": 0, "outcome": "done"}')  # a stale one
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while not (tmp_path / "srun_started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(getattr(signal, f"SIG{sig}"))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == want_rc, out
    assert "torchrun exited with code 1; the training processes exited with code" in out or code == 1, out
    assert want_line in out, out
    calls = (tmp_path / "scontrol.calls").read_text()
    assert ("requeue 42" in calls) == requeued, calls
