"""The foundation model: the union of every modality encoder and task head of the federation.

One instance lives per process and is shared by the global model and every client's models: they differ
only in the trainable tensors that are loaded into it before use (:meth:`FoundationModel.load_state`). A
client's *slice* is the set of components its tasks reach; :meth:`FoundationModel.components_for` and
:meth:`FoundationModel.components_on_path` answer from the architecture, never from a forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from tapl.components import (
    ComponentMismatchError,
    ComponentShapes,
    ComponentState,
    check_state,
    encoder_component,
    fusion_component,
    head_component,
)
from tapl.models.encoders import Encoder, Preprocessor
from tapl.models.fusion import SHARED_EXPERT, Fusion
from tapl.tasks import HeadContext, Task


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``tokens`` over the sequence, ignoring positions where ``mask`` is 0 (padding)."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class FoundationModel(nn.Module):
    """Modality encoders and one head per task over a frozen pretrained backbone.

    Each task's forward pass encodes the modalities it consumes. With a :class:`Fusion` block, the tokens
    of all those modalities go through it together (the shared expert plus the task's modality-task expert)
    and the fused tokens are mean-pooled over the attention mask; without one, each encoder's tokens are
    mean-pooled and the pooled features averaged across modalities. Padding is never pooled. The task's
    head maps the pooled feature to its outputs.

    Args:
        encoders: One encoder per modality, e.g. ``{"text": TextEncoder(...), "image": PatchImageEncoder(...)}``.
        tasks: The federation's tasks (linked from the data module by the CLI).
        fusion: Optional fusion block with LoRA experts.
    """

    def __init__(
        self, encoders: dict[str, Encoder], tasks: list[Task] | None = None, fusion: Fusion | None = None
    ) -> None:
        super().__init__()
        if not encoders:
            raise ValueError("model.encoders is empty: configure at least one modality encoder.")
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.heads = nn.ModuleDict()
        self.tasks: dict[str, Task] = {}
        for task in tasks or []:
            self._add_task(task)
        if fusion is not None:
            experts = sorted({t.pair for t in self.tasks.values()})
            fusion.build(experts, {m: e.hidden_size for m, e in self.encoders.items()})
        self._parameters_by_component = self._collect_components()
        # component -> parameter key -> the parameter's name in this module (for functional calls)
        full_names = {id(p): name for name, p in self.named_parameters(remove_duplicate=False)}
        self._full_names = {
            c: {k: full_names[id(p)] for k, p in params.items()} for c, params in self._parameters_by_component.items()
        }
        self.set_trainable(self.component_names())

    def _add_task(self, task: Task) -> None:
        if task.name in self.tasks:
            raise ValueError(f"Task {task.name!r} is declared twice.")
        missing = [m for m in task.modalities if m not in self.encoders]
        if missing:
            raise ValueError(
                f"Task {task.name!r} consumes modalities {missing} but model.encoders has only {sorted(self.encoders)}."
            )
        widths = {self.encoders[m].hidden_size for m in task.modalities}
        if self.fusion is not None:
            widths = {self.fusion.hidden_size}
        if len(widths) != 1:
            raise ValueError(f"Task {task.name!r}: its encoders have different widths {sorted(widths)}.")
        self.tasks[task.name] = task
        self.heads[task.name] = task.task_type.build_head(widths.pop(), task, self.head_context)

    def _collect_components(self) -> dict[str, dict[str, nn.Parameter]]:
        modules: dict[str, nn.Module] = {encoder_component(m): e for m, e in self.encoders.items()}
        modules.update({head_component(t): h for t, h in self.heads.items()})
        components = {
            name: {k: p for k, p in module.named_parameters() if p.requires_grad} for name, module in modules.items()
        }
        if self.fusion is not None:
            components.update({fusion_component(e): dict(p) for e, p in self.fusion.expert_parameters().items()})
        return {name: params for name, params in components.items() if params}

    # -- components ---------------------------------------------------------------------------------------

    def component_names(self) -> list[str]:
        """Every component of the server model, sorted."""
        return sorted(self._parameters_by_component)

    def components_on_path(self, task: str) -> list[str]:
        """The components one forward pass of ``task`` uses: its modalities' encoders and its head."""
        if task not in self.tasks:
            raise KeyError(f"Unknown task {task!r}; the model has tasks {sorted(self.tasks)}.")
        spec = self.tasks[task]
        names = {encoder_component(m) for m in spec.modalities} | {head_component(task)}
        if self.fusion is not None:
            names |= {fusion_component(SHARED_EXPERT), fusion_component(spec.pair)}
        return sorted(names & set(self._parameters_by_component))

    def components_for(self, tasks: Iterable[str]) -> list[str]:
        """The slice a client holding ``tasks`` trains: the union of their paths."""
        return sorted({c for t in tasks for c in self.components_on_path(t)})

    def component_shapes(self, components: Iterable[str] | None = None) -> ComponentShapes:
        """Parameter shapes of ``components`` (all components by default)."""
        names = self.component_names() if components is None else components
        return {c: {k: p.shape for k, p in self._parameters_by_component[c].items()} for c in names}

    def num_trainable_bytes(self, components: Iterable[str] | None = None) -> int:
        """Bytes of the trainable tensors of ``components`` (all by default)."""
        names = self.component_names() if components is None else components
        return sum(p.numel() * p.element_size() for c in names for p in self._parameters_by_component[c].values())

    def get_state(self, components: Iterable[str] | None = None) -> ComponentState:
        """A detached CPU copy of the trainable tensors of ``components`` (all by default)."""
        names = self.component_names() if components is None else list(components)
        self._check_known(names)
        return {
            c: {k: p.detach().to("cpu", copy=True) for k, p in self._parameters_by_component[c].items()} for c in names
        }

    @torch.no_grad()
    def load_state(self, state: Mapping[str, Mapping[str, Tensor]], what: str = "component state") -> None:
        """Copy the tensors of ``state`` into the model's parameters.

        The components of ``state`` must exist and each must carry exactly its parameters with their
        shapes; components not in ``state`` are left as they are.

        Raises:
            ComponentMismatchError: naming the offending components or tensors.
        """
        unknown = sorted(set(state) - set(self._parameters_by_component))
        if unknown:
            raise ComponentMismatchError(
                f"{what} has components the model lacks: {unknown}; the model has {self.component_names()}."
            )
        check_state(state, self.component_shapes(state), what)
        for component, tensors in state.items():
            params = self._parameters_by_component[component]
            for key, tensor in tensors.items():
                params[key].copy_(tensor)

    def component_parameters(self, component: str) -> dict[str, nn.Parameter]:
        """The trainable parameters of ``component`` by the keys its states use."""
        self._check_known([component])
        return dict(self._parameters_by_component[component])

    def parameter_names(self) -> dict[str, dict[str, str]]:
        """Per component and key of its states, the parameter's name in this module (``named_parameters``)."""
        return {c: dict(names) for c, names in self._full_names.items()}

    def parameters_of(self, components: Iterable[str]) -> list[nn.Parameter]:
        """The trainable parameters of ``components``."""
        return [p for c in components for p in self._parameters_by_component[c].values()]

    def forward_with(
        self, state: Mapping[str, Mapping[str, Tensor]], task: str, inputs: Mapping[str, dict[str, Tensor]]
    ) -> Tensor:
        """:meth:`forward` with the tensors of ``state`` in place of the loaded ones, which stay untouched.

        Used to run a second model (e.g. a distillation teacher) through the one shared backbone without
        copying tensors in and out. ``state`` must be on the model's device.
        """
        self._check_known(state)
        check_state(state, self.component_shapes(state), "state of forward_with()")
        substitutes = {self._full_names[c][k]: tensor for c, tensors in state.items() for k, tensor in tensors.items()}
        return torch.func.functional_call(self, substitutes, (task, inputs))

    def set_trainable(self, components: Iterable[str]) -> None:
        """Let gradients flow into ``components`` only; every other component is frozen."""
        wanted = set(components)
        self._check_known(wanted)
        for name, params in self._parameters_by_component.items():
            for p in params.values():
                p.requires_grad_(name in wanted)
        if self.fusion is not None:
            self.fusion.trainable = {e for e in self.fusion.expert_parameters() if fusion_component(e) in wanted}

    def _check_known(self, names: Iterable[str]) -> None:
        unknown = sorted(set(names) - set(self._parameters_by_component))
        if unknown:
            raise KeyError(f"Unknown components {unknown}; the model has {self.component_names()}.")

    # -- forward ------------------------------------------------------------------------------------------

    @property
    def preprocessors(self) -> dict[str, Preprocessor]:
        """Raw-value-to-tensor preprocessor per modality."""
        return {m: e.preprocessor for m, e in self.encoders.items()}

    @property
    def head_context(self) -> HeadContext:
        """What task types may use to build heads and decode outputs (preprocessors, text embeddings)."""
        embeddings = self.encoders["text"].input_embeddings() if "text" in self.encoders else None
        return HeadContext(self.preprocessors, embeddings)

    def forward(self, task: str, inputs: Mapping[str, dict[str, Tensor]]) -> Tensor:
        """Outputs of ``task``'s head for a batch of that task's samples.

        Args:
            task: Task name.
            inputs: Input tensors per modality, as made by :attr:`preprocessors`.
        """
        spec = self.tasks[task]
        if self.fusion is not None:
            tokens = {m: self.encoders[m](inputs[m]) for m in spec.modalities}
            feature = masked_mean(*self.fusion(tokens, spec.pair))
        else:
            pooled = [masked_mean(*self.encoders[m](inputs[m])) for m in spec.modalities]
            feature = pooled[0] if len(pooled) == 1 else torch.stack(pooled).mean(0)
        return self.heads[task](feature)
