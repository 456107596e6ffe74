"""python -m pretrain.demo (``make demo``): the whole NEO pipeline end to end on the embedded
synthetic data set, on a laptop-class CPU, proving the model learned to see.

  1. data_prep synthetic: pre-training mix, SFT conversations, text-only, held-out questions
  2. stage 0 (demo only): a randomly initialised tiny Qwen3 (transformers) pre-trained on the text
     as a NEO without pre-Buffer, exported with ``to-hf --qwen3``: the stand-in for downloading Qwen3
  3. stage 1 from that HF directory (init.hf_llm), stage 2 from stage 1, stage 3 (SFT) from stage 2,
     each with 2 processes at a layout with TP or PP > 1, W&B offline, checkpoints
  4. ``to-hf`` export of the final model, then ``pretrain.evaluate`` on the held-out questions
  5. a summary (printed and in DEMO_DIR/summary.json; DEMO_DIR defaults to runs/demo)
``--quick`` (or DEMO_QUICK=1) runs the same path with a fraction of the data and steps (the test).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# name -> (stage config, overrides, data set, steps, steps in --quick)
# PP2 for stages 1-3: on two CPU cores a 2-stage pipeline over 4 micro-batches wastes less than
# TP's per-layer all-reduces; stage 0 (demo only) is plain data parallelism. Micro-batches of 2 rows:
# a tiny model's step is mostly fixed cost, so two rows per micro-batch buy twice the images for
# less than twice the time.
# Steps and rates: every question type stays near the blind baseline after stages 1-2 and is learned
# in SFT, so SFT gets most of the steps. Stages 2-3 at 5e-4, half the tiny recipe's 1e-3: from one
# stage-2 checkpoint, 200 SFT steps at 2e-3 / 1e-3 / 5e-4 / 2.5e-4 answered 45 / 64 / 69 / 71% of
# 245 held-out shape questions (colour 77 / 75 / 86 / 80%).
# A 256-channel patch embedding (the tiny preset has 64): 0.2M parameters more, and the
# best shape accuracy of the variants we ran.
MULTIMODAL = ["train.micro_batch_size=2", "train.global_batch_size=8", "model.vision_hidden_size=256"]
# SFT at 4 rows a step (one per micro-batch) for twice the steps: about the same time as 8 x 270,
# and, from one stage-2 checkpoint, 1000 held-out questions answered colour 95 / shape 79% (86 / 76%
# at 8 x 270). The number of updates matters more than the rows seen. 900 steps, not 540: how early
# the model learns to pick the asked object depends on the SFT draw, and from one stage-2 checkpoint
# an unlucky draw answered colour 91 / shape 82% after 540 steps, 96 / 98% after 900 (+120 s).
SFT_BATCH = ["train.micro_batch_size=1", "train.global_batch_size=4"]
# Stage 1 at a quarter of the recipe's 2e-3: against the frozen LLM the higher rate turns the patch
# filters into colour detectors (measured: a shape probe on the stage-1 patch embedding fell from 88%
# at initialisation to 28%; 42% at 5e-4).
STAGES = [
    ("stage0_text", ["model.pre_buffer_layers=0"], "text", 100, 4),
    ("stage1_prebuffer", ["parallel.pp=2", "optim.lr=5e-4", *MULTIMODAL], "pretrain", 120, 4),
    ("stage2_midtrain", ["parallel.pp=2", "optim.lr=5e-4", *MULTIMODAL], "pretrain", 80, 4),
    ("stage3_sft", ["parallel.pp=2", "optim.lr=5e-4", *MULTIMODAL, *SFT_BATCH], "sft", 900, 4),
]
# data set -> (synthetic --mix, samples, samples in --quick, ' Answer with one word.' after questions)
# SFT (and so the held-out set) asks its questions without the hint: binding the asked word to its
# object is learnt only then (data_prep/synthetic.py, ANSWER_HINT).
# 12000 SFT samples, not 3000: 900 steps draw about 30000, ten passes over 3000, and from one
# stage-2 checkpoint 1000 held-out questions went from colour 90 / shape 89% to 93 / 98% (SFT
# loss 0.06 -> 0.13: less memorised), for 5 s more data preparation.
DATA = {
    "pretrain": ("caption=0.45,conversation=0.45,text=0.1", 6000, 200, True),
    "sft": ("conversation=1", 12000, 100, False),
    "text": ("text=1", 2000, 100, True),
}
HELDOUT, HELDOUT_QUICK = 400, 40


class Demo:
    def __init__(self, root: Path, quick: bool, scale: float = 1.0):
        self.root, self.quick, self.scale = root, quick, scale
        self.times: dict[str, float] = {}
        self.python = sys.executable

    def run(self, name: str, cmd: list[str], log: Path | None = None) -> None:
        """Run one step, streaming its output (to a log file for training stages)."""
        print(f"\n=== {name}: {' '.join(cmd[2:] if cmd[0] == self.python else cmd)}", flush=True)
        started = time.perf_counter()
        if log is None:
            done = subprocess.run(cmd)
        else:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as out:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for line in proc.stdout:
                    out.write(line)
                    if line.startswith(("step ", "saved", "resumed", "training", "done", "model:", "config error",
                                        "Traceback", "error")):
                        print("  " + line, end="", flush=True)
                done = proc
                proc.wait()
        self.times[name] = round(time.perf_counter() - started, 1)
        if done.returncode != 0:
            raise SystemExit(f"demo step '{name}' failed (exit {done.returncode})" + (f"; see {log}" if log else ""))

    # ------------------------------------------------------------------------------------ steps

    def data(self) -> dict[str, Path]:
        paths = {}
        train_tok = None
        for name, (mix, num, quick_num, hint) in DATA.items():
            out = self.root / "data" / name
            cmd = [self.python, "-m", "data_prep", "synthetic", "--output", str(out), "--num",
                   str(quick_num if self.quick else num), "--seed", str(len(paths)), "--mix", mix, "--overwrite",
                   "--answer-hint" if hint else "--no-answer-hint"]
            if train_tok:
                cmd += ["--tokenizer", str(train_tok)]
            self.run(f"data {name}", cmd)
            train_tok = train_tok or out / "tokenizer"
            paths[name] = out
        out = self.root / "data" / "heldout"
        self.run("data heldout", [self.python, "-m", "data_prep", "synthetic", "--output", str(out), "--num",
                                  str(HELDOUT_QUICK if self.quick else HELDOUT), "--seed", "0", "--split", "heldout",
                                  "--mix", "conversation=1", "--no-answer-hint", "--tokenizer", str(train_tok),
                                  "--overwrite"])
        paths["heldout"] = out
        return paths

    def random_qwen3(self, tokenizer: Path) -> Path:
        """A randomly initialised Qwen3 of the tiny preset's post-LLM shape (transformers)."""
        from pretrain.config import compose
        from pretrain.convert.hf import write_random_qwen3

        return write_random_qwen3(compose(["model=tiny"]).model, self.root / "qwen3-random", tokenizer)

    def train(self, stage: str, layout: list[str], data: Path, steps: int, init: str) -> Path:
        run_dir = self.root / stage
        cmd = [self.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "pretrain.train", "model=tiny", f"stage={stage}", *layout, f"data.path={data}",
               f"tokenizer.path={self.root / 'data' / 'pretrain' / 'tokenizer'}", f"run_dir={run_dir}",
               f"train.steps={steps}", f"checkpoint.every={max(1, steps // 2)}", "log.every=10",
               "wandb.mode=offline", "wandb.project=neo-demo", f"wandb.name=demo-{stage}", init]
        self.run(stage, cmd, log=run_dir / "train.log")
        return run_dir

    def main(self) -> dict:
        started = time.perf_counter()
        data = self.data()
        steps = {name: (quick if self.quick else max(1, round(full * self.scale))) for name, _, _, full, quick in STAGES}
        layouts = {name: layout for name, layout, _, _, _ in STAGES}
        datasets = {name: data[d] for name, _, d, _, _ in STAGES}

        random_qwen = self.random_qwen3(data["pretrain"] / "tokenizer")
        s0 = self.train("stage0_text", layouts["stage0_text"], datasets["stage0_text"], steps["stage0_text"],
                        f"init.hf_llm={random_qwen}")
        qwen = self.root / "qwen3-pretrained"
        self.run("export stage 0 as Qwen3", [self.python, "-m", "pretrain.convert", "to-hf",
                                              str(s0 / "checkpoints"), str(qwen), "--qwen3"])
        previous = f"init.hf_llm={qwen}"
        runs = {}
        for stage in ("stage1_prebuffer", "stage2_midtrain", "stage3_sft"):
            runs[stage] = self.train(stage, layouts[stage], datasets[stage], steps[stage], previous)
            previous = f"init.checkpoint={runs[stage] / 'checkpoints'}"

        final = runs["stage3_sft"] / "checkpoints"
        export = self.root / "neo-hf"
        self.run("export to the reference NEO HF layout", [self.python, "-m", "pretrain.convert", "to-hf",
                                                          str(final), str(export)])
        eval_json = self.root / "eval.json"
        self.run("evaluate", [self.python, "-m", "pretrain.evaluate", str(final), "--data", str(data["heldout"]),
                              "--out", str(eval_json)])
        result = json.loads(eval_json.read_text())

        summary = {
            "demo_dir": str(self.root),
            "quick": self.quick,
            "seconds": {**self.times, "total": round(time.perf_counter() - started, 1)},
            "final_loss": {s: _last_loss(self.root / s) for s in ["stage0_text", *runs]},
            "checkpoints": {s: str(self.root / s / "checkpoints") for s in ["stage0_text", *runs]},
            "hf_export": str(export),
            "qwen3_stand_in": str(qwen),
            "wandb_runs": {s: str(self.root / s / "wandb") for s in ["stage0_text", *runs]},
            "eval": result["table"],
            "eval_examples": result["examples"][:5],
        }
        (self.root / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def _last_loss(run_dir: Path) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[-1]["loss"] if rows else None


def print_summary(summary: dict) -> None:
    from pretrain.evaluate import format_table

    print("\n================ NEO demo summary ================")
    for name, seconds in summary["seconds"].items():
        print(f"  {name:<40} {seconds:>8.1f} s")
    print("final losses: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["final_loss"].items() if v is not None))
    print("held-out accuracy (greedy generation, exact match):")
    print(format_table(summary["eval"]))
    print(f"checkpoints: {summary['checkpoints']['stage3_sft']}")
    print(f"HF export:   {summary['hf_export']}")
    print(f"W&B (offline) runs: {summary['wandb_runs']['stage3_sft']} (and one per stage)")
    print(f"summary:     {Path(summary['demo_dir']) / 'summary.json'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("DEMO_QUICK") == "1")
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("DEMO_DIR", "runs/demo")))
    parser.add_argument("--scale", type=float, default=float(os.environ.get("DEMO_SCALE", "1")),
                        help="multiply every stage's steps (more time, better accuracy)")
    args = parser.parse_args(argv)
    if args.dir.exists() and any(args.dir.iterdir()):
        if not (args.dir / "data").is_dir():
            print(f"error: {args.dir} exists and is not a previous demo directory; choose another DEMO_DIR",
                  file=sys.stderr)
            return 2
        shutil.rmtree(args.dir)  # a previous demo: start clean
    args.dir.mkdir(parents=True, exist_ok=True)
    summary = Demo(args.dir.resolve(), args.quick, args.scale).main()
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
