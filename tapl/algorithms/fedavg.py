"""FedAvg: local training of each sampled client's slice, then a masked per-component weighted average."""

from __future__ import annotations

from typing import Literal

from tapl.algorithms.base import Algorithm
from tapl.api import ClientUpdate, Failure
from tapl.components import ComponentState, weighted_average


class FedAvg(Algorithm):
    """Federated averaging (McMahan et al., 2017) over heterogeneous slices.

    Each component is averaged over the clients that hold it, weighted by their training samples (or
    uniformly); a component no client of the round uploaded keeps its value.

    Args:
        weighting: ``"samples"`` weights a client by its training rows, ``"uniform"`` weights clients equally.
    """

    def __init__(self, weighting: Literal["samples", "uniform"] = "samples") -> None:
        super().__init__()
        if weighting not in ("samples", "uniform"):
            raise ValueError(f"algorithm.weighting must be 'samples' or 'uniform', got {weighting!r}")
        self.weighting = weighting

    def aggregate(
        self, round: int, global_state: ComponentState, results: list[ClientUpdate], failures: list[Failure]
    ) -> ComponentState:
        weights = [float(r.num_samples) if self.weighting == "samples" else 1.0 for r in results]
        return weighted_average(global_state, [r.state for r in results], weights)
