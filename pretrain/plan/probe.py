"""Measure the real model for the planner: parameters per rank and activation bytes per token.

Nothing here is a hand-written size formula. Both measurements build the real ``NeoModel`` for one
rank of a TP x PP layout inside this one process, on torch's *fake* process group (collectives do
nothing, every group reports the layout's sizes and ranks), so megatron shards and splits it
exactly as on that rank:

- ``stage_parameters``: the model on the meta device (no memory, a second for 9B): per pipeline
  stage, all parameters and the trainable ones grouped as the optimizer groups them
  (``optim.zero.param_groups``), which is what ZeRO-1's buffers are sized from.
- ``activation_profile``: what autograd keeps for backward (saved-tensor hooks, distinct storages,
  parameters left out), for one micro-batch, by region: the first stage's embedding and patch
  embedding, one pre-Buffer layer, one post-LLM layer, the per-micro-batch tables the first layer
  of every stage saves (Native-RoPE cos/sin, the mask), and the last stage's norm, LM head and
  loss. It runs a real forward on CPU, in the planned dtype, of a small copy of the model: every
  width (hidden, head dim, FFN, vocabulary, vision) divided by f, heads and layers' structure kept.
  A saved tensor is either as wide as one of those widths (bytes proportional to 1/f) or not
  (per-head softmax statistics, pixels, ids: constant), so bytes(f) = A/f + C exactly; two copies
  (f and f/2) give A and C, and the full width is A + C. The token count enters linearly, with
  three coefficients measured from three micro-batches: per token, per extra image token (the
  patch embedding), per extra supervised token (the LM head and loss run only there without
  sequence parallelism).

Both need a process without CUDA and without a process group of its own: ``python -m pretrain.plan``
hides the GPUs before torch looks for them, and ``pretrain.plan.predict_current`` (slurm.submit, the
trainer) runs it as a child process.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from pretrain.model.config import NeoModelConfig

PROBE_TOKENS = 256  # tokens in a probe micro-batch (a multiple of every TP size up to 8, for SP)
PROBE_IMAGE = (8, 16)  # the probe image's token grid: 128 tokens
REGIONS = ("first", "shared", "pre_buffer_layer", "post_llm_layer", "last")


@dataclass(frozen=True)
class StageParameters:
    """One rank of one pipeline stage: parameter counts (elements)."""

    params: int  # every parameter this rank holds
    trainable_groups: tuple[int, ...]  # trainable elements per optimizer group (decay, no decay)
    largest_trainable: int  # elements of the largest trainable parameter (its bf16 gradient is transient)


@dataclass(frozen=True)
class Coefficients:
    """Bytes kept for backward by one region, per token of the micro-batch: every token, plus
    each image token on top, plus each supervised token on top."""

    token: float
    image: float
    supervised: float

    def bytes(self, tokens: int, image_tokens: int, supervised: int) -> float:
        return self.token * tokens + self.image * image_tokens + self.supervised * supervised


@dataclass(frozen=True)
class ActivationProfile:
    """Per-region coefficients of one (TP, SP, recompute, dtype, trainable roles) setting."""

    regions: dict[str, Coefficients]

    def rank_bytes(self, layers: tuple[int, int], first: bool, last: bool, tokens: int, image_tokens: int,
                   supervised: int) -> dict[str, float]:
        """Bytes one micro-batch keeps on a rank with ``layers`` = (pre-Buffer, post-LLM) layer counts."""
        def b(region: str) -> float:
            return self.regions[region].bytes(tokens, image_tokens, supervised)
        return {
            "layers": layers[0] * b("pre_buffer_layer") + layers[1] * b("post_llm_layer"),
            "shared": b("shared") if sum(layers) else 0.0,
            "first": b("first") if first else 0.0,
            "last": b("last") if last else 0.0,
        }


# ------------------------------------------------------------------------------------ fake world


@contextlib.contextmanager
def fake_world(tp: int, pp: int, pp_rank: int = 0) -> Iterator[None]:
    """megatron's parallel state of TP rank 0 of pipeline stage ``pp_rank`` of a TP x PP layout,
    in this process, on torch's fake process group."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from pretrain.distributed import cpu_compat

    if torch.cuda.is_available() or dist.is_initialized():
        raise RuntimeError("the planner's probe needs a process without CUDA and without a process group; "
                           "use pretrain.plan.predict_current")
    cpu_compat.apply()
    dist.init_process_group("fake", store=FakeStore(), rank=pp_rank * tp, world_size=tp * pp)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notes of the collectives megatron calls
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                         create_gloo_process_groups=False)
            model_parallel_cuda_manual_seed(0, force_reset_rng=True)
            yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def _quiet_megatron() -> None:
    import logging

    warnings.filterwarnings("ignore", module="megatron")
    logging.getLogger("megatron").setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------ parameters


def stage_parameters(neo: NeoModelConfig, trainable: tuple[str, ...], tp: int, pp: int,
                     split: tuple[int, ...], dtype: torch.dtype = torch.bfloat16) -> list[StageParameters]:
    """Per pipeline stage, TP rank 0 (every TP rank holds the same counts), from the real model."""
    from pretrain.model.neo import NeoModel, transformer_config
    from pretrain.model.roles import set_trainable
    from pretrain.optim.zero import param_groups

    _quiet_megatron()
    out = []
    for rank in range(pp):
        with fake_world(tp, pp, rank), torch.device("meta"):
            config = transformer_config(neo, tp=tp, pp=pp, pipeline_split=split, dtype=dtype, init_weights=False)
            model = NeoModel(config, neo)
            set_trainable(model, trainable)
            groups = param_groups(model, weight_decay=0.0)
            sizes = [p.numel() for g in groups for p in g["params"]]
            out.append(StageParameters(
                params=sum(p.numel() for p in model.parameters()),
                trainable_groups=tuple(sum(p.numel() for p in g["params"]) for g in groups),
                largest_trainable=max(sizes, default=0),
            ))
    return out


# ----------------------------------------------------------------------------------- activations


def probe_batch(neo: NeoModelConfig, image: bool, supervised: bool, tokens: int = PROBE_TOKENS):
    """One packed row of two documents (the native mask's path, not plain causal): the first opens
    with one image of PROBE_IMAGE tokens if ``image``; every real token is supervised if
    ``supervised``, none otherwise."""
    from pretrain.model.batch import NeoBatch

    g = torch.Generator().manual_seed(0)
    half = tokens // 2
    doc_ids = torch.tensor([[0] * half + [1] * (tokens - half)])
    image_ids = torch.full((1, tokens), -1)
    grids = torch.zeros(0, 2, dtype=torch.long)
    patches = None
    if image:
        rows, cols = PROBE_IMAGE
        image_ids[0, : rows * cols] = 0
        grids = torch.tensor([[rows, cols]])
        merge = round(1 / neo.downsample_ratio)
        patches = torch.randn(merge * merge * rows * cols, 3 * neo.patch_size ** 2, generator=g)
    ids = torch.randint(0, neo.vocab_size, (1, tokens), generator=g)
    return NeoBatch(tokens=ids, labels=ids.roll(-1, 1), loss_mask=torch.full((1, tokens), supervised),
                    doc_ids=doc_ids, image_ids=image_ids, image_grids=grids, patches=patches)


def saved_bytes(model, batch, input_tensor: torch.Tensor | None = None) -> dict[str, int]:
    """Bytes autograd keeps for backward in one training forward of ``model`` (one pipeline stage)
    on ``batch``, by region: distinct storages, each counted in the region that first saves it,
    parameters left out. Regions: ``first`` (before the first decoder layer), ``layer{i}``,
    ``last`` (after the last one: final norm, LM head, loss)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    owner: dict[int, tuple[str, int]] = {}
    region = ["first"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in owner:
            owner[ptr] = (region[0], storage.nbytes())
        return t

    layers = list(model.decoder.layers)
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda *_, i=i: region.__setitem__(0, f"layer{i}")))
    if layers:
        hooks.append(layers[-1].register_forward_hook(lambda *_: region.__setitem__(0, "last")))
    if input_tensor is not None:
        model.set_input_tensor(input_tensor)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(batch)
        del out
    finally:
        for h in hooks:
            h.remove()
    totals: dict[str, int] = {}
    for name, nbytes in owner.values():
        totals[name] = totals.get(name, 0) + nbytes
    return totals


def scale_factors(neo: NeoModelConfig, tp: int) -> tuple[int, int]:
    """(f, f/2): the two width divisors the profile is measured at; the largest f <= 16 with valid
    copies at both (head dim a multiple of 4, every width whole, the vocabulary split over TP)."""
    def valid(f: int) -> bool:
        widths = (neo.hidden_size, neo.head_dim, neo.ffn_hidden_size, neo.vocab_size, neo.vision_hidden_size)
        return (all(w % f == 0 for w in widths) and (neo.head_dim // f) % 4 == 0
                and (neo.vocab_size // f) % tp == 0 and (neo.ffn_hidden_size // f) % tp == 0)
    for f in (16, 8, 4, 2):
        if valid(f) and valid(f // 2):
            return f, f // 2
    raise ValueError(f"model widths {neo.hidden_size}/{neo.head_dim}/{neo.ffn_hidden_size} cannot be halved "
                     "for the activation probe (head dim must stay a multiple of 4)")


def scaled(neo: NeoModelConfig, f: int, pre_buffer: int, post_llm: int) -> NeoModelConfig:
    return replace(neo, hidden_size=neo.hidden_size // f, head_dim=neo.head_dim // f,
                   ffn_hidden_size=neo.ffn_hidden_size // f, vocab_size=neo.vocab_size // f,
                   vision_hidden_size=neo.vision_hidden_size // f,
                   pre_buffer_layers=pre_buffer, post_llm_layers=post_llm)


def _regions_at(neo: NeoModelConfig, trainable: tuple[str, ...], tp: int, sp: bool, recompute: str,
                dtype: torch.dtype, f: int) -> dict[str, dict[str, int]]:
    """Region bytes of a copy of ``neo`` with widths / f, for the three probe micro-batches."""
    from pretrain.model.neo import NeoModel, transformer_config
    from pretrain.model.roles import set_trainable

    pre = 2 if neo.pre_buffer_layers else 0
    post = 2 if neo.post_llm_layers else 0
    if pre + post < 3:  # 3 layers of one kind: the first (which also keeps the tables) told apart
        pre, post = (3, 0) if pre else (0, 3)
    small = scaled(neo, f, pre, post)
    out = {}
    with fake_world(tp, 1):
        config = transformer_config(small, tp=tp, sequence_parallel=sp, dtype=dtype)
        torch.manual_seed(0)
        model = NeoModel(config, small, recompute=recompute)
        set_trainable(model, trainable)
        model.train()
        for kind, image, sup in (("base", False, False), ("image", True, False), ("supervised", False, True)):
            raw = saved_bytes(model, probe_batch(small, image, sup))
            layer = [raw.get(f"layer{i}", 0) for i in range(pre + post)]
            out[kind] = {
                "first": raw.get("first", 0),
                "shared": layer[0] - layer[1],  # layers 0 and 1 are of one kind; 0 also keeps the tables
                "pre_buffer_layer": layer[pre - 1] if pre else 0,
                "post_llm_layer": layer[-1] if post else 0,
                "last": raw.get("last", 0),
            }
    return out


def activation_profile(neo: NeoModelConfig, trainable: tuple[str, ...], tp: int, sp: bool, recompute: str,
                       dtype: torch.dtype = torch.bfloat16) -> ActivationProfile:
    """Bytes per token by region at the full widths of ``neo`` (module docstring)."""
    _quiet_megatron()
    f_hi, f_lo = scale_factors(neo, tp)
    at = {f: _regions_at(neo, tuple(trainable), tp, sp, recompute, dtype, f) for f in (f_hi, f_lo)}
    n, n_img = PROBE_TOKENS, PROBE_IMAGE[0] * PROBE_IMAGE[1]

    def full(kind: str, region: str) -> float:
        hi, lo = at[f_hi][kind][region], at[f_lo][kind][region]
        a = (lo - hi) / (1 / f_lo - 1 / f_hi)  # bytes(f) = a/f + c
        return a + (hi - a / f_hi)

    regions = {}
    for region in REGIONS:
        base = full("base", region)
        regions[region] = Coefficients(
            token=base / n,
            image=(full("image", region) - base) / n_img,
            supervised=(full("supervised", region) - base) / n,
        )
    return ActivationProfile(regions)


# -------------------------------------------------------------------------------- child process


def cpu_only_env() -> dict[str, str]:
    """The environment of a child process that must not see a GPU (the probe)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
