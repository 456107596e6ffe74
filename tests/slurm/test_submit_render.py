"""slurm.submit without a cluster: the rendered sbatch script (--dry-run), validation before anything
is submitted, the pipeline plan. Acceptance 5: the 4-node x 8-GPU neo_9b dry run."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from slurm import submit as submit_mod
from slurm.jobs import parse_show_job
from slurm.render import REQUEUE_EXIT_CODE, time_limit_seconds
from tests.slurm.helpers import REPO, run_cli


def sbatch_lines(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ").strip() for line in script.splitlines()
            if line.startswith("#SBATCH ")]


def command_of(script: str, first_word: str) -> list[str]:
    """The shell command starting with ``first_word`` (backslash continuations joined), as argv."""
    joined = script.replace("\\\n", " ")
    line = next(line for line in joined.splitlines() if line.strip().startswith(first_word + " "))
    return shlex.split(line.split(" &")[0] if line.rstrip().endswith("&") else line)


def scripts_of(dry_run_stdout: str) -> list[tuple[str, str]]:
    """[(sbatch command comment, script text)] from --dry-run output."""
    parts = re.split(r"^(# would run: .*)$", dry_run_stdout, flags=re.M)
    return [(parts[i], parts[i + 1].lstrip("\n")) for i in range(1, len(parts), 2)]


def test_dry_run_4_nodes_x_8_gpus_neo_9b(tmp_path):
    run_dir = tmp_path / "neo9b-stage1"
    done = run_cli("slurm.submit", [
        "--dry-run", "model=neo_9b", "parallel=tp4pp2", "stage=stage1_prebuffer", "data.path=/data/captions",
        f"run_dir={run_dir}", "cluster.nodes=4", "cluster.gpus_per_node=8", "cluster.time=48:00:00",
        "cluster.partition=gpu", "cluster.account=neo", "cluster.cpus_per_task=64", "cluster.max_restarts=7",
        "cluster.signal_lead_s=600",
    ])
    assert done.returncode == 0, done.stderr
    [(command, script)] = scripts_of(done.stdout)
    assert command == f"# would run: sbatch --parsable {run_dir}/job.sbatch"
    assert not run_dir.exists(), "--dry-run must not write anything"
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0, "script is not valid bash"

    # Allocation: 4 nodes, one task per node, 8 GPUs per node, requeue, warning signal, appended log.
    assert sbatch_lines(script) == [
        "--job-name=neo-neo9b-stage1-stage1_prebuffer", "--nodes=4", "--ntasks-per-node=1",
        "--gpus-per-node=8", "--cpus-per-task=64", "--time=48:00:00", "--partition=gpu", "--account=neo",
        f"--output={run_dir}/slurm-%j.out", "--open-mode=append", "--requeue", "--signal=B:USR1@600",
    ]
    # Task layout and rendezvous: one srun task per node, each a torchrun of 8 processes meeting at
    # the first host of the allocation.
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    srun = command_of(script, "srun")
    torchrun_at = srun.index("torch.distributed.run")
    assert srun[1:torchrun_at - 2] == ["--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=64",
                                       "--kill-on-bad-exit=1"]
    torchrun = srun[torchrun_at + 1:]
    module_at = torchrun.index("pretrain.train")
    launcher, overrides = torchrun[:module_at - 1], torchrun[module_at + 1:]
    assert "--nnodes=4" in launcher and "--nproc-per-node=8" in launcher
    assert "--rdzv-backend=c10d" in launcher
    assert "--rdzv-endpoint=$HEAD_NODE:$RDZV_PORT" in launcher and "--rdzv-id=$SLURM_JOB_ID" in launcher
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in launcher
    assert "--shutdown-timeout=600" in launcher  # the processes get the warning lead to checkpoint
    assert "--max-restarts=0" in launcher  # restarts are SLURM requeues, resuming from checkpoints
    assert overrides[:4] == ["model=neo_9b", "parallel=tp4pp2", "stage=stage1_prebuffer",
                             "data.path=/data/captions"]
    assert overrides[-1] == f"run_dir={run_dir}"
    # NCCL on GPUs.
    env = dict(re.findall(r"^export (\w+)=(.*)$", script, flags=re.M))
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    assert env["NCCL_ASYNC_ERROR_HANDLING"] == "${NCCL_ASYNC_ERROR_HANDLING:-1}"
    assert env["NCCL_DEBUG"] == "${NCCL_DEBUG:-WARN}"
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    assert env["OMP_NUM_THREADS"] == "${OMP_NUM_THREADS:-8}"  # 64 CPUs / 8 processes
    # Signal handling and requeue.
    assert "trap 'on_signal USR1' USR1" in script and "trap 'on_signal TERM' TERM" in script
    # the trap only runs while bash waits on a background child
    assert re.search(r'wait "\$TRAIN_PID"', script)
    assert "MAX_RESTARTS=7" in script and "RESTART=${SLURM_RESTART_COUNT:-0}" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    # A run whose final checkpoint is complete is finished, whatever torchrun's exit code says.
    assert f"FINAL_CHECKPOINT={run_dir}/checkpoints/step_00200000 " in script  # stage 1: 200000 steps
    assert f"((rc == {REQUEUE_EXIT_CODE}))" in script


def test_cpu_cluster_dry_run_uses_processes_per_node_and_no_gpus(tmp_path, capsys):
    code = submit_mod.main(["--dry-run", "--cpu", "model=tiny", f"run_dir={tmp_path / 'r'}",
                            "cluster.nodes=2", "cluster.gpus_per_node=2", "cluster.time=10",
                            "cluster.signal_lead_s=60"])
    out = capsys.readouterr().out
    assert code == 0
    [(_, script)] = scripts_of(out)
    lines = sbatch_lines(script)
    assert "--nodes=2" in lines and "--time=10" in lines
    assert not any(line.startswith("--gpus") for line in lines)
    assert not any(line.startswith(("--partition", "--account", "--cpus-per-task")) for line in lines)
    assert "NCCL" not in script and "gloo" in script
    srun = command_of(script, "srun")
    assert "--nnodes=2" in srun and "--nproc-per-node=2" in srun


def test_pipeline_plan_chains_stages_from_previous_checkpoints(tmp_path, capsys):
    root = tmp_path / "pipe"
    code = submit_mod.main([
        "--dry-run", "--pipeline", "--cpu", "model=tiny", f"run_dir={root}", "init.hf_llm=/models/qwen3",
        "train.steps=4", "stage3_sft.train.steps=2", "stage2_midtrain.data.path=/data/mix",
        "cluster.nodes=1", "cluster.gpus_per_node=2", "cluster.time=00:30:00", "cluster.signal_lead_s=60",
        "--sbatch-arg=--qos=high",
    ])
    assert code == 0
    jobs = scripts_of(capsys.readouterr().out)
    assert [c.split()[-1] for c, _ in jobs] == [f"{root}/{s}/job.sbatch" for s in submit_mod.STAGES]
    assert "--dependency" not in jobs[0][0]
    assert "--dependency=afterok:<job id of stage1_prebuffer> --kill-on-invalid-dep=yes" in jobs[1][0]
    assert "--dependency=afterok:<job id of stage2_midtrain> --kill-on-invalid-dep=yes" in jobs[2][0]
    overrides = [command_of(script, "srun") for _, script in jobs]
    overrides = [argv[argv.index("pretrain.train") + 1:] for argv in overrides]
    for stage, ov in zip(submit_mod.STAGES, overrides, strict=True):
        assert f"stage={stage}" in ov and ov[-1] == f"run_dir={root}/{stage}"
    assert "init.hf_llm=/models/qwen3" in overrides[0]
    assert not any(o.startswith("init.hf_llm") for o in overrides[1] + overrides[2])
    assert f"init.checkpoint={root}/stage1_prebuffer/checkpoints" in overrides[1]
    assert f"init.checkpoint={root}/stage2_midtrain/checkpoints" in overrides[2]
    assert "data.path=/data/mix" in overrides[1]
    assert not any("data.path" in o for o in overrides[0] + overrides[2])
    assert "train.steps=2" in overrides[2] and "train.steps=2" not in overrides[1]
    assert all("--qos=high" in sbatch_lines(script) for _, script in jobs)
    assert not root.exists()


@pytest.mark.parametrize("args, message", [
    (["model=neo_9b", "parallel=tp4pp2", "cluster.nodes=3", "cluster.gpus_per_node=1"],
     "world size 3 is not divisible by parallel.tp*parallel.pp = 4*2 = 8"),
    (["model=neo_9b", "cluster.nodes=4", "cluster.gpus_per_node=8"],
     "train.global_batch_size=8 must be a multiple of train.micro_batch_size*DP = 1*32 = 32"),
    (["train.stepz=3"], "Could not override 'train.stepz'"),
    (["cluster.time=1h"], "cluster.time='1h' is not a SLURM time limit"),
    (["cluster.gpus_per_node=1", "cluster.time=00:05:00", "cluster.signal_lead_s=300"],
     "cluster.signal_lead_s=300 must be > 0 and shorter than cluster.time=00:05:00 (300s)"),
    (["stage1_prebuffer.train.steps=3", "cluster.gpus_per_node=1"], "are for --pipeline"),
    (["--pipeline", "stage=stage3_sft", "cluster.gpus_per_node=1"], "--pipeline runs all three stages"),
])
def test_config_errors_are_one_line_and_submit_nothing(tmp_path, capsys, args, message):
    run_dir = tmp_path / "never"
    # No --dry-run: the error must come before sbatch is even looked for.
    code = submit_mod.main([*args, f"run_dir={run_dir}"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: ") and message in lines[0], captured.err
    assert not run_dir.exists()


def test_time_limits_in_every_slurm_format():
    seconds = time_limit_seconds
    assert seconds("30") == 1800 and seconds("30:15") == 1815 and seconds("02:00:00") == 7200
    assert seconds("1-00") == 86400 and seconds("1-02:30") == 95400 and seconds("2-00:00:10") == 172810


def test_scontrol_show_job_line_is_parsed_with_spaces_in_values():
    line = ("JobId=42 JobName=neo-x UserId=root(0) JobState=PENDING Reason=DependencyNeverSatisfied "
            "Dependency=afterok:41(failed) Requeue=1 Restarts=2 ExitCode=0:0 RunTime=00:00:00 "
            "Command=/runs/my run/job.sbatch WorkDir=/home/u TRES=cpu=1,node=1 Socks/Node=*")
    fields = parse_show_job(line)
    assert fields["JobState"] == "PENDING" and fields["Restarts"] == "2"
    assert fields["Reason"] == "DependencyNeverSatisfied" and fields["Dependency"] == "afterok:41(failed)"
    assert fields["Command"] == "/runs/my run/job.sbatch" and fields["TRES"] == "cpu=1,node=1"
    assert fields["Socks/Node"] == "*"


def test_requeue_exit_code_is_the_trainers():
    source = (REPO / "pretrain" / "trainer.py").read_text()
    assert re.search(rf"^REQUEUE_EXIT_CODE\s*=\s*{REQUEUE_EXIT_CODE}\b", source, flags=re.M)


def test_template_has_no_unfilled_fields(tmp_path, capsys):
    assert submit_mod.main(["--dry-run", "--cpu", f"run_dir={tmp_path}", "cluster.gpus_per_node=1",
                            "cluster.time=10", "cluster.signal_lead_s=60"]) == 0
    assert "{{" not in capsys.readouterr().out
    assert Path(submit_mod.__file__).with_name("job.sbatch.in").is_file()


def test_gpu_check_dry_run_is_one_gpu_node_running_the_gpu_tests(tmp_path, capsys):
    run_dir = tmp_path / "check"
    assert submit_mod.main(["--dry-run", "--gpu-check", f"run_dir={run_dir}", "cluster.gpus_per_node=2",
                            "cluster.partition=gpu", "cluster.account=neo", "--sbatch-arg=--qos=debug"]) == 0
    [(command, script)] = scripts_of(capsys.readouterr().out)
    assert command == f"# would run: sbatch --parsable {run_dir}/job.sbatch"
    assert not run_dir.exists(), "--dry-run must not write anything"
    assert "{{" not in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0, "script is not valid bash"
    assert sbatch_lines(script) == [
        "--job-name=neo-gpu-check", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=2", "--time=00:30:00",
        "--partition=gpu", "--account=neo", f"--output={run_dir}/slurm-%j.out", "--open-mode=append",
        "--qos=debug",
    ]  # no --requeue, no warning signal: a check that dies is a result
    pytest_argv = command_of(script, submit_mod.sys.executable)
    assert pytest_argv[1:] == ["-m", "pytest", "-m", "gpu", "-rs", f"--basetemp={run_dir}/tmp"]
    assert f"cd {REPO}" in script and f"export NEO_GPU_CHECK_OUT={run_dir}" in script
    # Refused with one line: a pipeline or a CPU cluster makes no sense for it.
    assert submit_mod.main(["--dry-run", "--gpu-check", "--cpu"]) == 2
    assert "drop --pipeline and --cpu" in capsys.readouterr().err


def test_layout_predicted_over_gpu_memory_is_refused_unless_forced(tmp_path):
    """neo_9b stage 2 (seq 32768) at TP2 without sequence parallelism or recompute needs far more
    than an H100's 80 GB: the dry run refuses with the planner's prediction; --force renders it."""
    run_dir = tmp_path / "neo9b-s2"
    args = ["--dry-run", "model=neo_9b", "stage=stage2_midtrain", "parallel.tp=2", "train.global_batch_size=256",
            "cluster=h100_80gb", "cluster.nodes=4", "data.path=/data/mix", f"run_dir={run_dir}"]
    refused = run_cli("slurm.submit", args)
    assert refused.returncode == 2 and refused.stdout == ""
    plan_line, error = refused.stderr.strip().splitlines()
    assert re.search(r"memory plan: \d+\.\d+ GB per GPU: OVER 80 GB by \d+\.\d GB \(weights ", plan_line), plan_line
    assert error.startswith("config error: stage2_midtrain: predicted ") and "--force" in error, error

    forced = run_cli("slurm.submit", [*args, "--force"])
    assert forced.returncode == 0, forced.stderr
    [(_, script)] = scripts_of(forced.stdout)
    assert "parallel.tp=2" in script and "OVER 80 GB" in forced.stderr

    fits = run_cli("slurm.submit", [*args[:3], "parallel.tp=8", "parallel.sequence_parallel=true", *args[4:]])
    assert fits.returncode == 0, fits.stderr
    assert re.search(r"memory plan: \d+\.\d+ GB per GPU of 80 GB: fits", fits.stderr), fits.stderr
