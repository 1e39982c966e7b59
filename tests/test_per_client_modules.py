"""PerClientModules: a shared layer applies each cohort member's own tensors to that member's rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tapl.engine.per_client_modules import NotBatchable, PerClientModules


@pytest.mark.parametrize("bias", ["per member", "shared", "none"])
def test_a_linear_layer_gives_each_member_what_its_own_weights_give(bias: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(5, 3, bias=bias != "none")
    model = nn.Sequential(layer)
    members, rows = 4, 6
    tensors = {"0.weight": torch.randn(members, 3, 5, requires_grad=True)}
    if bias == "per member":
        tensors["0.bias"] = torch.randn(members, 3, requires_grad=True)
    x = torch.randn(members * rows, 7, 5)  # rows of member 0, then member 1, ...; a sequence axis in between

    with PerClientModules(model, tensors).active():
        out = model(x)
    out.square().sum().backward()

    for m in range(members):
        b = tensors["0.bias"][m] if bias == "per member" else layer.bias
        expected = torch.nn.functional.linear(x[m * rows : (m + 1) * rows], tensors["0.weight"][m], b)
        torch.testing.assert_close(out[m * rows : (m + 1) * rows], expected)
    own = [slice(m * rows, (m + 1) * rows) for m in range(members)]
    expected_grad = torch.stack([2 * torch.einsum("rso,rsi->oi", out[r], x[r]) for r in own])
    torch.testing.assert_close(tensors["0.weight"].grad, expected_grad.detach())
    assert "forward" not in layer.__dict__  # the layer runs its own weights again after the context


def test_a_subset_of_members_uses_their_own_weights_and_rows_must_divide_among_them() -> None:
    layer = nn.Linear(2, 2, bias=False)
    weights = torch.stack([torch.eye(2) * (m + 1) for m in range(3)])
    per_client = PerClientModules(nn.Sequential(layer), {"0.weight": weights})
    x = torch.ones(4, 2)
    with per_client.active([2, 0]):
        out = layer(x)
        with pytest.raises(NotBatchable, match="3 rows, not a multiple of the cohort's 2 members"):
            layer(torch.ones(3, 2))
    torch.testing.assert_close(out, torch.tensor([[3.0, 3.0], [3.0, 3.0], [1.0, 1.0], [1.0, 1.0]]))
