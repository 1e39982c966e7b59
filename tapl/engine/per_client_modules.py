"""Per-client tensors inside one shared model: the layers that hold a client's own tensors run each client's rows
with that client's values, so one forward pass serves a whole cohort of clients.

A cohort's batch holds the rows of every member one after another, the same number of rows per member. The frozen
layers run once over all of them; a layer owning cohort tensors (a LoRA factor, a head's linear layer, a patch
embedding) reshapes its input to ``(members, rows per member, ...)`` and applies each member's values to its own
rows through :func:`torch.vmap` (a batched matrix product for a linear layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tapl.errors import TaplError

#: A layer's forward with some of its parameters substituted: ``(layer, substitutes, input) -> output``.
Functional = Callable[[Any, Mapping[str, Tensor], Tensor], Tensor]


def _param(layer: nn.Module, substitutes: Mapping[str, Tensor], name: str) -> Tensor | None:
    return substitutes[name] if name in substitutes else getattr(layer, name)


def _linear(layer: nn.Linear, p: Mapping[str, Tensor], x: Tensor) -> Tensor:
    return F.linear(x, _param(layer, p, "weight"), _param(layer, p, "bias"))


def _conv(layer: nn.Conv1d | nn.Conv2d, p: Mapping[str, Tensor], x: Tensor) -> Tensor:
    return layer._conv_forward(x, _param(layer, p, "weight"), _param(layer, p, "bias"))


def _layer_norm(layer: nn.LayerNorm, p: Mapping[str, Tensor], x: Tensor) -> Tensor:
    weight, bias = _param(layer, p, "weight"), _param(layer, p, "bias")
    return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)


def _embedding(layer: nn.Embedding, p: Mapping[str, Tensor], x: Tensor) -> Tensor:
    return F.embedding(x, _param(layer, p, "weight"), layer.padding_idx, layer.max_norm, layer.norm_type)


#: The layer types that can hold per-client tensors, with their functional forward.
FUNCTIONALS: dict[type[nn.Module], Functional] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.LayerNorm: _layer_norm,
    nn.Embedding: _embedding,
}


class NotBatchable(TaplError, ValueError):
    """The cohort's fit cannot run batched (e.g. a per-client tensor sits in a layer of an unsupported type)."""


class PerClientModules:
    """Routes the model's layers that own cohort tensors through each member's values.

    Args:
        model: The shared model.
        tensors: Per parameter name of ``model`` (as ``named_parameters`` gives it), the members' values stacked
            along a first dimension (trainable cohort parameters, or per-member constants).

    Raises:
        NotBatchable: naming a layer of a type that :data:`FUNCTIONALS` does not cover.
    """

    def __init__(self, model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
        self.model = model
        owners = dict(model.named_modules())
        #: layer -> its parameter attribute -> the stacked values
        self.layers: dict[nn.Module, dict[str, Tensor]] = {}
        for name, stacked in tensors.items():
            path, _, attr = name.rpartition(".")
            layer = owners[path]
            if type(layer) not in FUNCTIONALS:
                raise NotBatchable(
                    f"parameter {name} belongs to a {type(layer).__name__}, which cannot hold per-client tensors "
                    f"(supported: {', '.join(sorted(t.__name__ for t in FUNCTIONALS))})"
                )
            self.layers.setdefault(layer, {})[attr] = stacked
        self._active = False

    @contextmanager
    def active(self, members: Sequence[int] | None = None) -> Iterator[None]:
        """Within, the layers apply each member's values to its rows: the input's first dimension is
        ``len(members)`` groups of rows, member by member (``members``: indices into the stacked values; all
        members by default)."""
        index = None if members is None else torch.as_tensor(list(members))
        try:
            for layer, stacked in self.layers.items():
                values = stacked if index is None else {a: t[index.to(t.device)] for a, t in stacked.items()}
                layer.forward = _per_member_forward(layer, values)
            self._active = True
            yield
        finally:
            self._release()

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Within, the layers run their own parameters again (e.g. for another state's forward pass)."""
        if not self._active:
            yield
            return
        saved = {layer: layer.__dict__.pop("forward") for layer in self.layers if "forward" in layer.__dict__}
        try:
            yield
        finally:
            for layer, forward in saved.items():
                layer.forward = forward

    def _release(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        self._active = False


def _per_member_forward(layer: nn.Module, values: Mapping[str, Tensor]) -> Callable[[Tensor], Tensor]:
    functional = FUNCTIONALS[type(layer)]
    members = next(iter(values.values())).shape[0]
    if type(layer) is nn.Linear and "weight" in values:
        return _per_member_linear(layer, values, members)

    def member_forward(x: Tensor, substitutes: Mapping[str, Tensor]) -> Tensor:
        return functional(layer, substitutes, x)

    batched = torch.vmap(member_forward)

    def forward(x: Tensor) -> Tensor:
        if x.shape[0] % members:
            raise NotBatchable(
                f"a {type(layer).__name__} got {x.shape[0]} rows, not a multiple of the cohort's {members} members"
            )
        out = batched(x.reshape(members, -1, *x.shape[1:]), values)
        return out.reshape(-1, *out.shape[2:])

    return forward


def _per_member_linear(layer: nn.Linear, values: Mapping[str, Tensor], members: int) -> Callable[[Tensor], Tensor]:
    """A linear layer with per-member weights as one batched matrix product: the same result as the ``vmap`` of
    :func:`_linear`, without ``vmap``'s cost per call (most of the work of a LoRA factor over a few rows)."""
    weight = values["weight"].transpose(1, 2)  # (members, in, out)
    bias = _param(layer, values, "bias")
    if bias is not None and bias.dim() == 2:
        bias = bias.unsqueeze(1)  # (members, 1, out): each member's own bias

    def forward(x: Tensor) -> Tensor:
        if x.shape[0] % members:
            raise NotBatchable(f"a Linear got {x.shape[0]} rows, not a multiple of the cohort's {members} members")
        rows = x.reshape(members, -1, x.shape[-1])
        out = torch.bmm(rows, weight) if bias is None else torch.baddbmm(bias, rows, weight)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return forward
