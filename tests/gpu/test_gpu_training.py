"""GPU check: the real trainer in bf16 at neo_2b widths, seq 16384, packed multimodal data with
large images, launched with torchrun as users launch it. Sizes: tests/gpu/sizes.py
(NEO_GPU_CHECK_CPU=1 runs the same code at tiny sizes on CPU).

Per layout (TP1 on one GPU; TP2 on two, skipped with the reason where fewer exist), stage 2
(stage2_midtrain: everything trains):
  straight  bf16, STEPS steps               -> the loss falls; tokens/s, TFLOP/s, MFU, peak memory
  resumed   straight's overrides in another run_dir; SIGUSR1 to torchrun after step STEPS/2 (every
            rank checkpoints at step k and exits 85, as on SLURM), then the same command again
                                            -> every step's loss identical to straight's
  fp32      one fp32 step resuming resumed's step-k checkpoint (checkpoint.resume=...,
            checkpoint.load_optimizer=false): the same weights and the same next batch
                                            -> its step-(k+1) loss and gradient norm equal the bf16
            run's within bf16 rounding. Trained weights on purpose: at the random start every loss
            is about ln(vocab), whatever the computation does.
and at TP1, stage 1 (stage1_prebuffer, post-LLM frozen): bf16, STEPS steps -> the loss falls and
the post-LLM comes out exactly as it went in (its bf16-rounded Qwen3 weights).
Every run starts from ONE fp32 checkpoint (conftest.init_checkpoint) and draws the same batches:
same data, seed, loader workers and batch shape.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.gpu.conftest import hidden_cuda_env
from tests.gpu.launch import REPO, Run
from tests.gpu.report import TABLE
from tests.gpu.sizes import CPU_MODE, SIZES, gpu_name_and_peak

pytestmark = pytest.mark.gpu

RECOMPUTE = "full"  # train.recompute of every run (none | selective | full)
LAYOUTS = (1, 2)  # parallel.tp; one process per GPU, DP = 1
LOSS_WINDOW = 5  # the loss falls: the mean of the last LOSS_WINDOW losses is below the step-1 loss
WARM_UP_STEPS = 2  # left out of the throughput medians: the first steps compile kernels, fill the loader
# One step in bf16 against fp32 from the same (bf16) weights on the same batch. bf16 keeps 8
# significant bits: each rounded activation or matmul output is off by up to 2^-9 = 0.2%, while
# loss, softmax and norms run in fp32 and matmuls accumulate in fp32; the loss is a mean over
# thousands of tokens (65k here), so independent rounding errors mostly cancel. Measured with the
# CPU version (tiny, seq 512): loss 3e-5..6e-5 relative, gradient norm 2e-4..2e-3. At neo_2b widths
# and 16k keys per softmax (flash kernels round the probabilities to bf16 before P @ V) the errors
# grow, hence the margins: loss 1e-2 (~200x the CPU value) still sits far below what a wrong kernel,
# mask or dtype does to a trained model's loss (tens of percent; attending to later tokens lowers it
# sharply); the gradient norm, which backward rounds at every layer, 5e-2.
LOSS_RTOL = 1e-2
GRAD_NORM_RTOL = 5e-2


def overrides(tp: int, data: Path, init: Path | None, stage: str, dtype: str, steps: int) -> list[str]:
    _, peak = gpu_name_and_peak()
    return [
        *SIZES.model, f"stage={stage}", f"parallel.tp={tp}", f"data.path={data}",
        *([f"init.checkpoint={init}"] if init is not None else []),
        f"train.dtype={dtype}", f"train.steps={steps}", f"train.seq_len={SIZES.seq_len}",
        "train.micro_batch_size=1", f"train.global_batch_size={SIZES.global_batch}",
        f"train.recompute={RECOMPUTE}",
        "optim.warmup=0.1",  # the recipes' warm-up is sized for 50k-200k steps: 10% of this run
        f"data.num_workers={SIZES.data_workers}", f"data.packing_buffer={SIZES.packing_buffer}",
        "checkpoint.every=1000000", "checkpoint.keep=2",  # saves at the end and on the signal only
        "log.every=1", "wandb.mode=disabled",
        *([f"cluster.peak_tflops={peak}"] if peak is not None else []),  # no peak, no MFU
    ]


def new_run(work: Path, name: str, tp: int, run_overrides: list[str]) -> Run:
    """A run directory ``work/name`` for ``tp`` processes (one per GPU)."""
    return Run(work / name, tp, run_overrides, SIZES.launch_timeout_s, dict(SIZES.launch_env))


def step_dir(run: Run, step: int) -> Path:
    return run.dir / "checkpoints" / f"step_{step:08d}"


def label(tp: int, stage: int = 2) -> str:
    return f"TP{tp} stage {stage}"


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", params=LAYOUTS, ids=[f"tp{t}" for t in LAYOUTS])
def tp(request) -> int:
    tp, gpus = request.param, torch.cuda.device_count()
    if not CPU_MODE and gpus < tp:
        pytest.skip(f"parallel.tp={tp} needs {tp} GPUs; torch.cuda.device_count() is {gpus}")
    return tp


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The parent directory of every run; the table's first rows say what all runs share."""
    name, peak = gpu_name_and_peak()
    TABLE.add("device", f"{torch.cuda.device_count()} x {name}" if torch.cuda.is_available() else name,
              "-" if peak is None else f"peak {peak:.0f} TFLOP/s (dense bf16, for MFU)")
    TABLE.add("train.recompute", RECOMPUTE)
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def straight(tp, data, init_checkpoint, work, out_dir):
    run = new_run(work, f"tp{tp}-stage2-bf16-straight", tp,
                  overrides(tp, data, init_checkpoint, "stage2_midtrain", "bfloat16", SIZES.steps))
    try:
        run.train()
        TABLE.add(f"{label(tp)} bf16 run: wall time", f"{run.wall_s:.0f}s (start, {SIZES.steps} steps, save)")
        yield run
    finally:
        run.keep_results(out_dir)
        run.drop_checkpoints()


@pytest.fixture(scope="module")
def resumed(tp, data, init_checkpoint, work, out_dir):
    """(run, k): stopped by SIGUSR1 after step k, then launched again with the same command."""
    run = new_run(work, f"tp{tp}-stage2-bf16-resumed", tp,
                  overrides(tp, data, init_checkpoint, "stage2_midtrain", "bfloat16", SIZES.steps))
    try:
        stopped = run.train_until_signal(after_step=SIZES.steps // 2)
        assert (step_dir(run, stopped) / "manifest.json").is_file(), f"no checkpoint of step {stopped}"
        run.train()  # the same command again: resumes from the newest checkpoint
        assert f"resumed from {step_dir(run, stopped)}" in run.log_text(), run.log_tail()
        TABLE.add(f"{label(tp)} bf16 run stopped by SIGUSR1 + restart: wall time", f"{run.wall_s:.0f}s")
        yield run, stopped
    finally:
        run.keep_results(out_dir)
        run.drop_checkpoints()


@pytest.fixture(scope="module")
def fp32_step(tp, data, resumed, work, out_dir) -> Run:
    """One fp32 step from resumed's step-k checkpoint: its bf16 weights and its loader position (the
    next batch is the bf16 run's batch k+1); a fresh optimizer, which that step's loss and gradient
    norm do not depend on (both come before the update)."""
    bf16_run, stopped = resumed
    run = new_run(work, f"tp{tp}-stage2-fp32-step", tp,
                  [*overrides(tp, data, None, "stage2_midtrain", "float32", stopped + 1),
                   f"checkpoint.resume={step_dir(bf16_run, stopped)}", "checkpoint.load_optimizer=false"])
    try:
        run.train()
        TABLE.add(f"{label(tp)} fp32 one-step run: wall time", f"{run.wall_s:.0f}s")
        yield run
    finally:
        run.keep_results(out_dir)
        run.drop_checkpoints()


# ---------------------------------------------------------------------------------------- tests


def loss_falls(run: Run, what: str) -> str | None:
    """Adds the row; returns what is wrong, or None."""
    losses = run.losses()
    rows = run.metrics()
    skipped = rows[-1]["skipped_steps"] if rows else None
    first = losses.get(1, math.nan)
    last = statistics.mean(losses[s] for s in sorted(losses)[-LOSS_WINDOW:]) if losses else math.nan
    problem = None
    if sorted(losses) != list(range(1, SIZES.steps + 1)):
        problem = f"logged steps {sorted(losses)}, expected 1..{SIZES.steps}"
    elif not all(math.isfinite(v) for v in losses.values()) or skipped != 0:
        problem = f"non-finite or skipped steps: skipped_steps={skipped}, losses {losses}"
    elif not last < first:
        problem = f"the loss did not fall: {losses}"
    TABLE.add(f"{what}: loss, step 1 -> mean of the last {LOSS_WINDOW}", f"{first:.4f} -> {last:.4f}",
              f"falls; steps 1..{SIZES.steps} logged, finite, 0 skipped", problem is None)
    return problem


def test_stage2_bf16_loss_falls(tp, straight):
    problem = loss_falls(straight, f"{label(tp)} bf16")
    assert problem is None, problem


def test_stage2_resume_after_sigusr1_is_bit_exact(tp, straight, resumed):
    run, stopped = resumed
    want, got = straight.losses(), run.losses()
    # Steps up to the stop ran the same computation as straight's in another process: a difference
    # there is run-to-run nondeterminism of the kernels, not the resume.
    before = [s for s in range(1, stopped + 1) if got.get(s) != want.get(s)]
    after = [s for s in range(stopped + 1, SIZES.steps + 1) if got.get(s) != want.get(s)]
    logged = [r["step"] for r in run.metrics()]  # each step once: the restart repeats nothing
    same = SIZES.steps - len(before) - len(after)
    TABLE.add(f"{label(tp)} resume: stopped at step {stopped}, restarted to {SIZES.steps}",
              f"{same}/{SIZES.steps} losses identical", "all == the straight run's",
              not before and not after and logged == list(range(1, SIZES.steps + 1)))
    assert not before, (f"steps {before} (before the stop) differ from the straight run: the computation is "
                        f"not deterministic run to run: {[(s, got.get(s), want.get(s)) for s in before]}")
    assert not after, (f"steps {after} (after the restart at {stopped}) differ: the resume is not exact: "
                       f"{[(s, got.get(s), want.get(s)) for s in after]}")
    assert logged == list(range(1, SIZES.steps + 1)), f"logged steps {logged}"


def test_stage2_bf16_matches_fp32_on_the_same_weights_and_batch(tp, resumed, fp32_step):
    bf16_run, stopped = resumed
    step = stopped + 1
    bf16 = next(r for r in bf16_run.metrics() if r["step"] == step)
    fp32 = next(r for r in fp32_step.metrics() if r["step"] == step)
    loss_rel = abs(bf16["loss"] - fp32["loss"]) / abs(fp32["loss"])
    norm_rel = abs(bf16["grad_norm"] - fp32["grad_norm"]) / abs(fp32["grad_norm"])
    loss_ok = TABLE.add(f"{label(tp)} step-{step} loss, bf16 vs fp32 (step-{stopped} weights)",
                        f"{bf16['loss']:.5f} vs {fp32['loss']:.5f} (rel {loss_rel:.1e})",
                        f"rel <= {LOSS_RTOL:.0e}", loss_rel <= LOSS_RTOL)
    norm_ok = TABLE.add(f"{label(tp)} step-{step} grad norm, bf16 vs fp32",
                        f"{bf16['grad_norm']:.4g} vs {fp32['grad_norm']:.4g} (rel {norm_rel:.1e})",
                        f"rel <= {GRAD_NORM_RTOL:.0e}", norm_rel <= GRAD_NORM_RTOL)
    assert loss_ok and norm_ok, (bf16, fp32)


def test_stage2_throughput_memory_mfu(tp, straight):
    rows = straight.metrics()
    warm = [r for r in rows if r["step"] > WARM_UP_STEPS] or rows

    def median(key: str) -> float:
        return statistics.median(r[key] for r in warm)

    TABLE.add(f"{label(tp)} tokens/s (median, steps {WARM_UP_STEPS + 1}+)", f"{median('tokens_per_s'):,.0f}")
    TABLE.add(f"{label(tp)} step time (median)",
              f"{median('step_time_s'):.3f}s ({SIZES.global_batch} x {SIZES.seq_len} tokens)")
    TABLE.add(f"{label(tp)} TFLOP/s per device (median)", f"{median('tflops_per_device'):.3g}")

    _, peak = gpu_name_and_peak()
    if "mfu" in warm[0]:
        mfu = median("mfu")
        low = SIZES.min_mfu
        # Above 100% the FLOP count counts work that is not done; below the floor something runs
        # far slower than it should (a fallback kernel, a host-bound loop: see the run's log).
        mfu_ok = TABLE.add(f"{label(tp)} MFU (median)", f"{100 * mfu:.1f}%",
                           "<= 100%" if low is None else f"{100 * low:.0f}%..100%",
                           mfu <= 1.0 and (low is None or mfu >= low))
    elif peak is None:
        mfu_ok = TABLE.add(f"{label(tp)} MFU", "not reported: no peak TFLOP/s known for this device")
    else:
        mfu_ok = TABLE.add(f"{label(tp)} MFU", f"missing from metrics.jsonl with cluster.peak_tflops={peak}",
                           "reported", False)

    memory = max(r["memory_gb"] for r in rows)
    limit = SIZES.max_memory_gb
    what = "GPU memory (max_memory_allocated)" if torch.cuda.is_available() else "host memory (RSS)"
    memory_ok = TABLE.add(f"{label(tp)} peak {what}, rank 0", f"{memory:.2f} GB",
                          "-" if limit is None else f"<= {limit:.0f} GB",
                          None if limit is None else memory <= limit)
    # pretrain.plan's prediction for this layout (logged by the trainer of a bf16 run) against the
    # measured peak: the planner's acceptance is within 10% on a GPU (allocated bytes; no reserve).
    planned = rows[0].get("planned_memory_gb")
    plan_ok = True
    if planned is None:
        plan_ok = TABLE.add(f"{label(tp)} memory plan (pretrain.plan)", "missing from metrics.jsonl", "logged", False)
    elif torch.cuda.is_available():
        error = (planned - memory) / memory
        plan_ok = TABLE.add(f"{label(tp)} memory plan vs max_memory_allocated, rank 0",
                            f"{planned:.2f} GB planned, {memory:.2f} GB measured ({100 * error:+.1f}%)",
                            "within 10%", abs(error) <= 0.10)
    else:
        TABLE.add(f"{label(tp)} memory plan, rank 0", f"{planned:.3f} GB planned (compared with "
                  "max_memory_allocated on GPUs only: RSS is not allocator memory)")
    assert mfu_ok, [r.get("mfu") for r in rows]
    assert memory_ok, f"peak memory {memory:.1f} GB > {limit} GB"
    assert plan_ok, f"planned {planned} GB, measured {memory:.2f} GB"


def test_stage1_bf16_loss_falls_and_post_llm_stays_frozen(data, init_checkpoint, qwen3, work, out_dir,
                                                          tmp_path):
    from safetensors.torch import load_file

    from pretrain.config import compose

    run = new_run(work, "tp1-stage1-bf16", 1,
                  overrides(1, data, init_checkpoint, "stage1_prebuffer", "bfloat16", SIZES.steps))
    exported = tmp_path / "final-hf"
    try:
        run.train()
        TABLE.add(f"{label(1, 1)} bf16 run: wall time", f"{run.wall_s:.0f}s")
        problem = loss_falls(run, f"{label(1, 1)} bf16 (post-LLM frozen)")
        # The final checkpoint in the reference HF layout (the user's exporter, on the host)...
        final_ckpt = step_dir(run, SIZES.steps)
        export = [sys.executable, "-m", "pretrain.convert", "to-hf", str(final_ckpt), str(exported)]
        done = subprocess.run(export, cwd=REPO, env=hidden_cuda_env(), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        run.keep_results(out_dir)
        run.drop_checkpoints()
    # ... against the Qwen3 the post-LLM came from: a bf16 run holds its bf16-rounded weights, exactly.
    final = load_file(exported / "model.safetensors")
    pre = compose(list(SIZES.model)).model.pre_buffer_layers
    changed, compared = [], 0
    for key, value in load_file(qwen3 / "model.safetensors").items():
        if key == "lm_head.weight":  # tied: the same tensor as model.embed_tokens.weight
            continue
        ours = key.replace("model.", "language_model.model.", 1)
        if ours.startswith("language_model.model.layers."):  # post-LLM layer i is NEO layer pre + i
            parts = ours.split(".")
            parts[3] = str(int(parts[3]) + pre)
            ours = ".".join(parts)
        compared += 1
        if not torch.equal(final[ours], value.to(torch.bfloat16).float()):
            changed.append(key)
    TABLE.add(f"{label(1, 1)} frozen post-LLM tensors unchanged", f"{compared - len(changed)}/{compared}",
              "all (bf16-rounded Qwen3)", not changed)
    assert problem is None, problem
    assert not changed, f"frozen tensors changed in stage 1: {changed[:10]}"
