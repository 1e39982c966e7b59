"""FLAVA as the foundation model: its image and text towers as encoders, its multimodal layers as fusion.

FLAVA (``facebook/flava-full``, class ``FlavaModel``) holds three transformers: an image tower (ViT), a text
tower (BERT-like) and a multimodal encoder that reads the concatenated image and text states after
pretrained linear maps into its width (``image_to_mm_projection``, ``text_to_mm_projection``). Here each
tower is one frozen encoder with LoRA on its attention projections, and :class:`FlavaFusion` runs the
multimodal encoder's layers with the LoRA experts of :class:`~tapl.models.fusion.Fusion`, after FLAVA's own
(frozen) input projections. Every class loads the checkpoint itself and keeps only the part it uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import FlavaModel
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from tapl.models.encoders import Encoder, ImagePreprocessor, TextEncoder
from tapl.models.fusion import Fusion
from tapl.pretrained import LoraSettings, attach_lora, load_backbone


def fit_pixels(pixels: Tensor, size: int, channels: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Turn ``(B, C, H, W)`` pixels in [0, 1] into what a pretrained vision tower expects.

    Grey images (one channel) are repeated over ``channels``; images are resized bilinearly to ``size``
    and normalised with the tower's ``mean`` and ``std``.

    Raises:
        ValueError: if the images have neither one channel nor ``channels``.
    """
    if pixels.shape[1] not in (1, channels):
        raise ValueError(f"images have {pixels.shape[1]} channels; the vision tower takes 1 (grey) or {channels}")
    pixels = pixels.expand(-1, channels, -1, -1)
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean_ = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    std_ = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels - mean_) / std_


class FlavaTextEncoder(TextEncoder):
    """FLAVA's text tower, frozen, with LoRA on its attention projections.

    Args:
        name_or_path: Hub name (``facebook/flava-full``), local directory or ``package:MODULE/SUBDIR`` of a
            ``FlavaModel`` checkpoint with its tokenizer.
        max_length: Longest token sequence; longer texts are truncated.
        layernorm: Return the tower's output after its final LayerNorm (FLAVA's ``text_embeddings``). FLAVA
            feeds its multimodal encoder the states *before* that LayerNorm: set ``False`` under
            :class:`FlavaFusion` to match its pretraining.
        lora: LoRA adapter settings.
    """

    def __init__(
        self, name_or_path: str, max_length: int = 77, layernorm: bool = True, lora: LoraSettings | None = None
    ) -> None:
        super().__init__(name_or_path, max_length, lora)
        self.layernorm = layernorm

    def _load_backbone(self, name_or_path: str) -> nn.Module:
        return load_backbone(name_or_path, FlavaModel).text_model

    def _last_tokens(self, inputs: dict[str, Tensor]) -> Tensor:
        if self.layernorm:
            return super()._last_tokens(inputs)
        out = self.backbone(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True
        )
        return out.hidden_states[-1]


class FlavaImageEncoder(Encoder):
    """FLAVA's image tower (a ViT), frozen, with LoRA on its attention projections.

    Images are taken at the data's size and channels (what :attr:`preprocessor` produces) and fitted to
    the tower inside :meth:`forward`: grey images are repeated over the tower's colour channels, resized
    to its ``image_size`` and normalised with ``mean`` / ``std`` (FLAVA's, i.e. CLIP's, by default). The
    tokens are the tower's CLS token and one token per patch.

    Args:
        name_or_path: Hub name, local directory or ``package:MODULE/SUBDIR`` of a ``FlavaModel`` checkpoint.
        image_size: Side of the (square) input images in pixels.
        channels: Colour channels of the input images (1 for grey, 3 for RGB).
        layernorm: As for :class:`FlavaTextEncoder`.
        mean: Per-channel normalisation mean of the tower.
        std: Per-channel normalisation standard deviation of the tower.
        lora: LoRA adapter settings.
    """

    def __init__(
        self,
        name_or_path: str,
        image_size: int = 224,
        channels: int = 3,
        layernorm: bool = True,
        mean: Sequence[float] = tuple(OPENAI_CLIP_MEAN),
        std: Sequence[float] = tuple(OPENAI_CLIP_STD),
        lora: LoraSettings | None = None,
    ) -> None:
        super().__init__()
        self.name_or_path = name_or_path
        tower = load_backbone(name_or_path, FlavaModel).image_model
        self.tower_size = tower.config.image_size
        self.tower_channels = tower.config.num_channels
        if len(mean) != self.tower_channels or len(std) != self.tower_channels:
            raise ValueError(f"mean and std need {self.tower_channels} values, one per channel of the tower")
        self.mean, self.std = tuple(mean), tuple(std)
        self.hidden_size = tower.config.hidden_size
        self.layernorm = layernorm
        self.backbone = attach_lora(tower, lora or LoraSettings())
        self.preprocessor = ImagePreprocessor(image_size, channels)

    def forward(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        pixels = fit_pixels(inputs["pixel_values"].float(), self.tower_size, self.tower_channels, self.mean, self.std)
        out = self.backbone(pixel_values=pixels, output_hidden_states=not self.layernorm)
        tokens = out.last_hidden_state if self.layernorm else out.hidden_states[-1]
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        return tokens, mask


class FlavaFusion(Fusion):
    """FLAVA's multimodal encoder as the fusion block, with the LoRA experts of :class:`Fusion`.

    Image and text tokens first pass FLAVA's pretrained, frozen ``image_to_mm_projection`` /
    ``text_to_mm_projection``; tokens of other modalities get a learned projection (part of the shared
    expert) when their width differs. The multimodal encoder prepends its CLS token, which is kept in
    the fused tokens (mask 1) and so takes part in pooling.

    Args:
        name_or_path: Hub name, local directory or ``package:MODULE/SUBDIR`` of a ``FlavaModel`` checkpoint.
        num_layers: Keep only the last ``num_layers`` multimodal layers (``None``: all).
        lora: LoRA settings of every expert.
    """

    def __init__(self, name_or_path: str, num_layers: int | None = None, lora: LoraSettings | None = None) -> None:
        super().__init__(name_or_path, num_layers=num_layers, layers_attribute="encoder.layer", lora=lora)

    def _load_backbone(self, name_or_path: str) -> nn.Module:
        flava = load_backbone(name_or_path, FlavaModel)
        self.input_projections = nn.ModuleDict(
            {"image": flava.image_to_mm_projection, "text": flava.text_to_mm_projection}
        )
        return flava.multimodal_model

    def build(self, experts: Sequence[str], encoder_widths: dict[str, int]) -> None:
        widths = dict(encoder_widths)
        for modality, projection in self.input_projections.items():
            if modality in widths:
                if widths[modality] != projection.in_features:
                    raise ValueError(
                        f"the {modality} encoder gives width {widths[modality]} but FLAVA's {modality} projection "
                        f"takes {projection.in_features}; use the FLAVA {modality} encoder of the same checkpoint"
                    )
                widths[modality] = self.hidden_size
        super().build(experts, widths)

    def forward(self, tokens: dict[str, tuple[Tensor, Tensor]], expert: str) -> tuple[Tensor, Tensor]:
        projected = {
            m: (self.input_projections[m](t) if m in self.input_projections else t, mask)
            for m, (t, mask) in tokens.items()
        }
        return super().forward(projected, expert)

    def _run(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        assert self.model is not None
        if self.model.get_base_model().use_cls_token:
            mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        out = self.model(hidden_states=features, attention_mask=mask)
        return out.last_hidden_state, mask
