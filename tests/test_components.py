"""Tests for tapl.components: strict state checks, masked weighted averaging and state bookkeeping."""

from __future__ import annotations

import pytest
import torch

from tapl.components import (
    ComponentMismatchError,
    check_state,
    clone,
    flatten,
    non_finite_components,
    num_bytes,
    select,
    shapes_of,
    unflatten,
    weighted_average,
)

ENC, HEAD_A, HEAD_B, HEAD_C = "encoder[text]", "head[a]", "head[b]", "head[c]"


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@pytest.fixture
def base() -> dict[str, dict[str, torch.Tensor]]:
    """A server state of four components; nobody in the tests below holds ``head[c]``."""
    return {
        ENC: {"lora.weight": _t(0.0, 0.0), "bias": _t(-1.0)},
        HEAD_A: {"weight": _t(100.0)},
        HEAD_B: {"weight": _t(200.0)},
        HEAD_C: {"weight": _t(7.0, 8.0)},
    }


@pytest.fixture
def clients() -> list[dict[str, dict[str, torch.Tensor]]]:
    """Three clients with different slices: A holds {enc, head[a]}, B {enc, head[b]}, C {enc}."""
    return [
        {ENC: {"lora.weight": _t(1.0, 2.0), "bias": _t(1.0)}, HEAD_A: {"weight": _t(3.0)}},
        {ENC: {"lora.weight": _t(4.0, 6.0), "bias": _t(2.0)}, HEAD_B: {"weight": _t(5.0)}},
        {ENC: {"lora.weight": _t(10.0, 0.0), "bias": _t(3.0)}},
    ]


# -- check_state ----------------------------------------------------------------------------------------------


def test_check_state_accepts_an_exact_match(base: dict) -> None:
    check_state(base, shapes_of(base), "the base")


def test_check_state_names_every_problem(base: dict) -> None:
    state = {
        ENC: {"lora.weight": _t(1.0, 2.0, 3.0), "stray": _t(0.0)},  # wrong shape, extra tensor, no "bias"
        HEAD_A: {"weight": _t(1.0)},
        "head[ghost]": {"weight": _t(1.0)},  # extra component; head[b] and head[c] are missing
    }
    with pytest.raises(ComponentMismatchError) as error:
        check_state(state, shapes_of(base), "upload of client 3")
    message = str(error.value)
    assert "upload of client 3" in message
    assert "missing components ['head[b]', 'head[c]']" in message
    assert "unexpected components ['head[ghost]']" in message
    assert "encoder[text]: missing tensors ['bias']" in message
    assert "encoder[text]: unexpected tensors ['stray']" in message
    assert "'lora.weight' has shape (3,), expected (2,)" in message
    assert "head[a]" not in message, "a component that matches is not reported"


# -- weighted_average -----------------------------------------------------------------------------------------


def test_weighted_average_over_heterogeneous_slices(base: dict, clients: list) -> None:
    result = weighted_average(base, clients, weights=[1.0, 3.0, 6.0])
    assert sorted(result) == sorted(base)
    # encoder[text] is held by all three: (1 * A + 3 * B + 6 * C) / 10.
    torch.testing.assert_close(result[ENC]["lora.weight"], _t((1 + 12 + 60) / 10, (2 + 18 + 0) / 10))
    torch.testing.assert_close(result[ENC]["bias"], _t((1 * 1 + 3 * 2 + 6 * 3) / 10))
    # Each head is held by one client: its weight is renormalised over the holders only, so the head is
    # that client's value, not diluted by the clients that do not hold it.
    torch.testing.assert_close(result[HEAD_A]["weight"], _t(3.0))
    torch.testing.assert_close(result[HEAD_B]["weight"], _t(5.0))
    # Held by nobody: keeps the base value, as a copy.
    torch.testing.assert_close(result[HEAD_C]["weight"], _t(7.0, 8.0))
    assert result[HEAD_C]["weight"].data_ptr() != base[HEAD_C]["weight"].data_ptr()


def test_weighted_average_with_uniform_weights(base: dict, clients: list) -> None:
    result = weighted_average(base, clients, weights=[1.0, 1.0, 1.0])
    torch.testing.assert_close(result[ENC]["lora.weight"], _t((1 + 4 + 10) / 3, (2 + 6 + 0) / 3))
    torch.testing.assert_close(result[ENC]["bias"], _t(2.0))
    torch.testing.assert_close(result[HEAD_A]["weight"], _t(3.0))
    torch.testing.assert_close(result[HEAD_B]["weight"], _t(5.0))


def test_weighted_average_scales_weights_freely(base: dict, clients: list) -> None:
    small = weighted_average(base, clients, weights=[1.0, 3.0, 6.0])
    large = weighted_average(base, clients, weights=[10.0, 30.0, 60.0])
    for component in base:
        for key in base[component]:
            torch.testing.assert_close(small[component][key], large[component][key])


def test_weighted_average_keeps_base_when_holders_weigh_zero(base: dict, clients: list) -> None:
    result = weighted_average(base, clients, weights=[0.0, 1.0, 1.0])
    torch.testing.assert_close(result[HEAD_A]["weight"], _t(100.0))
    torch.testing.assert_close(result[ENC]["lora.weight"], _t(7.0, 3.0))


def test_weighted_average_leaves_its_inputs_alone(base: dict, clients: list) -> None:
    before = clone(base), [clone(c) for c in clients]
    result = weighted_average(base, clients, weights=[1.0, 3.0, 6.0])
    for params in result.values():
        for tensor in params.values():
            tensor.add_(1000.0)
    for original, copy in zip([base, *clients], [before[0], *before[1]], strict=True):
        for component, params in original.items():
            for key, tensor in params.items():
                assert torch.equal(tensor, copy[component][key])


def test_weighted_average_keeps_the_base_dtype() -> None:
    base = {ENC: {"w": torch.zeros(3, dtype=torch.bfloat16)}}
    states = [{ENC: {"w": torch.full((3,), 1.0, dtype=torch.bfloat16)}}, {ENC: {"w": torch.full((3,), 2.0)}}]
    result = weighted_average(base, states, weights=[1.0, 1.0])
    assert result[ENC]["w"].dtype == torch.bfloat16
    torch.testing.assert_close(result[ENC]["w"], torch.full((3,), 1.5, dtype=torch.bfloat16))


def test_weighted_average_rejects_a_negative_weight(base: dict, clients: list) -> None:
    with pytest.raises(ValueError, match="non-negative"):
        weighted_average(base, clients, weights=[1.0, -0.5, 1.0])


def test_weighted_average_rejects_a_length_mismatch(base: dict, clients: list) -> None:
    with pytest.raises(ValueError, match="3 states but 2 weights"):
        weighted_average(base, clients, weights=[1.0, 1.0])


def test_weighted_average_rejects_components_and_shapes_the_base_lacks(base: dict, clients: list) -> None:
    with pytest.raises(ComponentMismatchError, match=r"state 1 .*head\[ghost\]"):
        weighted_average(base, [clients[0], {"head[ghost]": {"weight": _t(1.0)}}], weights=[1.0, 1.0])
    with pytest.raises(ComponentMismatchError, match=r"state 0 .*'weight' has shape \(2,\), expected \(1,\)"):
        weighted_average(base, [{HEAD_A: {"weight": _t(1.0, 2.0)}}], weights=[1.0])


# -- bookkeeping ----------------------------------------------------------------------------------------------


def test_flatten_unflatten_round_trip(base: dict) -> None:
    state = {
        "encoder[image+text]": {"backbone.layer.0.query.lora_A.default.weight": torch.randn(2, 3)},
        **base,
    }
    flat = flatten(state)
    assert "encoder[image+text]/backbone.layer.0.query.lora_A.default.weight" in flat
    assert "head[c]/weight" in flat
    assert len(flat) == sum(len(params) for params in state.values())
    restored = unflatten(flat)
    assert restored.keys() == state.keys()
    for component, params in state.items():
        assert restored[component].keys() == params.keys()
        for key, tensor in params.items():
            assert torch.equal(restored[component][key], tensor)


def test_num_bytes_counts_every_tensor_at_its_element_size() -> None:
    state = {
        "a": {"w": torch.zeros(2, 3, dtype=torch.float32), "b": torch.zeros(5, dtype=torch.float16)},
        "b": {"step": torch.zeros(1, dtype=torch.int64)},
    }
    assert num_bytes(state) == 2 * 3 * 4 + 5 * 2 + 1 * 8
    assert num_bytes({}) == 0


def test_non_finite_components_names_nan_and_inf() -> None:
    state = {
        "head[z]": {"w": _t(1.0, float("nan"))},
        "encoder[text]": {"ok": _t(1.0), "bad": _t(float("-inf"))},
        "head[a]": {"w": _t(1e30, -1e30)},
    }
    assert non_finite_components(state) == ["encoder[text]", "head[z]"]
    assert non_finite_components({"head[a]": state["head[a]"]}) == []


def test_select_shares_tensors_and_rejects_unknown_components(base: dict) -> None:
    sub = select(base, [HEAD_A, ENC])
    assert sorted(sub) == [ENC, HEAD_A]
    assert sub[HEAD_A]["weight"] is base[HEAD_A]["weight"]
    with pytest.raises(ComponentMismatchError, match=r"head\[ghost\]"):
        select(base, [ENC, "head[ghost]"])


def test_clone_copies_and_detaches() -> None:
    weight = torch.ones(2, requires_grad=True)
    copy = clone({"a": {"w": weight}})
    assert not copy["a"]["w"].requires_grad
    copy["a"]["w"].add_(1.0)
    assert torch.equal(weight.detach(), torch.ones(2))
