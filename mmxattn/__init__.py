"""mmxattn: a CAT image encoder read by text-query cross-attention, for captioning and image-text retrieval."""

from .attention import Attention, eager_attention, set_fused_attention
from .capture import capture_attention
from .checkpoint import export, load
from .config import CATConfig, MMXAttnConfig, TextConfig
from .presets import create_encoder, create_model, list_encoder_presets, list_presets
from .vision.windows import clear_weight_caches
from .zeroshot import classify, zero_shot_classifier

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "CATConfig",
    "MMXAttnConfig",
    "TextConfig",
    "capture_attention",
    "classify",
    "clear_weight_caches",
    "create_encoder",
    "create_model",
    "eager_attention",
    "export",
    "list_encoder_presets",
    "list_presets",
    "load",
    "set_fused_attention",
    "zero_shot_classifier",
]
