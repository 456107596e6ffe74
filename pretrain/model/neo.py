"""The NEO model on megatron-core: layer spec, TransformerConfig and the model itself.

Pipeline stage by stage (a stage may be all of them):
  first:  word embeddings; pixels -> patch embedding -> replaces the <IMG_CONTEXT> embeddings
  every:  native (T, H, W) positions and mask from the batch metadata (no mask when the batch is
          plain causal text, ``NeoBatch.causal``) -> its decoder layers
  last:   final norm -> LM head (tied to the embeddings across stages if configured) ->
          per-token cross-entropy (the weighting and normalisation are pretrain/model/loss.py's)
Every decoder layer, pre-Buffer and post-LLM alike, is megatron's TransformerLayer with
NativeSelfAttention plugged in through the spec.
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

from pretrain.model.batch import NeoBatch
from pretrain.model.config import NeoModelConfig
from pretrain.model.native_attention import NativeAttentionSubmodules, NativeSelfAttention
from pretrain.model.native_rope import native_rope_cos_sin
from pretrain.model.norm import RMSNorm
from pretrain.model.positions import native_attention_bias, native_positions
from pretrain.model.vision_embed import VisionEmbedding


def layer_spec() -> ModuleSpec:
    """One NEO decoder layer: Qwen3's pre-norm block with native attention."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=NativeSelfAttention,
                params={"attn_mask_type": AttnMaskType.arbitrary},
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
    random init when every weight is about to be loaded (minutes saved at 9B).
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
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )


class NeoModel(LanguageModule):
    """NEO for one pipeline stage of the current megatron layout."""

    def __init__(self, config: TransformerConfig, neo: NeoModelConfig, pre_process: bool | None = None,
                 post_process: bool | None = None):
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

        spec = layer_spec()
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
        # No mask for plain causal batches: core attention then runs SDPA's causal kernel, which
        # skips the upper triangle instead of reading an s*s mask (batch.causal is decided on the host).
        # Otherwise one additive bias for all layers (why not a boolean mask: native_attention_bias).
        mask = (None if batch.causal
                else native_attention_bias(batch.doc_ids, batch.image_ids, self.config.params_dtype))
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
