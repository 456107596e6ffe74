"""What a resume takes from the checkpoint and what from the command line, as real 1-process runs
of the tiny preset (pretrain/checkpoint/manager.py's docstring has the rules):

  - a changed optim.lr is refused with one line naming the key and both values, before anything
    trains: the restored optimizer state would keep the checkpoint's learning rate;
  - with checkpoint.override_schedule=true it is applied: metrics.jsonl shows this run's lr on the
    schedule (and train.steps, changed too, re-lays the schedule, logged);
  - another stage's checkpoints in the run directory are refused, resume or not;
  - an init.checkpoint that does not exist is an error even though a resume would not load it; one
    that exists is said to be not loaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.optim.lr_schedule import lr_factor, warmup_steps
from tests.train.test_training_runs import _metrics, _train, data  # noqa: F401 - data is a fixture

pytestmark = pytest.mark.slow

LR, NEW_LR, WARMUP, MIN_RATIO = 1e-3, 5e-3, 0.25, 0.2


def _overrides(data: Path, run_dir: Path, *extra: str, stage: str = "stage2_midtrain") -> list[str]:
    return ["model=tiny", f"stage={stage}", f"data.path={data}", f"run_dir={run_dir}", "train.steps=2",
            "train.seq_len=128", "train.global_batch_size=4", "checkpoint.every=2", "data.num_workers=0",
            "wandb.mode=disabled", f"optim.lr={LR}", f"optim.warmup={WARMUP}", f"optim.min_lr_ratio={MIN_RATIO}",
            *extra]


def _one_error(log: str) -> str:
    assert "Traceback" not in log, log[-4000:]
    errors = [line for line in log.splitlines() if line.startswith(("config error:", "error:"))]
    assert len(errors) == 1 and errors[0].startswith("config error: "), log[-4000:]
    return errors[0]


@pytest.fixture(scope="module")
def two_steps(data, tmp_path_factory) -> Path:  # noqa: F811 - the imported fixture
    """A stage-2 run of 2 steps: its checkpoint at step 2 says lr 1e-3."""
    run = tmp_path_factory.mktemp("resume") / "run"
    _train(1, _overrides(data, run))
    assert (run / "checkpoints" / "step_00000002" / "manifest.json").is_file()
    return run


def test_changed_lr_is_refused_then_applied_with_override_schedule(data, two_steps, tmp_path):  # noqa: F811
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_steps, run)
    line = _one_error(_train(1, _overrides(data, run, "train.steps=4", f"optim.lr={NEW_LR}"), expect=2))
    assert f"optim.lr={NEW_LR} (checkpoint: {LR})" in line and "set checkpoint.override_schedule=true" in line, line
    assert [row["step"] for row in _metrics(run)] == [1, 2]  # nothing trained

    log = _train(1, _overrides(data, run, "train.steps=4", f"optim.lr={NEW_LR}", "checkpoint.override_schedule=true",
                               f"init.checkpoint={two_steps / 'checkpoints'}"))
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'}" in log
    assert f"checkpoint.override_schedule=true: applying optim.lr={NEW_LR} (checkpoint: {LR})" in log, log[-3000:]
    assert "train.steps=4 (the checkpoint's run: 2): the LR schedule now spans 4 steps" in log
    assert f"init.checkpoint={two_steps / 'checkpoints'} is not loaded: the run resumes from" in log
    rows = {row["step"]: row["lr"] for row in _metrics(run)}
    warm = warmup_steps(4, WARMUP)
    for step in (3, 4):  # the scheduler's lr after step k: base lr x factor(k)
        assert rows[step] == pytest.approx(NEW_LR * lr_factor(step, 4, warm, MIN_RATIO), rel=1e-9), rows
    # The new checkpoint records what ran: resuming it with lr 5e-3 needs no override.
    saved = (run / "checkpoints" / "step_00000004" / "config.yaml").read_text()
    assert f"lr: {NEW_LR}" in saved


def test_other_stage_checkpoints_in_the_run_dir_are_refused(data, two_steps, tmp_path):  # noqa: F811
    for extra in ([], ["checkpoint.resume=never"]):
        line = _one_error(_train(1, _overrides(data, two_steps, *extra, stage="stage3_sft"), expect=2))
        assert "holds checkpoints of stage stage2_midtrain" in line and "this run is stage stage3_sft" in line, line
        assert f"init.checkpoint={two_steps / 'checkpoints'}" in line
    # An explicit checkpoint of another stage, from a fresh run_dir.
    ckpt = two_steps / "checkpoints" / "step_00000002"
    line = _one_error(_train(1, _overrides(data, tmp_path / "s3", f"checkpoint.resume={ckpt}", stage="stage3_sft"),
                             expect=2))
    assert f"checkpoint.resume={ckpt} is a checkpoint of stage stage2_midtrain" in line, line


def test_missing_init_checkpoint_is_an_error_when_resuming(data, two_steps, tmp_path, capsys):  # noqa: F811
    from pretrain.train import main

    code = main(_overrides(data, two_steps, f"init.checkpoint={tmp_path / 'nonexistent'}"))
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"config error: init.checkpoint={tmp_path / 'nonexistent'} does not exist"
