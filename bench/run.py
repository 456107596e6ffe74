"""`make bench`: every benchmark side by side with its baseline, in one run.

    python -m bench [--quick] [--only data model attention gpu checkpoint] [--out runs/bench]

Sections (each is also runnable alone: ``python -m bench.<module>``):
  data        shard build samples/s per worker; loader samples/s per worker and pack fill against
              loose JPEG files + a JSON list read by a plain torch Dataset      (bench/data_path.py)
  model       CPU fwd+bwd tokens/s of the NEO text path against transformers' Qwen3 with identical
              weights; the full multimodal step at two sizes                     (bench/model_step.py)
  attention   CPU attention fwd+bwd following the native mask (block-sparse) against the dense
              additive bias, tiny and h512 widths, seq 4k-16k, stage-1 and SFT packings; executed
              and allowed-pair FLOPs                                              (bench/attention.py)
  gpu         neo_2b shapes in bf16: text at seq 8k/16k vs transformers' Qwen3, packed multimodal
              with FlexAttention at 8k/16k/32k; tokens/s, MFU on useful FLOPs, attention kernels,
              memory; skipped with the reason when there is no GPU                 (bench/gpu.py)
  checkpoint  save_weights/load_weights GB/s against torch.save/torch.load        (bench/checkpoint.py)

Writes ``results.json`` (a list of {name, value, unit, baseline_value, ratio, notes}) and
``results.md`` (the same as a Markdown table, with the machine and the run time on top) into
``--out``, after every section, and prints the table at the end. Comparisons run interleaved
(ours, baseline, baseline, ours, ...) and report medians: the machine may be shared. A section
that fails is recorded as a row saying so; the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import results as results_mod  # noqa: E402
from bench.results import Result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("data", "model", "attention", "gpu", "checkpoint")


def _section(name: str, quick: bool) -> list[Result]:
    if name == "data":
        from bench import data_path

        return data_path.run(quick)
    if name == "model":
        from bench import model_step

        return model_step.run(quick)
    if name == "attention":
        from bench import attention

        return attention.run(quick)
    if name == "gpu":
        from bench import gpu

        return gpu.run(quick)
    if name == "checkpoint":
        from bench import checkpoint

        return checkpoint.run(quick)
    raise ValueError(name)


def _header(quick: bool, elapsed: float, done: list[str]) -> str:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (
        f"# NEO benchmarks{' (--quick)' if quick else ''}\n\n"
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; {platform.machine()} machine with "
        f"{os.cpu_count()} CPUs, GPU: {gpu}; torch {torch.__version__}; sections {', '.join(done)} in "
        f"{elapsed:.0f} s; load average {_load()} (1/5/15 min) at the end.\n"
        "ratio = ours / baseline (above 1.0: ours is faster; for units marked 'lower is better': ours uses more). "
        "Medians of interleaved runs; "
        "a shared machine makes absolute numbers wobble, ratios less so."
    )


def _load() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy sizes, one or two repeats: seconds, for the smoke test")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    collected: list[Result] = []
    failed = []
    done = []
    for name in [s for s in SECTIONS if s in args.only]:
        t0 = time.perf_counter()
        print(f"bench: {name} ... (load average {_load()})", flush=True)
        try:
            rows = _section(name, args.quick)
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others' numbers
            traceback.print_exc()
            failed.append(name)
            rows = [Result(name=f"{name}/(section failed)", value=None, unit="-",
                           notes=f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}")]
        collected += rows
        done.append(name)
        print(f"bench: {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
        results_mod.write(collected, args.out, _header(args.quick, time.perf_counter() - start, done))
    json_path, md_path = results_mod.write(collected, args.out, _header(args.quick, time.perf_counter() - start, done))
    print()
    print(results_mod.markdown_table(collected))
    print(f"bench: {len(collected)} results in {time.perf_counter() - start:.0f} s -> {json_path}, {md_path}")
    if failed:
        print(f"bench: section(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
