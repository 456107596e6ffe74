"""python -m pretrain.plan [training overrides] cluster=h100_80gb cluster.nodes=N [options]

Every valid layout (TP, PP, DP, micro-batch size, recompute) of the run the overrides describe,
ranked by estimated step time, with its per-GPU memory part by part; layouts over the GPU memory
are listed after the ones that fit, with by how much. The best line is printed as overrides.

    python -m pretrain.plan model=neo_9b stage=stage2_midtrain train.global_batch_size=256 \\
        cluster=h100_80gb cluster.nodes=4

Options: --json (a JSON list, best first), --top N (table rows, default 15), --current (only the
layout the overrides set: what slurm.submit checks and the trainer logs), --reserve-gb G (stated
headroom per GPU, default 4), --efficiency E (assumed fraction of peak for compute, default 0.5).
"""

from __future__ import annotations

import json
import os
import sys

USAGE = "usage: python -m pretrain.plan [hydra overrides] [--json] [--top N] [--current] [--reserve-gb G] [--efficiency E]"


def _options(argv: list[str]) -> tuple[dict, list[str]]:
    opts = {"json": False, "current": False, "top": 15, "reserve_gb": None, "efficiency": None}
    rest, it = [], iter(argv)
    for arg in it:
        if arg in ("--json", "--current"):
            opts[arg[2:]] = True
        elif arg in ("--top", "--reserve-gb", "--efficiency"):
            value = next(it, None)
            try:
                opts[arg[2:].replace("-", "_")] = (int if arg == "--top" else float)(value)
            except (TypeError, ValueError):
                raise ValueError(f"{arg} needs a number, got {value!r}") from None
        elif arg in ("-h", "--help"):
            raise SystemExit(print(__doc__) or 0)
        elif arg.startswith("--"):
            raise ValueError(f"unknown option {arg}")
        else:
            rest.append(arg)
    return opts, rest


def _row(i: int, p) -> str:
    m = p.memory.gb()
    mem = (f"{m['total']:6.1f} {m['weights']:6.1f} {m['gradients']:5.1f} {m['optimizer']:5.1f} "
           f"{m['activations']:6.1f} {m['mask_tables']:5.2f} {m['logits_loss']:6.1f} {m['transient']:5.1f} "
           f"{m['reserve']:4.1f}")
    t = p.time
    times = (f"{t.total:7.2f} {t.compute:7.2f} {t.tp_comm:5.2f} {t.pp_comm:5.2f} {t.bubble:6.2f} {t.dp_comm:5.2f}")
    tps = p.tokens_per_step / t.total / (p.tp * p.pp * p.dp)
    fit = "fits" if p.fits else f"OVER by {p.over_gb:.1f} GB"
    return (f"{i:>3} {p.label():<13} {p.micro_batch_size:>3} {p.recompute:<9} | {mem} | {times} | "
            f"{tps:9.0f} {100 * p.mfu:5.1f}% | {fit}")


HEADER = ("  # layout        mbs recompute | memory GB: total weights grads optim  activ  mask logits trans  rsv "
          "| step s: total compute    TP    PP bubble    DP | tok/s/GPU   MFU | fits")


def main(argv: list[str]) -> int:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the probe runs the model on CPU (before torch touches CUDA)
    from pretrain.config import ConfigError, compose
    from pretrain.plan import DEFAULT_EFFICIENCY, DEFAULT_RESERVE_GB, Planner

    try:
        opts, overrides = _options(argv)
    except ValueError as err:
        print(f"error: {err}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        cfg = compose(overrides)
        planner = Planner(cfg, reserve_gb=DEFAULT_RESERVE_GB if opts["reserve_gb"] is None else opts["reserve_gb"],
                          efficiency=DEFAULT_EFFICIENCY if opts["efficiency"] is None else opts["efficiency"])
        plans = [planner.plan(cfg)] if opts["current"] else planner.plan_all()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the hydra composer's own errors (unknown group, bad value)
        if type(err).__module__.startswith(("hydra", "omegaconf")):
            print(f"config error: {str(err).splitlines()[0]}", file=sys.stderr)
            return 2
        raise
    if opts["json"]:
        print(json.dumps([p.as_json() for p in plans], indent=1))
        return 0
    if not plans:
        print(f"no layout of {planner.world} GPUs passes the training config's validation "
              "(train.global_batch_size must be a multiple of micro_batch_size x DP)", file=sys.stderr)
        return 1
    c, train = cfg.cluster, cfg.train
    fitting = sum(p.fits for p in plans)
    print(f"{cfg.stage.name} of a {cfg.model.num_parameters() / 1e9:.2f}B NEO: seq {train.seq_len}, global batch "
          f"{train.global_batch_size}, {c.nodes} x {c.gpus_per_node} GPUs of {c.gpu_memory_gb:g} GB, "
          f"{c.peak_tflops:g} TFLOP/s, links {c.intra_node_gbps:g}/{c.inter_node_gbps:g} Gbit/s")
    print(f"{len(plans)} layouts, {fitting} fit; compute at {100 * planner.efficiency:.0f}% of peak, "
          f"{planner.reserve_gb:g} GB reserve per GPU; memory of the fullest pipeline stage, worst-case micro-batch")
    print(HEADER)
    for i, p in enumerate(plans[: opts["top"]], 1):
        print(_row(i, p))
    if len(plans) > opts["top"]:
        print(f"... {len(plans) - opts['top']} more (--top N, or --json for all)")
    best = plans[0]
    if best.fits:
        print(f"best: {best.label()}, {best.time.total:.2f} s per step, {best.memory.total / 1e9:.1f} GB per GPU:")
        print("  " + " ".join(best.overrides()))
        return 0
    print(f"no layout fits {c.gpu_memory_gb:g} GB: the closest needs {best.memory.total / 1e9:.1f} GB "
          "(more GPUs, a shorter train.seq_len or a smaller micro-batch)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
