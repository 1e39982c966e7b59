"""Component states: the unit that is sliced, sent, averaged, replaced and checkpointed.

Every trainable tensor of the foundation model belongs to exactly one named component (``encoder[text]``,
``head[digits]``). A :data:`ComponentState` maps component names to that component's tensors by parameter
name. Slicing, masked aggregation and communication accounting are set operations over component names;
every transfer of component tensors checks the exact key set and shapes first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from tapl.errors import TaplError

#: component name -> parameter name -> tensor
ComponentState = dict[str, dict[str, Tensor]]
#: component name -> parameter name -> shape
ComponentShapes = dict[str, dict[str, torch.Size]]

_SEPARATOR = "/"


class ComponentMismatchError(TaplError, ValueError):
    """Raised when a component state does not have exactly the expected keys and shapes."""


def encoder_component(modality: str) -> str:
    """Name of the component holding the trainable tensors of the ``modality`` encoder."""
    return f"encoder[{modality}]"


def fusion_component(expert: str) -> str:
    """Name of the component holding the fusion expert ``expert`` (``"shared"`` or a modality-task pair)."""
    return f"fusion[{expert}]"


def head_component(task: str) -> str:
    """Name of the component holding the head of ``task``."""
    return f"head[{task}]"


def shapes_of(state: Mapping[str, Mapping[str, Tensor]]) -> ComponentShapes:
    """The shapes of every tensor of ``state``."""
    return {c: {k: t.shape for k, t in params.items()} for c, params in state.items()}


def check_state(state: Mapping[str, Mapping[str, Tensor]], expected: ComponentShapes, what: str) -> None:
    """Check that ``state`` has exactly the components, parameter names and shapes of ``expected``.

    Args:
        state: The component state to check.
        expected: The shapes it must have.
        what: Names the state in the error message (e.g. ``"upload of client 3"``).

    Raises:
        ComponentMismatchError: naming every missing, unexpected or mis-shaped key.
    """
    problems: list[str] = []
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing components {missing}")
    if extra:
        problems.append(f"unexpected components {extra}")
    for component in sorted(set(expected) & set(state)):
        want, got = expected[component], state[component]
        missing_keys = sorted(set(want) - set(got))
        extra_keys = sorted(set(got) - set(want))
        if missing_keys:
            problems.append(f"{component}: missing tensors {missing_keys}")
        if extra_keys:
            problems.append(f"{component}: unexpected tensors {extra_keys}")
        for key in sorted(set(want) & set(got)):
            if tuple(got[key].shape) != tuple(want[key]):
                problems.append(
                    f"{component}: tensor {key!r} has shape {tuple(got[key].shape)}, expected {tuple(want[key])}"
                )
    if problems:
        raise ComponentMismatchError(f"{what} does not match the model: " + "; ".join(problems))


def select(state: Mapping[str, dict[str, Tensor]], components: Iterable[str]) -> ComponentState:
    """The sub-state holding only ``components`` (tensors are shared, not copied).

    Raises:
        ComponentMismatchError: if a requested component is not in ``state``.
    """
    components = list(components)
    missing = sorted(set(components) - set(state))
    if missing:
        raise ComponentMismatchError(f"state has no components {missing}")
    return {c: state[c] for c in components}


def clone(state: Mapping[str, Mapping[str, Tensor]]) -> ComponentState:
    """A deep copy of ``state`` with detached tensors."""
    return {c: {k: t.detach().clone() for k, t in params.items()} for c, params in state.items()}


def num_bytes(state: Mapping[str, Mapping[str, Tensor]]) -> int:
    """Bytes needed to send the tensors of ``state``."""
    return sum(t.numel() * t.element_size() for params in state.values() for t in params.values())


def non_finite_components(state: Mapping[str, Mapping[str, Tensor]]) -> list[str]:
    """Names of the components of ``state`` that hold a NaN or infinite value."""
    return sorted(c for c, params in state.items() if any(not torch.isfinite(t).all() for t in params.values()))


def check_finite(state: Mapping[str, Mapping[str, Tensor]], what: str) -> None:
    """Raise ``FloatingPointError`` naming ``what`` and its components that hold a NaN or infinite value."""
    bad = non_finite_components(state)
    if bad:
        raise FloatingPointError(f"{what} has non-finite values in {bad}")


def weighted_average(
    base: Mapping[str, Mapping[str, Tensor]],
    states: Sequence[Mapping[str, Mapping[str, Tensor]]],
    weights: Sequence[float],
) -> ComponentState:
    """Average each component over the states that hold it, weighted by ``weights``.

    A component that no state holds keeps its value from ``base``. Weights of the states holding a component
    are renormalised over those states only (masked averaging), so clients with different slices combine
    correctly.

    Args:
        base: The current global state (every component of the server model).
        states: Client states, each a subset of ``base``'s components with the same shapes.
        weights: One non-negative weight per state (e.g. training samples).

    Returns:
        A new state with the components of ``base``.

    Raises:
        ValueError: if the lengths differ or a weight is negative.
        ComponentMismatchError: if a state has a component or tensor ``base`` lacks, or another shape.
    """
    if len(states) != len(weights):
        raise ValueError(f"got {len(states)} states but {len(weights)} weights")
    if any(w < 0 for w in weights):
        raise ValueError(f"aggregation weights must be non-negative, got {list(weights)}")
    base_shapes = shapes_of(base)
    for i, state in enumerate(states):
        check_state(state, {c: base_shapes[c] for c in state if c in base_shapes}, f"state {i}")
    result: ComponentState = {}
    for component, params in base.items():
        holders = [(s[component], w) for s, w in zip(states, weights, strict=True) if component in s]
        total = sum(w for _, w in holders)
        if not holders or total <= 0:
            result[component] = {k: t.detach().clone() for k, t in params.items()}
            continue
        result[component] = {}
        for key, tensor in params.items():
            acc = torch.zeros_like(tensor, dtype=torch.float64)
            for held, w in holders:
                acc += held[key].to(device=tensor.device, dtype=torch.float64) * (w / total)
            result[component][key] = acc.to(tensor.dtype)
    return result


def flatten(state: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """One flat ``"component/parameter"`` mapping, e.g. for safetensors files."""
    return {f"{c}{_SEPARATOR}{k}": t for c, params in state.items() for k, t in params.items()}


def unflatten(flat: Mapping[str, Tensor]) -> ComponentState:
    """Inverse of :func:`flatten`."""
    state: ComponentState = {}
    for key, tensor in flat.items():
        component, _, name = key.partition(_SEPARATOR)
        state.setdefault(component, {})[name] = tensor
    return state
