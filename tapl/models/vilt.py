"""ViLT as the foundation model: its embeddings as encoders, its transformer layers as fusion.

ViLT (``dandelin/vilt-b32-mlm``, class ``ViltModel``) has no modality towers: word embeddings and a patch
projection feed one transformer over the concatenated text and image tokens. So here the encoders are
ViLT's embeddings (text: word, position and token-type embeddings; image: patch projection, CLS token and
position embeddings), each plus ViLT's modality-type embedding (0 for text, 1 for images), and
:class:`ViltFusion` runs ViLT's encoder layers with the LoRA experts of :class:`~tapl.models.fusion.Fusion`.

Embeddings have no attention projections, so the encoders' LoRA adapters sit on the embedding layers
themselves: PEFT's LoRA for ``nn.Embedding`` on the word embeddings, and for ``nn.Conv2d`` on the patch
projection. The pretrained tables stay frozen; the low-rank updates are the trainable ``encoder[...]``
components.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import Tensor, nn
from transformers import ViltModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils.constants import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

from tapl.models.encoders import Encoder, ImagePreprocessor, TextPreprocessor
from tapl.models.flava import fit_pixels
from tapl.models.fusion import Fusion
from tapl.pretrained import LoraSettings, load_backbone, load_tokenizer

TEXT_TYPE, IMAGE_TYPE = 0, 1  # ViLT's modality-type ids


def _attach_embedding_lora(module: nn.Module, settings: LoraSettings, default_targets: list[str]) -> None:
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules or default_targets,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        inject_adapter_in_model(config, module)


class ViltTextEncoder(Encoder):
    """ViLT's text embeddings (frozen, LoRA on the word embeddings) plus its text modality-type embedding.

    Args:
        name_or_path: Hub name (``dandelin/vilt-b32-mlm``), local directory or ``package:MODULE/SUBDIR`` of a
            ``ViltModel`` checkpoint with its tokenizer.
        max_length: Longest token sequence (at most ViLT's ``max_position_embeddings``, 40 for
            ``vilt-b32-mlm``); longer texts are truncated.
        lora: LoRA settings; ``target_modules`` defaults to ``["word_embeddings"]``.
    """

    def __init__(self, name_or_path: str, max_length: int = 40, lora: LoraSettings | None = None) -> None:
        super().__init__()
        self.name_or_path = name_or_path
        vilt = load_backbone(name_or_path, ViltModel)
        limit = vilt.config.max_position_embeddings
        if max_length > limit:
            raise ValueError(f"max_length {max_length} exceeds ViLT's {limit} text positions")
        self.hidden_size = vilt.config.hidden_size
        self.text_embeddings = vilt.embeddings.text_embeddings
        self.modality_embeddings = vilt.embeddings.token_type_embeddings
        _attach_embedding_lora(self.text_embeddings, lora or LoraSettings(), ["word_embeddings"])
        self.preprocessor = TextPreprocessor(load_tokenizer(name_or_path), max_length)

    def input_embeddings(self) -> nn.Embedding | None:
        words = self.text_embeddings.word_embeddings
        return getattr(words, "base_layer", words)  # the frozen table, without the LoRA update

    def forward(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        mask = inputs["attention_mask"]
        tokens = self.text_embeddings(input_ids=inputs["input_ids"])
        tokens = tokens + self.modality_embeddings(torch.full_like(mask, TEXT_TYPE, dtype=torch.long))
        return tokens, mask


class ViltImageEncoder(Encoder):
    """ViLT's patch embeddings (frozen projection with LoRA), CLS token, positions and image modality type.

    Images are taken at the data's size and channels (what :attr:`preprocessor` produces) and fitted inside
    :meth:`forward`: grey images are repeated over ViLT's colour channels, resized to its ``image_size``
    (so the pretrained position embeddings apply as they are; ViLT's own variable-size path, which
    interpolates positions and samples patches at random, is not used) and normalised with ``mean`` /
    ``std`` (ViLT's, 0.5 per channel, by default).

    Args:
        name_or_path: Hub name, local directory or ``package:MODULE/SUBDIR`` of a ``ViltModel`` checkpoint.
        image_size: Side of the (square) input images in pixels.
        channels: Colour channels of the input images (1 for grey, 3 for RGB).
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation standard deviation.
        lora: LoRA settings; ``target_modules`` defaults to ``["projection"]`` (the patch convolution).
    """

    def __init__(
        self,
        name_or_path: str,
        image_size: int = 384,
        channels: int = 3,
        mean: Sequence[float] = tuple(IMAGENET_STANDARD_MEAN),
        std: Sequence[float] = tuple(IMAGENET_STANDARD_STD),
        lora: LoraSettings | None = None,
    ) -> None:
        super().__init__()
        self.name_or_path = name_or_path
        vilt = load_backbone(name_or_path, ViltModel)
        config = vilt.config
        self.tower_size, self.tower_channels = config.image_size, config.num_channels
        if len(mean) != self.tower_channels or len(std) != self.tower_channels:
            raise ValueError(f"mean and std need {self.tower_channels} values, one per channel of ViLT")
        self.mean, self.std = tuple(mean), tuple(std)
        self.hidden_size = config.hidden_size
        embeddings = vilt.embeddings
        self.patch_embeddings = embeddings.patch_embeddings
        self.cls_token = embeddings.cls_token
        self.position_embeddings = embeddings.position_embeddings
        self.modality_embeddings = embeddings.token_type_embeddings
        self.dropout = embeddings.dropout
        _attach_embedding_lora(self.patch_embeddings, lora or LoraSettings(), ["projection"])
        self.preprocessor = ImagePreprocessor(image_size, channels)

    def forward(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        pixels = fit_pixels(inputs["pixel_values"].float(), self.tower_size, self.tower_channels, self.mean, self.std)
        patches = self.patch_embeddings(pixels).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        tokens = torch.cat([cls, patches], dim=1) + self.position_embeddings
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        tokens = tokens + self.modality_embeddings(torch.full_like(mask, IMAGE_TYPE))
        return self.dropout(tokens), mask


class ViltFusion(Fusion):
    """ViLT's transformer layers and final LayerNorm as the fusion block, with the LoRA experts of :class:`Fusion`.

    It takes the embedded tokens of :class:`ViltTextEncoder` / :class:`ViltImageEncoder` (modality types
    already added) directly; ViLT's embedding layers are not run again.

    Args:
        name_or_path: Hub name, local directory or ``package:MODULE/SUBDIR`` of a ``ViltModel`` checkpoint.
        num_layers: Keep only the last ``num_layers`` layers (``None``: all).
        lora: LoRA settings of every expert.
    """

    def __init__(self, name_or_path: str, num_layers: int | None = None, lora: LoraSettings | None = None) -> None:
        super().__init__(name_or_path, num_layers=num_layers, layers_attribute="encoder.layer", lora=lora)

    def _load_backbone(self, name_or_path: str) -> nn.Module:
        return load_backbone(name_or_path, ViltModel)

    def _run(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        assert self.model is not None
        vilt = self.model.get_base_model()
        attention = create_bidirectional_mask(config=vilt.config, inputs_embeds=features, attention_mask=mask)
        out = vilt.encoder(features, attention_mask=attention)
        return vilt.layernorm(out.last_hidden_state), mask
