"""python -m pretrain.convert {from-hf,to-hf} ...: move checkpoints to and from HF.

  from-hf SRC OUT [--pre-buffer-layers N]   HF Qwen3 (becomes the post-LLM) or reference NEO -> ours
  to-hf CKPT OUT [--qwen3] [--dtype D]      ours (saved at any TP/PP layout) -> reference NEO HF
                                            (or plain Qwen3 with --qwen3)
"""

from __future__ import annotations

import argparse
import sys
import time

from pretrain.checkpoint.checkpointer import CheckpointError
from pretrain.convert.hf import from_hf, to_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("from-hf", help="HF Qwen3 or reference NEO checkpoint -> our checkpoint")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--pre-buffer-layers", type=int, default=0,
                   help="fresh NEO layers in front of a Qwen3 post-LLM (12 for NEO-2.2B, 6 for NEO-9B)")
    p.add_argument("--vision-hidden-size", type=int, default=None, help="patch embedding width (default 1024)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the pre-Buffer and vision init")
    p = sub.add_parser("to-hf", help="our checkpoint -> reference NEO HF layout (or Qwen3)")
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--qwen3", action="store_true", help="write a plain Qwen3 checkpoint (no pre-Buffer, zero k_proj_hw)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        if args.command == "from-hf":
            neo = from_hf(args.src, args.out, args.pre_buffer_layers, args.seed, args.vision_hidden_size)
            what = f"{neo.pre_buffer_layers} pre-Buffer + {neo.post_llm_layers} post-LLM layers, vocab {neo.vocab_size}"
        else:
            to_hf(args.ckpt, args.out, qwen3=args.qwen3, dtype=args.dtype)
            what = "Qwen3" if args.qwen3 else "reference NEO layout"
    except CheckpointError as err:  # damaged, incomplete or crafted: a failure, not a usage error
        _error(err)
        return 1
    except (FileNotFoundError, ValueError) as err:  # the wrong directory or kind of checkpoint
        _error(err)
        return 2
    except OSError as err:  # reading or writing failed (permissions, a full disk)
        _error(err)
        return 1
    print(f"wrote {args.out} ({what}) in {time.perf_counter() - start:.1f}s")
    return 0


def _error(err: BaseException) -> None:
    """The one line a failed conversion prints."""
    print(f"error: {' '.join(str(err).splitlines())}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
