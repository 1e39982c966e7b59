"""Modality encoders: a frozen pretrained transformer with LoRA adapters, plus a light preprocessor.

An encoder maps one modality's inputs to token features and an attention mask. Its trainable tensors
(LoRA adapters and any input embedding it learns) form the component ``encoder[<modality>]``. Raw values
are turned into tensors by the encoder's :attr:`Encoder.preprocessor`, a small picklable object that data
loader workers can run without holding the model.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tapl.pretrained import LoraSettings, attach_lora, load_backbone, load_tokenizer


class Encoder(nn.Module, ABC):
    """Base class of modality encoders.

    Attributes:
        hidden_size: Width of the token features :meth:`forward` returns.
        preprocessor: Turns a list of raw values into the input tensors of :meth:`forward`.
    """

    hidden_size: int
    preprocessor: Preprocessor

    @abstractmethod
    def forward(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Encode a batch.

        Returns:
            ``(tokens, mask)``: features of shape ``(batch, length, hidden_size)`` and a ``(batch, length)``
            mask that is 1 on real tokens and 0 on padding.
        """

    def input_embeddings(self) -> nn.Embedding | None:
        """The frozen token embeddings of a text encoder (tied text decoders use them), else ``None``."""
        return None


class UnreadableValue(ValueError):
    """A raw value that a preprocessor cannot turn into tensors.

    Attributes:
        index: Position of the value in the checked sequence.
    """

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index


class Preprocessor(ABC):
    """Turns raw values of one modality into model input tensors."""

    @abstractmethod
    def __call__(self, values: Sequence[Any]) -> dict[str, Tensor]:
        """Batch tensors for ``values``."""

    def check(self, values: Sequence[Any]) -> int:
        """Preprocess ``values`` once, before training, and count those that lose information.

        Returns:
            How many values are altered (e.g. texts truncated).

        Raises:
            UnreadableValue: for the first value that cannot be preprocessed.
        """
        for index, value in enumerate(values):
            try:
                self([value])
            except Exception as error:
                raise UnreadableValue(index, f"{type(error).__name__}: {error}") from error
        return 0


class TextPreprocessor(Preprocessor):
    """Tokenizes strings, padding to the longest and truncating to ``max_length`` tokens."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, values: Sequence[Any]) -> dict[str, Tensor]:
        encoded = self.tokenizer(
            [str(v) for v in values],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def check(self, values: Sequence[Any]) -> int:
        """Count the texts longer than ``max_length`` tokens (they are truncated)."""
        lengths = self.tokenizer([str(v) for v in values], truncation=False)["input_ids"]
        return sum(len(ids) > self.max_length for ids in lengths)


class ImagePreprocessor(Preprocessor):
    """Turns images (PIL images, arrays, or flat lists of pixels in [0, 1]) into ``(B, C, H, W)`` floats.

    Raises ``ValueError`` for an array of the wrong size or with non-finite values.
    """

    def __init__(self, image_size: int, channels: int) -> None:
        self.image_size = image_size
        self.channels = channels

    def _to_array(self, value: Any) -> np.ndarray:
        if hasattr(value, "convert"):  # PIL image
            mode = "L" if self.channels == 1 else "RGB"
            image = value.convert(mode).resize((self.image_size, self.image_size))
            array = np.asarray(image, dtype=np.float32) / 255.0
            return array if array.ndim == 2 else array.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
        array = np.asarray(value, dtype=np.float32)
        expected = self.channels * self.image_size * self.image_size
        if array.size != expected:
            raise ValueError(
                f"image has {array.size} values, expected {expected} "
                f"({self.channels} x {self.image_size} x {self.image_size})"
            )
        if not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise ValueError(f"image has {bad} non-finite pixel value(s) (NaN or infinity)")
        return array

    def __call__(self, values: Sequence[Any]) -> dict[str, Tensor]:
        arrays = [self._to_array(v).reshape(self.channels, self.image_size, self.image_size) for v in values]
        return {"pixel_values": torch.from_numpy(np.stack(arrays))}


class TextEncoder(Encoder):
    """A pretrained Hugging Face text transformer with LoRA on its attention projections.

    Args:
        name_or_path: Hub name, local directory or ``package:MODULE/SUBDIR`` of the model and tokenizer.
        max_length: Longest token sequence; longer texts are truncated.
        lora: LoRA adapter settings.
    """

    def __init__(self, name_or_path: str, max_length: int = 128, lora: LoraSettings | None = None) -> None:
        super().__init__()
        self.name_or_path = name_or_path
        backbone = self._load_backbone(name_or_path)
        limit = getattr(backbone.config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ValueError(f"max_length {max_length} exceeds the text model's {limit} positions")
        self.hidden_size = backbone.config.hidden_size
        self.backbone = attach_lora(backbone, lora or LoraSettings())
        self.preprocessor = TextPreprocessor(load_tokenizer(name_or_path), max_length)

    def _load_backbone(self, name_or_path: str) -> nn.Module:
        """The frozen text transformer (overridden for towers inside multimodal checkpoints)."""
        return load_backbone(name_or_path)

    def input_embeddings(self) -> nn.Embedding | None:
        return self.backbone.get_input_embeddings()

    def _last_tokens(self, inputs: dict[str, Tensor]) -> Tensor:
        out = self.backbone(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return out.last_hidden_state

    def forward(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self._last_tokens(inputs), inputs["attention_mask"]


class PatchImageEncoder(Encoder):
    """Images through a pretrained transformer, ViLT-style.

    A learned patch embedding (a strided convolution) turns each ``patch_size`` square into one token
    embedding that enters the frozen pretrained transformer through ``inputs_embeds``; the transformer's
    own position embeddings order the patches. The patch embedding and the LoRA adapters are trainable.
    This lets a text-pretrained transformer serve images when no pretrained vision model is at hand.

    Args:
        name_or_path: Hub name, local directory or ``package:MODULE/SUBDIR`` of the transformer.
        image_size: Side of the (square) input images in pixels.
        patch_size: Side of one patch; must divide ``image_size``.
        channels: Colour channels (1 for grey, 3 for RGB).
        lora: LoRA adapter settings.
    """

    def __init__(
        self,
        name_or_path: str,
        image_size: int = 32,
        patch_size: int = 4,
        channels: int = 3,
        lora: LoraSettings | None = None,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide image_size {image_size}")
        self.name_or_path = name_or_path
        backbone = load_backbone(name_or_path)
        self.hidden_size = backbone.config.hidden_size
        num_patches = (image_size // patch_size) ** 2
        limit = getattr(backbone.config, "max_position_embeddings", None)
        if limit is not None and num_patches > limit:
            raise ValueError(f"{num_patches} patches exceed the model's {limit} positions; use larger patches")
        self.backbone = attach_lora(backbone, lora or LoraSettings())
        self.patch_embedding = nn.Conv2d(channels, self.hidden_size, kernel_size=patch_size, stride=patch_size)
        nn.init.normal_(self.patch_embedding.weight, std=1.0 / math.sqrt(channels * patch_size * patch_size))
        nn.init.zeros_(self.patch_embedding.bias)
        self.preprocessor = ImagePreprocessor(image_size, channels)

    def forward(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        pixels = inputs["pixel_values"].to(self.patch_embedding.weight.dtype)
        embeds = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        out = self.backbone(inputs_embeds=embeds, attention_mask=mask)
        return out.last_hidden_state, mask
