"""Checkpoint benchmark: model weights save/load GB/s with ``pretrain.checkpoint.weights``.

A NEO of a few hundred MB (fp32) in one spawned rank: ``save_weights`` (megatron
dist_checkpointing, reshardable) and ``load_weights`` (strict load into the model), against
``torch.save(model.state_dict())`` / ``torch.load`` + ``load_state_dict`` of the same tensors
to the same file system, interleaved. GB are the bytes of the model's tensors (1 GB = 1e9 B).
Both saves are durable: dist_checkpointing's writer fsyncs every file it writes, and the baseline
fsyncs its one file. Loads read what was just written, from the page cache: an upper bound for a
cold read from a real file system; the ratio is what to watch.

What the restricted unpickling costs (pretrain/checkpoint/restricted.py): ``load_weights`` against
the same dist_checkpointing load without ``check_weights``, and the ZeRO optimizer state through
the restricted DeepSpeed loader against DeepSpeed's own (``weights_only=False``).

    python -m bench.checkpoint [--quick]
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bench.results import Result


def checkpoint_model(quick: bool):
    from bench.model_step import preset

    if quick:
        return replace(preset("tiny"), hidden_size=256, post_llm_layers=2, pre_buffer_layers=0, vocab_size=8192)
    # About 90M parameters, 360 MB in fp32.
    return replace(preset("tiny"), hidden_size=1024, pre_buffer_layers=1, post_llm_layers=3, num_attention_heads=8,
                   num_kv_heads=4, head_dim=128, ffn_hidden_size=3072, vocab_size=32768, vision_hidden_size=256)


def _rank_body(quick: bool, repeats: int, work: str) -> list[dict]:
    from bench.model_step import build_neo
    from bench.timing import interleaved, median, paired_ratio, spread
    from pretrain.checkpoint.weights import load_weights, save_weights
    from pretrain.distributed import runtime

    work = Path(work)
    neo = checkpoint_model(quick)
    out = []
    with runtime.model_parallel(1, 1, seed=1234):
        model = build_neo(neo)
        nbytes = sum(v.numel() * v.element_size() for v in model.state_dict().values() if torch.is_tensor(v))
        counter = iter(range(10_000))
        latest: dict[str, Path] = {}

        def save_ours():
            path = work / f"dist-{next(counter)}"
            save_weights(model, path)
            if "ours" in latest:
                shutil.rmtree(latest["ours"], ignore_errors=True)
            latest["ours"] = path

        def save_torch():
            path = work / f"torch-{next(counter)}.pt"
            with open(path, "wb") as f:  # durable like dist_checkpointing's writer, which fsyncs each file
                torch.save(model.state_dict(), f)
                f.flush()
                os.fsync(f.fileno())
            if "torch" in latest:
                latest["torch"].unlink(missing_ok=True)
            latest["torch"] = path

        def load_ours():
            load_weights(model, latest["ours"])

        def load_torch():
            model.load_state_dict(torch.load(latest["torch"], weights_only=True), strict=True)

        def load_unchecked():  # load_weights before the restricted check
            from megatron.core import dist_checkpointing
            from megatron.core.dist_checkpointing.validation import StrictHandling

            state = dist_checkpointing.load(model.sharded_state_dict(), str(latest["ours"]),
                                            strict=StrictHandling.RAISE_ALL)
            model.load_state_dict(state, strict=True)

        save = interleaved({"ours": save_ours, "torch": save_torch}, repeats, warmup=1)
        load = interleaved({"ours": load_ours, "torch": load_torch}, repeats, warmup=1)
        check = interleaved({"checked": load_ours, "unchecked": load_unchecked}, repeats, warmup=1)
        optimizer = _optimizer_loads(model, work, repeats)
        gb = nbytes / 1e9
        size = (f"{neo.num_parameters() / 1e6:.0f}M-parameter NEO, {nbytes / 1e6:.0f} MB fp32, one rank; saves "
                f"fsync'ed, loads from the page cache")
        for what, secs in (("save", save), ("load", load)):
            out.append(asdict(Result(
                name=f"checkpoint/{what} weights",
                value=gb / median(secs["ours"]), unit="GB/s", baseline_value=gb / median(secs["torch"]),
                notes=(f"{what}_weights (megatron dist_checkpointing) vs torch.{what} of the same state "
                       f"dict; {size}; medians of interleaved runs (ours {spread(secs['ours'])}; "
                       f"torch {spread(secs['torch'])}; median of per-round ratios "
                       f"{paired_ratio(secs['ours'], secs['torch']):.2f})"),
            )))
        for what, secs, (a, b) in (("weights", check, ("checked", "unchecked")),
                                   ("ZeRO optimizer state", optimizer, ("restricted", "deepspeed"))):
            out.append(asdict(Result(
                name=f"checkpoint/load {what}, restricted unpickling",
                value=median(secs[a]), unit="s", baseline_value=median(secs[b]),
                notes=(f"{a} vs {b} load, {size}; cost {100 * (paired_ratio(secs[a], secs[b]) - 1):+.1f}% "
                       f"(median of per-round ratios; {a} {spread(secs[a])}, {b} {spread(secs[b])})"),
            )))
    return out


def _optimizer_loads(model, work: Path, repeats: int) -> dict[str, list[float]]:
    """Seconds to load a ZeRO-1 checkpoint of ``model`` through the restricted loader and through
    DeepSpeed's own."""
    from bench.timing import interleaved
    from pretrain.config import OptimConfig
    from pretrain.checkpoint.restricted import restricted_checkpoint_engine
    from pretrain.optim.zero import _quiet, build_engine

    engine, _ = build_engine(model, OptimConfig(), total_steps=10, micro_batch_size=1, num_microbatches=1,
                             bf16=False)
    from pretrain.optim.zero import main_grads
    from pretrain.plan.probe import probe_batch
    from pretrain.schedule import finalize_grads, forward_backward

    forward_backward(model, [probe_batch(model.neo, True, True, tokens=256)])  # Adam state exists after a step
    finalize_grads(model, main_grads(engine), reduce_data_parallel=False)
    engine.set_gradient_accumulation_boundary(True)
    engine.allreduce_gradients()
    engine.step()
    with _quiet():
        engine.save_checkpoint(str(work / "zero"), tag="zero", save_latest=False)
    stock, restricted = engine.checkpoint_engine, restricted_checkpoint_engine(engine._config)

    def load(checkpoint_engine):
        def run():
            engine.checkpoint_engine = checkpoint_engine
            with _quiet():
                engine.load_checkpoint(str(work / "zero"), tag="zero", load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
        return run

    secs = interleaved({"restricted": load(restricted), "deepspeed": load(stock)}, repeats, warmup=1)
    engine.destroy()
    return secs


def run(quick: bool = False, repeats: int | None = None) -> list[Result]:
    from pretrain.distributed import spawn

    repeats = repeats or (2 if quick else 5)
    work = Path(tempfile.mkdtemp(prefix="neo-bench-ckpt-"))
    try:
        values = spawn.run(_rank_body, 1, args=(quick, repeats, str(work)), timeout=600)[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [Result(**v) for v in values]


def main() -> int:
    from bench.results import section_main

    return section_main(run, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
