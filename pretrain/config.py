"""Run configuration: dataclass schemas (the Hydra structured config) and validation at the edge.

Hydra composes conf/ into these dataclasses; ``validate`` checks the result against the world
size *before any process starts*, so a bad layout costs a one-line error, not a cluster
allocation. Each error names the offending keys and what would fix them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from pretrain.model.config import NeoModelConfig


class ConfigError(ValueError):
    """A configuration that cannot run. The message is one line a user can act on."""


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    # Decoder layers per pipeline stage, first stage first. Empty: split evenly (must divide).
    pipeline_split: list[int] = field(default_factory=list)


@dataclass
class StageConfig:
    name: str = "stage1_prebuffer"
    # Parameter roles that train (pretrain/model/roles.py); everything else is frozen.
    trainable: list[str] = field(default_factory=lambda: ["vision", "pre_buffer", "post_llm_hw"])
    loss_reduction: str = "square"  # token | sample | square (shared/spec/NEO_MODEL.md)


@dataclass
class OptimConfig:
    zero_stage: int = 1
    lr: float = 8e-4
    min_lr_ratio: float = 0.1
    warmup: float = 1000  # >= 1: steps; < 1: fraction of train.steps
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 10
    seq_len: int = 512
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seed: int = 1234
    dtype: str = "auto"  # auto: bf16 on GPUs, fp32 on CPU
    max_skipped_steps: int = 5  # skipped steps in a row before the run stops
    # Nothing bad is saved (pretrain/trainer.py, LossWatch): a loss above loss_ceiling_factor x
    # ln(vocab size) skips its step; one above spike_factor x the median of the last spike_window
    # good losses is a spike. Neither is checkpointed.
    loss_ceiling_factor: float = 3.0
    spike_factor: float = 3.0
    spike_window: int = 20
    # Activations backward recomputes instead of keeping: none | selective (core attention) | full
    # (each decoder layer keeps only its input). pretrain/model/neo.py, layer_spec.
    recompute: str = "none"


@dataclass
class DataConfig:
    path: str = ""  # a data_prep shard directory or an Energon blend (metadataset) YAML
    num_workers: int = 1
    packing_buffer: int = 512  # samples first-fit packed together (fill ~0.97 at seq 1024)
    shuffle_buffer: int = 256
    # false: the loader refuses data whose Energon metadata (.nv-meta/, blend YAMLs) is not what
    # data_prep writes, since it can name classes and Python files Energon imports and runs.
    # true: hand it to Energon as is; only for data whose code you trust.
    trust_dataset_code: bool = False


@dataclass
class TokenizerConfig:
    path: str = ""  # an HF tokenizer dir; empty: <data.path>/tokenizer


@dataclass
class InitConfig:
    hf_llm: str = ""  # a local HF Qwen3 dir: the post-LLM of a fresh NEO (stage 1)
    checkpoint: str = ""  # one of our checkpoints: weights of the previous stage


@dataclass
class CheckpointConfig:
    dir: str = ""  # empty: <run_dir>/checkpoints
    every: int = 100
    keep: int = 3
    resume: str = "auto"  # auto: newest valid checkpoint in dir; never; or a checkpoint path
    load_optimizer: bool = True
    # On resume, optim.* values that differ from the checkpoint's config.yaml (the restored optimizer
    # state would otherwise keep the checkpoint's lr, betas, eps, weight_decay and clip_grad) are
    # refused with the list of keys; true applies this run's values from the resume step on (logged).
    override_schedule: bool = False


@dataclass
class LogConfig:
    every: int = 1


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled; online needs WANDB_API_KEY in the environment
    project: str = "neo-pretrain"
    entity: str = ""
    name: str = ""


@dataclass
class ClusterConfig:
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 0  # 0: SLURM's default
    time: str = "24:00:00"
    partition: str = ""
    account: str = ""
    max_restarts: int = 10
    signal_lead_s: int = 300  # SIGUSR1 this long before the time limit: checkpoint and requeue
    # The GPUs (presets: conf/cluster/). Training reports MFU against peak_tflops; pretrain.plan and
    # slurm.submit check layouts against gpu_memory_gb. 0: unknown (no MFU, no memory check).
    gpu_memory_gb: float = 0.0  # the card's nominal memory, read as 10^9 bytes
    peak_tflops: float = 0.0  # dense bf16 TFLOP/s per GPU
    intra_node_gbps: float = 0.0  # effective NCCL bus bandwidth inside a node (NVLink), Gbit/s
    inter_node_gbps: float = 0.0  # effective NCCL bus bandwidth per GPU between nodes, Gbit/s


@dataclass
class Config:
    run_dir: str = "runs/default"
    model: NeoModelConfig = field(default_factory=NeoModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    init: InitConfig = field(default_factory=InitConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def tokenizer_dir(self) -> tuple[Path, str]:
        """The run's tokenizer directory, and the setting that names it (for messages): tokenizer.path,
        else the data's own ``<data.path>/tokenizer``."""
        if self.tokenizer.path:
            return Path(self.tokenizer.path), "tokenizer.path"
        return Path(self.data.path) / "tokenizer", "<data.path>/tokenizer"


@dataclass(frozen=True)
class Layout:
    """The process layout a valid config implies for a given world size."""

    tp: int
    pp: int
    dp: int
    num_microbatches: int
    layers_per_stage: tuple[int, ...]

    def __str__(self) -> str:
        return f"TP{self.tp}xPP{self.pp}xDP{self.dp}"


# Bounds on the model's shape: past them no GPU holds the weights, and building the model would
# try to allocate them anyway (model.vocab_size=1e9 asked for 512 GB on one rank).
MAX_VOCAB_SIZE = 1 << 20  # 1,048,576: every real tokenizer is far below (Qwen3: 151,936)
MAX_BYTES_PER_RANK = 300e9  # a rank's weights alone at 2 bytes each: more than any GPU holds (288 GB)


def validate(cfg: Config, world_size: int) -> Layout:
    """Check ``cfg`` against ``world_size`` processes; return the layout or raise ConfigError."""
    model, par, train = cfg.model, cfg.parallel, cfg.train
    _validate_model(model)
    model.check()
    tp, pp = par.tp, par.pp
    if tp < 1 or pp < 1:
        raise ConfigError(f"parallel.tp={tp} and parallel.pp={pp} must be >= 1")
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp*parallel.pp = {tp}*{pp} = {tp * pp}; "
            f"use a world size that is a multiple of {tp * pp} or change the layout"
        )
    dp = world_size // (tp * pp)
    if model.num_attention_heads % tp:
        raise ConfigError(
            f"model.num_attention_heads={model.num_attention_heads} is not divisible by parallel.tp={tp}"
        )
    if model.num_kv_heads % tp:
        raise ConfigError(
            f"model.num_kv_heads={model.num_kv_heads} (KV groups) is not divisible by parallel.tp={tp}"
        )
    if par.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
    if par.sequence_parallel and train.seq_len % tp:
        raise ConfigError(f"train.seq_len={train.seq_len} must be divisible by parallel.tp={tp} with sequence parallelism")

    layers = model.num_layers
    if par.pipeline_split:
        split = tuple(int(n) for n in par.pipeline_split)
        if len(split) != pp or sum(split) != layers or min(split) < 1:
            raise ConfigError(
                f"parallel.pipeline_split={list(split)} must list {pp} positive layer counts summing to "
                f"{layers} (pre-Buffer {model.pre_buffer_layers} + post-LLM {model.post_llm_layers})"
            )
    elif layers % pp:
        raise ConfigError(
            f"{layers} decoder layers do not split evenly over parallel.pp={pp} stages; "
            f"set parallel.pipeline_split (e.g. {_suggest_split(layers, pp)})"
        )
    else:
        split = (layers // pp,) * pp

    if model.vocab_size % tp:
        raise ConfigError(f"model.vocab_size={model.vocab_size} is not divisible by parallel.tp={tp} (pad it to a multiple of 128)")

    per_rank = model.num_parameters() / (tp * pp)  # the average rank: the fullest holds at least this
    if 2 * per_rank > MAX_BYTES_PER_RANK:
        raise ConfigError(
            f"this model puts at least {per_rank / 1e9:.1f}B parameters on one rank at TP{tp}xPP{pp} ({2 * per_rank / 1e9:.0f} GB "
            f"of bf16 weights alone, more than any GPU holds): check the model.* sizes or raise parallel.tp/parallel.pp"
        )

    mbs, gbs = train.micro_batch_size, train.global_batch_size
    if mbs < 1 or gbs < 1 or gbs % (mbs * dp):
        raise ConfigError(
            f"train.global_batch_size={gbs} must be a multiple of train.micro_batch_size*DP = {mbs}*{dp} = {mbs * dp}"
        )
    num_micro = gbs // (mbs * dp)

    zero = cfg.optim.zero_stage
    if zero not in (0, 1, 2, 3):
        raise ConfigError(f"optim.zero_stage={zero} must be 0, 1, 2 or 3")
    if zero >= 2 and pp > 1:
        raise ConfigError(
            f"optim.zero_stage={zero} cannot be used with pipeline parallelism (parallel.pp={pp}): "
            "ZeRO-2/3 partition gradients during backward, which the pipeline schedule runs itself; use zero_stage=1"
        )
    if zero >= 2 and num_micro > 1:
        raise ConfigError(
            f"optim.zero_stage={zero} cannot accumulate {num_micro} micro-batches run by the Megatron schedule "
            "(gradients would be reduced before accumulation ends); use zero_stage=1 or one micro-batch per step"
        )
    _validate_run(cfg)
    return Layout(tp=tp, pp=pp, dp=dp, num_microbatches=num_micro, layers_per_stage=split)


def _validate_model(model: NeoModelConfig) -> None:
    """Sizes a model can have at all (before ``model.check``, which divides by some of them)."""
    positive = ("hidden_size", "num_attention_heads", "num_kv_heads", "head_dim", "ffn_hidden_size", "vocab_size",
                "vision_hidden_size", "patch_size")
    for name in positive:
        if getattr(model, name) < 1:
            raise ConfigError(f"model.{name}={getattr(model, name)} must be >= 1")
    for name in ("pre_buffer_layers", "post_llm_layers"):
        if getattr(model, name) < 0:
            raise ConfigError(f"model.{name}={getattr(model, name)} must be >= 0")
    if model.vocab_size > MAX_VOCAB_SIZE:
        raise ConfigError(f"model.vocab_size={model.vocab_size} is beyond {MAX_VOCAB_SIZE:,}: no tokenizer has that "
                          "many tokens (set it to the tokenizer's size, padded to a multiple of 128)")
    for name in ("rope_theta", "rope_theta_hw", "rope_theta_vision", "norm_eps", "init_std"):
        value = getattr(model, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"model.{name}={value} must be a finite number > 0")
    if not (math.isfinite(model.downsample_ratio) and 0 < model.downsample_ratio <= 1):
        raise ConfigError(f"model.downsample_ratio={model.downsample_ratio} must be in (0, 1]")


def _validate_numbers(cfg: Config) -> None:
    """Numbers that parse but cannot run: negative counts, a NaN learning rate, a warm-up of -5."""

    def need(ok: bool, key: str, value, what: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={value} {what}")

    o, t, d = cfg.optim, cfg.train, cfg.data
    finite = math.isfinite
    need(finite(o.lr) and o.lr > 0, "optim.lr", o.lr, "must be a finite number > 0")
    need(finite(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio,
         "must be in [0, 1] (the final learning rate as a fraction of optim.lr)")
    need(finite(o.warmup) and o.warmup >= 0, "optim.warmup", o.warmup,
         "must be >= 0 (>= 1: a number of steps; below 1: a fraction of train.steps)")
    need(o.warmup < 1 or float(o.warmup).is_integer(), "optim.warmup", o.warmup,
         "is a number of steps (>= 1) and must be whole; below 1 it is a fraction of train.steps")
    need(finite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be a finite number >= 0")
    need(finite(o.beta1) and 0 <= o.beta1 < 1, "optim.beta1", o.beta1, "must be in [0, 1)")
    need(finite(o.beta2) and 0 <= o.beta2 < 1, "optim.beta2", o.beta2, "must be in [0, 1)")
    need(finite(o.eps) and o.eps > 0, "optim.eps", o.eps, "must be a finite number > 0")
    need(finite(o.clip_grad) and o.clip_grad >= 0, "optim.clip_grad", o.clip_grad,
         "must be a finite number >= 0 (0: no clipping)")
    need(t.seq_len >= 2, "train.seq_len", t.seq_len, "must be >= 2 (a packed row of tokens)")
    need(t.max_skipped_steps >= 1, "train.max_skipped_steps", t.max_skipped_steps, "must be >= 1")
    need(finite(t.loss_ceiling_factor) and t.loss_ceiling_factor > 1, "train.loss_ceiling_factor",
         t.loss_ceiling_factor, "must be a finite number > 1 (times the loss of uniform guessing)")
    need(finite(t.spike_factor) and t.spike_factor > 1, "train.spike_factor", t.spike_factor,
         "must be a finite number > 1 (times the median of recent losses)")
    need(t.spike_window >= 1, "train.spike_window", t.spike_window, "must be >= 1 (good losses in the median)")
    need(t.seed >= 0, "train.seed", t.seed, "must be >= 0")
    need(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0 (0: load in the trainer process)")
    need(d.packing_buffer >= 1, "data.packing_buffer", d.packing_buffer, "must be >= 1")
    need(d.shuffle_buffer >= 0, "data.shuffle_buffer", d.shuffle_buffer, "must be >= 0 (0: no shuffle buffer)")
    need(cfg.checkpoint.keep >= 0, "checkpoint.keep", cfg.checkpoint.keep, "must be >= 0 (0: keep every checkpoint)")


def _validate_run(cfg: Config) -> None:
    """Settings of the run itself (not of the layout)."""
    _validate_numbers(cfg)
    from pretrain.model.loss import REDUCTIONS
    from pretrain.model.roles import ROLES

    unknown = set(cfg.stage.trainable) - set(ROLES)
    if unknown:
        raise ConfigError(f"stage.trainable has unknown roles {sorted(unknown)}; known: {', '.join(ROLES)}")
    if cfg.model.tie_word_embeddings and len(set(cfg.stage.trainable) & {"embedding", "lm_head"}) == 1:
        raise ConfigError("stage.trainable: with tied word embeddings 'embedding' and 'lm_head' are one tensor; list both or neither")
    if cfg.stage.loss_reduction not in REDUCTIONS:
        raise ConfigError(f"stage.loss_reduction={cfg.stage.loss_reduction!r} is not one of {', '.join(REDUCTIONS)}")
    if cfg.train.dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"train.dtype={cfg.train.dtype!r} must be auto, float32 or bfloat16")
    if cfg.train.recompute not in ("none", "selective", "full"):  # neo.RECOMPUTE, without importing megatron
        raise ConfigError(f"train.recompute={cfg.train.recompute!r} must be none, selective or full")
    if cfg.wandb.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"wandb.mode={cfg.wandb.mode!r} must be offline, online or disabled")
    if cfg.train.steps < 1 or cfg.checkpoint.every < 1 or cfg.log.every < 1:
        raise ConfigError("train.steps, checkpoint.every and log.every must be >= 1")
    if cfg.init.hf_llm and cfg.init.checkpoint:
        raise ConfigError("set init.hf_llm (start from Qwen3) or init.checkpoint (start from a previous stage), not both")


def _suggest_split(layers: int, pp: int) -> list[int]:
    base, extra = divmod(layers, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> Config:
    """Compose conf/ with Hydra command-line style overrides into a typed, schema-checked Config.

    For tools that need the config outside a ``@hydra.main`` entry point (tests, slurm/submit).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _register_schema()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        _check_keys(OmegaConf.to_container(cfg), Config, "")
        return OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as err:  # bad value, unknown key or group option, syntax
        raise ConfigError(hydra_error_line(err)) from None


def hydra_error_line(err: BaseException) -> str:
    """One line for an error of Hydra's composition or OmegaConf's schema check (both are
    multi-line, and an unknown key suggests '+key=...', which ``_check_keys`` then refuses)."""
    import re

    cause = err.__cause__ if err.__cause__ is not None else err.__context__
    key = getattr(cause, "full_key", None) or getattr(err, "full_key", None)
    text = _squash(str(err))
    reason = _squash(str(getattr(cause, "msg", None) or cause or ""))
    if key and type(cause).__name__ in ("ConfigAttributeError", "ConfigKeyError"):
        parent = str(key).rpartition(".")[0]
        known = _known_keys(parent)
        listing = f" (known under '{parent or '<root>'}': {', '.join(known)})" if known is not None else ""
        return f"Could not override '{key}': unknown config key '{key}'{listing}"
    if key and reason:
        merging = re.match(r"Error merging override (\S+)", text)
        return f"{merging.group(1) if merging else key}: {reason}"
    missing = re.match(r"In '[^']*': Could not find '([^']+)'\s+Available options in '([^']+)':(.*?)(Config search path|$)",
                       str(err), re.S)
    if missing:
        options = ", ".join(missing.group(3).split())
        return f"Could not find '{missing.group(1)}' (available options in '{missing.group(2)}': {options})"
    return text


def _squash(text: str) -> str:
    """Hydra's and OmegaConf's messages on one line, without the config search path and the
    full_key/object_type trailer (they repeat what the line already says)."""
    text = " ".join(text.split())
    for cut in (" Config search path", " full_key:", " reference_type=", " object_type="):
        text = text.split(cut)[0]
    return text.strip()


def _known_keys(parent: str) -> list[str] | None:
    schema = Config
    for part in [p for p in parent.split(".") if p]:
        sub = next((f.default_factory for f in fields(schema) if f.name == part and is_dataclass(f.default_factory)), None)
        if sub is None:
            return None
        schema = sub
    return [f.name for f in fields(schema)]


def _check_keys(node: dict, schema: type, prefix: str) -> None:
    """Reject keys the schema does not know, including ones added with '+key=value' (Hydra lets
    those through and to_object drops them silently: a typo must not become a silent default)."""
    known = {f.name: f.type for f in fields(schema)}
    for key, value in node.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known under '{prefix.rstrip('.') or '<root>'}': {', '.join(known)})")
        sub = next((f.default_factory for f in fields(schema) if f.name == key and is_dataclass(f.default_factory)), None)
        if isinstance(value, dict) and sub is not None:
            _check_keys(value, sub, f"{prefix}{key}.")
