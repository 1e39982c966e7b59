"""Fusion: frozen pretrained transformer layers over all encoder tokens, with LoRA experts.

The fusion block carries one shared LoRA expert plus one expert per modality-task pair of the federation
(e.g. ``text,classification`` or ``image+text,text_generation``). A task's forward pass runs the shared
expert and its own pair's expert together (their low-rank updates add up), over the concatenated tokens of
the modalities it consumes, so two-modality tasks attend jointly over both token sets; attention masks keep
padding out. Each expert is one component (``fusion[shared]``, ``fusion[<pair>]``), so a client's slice
holds the shared expert and exactly the experts of its own pairs.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn

from tapl.pretrained import LoraSettings, load_backbone, lora_target_modules

SHARED_EXPERT = "shared"
_ADAPTER_OF_PARAMETER = re.compile(r"\.lora_[AB]\.([^.]+)\.")


class Fusion(nn.Module):
    """Pretrained transformer layers (frozen) with a shared LoRA expert and one per modality-task pair.

    The pretrained model receives the concatenated encoder tokens through ``inputs_embeds``; its own position
    embeddings and all its weights stay frozen. Encoder tokens of another width are first projected by a
    learned linear map per modality (part of the shared expert).

    Args:
        name_or_path: Hub name, local directory or ``package:MODULE/SUBDIR`` of the pretrained transformer.
        num_layers: Keep only its last ``num_layers`` layers (``None``: all).
        layers_attribute: Dotted path of the layer list inside the loaded model (``encoder.layer`` for
            BERT-like models and ViLT).
        lora: LoRA settings of every expert.
    """

    def __init__(
        self,
        name_or_path: str,
        num_layers: int | None = None,
        layers_attribute: str = "encoder.layer",
        lora: LoraSettings | None = None,
    ) -> None:
        super().__init__()
        self.name_or_path = name_or_path
        backbone = self._load_backbone(name_or_path)
        if num_layers is not None:
            owner_path, _, name = layers_attribute.rpartition(".")
            owner = backbone.get_submodule(owner_path) if owner_path else backbone
            layers = getattr(owner, name)
            if not 1 <= num_layers <= len(layers):
                raise ValueError(f"fusion.num_layers must lie in [1, {len(layers)}], got {num_layers}")
            setattr(owner, name, nn.ModuleList(list(layers)[-num_layers:]))
            if hasattr(backbone.config, "num_hidden_layers"):
                backbone.config.num_hidden_layers = num_layers
        self.hidden_size: int = backbone.config.hidden_size
        self.lora = lora or LoraSettings()
        self._pending = (backbone,)  # wrapped by build(); a tuple keeps it from registering twice
        self.model: nn.Module | None = None
        self.projections = nn.ModuleDict()
        self.trainable: set[str] = set()
        self._experts: dict[str, dict[str, nn.Parameter]] = {}

    def _load_backbone(self, name_or_path: str) -> nn.Module:
        """The frozen pretrained model whose layers fuse; a subclass may return a part of a larger model."""
        return load_backbone(name_or_path)

    def build(self, experts: Sequence[str], encoder_widths: dict[str, int]) -> None:
        """Attach the shared expert and ``experts``, and projections for encoders of another width.

        Called once by the foundation model, which knows the federation's modality-task pairs.
        """
        backbone = self._pending[0]
        targets = self.lora.target_modules or lora_target_modules(backbone)
        config = LoraConfig(
            r=self.lora.r, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout, target_modules=targets
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = get_peft_model(backbone, config, adapter_name=SHARED_EXPERT)
            for expert in experts:
                model.add_adapter(expert, config)
        self.model = model
        for modality, width in sorted(encoder_widths.items()):
            if width != self.hidden_size:
                self.projections[modality] = nn.Linear(width, self.hidden_size)
        self._experts = self._collect_experts()

    def expert_parameters(self) -> dict[str, dict[str, nn.Parameter]]:
        """Trainable parameters by expert name (the shared expert includes the input projections)."""
        return self._experts

    def _collect_experts(self) -> dict[str, dict[str, nn.Parameter]]:
        assert self.model is not None
        experts: dict[str, dict[str, nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            found = _ADAPTER_OF_PARAMETER.search(f".{name}")
            if found:
                experts.setdefault(found.group(1), {})[f"model.{name}"] = param
        for name, param in self.projections.named_parameters():
            experts.setdefault(SHARED_EXPERT, {})[f"projections.{name}"] = param
        return experts

    def forward(self, tokens: dict[str, tuple[Tensor, Tensor]], expert: str) -> tuple[Tensor, Tensor]:
        """Fuse the tokens of several modalities with the shared expert and ``expert``.

        Args:
            tokens: ``modality -> (features, mask)`` from the encoders.
            expert: The modality-task pair whose expert runs beside the shared one.

        Returns:
            ``(tokens, mask)`` over the concatenated sequence.
        """
        assert self.model is not None, "Fusion.build() was not called"
        features = [self.projections[m](t) if m in self.projections else t for m, (t, _) in sorted(tokens.items())]
        masks = [mask for _, (_, mask) in sorted(tokens.items())]
        self.model.base_model.set_adapter([SHARED_EXPERT, expert])
        # set_adapter also flips requires_grad; the engine, not the active expert, decides what trains.
        for name, params in self.expert_parameters().items():
            for param in params.values():
                param.requires_grad_(name in self.trainable)
        return self._run(torch.cat(features, dim=1), torch.cat(masks, dim=1))

    def _run(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Run the adapted pretrained layers over concatenated ``features`` of width :attr:`hidden_size`.

        The active experts are already set. Subclasses override this for models that take hidden states in
        another way than ``inputs_embeds``.

        Returns:
            ``(tokens, mask)``, the fused tokens and their mask (a model may add tokens, e.g. a CLS token).
        """
        assert self.model is not None
        out = self.model(inputs_embeds=features, attention_mask=mask)
        return out.last_hidden_state, mask
