"""The layout planner: which TP x PP x DP, micro-batch size and recompute mode fit the GPUs and run
fastest, before a job is queued (``python -m pretrain.plan``; ``slurm.submit`` and the trainer's
first log lines use the same prediction).

    probe.py      measures the real model: parameters per rank (meta device), activation bytes
                  per token (saved-tensor hooks on small copies), on torch's fake process group
    memory.py     per-GPU memory of a layout, part by part
    step_time.py  estimated step time: compute, TP communication, pipeline bubble, DP reduction

Every candidate passes the same ``pretrain.config.validate`` as training. Sequence parallelism is
on whenever TP > 1 (it divides the layer-norm and residual activations by TP for the same
communication volume), TP stays inside a node, and uneven layer counts get the most even
``parallel.pipeline_split``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from pretrain.config import Config, ConfigError, Layout, _suggest_split, validate
from pretrain.plan.memory import GB, Memory, stage_memory
from pretrain.plan.probe import ActivationProfile, StageParameters, activation_profile, stage_parameters
from pretrain.plan.step_time import Links, StepTime, step_time, useful_flops

RECOMPUTE = ("none", "selective", "full")
MICRO_BATCH_SIZES = (1, 2, 4, 8)
DEFAULT_RESERVE_GB = 4.0
DEFAULT_EFFICIENCY = 0.5


@dataclass
class LayoutPlan:
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    recompute: str
    sequence_parallel: bool
    pipeline_split: tuple[int, ...]
    num_microbatches: int
    stages: list[Memory]  # one rank of each pipeline stage
    time: StepTime | None  # None without the cluster's peak and bandwidths
    gpu_memory_gb: float
    tokens_per_step: int
    mfu: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def memory(self) -> Memory:
        """The binding rank: the stage with the most memory."""
        return max(self.stages, key=lambda m: m.total)

    @property
    def fits(self) -> bool:
        return self.gpu_memory_gb <= 0 or self.memory.total <= self.gpu_memory_gb * GB

    @property
    def over_gb(self) -> float:
        return max(self.memory.total / GB - self.gpu_memory_gb, 0.0) if self.gpu_memory_gb > 0 else 0.0

    def label(self) -> str:
        return f"TP{self.tp}xPP{self.pp}xDP{self.dp}"

    def overrides(self) -> list[str]:
        out = [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}",
               f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}"]
        uneven = len(set(self.pipeline_split)) > 1
        out.append(f"parallel.pipeline_split=[{','.join(map(str, self.pipeline_split))}]" if uneven
                   else "parallel.pipeline_split=[]")
        return out + [f"train.micro_batch_size={self.micro_batch_size}", f"train.recompute={self.recompute}"]

    def as_json(self) -> dict:
        return {
            "tp": self.tp, "pp": self.pp, "dp": self.dp, "micro_batch_size": self.micro_batch_size,
            "recompute": self.recompute, "sequence_parallel": self.sequence_parallel,
            "pipeline_split": list(self.pipeline_split), "num_microbatches": self.num_microbatches,
            "memory_gb": self.memory.gb(), "memory_gb_per_stage": [m.total / GB for m in self.stages],
            # what torch.cuda.max_memory_allocated should reach on a rank of each stage (no reserve)
            "allocated_gb_per_stage": [(m.total - m.reserve) / GB for m in self.stages],
            "gpu_memory_gb": self.gpu_memory_gb, "fits": self.fits, "over_gb": self.over_gb,
            "step_time_s": self.time.total if self.time else None,
            "step_time_parts_s": self.time.parts() if self.time else None,
            "tokens_per_s": self.tokens_per_step / self.time.total if self.time else None, "mfu": self.mfu,
            "overrides": self.overrides(),
        }


def stage_layer_kinds(neo, split: tuple[int, ...]) -> list[tuple[int, int]]:
    """(pre-Buffer, post-LLM) decoder layers of each pipeline stage (the pre-Buffer comes first)."""
    kinds, start = [], 0
    for n in split:
        pre = max(0, min(start + n, neo.pre_buffer_layers) - start)
        kinds.append((pre, n - pre))
        start += n
    return kinds


GPU_FACTS = ("gpu_memory_gb", "peak_tflops", "intra_node_gbps", "inter_node_gbps")


def missing_gpu_facts(cfg: Config, keys: tuple[str, ...]) -> list[str]:
    return [k for k in keys if not getattr(cfg.cluster, k) > 0]


class Planner:
    """Plans layouts of one config; the probe's measurements are cached across candidates."""

    def __init__(self, cfg: Config, reserve_gb: float = DEFAULT_RESERVE_GB, efficiency: float = DEFAULT_EFFICIENCY):
        if cfg.train.dtype == "float32":
            raise ConfigError("pretrain.plan models bf16 GPU runs; drop train.dtype=float32")
        if not 0 < efficiency <= 1:
            raise ConfigError(f"efficiency={efficiency} must be in (0, 1]")
        self.cfg, self.reserve_gb, self.efficiency = cfg, reserve_gb, efficiency
        self.trainable = tuple(cfg.stage.trainable)
        self._params: dict[tuple, list[StageParameters]] = {}
        self._profiles: dict[tuple, ActivationProfile] = {}

    @property
    def world(self) -> int:
        return self.cfg.cluster.nodes * self.cfg.cluster.gpus_per_node

    def candidates(self) -> list[Config]:
        """Every layout the search covers that training would accept at this world size."""
        cfg, out = self.cfg, []
        layers = cfg.model.num_layers
        for tp in (t for t in (1, 2, 4, 8, 16) if t <= cfg.cluster.gpus_per_node and self.world % t == 0):
            for pp in (p for p in range(1, layers + 1) if (self.world // tp) % p == 0):
                for mbs in MICRO_BATCH_SIZES:
                    for recompute in RECOMPUTE:
                        c = copy.deepcopy(cfg)
                        c.parallel.tp, c.parallel.pp, c.parallel.sequence_parallel = tp, pp, tp > 1
                        c.parallel.pipeline_split = [] if layers % pp == 0 else _suggest_split(layers, pp)
                        c.train.micro_batch_size, c.train.recompute = mbs, recompute
                        try:
                            validate(c, self.world)
                        except ConfigError:
                            continue
                        out.append(c)
        return out

    def plan_all(self) -> list[LayoutPlan]:
        """Every candidate, best first: layouts that fit by step time, then those over memory."""
        missing = missing_gpu_facts(self.cfg, GPU_FACTS)
        if missing:
            raise ConfigError(f"the plan needs the GPUs' facts: set {', '.join('cluster.' + k for k in missing)} "
                              "or pick a preset (cluster=h100_80gb, cluster=h200_141gb)")
        plans = [self.plan(c) for c in self.candidates()]
        return sorted(plans, key=lambda p: (not p.fits, p.time.total))

    def plan(self, cfg: Config) -> LayoutPlan:
        """The prediction for ``cfg``'s own layout (validated at this world size)."""
        layout: Layout = validate(cfg, self.world)
        neo, train, sp = cfg.model, cfg.train, cfg.parallel.sequence_parallel
        split = layout.layers_per_stage
        key = (layout.tp, layout.pp, split)
        if key not in self._params:
            self._params[key] = stage_parameters(neo, self.trainable, layout.tp, layout.pp, split)
        params = self._params[key]
        profile = self._profile(layout.tp, sp, train.recompute)
        # What backward rebuilds, one layer at a time: the whole layer (full) or its attention (selective).
        rebuilt = self._profile(layout.tp, sp, "none") if train.recompute != "none" else None
        kinds = stage_layer_kinds(neo, split)
        tokens = train.micro_batch_size * train.seq_len
        stages = [stage_memory(r, params, kinds, layout.dp, layout.num_microbatches, tokens, neo.hidden_size,
                               neo.vocab_size // layout.tp, layout.tp, sp, profile, rebuilt, self.reserve_gb)
                  for r in range(layout.pp)]
        cluster = cfg.cluster
        time = mfu = None
        if not missing_gpu_facts(cfg, ("peak_tflops", "intra_node_gbps", "inter_node_gbps")):
            links = Links(cluster.gpus_per_node, cluster.intra_node_gbps, cluster.inter_node_gbps)
            time = step_time(neo, self.trainable, tp=layout.tp, pp=layout.pp, dp=layout.dp, split=split,
                             micro_batch_size=train.micro_batch_size, micro_batches=layout.num_microbatches,
                             seq_len=train.seq_len, recompute=train.recompute, sp=sp,
                             trainable_bytes_per_rank=[m.gradients for m in stages], peak_tflops=cluster.peak_tflops,
                             efficiency=self.efficiency, links=links)
            flops = useful_flops(neo, self.trainable, train.seq_len, train.micro_batch_size,
                                 layout.num_microbatches, layout.dp)
            mfu = flops / time.total / (self.world * cluster.peak_tflops * 1e12)
        return LayoutPlan(
            tp=layout.tp, pp=layout.pp, dp=layout.dp, micro_batch_size=train.micro_batch_size,
            recompute=train.recompute, sequence_parallel=sp, pipeline_split=split,
            num_microbatches=layout.num_microbatches, stages=stages, time=time,
            gpu_memory_gb=cluster.gpu_memory_gb, tokens_per_step=train.global_batch_size * train.seq_len, mfu=mfu,
        )

    def _profile(self, tp: int, sp: bool, recompute: str) -> ActivationProfile:
        key = (tp, sp, recompute)
        if key not in self._profiles:
            self._profiles[key] = activation_profile(self.cfg.model, self.trainable, tp, sp, recompute)
        return self._profiles[key]


def predict_current(overrides: list[str] | tuple[str, ...], timeout_s: float = 600.0) -> dict:
    """``LayoutPlan.as_json()`` of the layout the overrides set (``python -m pretrain.plan --current
    --json``), computed in a child process that sees no GPU: the probe runs the model on CPU on a
    fake process group, which must not meet this process's CUDA context or process group.
    Raises ConfigError with the child's one-line error."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from pretrain.plan.probe import cpu_only_env

    try:
        proc = subprocess.run([sys.executable, "-m", "pretrain.plan", "--current", "--json", *overrides],
                              capture_output=True, text=True, env=cpu_only_env(), timeout=timeout_s,
                              cwd=Path(__file__).resolve().parents[2])
    except subprocess.TimeoutExpired:
        raise ConfigError(f"the memory plan took longer than {timeout_s:.0f} s") from None
    if proc.returncode:
        lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
        raise ConfigError(f"the memory plan failed: {lines[-1]}")
    return json.loads(proc.stdout)[0]


def describe(prediction: dict) -> str:
    """One line: the predicted per-GPU memory of the fullest stage, part by part."""
    m = prediction["memory_gb"]
    parts = ", ".join(f"{k.replace('_', '/')} {m[k]:.2f}" for k in
                      ("weights", "gradients", "optimizer", "activations", "mask_tables", "logits_loss", "transient",
                       "reserve"))
    limit = prediction["gpu_memory_gb"]
    verdict = (f" of {limit:g} GB: fits" if prediction["fits"] else f": OVER {limit:g} GB by {prediction['over_gb']:.1f} GB") \
        if limit > 0 else " (cluster.gpu_memory_gb unknown: not checked)"
    return f"{m['total']:.2f} GB per GPU{verdict} ({parts})"
