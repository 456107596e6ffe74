"""The NEO model on megatron-core: layer spec, TransformerConfig and the model itself.

Pipeline stage by stage (a stage may be all of them):
  first:  word embeddings; pixels -> patch embedding -> replaces the <IMG_CONTEXT> embeddings
  every:  native (T, H, W) positions and mask from the batch metadata (no mask when the batch is
          plain causal text, ``NeoBatch.causal``) -> its decoder layers
  last:   final norm -> LM head (tied to the embeddings across stages if configured) ->
          per-token cross-entropy (the weighting and normalisation are pretrain/model/loss.py's)
Every decoder layer, pre-Buffer and post-LLM alike, is megatron's TransformerLayer with
NativeSelfAttention plugged in through the spec (with ``recompute="full"``, its recomputing
subclass RecomputedTransformerLayer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.utils import init_method_normal
from torch.utils.checkpoint import checkpoint

from pretrain.model.batch import NeoBatch
from pretrain.model.config import NeoModelConfig
from pretrain.model.native_attention import NativeAttentionSubmodules, NativeSelfAttention
from pretrain.model.native_rope import native_rope_cos_sin
from pretrain.model.norm import RMSNorm
from pretrain.model.masked_attention import NativeMask
from pretrain.model.positions import native_positions
from pretrain.model.vision_embed import VisionEmbedding


RECOMPUTE = ("none", "selective", "full")  # what backward recomputes instead of keeping (layer_spec)


class RecomputedTransformerLayer(TransformerLayer):
    """megatron's TransformerLayer that keeps only its input for backward and runs again there.

    Not megatron's ``recompute_granularity="full"``: its ``TransformerBlock._checkpointed_forward``
    drops ``rotary_pos_cos/sin``, where NEO's attention reads the Native-RoPE tables. Here torch's
    non-reentrant checkpoint wraps the whole call, so the recompute gets every argument the forward
    got (tables and mask included) and works whether or not the input or the weights need grad
    (frozen stage-1 layers). Collectives inside the layer (TP reductions, SP gathers and scatters)
    run again in backward; every TP rank recomputes the same layers in the same order, so they pair.
    RNG: the recompute runs in backward, outside the CUDA RNG tracker fork that TransformerBlock
    opens around its layers with SP, and checkpoint restores only torch's default generators, not
    the tracker's states (megatron's own CheckpointFunction does). So a dropout drawn inside the
    layer could differ in the recompute. Nothing in a NEO layer draws random numbers (no dropout,
    checked in __init__), so the recompute is the forward, bit for bit.
    """

    def __init__(self, config, *args, **kwargs):
        if config.hidden_dropout or config.attention_dropout:
            raise ValueError("full recompute needs hidden_dropout = attention_dropout = 0 (the RNG tracker "
                             "is not restored for the recompute)")
        super().__init__(config, *args, **kwargs)

    def forward(self, hidden_states, **kwargs):
        if self.training and torch.is_grad_enabled():
            return checkpoint(super().forward, hidden_states, use_reentrant=False, **kwargs)
        return super().forward(hidden_states, **kwargs)


def layer_spec(recompute: str = "none") -> ModuleSpec:
    """One NEO decoder layer: Qwen3's pre-norm block with native attention.

    ``recompute``: ``none`` keeps every activation backward needs; ``selective`` recomputes the
    core attention (its kernel's saved state: output and softmax statistics, or the s*s scores of
    an unfused kernel); ``full`` keeps only each layer's input (RecomputedTransformerLayer).
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r} is not one of {', '.join(RECOMPUTE)}")
    return ModuleSpec(
        module=RecomputedTransformerLayer if recompute == "full" else TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=NativeSelfAttention,
                params={"attn_mask_type": AttnMaskType.arbitrary,
                        "checkpoint_core_attention": recompute == "selective"},
                submodules=NativeAttentionSubmodules(),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def transformer_config(
    model: NeoModelConfig,
    *,
    tp: int = 1,
    pp: int = 1,
    sequence_parallel: bool = False,
    pipeline_split: tuple[int, ...] | list[int] = (),
    dtype: torch.dtype = torch.float32,
    init_weights: bool = True,
) -> TransformerConfig:
    """megatron's TransformerConfig for a NEO shape at a parallel layout.

    Weights are initialised on CPU in full and then split (``use_cpu_initialization``), which makes
    a random init identical across TP layouts; every Linear, output projections included, is
    N(0, init_std) as the reference initialises the pre-Buffer. ``init_weights=False`` skips the
    random init when every weight is about to be loaded (minutes saved at 9B) and allocates
    megatron's weights straight on the current device instead of on the host.
    """
    init = init_method_normal(model.init_std)
    layout = None
    if pipeline_split and len(set(pipeline_split)) > 1:
        stages = ["t" * n for n in pipeline_split]
        stages[0], stages[-1] = "E" + stages[0], stages[-1] + "L"
        layout = "|".join(stages)
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_kv_heads,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.ffn_hidden_size,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        qk_layernorm=True,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method=init,
        output_layer_init_method=init,
        init_method_std=model.init_std,
        perform_initialization=init_weights,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_model_parallel_layout=layout,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=init_weights,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )


class NeoModel(LanguageModule):
    """NEO for one pipeline stage of the current megatron layout."""

    def __init__(self, config: TransformerConfig, neo: NeoModelConfig, pre_process: bool | None = None,
                 post_process: bool | None = None, recompute: str = "none"):
        super().__init__(config=config)
        self.neo = neo
        self.pre_process = parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process
        self.post_process = parallel_state.is_pipeline_last_stage() if post_process is None else post_process
        self.share_embeddings_and_output_weights = neo.tie_word_embeddings
        self.model_type = None  # megatron's schedules only look at it for encoder-decoder models

        if self.pre_process:
            self.embedding = LanguageModelEmbedding(
                config, neo.vocab_size, max_sequence_length=1, position_embedding_type="none",
                scatter_to_sequence_parallel=False,  # pixels go in first, then we scatter
            )
            self.vision = VisionEmbedding(
                llm_hidden=neo.hidden_size,
                vision_hidden=neo.vision_hidden_size,
                patch_size=neo.patch_size,
                downsample_ratio=neo.downsample_ratio,
                rope_theta_vision=neo.rope_theta_vision,
            ).to(config.params_dtype)
            if config.perform_initialization:
                self.vision.reset_parameters(neo.init_std)

        spec = layer_spec(recompute)
        self.decoder = TransformerBlock(
            config,
            TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=RMSNorm),
            pre_process=self.pre_process,
            post_process=self.post_process,
        )
        if self.post_process:
            self.output_layer = ColumnParallelLinear(
                neo.hidden_size,
                neo.vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=False,
                skip_weight_param_allocation=self.pre_process and self.share_embeddings_and_output_weights,
            )
        if self.pre_process or self.post_process:
            self.setup_embeddings_and_output_layer()
        self._mark_tensor_parallel()

    def _mark_tensor_parallel(self) -> None:
        """megatron sets ``tensor_model_parallel``/``partition_dim`` on sharded weights only while
        randomly initialising them; without init (weights about to be loaded) they would look
        replicated to grad-norm and optimizer code. Mark them here, always."""
        for module in self.modules():
            dim = {ColumnParallelLinear: 0, VocabParallelEmbedding: 0, RowParallelLinear: 1}.get(type(module))
            weight = getattr(module, "weight", None) if dim is not None else None
            if weight is not None and not hasattr(weight, "tensor_model_parallel"):
                set_tensor_model_parallel_attributes(weight, True, dim, 1)

    def set_input_tensor(self, input_tensor) -> None:
        """The pipeline schedule hands activations from the previous stage in here."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def embed(self, batch: NeoBatch) -> torch.Tensor:
        """[s, b, h] input embeddings: word embeddings with image tokens put in place."""
        hidden = self.embedding(input_ids=batch.tokens, position_ids=None)  # [s, b, h]
        if batch.has_images:
            image_tokens = self.vision(batch.patches.to(hidden.dtype), batch.image_grids)
            # Image tokens come image by image, row by row of the batch: index [b, s]-major.
            rows, cols = (batch.image_ids >= 0).nonzero(as_tuple=True)
            if rows.numel() != image_tokens.shape[0]:
                raise ValueError(
                    f"batch has {rows.numel()} <IMG_CONTEXT> tokens but its images give {image_tokens.shape[0]}"
                )
            hidden = hidden.index_put((cols, rows), image_tokens.to(hidden.dtype))
        if self.config.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
        return hidden

    def forward(self, batch: NeoBatch, return_logits: bool = False) -> torch.Tensor:
        """First/middle stages: hidden states [s, b, h] for the next stage. Last stage: per-token
        cross-entropy [b, s] (float32; 0 where ``loss_mask`` is False), or full-vocabulary logits
        [b, s, V] if ``return_logits``."""
        neo = self.neo
        positions = native_positions(batch.doc_ids, batch.image_ids, batch.image_grids)
        cos, sin = native_rope_cos_sin(positions, neo.head_dim, neo.rope_theta, neo.rope_theta_hw)
        # No mask for plain causal batches: core attention then runs SDPA's causal kernel (batch.causal
        # is decided on the host). Otherwise the native mask, built once for all layers in the form the
        # device's kernel needs (a FlexAttention BlockMask on CUDA, a plan of kernel calls on CPU).
        mask = None if batch.causal else NativeMask.build(batch.doc_ids, batch.image_ids)
        hidden = self.decoder(
            hidden_states=self.embed(batch) if self.pre_process else None,
            attention_mask=mask,
            rotary_pos_cos=cos,
            rotary_pos_sin=sin,
        )
        if not self.post_process:
            return hidden
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        if return_logits:
            logits, _ = self.output_layer(hidden, weight=weight)  # [s, b, V/tp]
            return tensor_parallel.gather_from_tensor_model_parallel_region(logits).transpose(0, 1).float()
        if self.config.sequence_parallel:  # hidden is a slice of the sequence; the head gathers it
            logits, _ = self.output_layer(hidden, weight=weight)
            return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch.labels.t().contiguous()).t()
        # Only supervised positions reach the LM head: image and prompt tokens (most of a
        # multimodal batch) would spend the largest matmul and the vocabulary softmax on nothing.
        where = batch.loss_mask.t()  # [s, b]
        logits, _ = self.output_layer(hidden[where].unsqueeze(1), weight=weight)  # [n, 1, V/tp]
        ce = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch.labels.t()[where].unsqueeze(1))
        return torch.zeros(where.shape, dtype=ce.dtype, device=ce.device).masked_scatter(where, ce.squeeze(1)).t()
