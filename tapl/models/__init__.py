"""The foundation model: modality encoders over frozen pretrained backbones with LoRA, and task heads."""

from tapl.models.encoders import Encoder, PatchImageEncoder, Preprocessor, TextEncoder
from tapl.models.foundation import FoundationModel
from tapl.models.fusion import Fusion
from tapl.models.loading import LoraSettings, resolve_pretrained

__all__ = [
    "Encoder",
    "FoundationModel",
    "Fusion",
    "LoraSettings",
    "PatchImageEncoder",
    "Preprocessor",
    "TextEncoder",
    "resolve_pretrained",
]
