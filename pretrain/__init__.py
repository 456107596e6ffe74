"""NEO pre-training: model, data loader, trainer, checkpoints, metrics, conversion."""

import warnings

# megatron-core warns at import that TransformerEngine/Apex are absent; we use its local (pure
# torch) implementations on purpose (shared/notes/PLATFORM.md), so the warning is noise in logs.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
