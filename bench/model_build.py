"""Seconds to build one rank's NeoModel, with megatron's random initialisation (a fresh run) and
without it (resume, ``init.checkpoint``, ``init.hf_llm``: every weight is loaded next).

    python -m bench.model_build [--model neo_2b] [--tp 1] [--dtype float32]

One process at TP1PP1 by default (``--tp N`` builds rank 0 of a TPN layout inside N processes).
"""

from __future__ import annotations

import argparse
import time

from pretrain.distributed import spawn


def _build_body(model_name: str, tp: int, dtype_name: str) -> dict:
    import gc

    import torch

    from pretrain.config import compose
    from pretrain.distributed import runtime
    from pretrain.model.neo import NeoModel, transformer_config

    neo = compose([f"model={model_name}"]).model
    dtype = getattr(torch, dtype_name)
    out = {}
    with runtime.model_parallel(tp, 1):
        for init in (True, False):
            started = time.perf_counter()
            model = NeoModel(transformer_config(neo, tp=tp, dtype=dtype, init_weights=init), neo)
            out["random init" if init else "no init (weights loaded next)"] = time.perf_counter() - started
            out["parameters on rank 0"] = sum(p.numel() for p in model.parameters())
            del model
            gc.collect()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="neo_2b")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    result = spawn.run(_build_body, args.tp, args=(args.model, args.tp, args.dtype), timeout=1800)[0]
    print(f"{args.model} TP{args.tp}PP1 {args.dtype}, rank 0 holds {result.pop('parameters on rank 0') / 1e9:.2f}B parameters")
    for name, seconds in result.items():
        print(f"  build with {name:<30} {seconds:7.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
