"""The foundation model: modality encoders over frozen pretrained backbones with LoRA, and task heads."""

from tapl.models.encoders import Encoder, PatchImageEncoder, Preprocessor, TextEncoder
from tapl.models.flava import FlavaFusion, FlavaImageEncoder, FlavaTextEncoder
from tapl.models.foundation import FoundationModel
from tapl.models.fusion import Fusion
from tapl.models.vilt import ViltFusion, ViltImageEncoder, ViltTextEncoder
from tapl.pretrained import LoraSettings, resolve_pretrained

__all__ = [
    "Encoder",
    "FlavaFusion",
    "FlavaImageEncoder",
    "FlavaTextEncoder",
    "FoundationModel",
    "Fusion",
    "LoraSettings",
    "PatchImageEncoder",
    "Preprocessor",
    "TextEncoder",
    "ViltFusion",
    "ViltImageEncoder",
    "ViltTextEncoder",
    "resolve_pretrained",
]
