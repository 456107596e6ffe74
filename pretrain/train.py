"""python -m pretrain.train [Hydra overrides]: train NEO, launched by torchrun (or slurm/).

    torchrun --standalone --nproc_per_node=4 -m pretrain.train model=tiny stage=stage1_prebuffer \
        parallel.tp=2 parallel.pp=2 data.path=DATA run_dir=runs/x

The config is composed from conf/ and validated against the world size before anything heavy
starts; ``--print-config`` shows the resolved config and exits.
"""

from __future__ import annotations

import os
import sys

from omegaconf import OmegaConf


def config_error(err: BaseException) -> int:
    """The one line every configuration problem ends in (exit status 2), whatever its origin."""
    print(f"config error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str]) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pretrain.config import ConfigError, compose, hydra_error_line, validate

    show = "--print-config" in argv
    overrides = [a for a in argv if a != "--print-config"]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = compose(overrides)
        layout = validate(cfg, world_size)
        if not show:
            check_inputs(cfg)
    except ConfigError as err:
        return config_error(err)
    except (HydraException, OmegaConfBaseException) as err:  # compose maps these; a fallback
        return config_error(ConfigError(hydra_error_line(err)))
    if show:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
        print(f"# layout at world size {world_size}: {layout}")
        return 0
    if "RANK" not in os.environ:  # plain `python -m pretrain.train`: a one-process run
        from pretrain.distributed.spawn import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    from pretrain.distributed import runtime
    from pretrain.checkpoint.checkpointer import CheckpointError
    from pretrain.trainer import NonFiniteError, train

    memory_plan = _memory_plan(cfg, overrides, world_size)
    runtime.init_distributed()
    try:
        return train(cfg, layout, memory_plan)
    except ConfigError as err:
        return config_error(err)
    except (NonFiniteError, CheckpointError) as err:  # CheckpointError: damaged, incomplete or crafted
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        runtime.shutdown()


def check_inputs(cfg) -> None:
    """What the run reads, checked before any process group exists (ConfigError, one line): the
    data is a complete data_prep build, the tokenizer has NEO's special tokens, and a path given
    as init.checkpoint or init.hf_llm exists even when the run resumes and will not load it."""
    from pathlib import Path

    from pretrain.config import ConfigError
    from pretrain.data.loader import check_data_path
    from pretrain.data.template import check_tokenizer

    for key in ("checkpoint", "hf_llm"):
        value = getattr(cfg.init, key)
        if value and not Path(value).exists():
            raise ConfigError(f"init.{key}={value} does not exist")
    if not cfg.data.path:
        raise ConfigError("data.path is not set: point it at a data_prep output directory or an Energon blend YAML")
    check_data_path(cfg.data.path)
    check_tokenizer(*cfg.tokenizer_dir())


def _memory_plan(cfg, overrides: list[str], world_size: int) -> dict | None:
    """pretrain.plan's prediction for this layout, on rank 0 of a bf16 run (the planner models
    bf16 runs); a failure costs a warning line, never the run."""
    import torch

    from pretrain.config import ConfigError
    from pretrain.plan import predict_current

    bf16 = cfg.train.dtype == "bfloat16" or (cfg.train.dtype == "auto" and torch.cuda.is_available())
    if os.environ.get("RANK", "0") != "0" or not bf16:
        return None
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    here = [f"cluster.nodes={max(world_size // per_node, 1)}", f"cluster.gpus_per_node={per_node}"]
    try:
        return predict_current([*overrides, *here])
    except (ConfigError, OSError, ValueError) as err:
        print(f"warning: no memory plan for this run: {err}", file=sys.stderr, flush=True)
        return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
