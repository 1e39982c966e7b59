"""FedAvgM (Hsu et al., 2019) as a user-written tapl plugin: FedAvg with momentum on the server.

Run it without touching tapl::

    PYTHONPATH=examples tapl fit --config experiments/demo.yaml \
        --algorithm server_momentum.FedAvgM --algorithm.momentum 0.9
"""

from __future__ import annotations

from typing import Any

from tapl.algorithms import ClientUpdate, Failure, FedAvg
from tapl.components import ComponentState


class FedAvgM(FedAvg):
    """FedAvg whose server applies the averaged client change with momentum.

    Args:
        momentum: Server momentum ``beta``; ``0`` is plain FedAvg.
        server_lr: Server learning rate applied to the momentum buffer.
        weighting: As in FedAvg.
    """

    def __init__(self, momentum: float = 0.9, server_lr: float = 1.0, weighting: str = "samples") -> None:
        super().__init__(weighting=weighting)
        self.momentum = momentum
        self.server_lr = server_lr
        self.velocity: ComponentState = {}

    def aggregate(
        self, round: int, global_state: ComponentState, results: list[ClientUpdate], failures: list[Failure]
    ) -> ComponentState:
        average = super().aggregate(round, global_state, results, failures)
        new_state: ComponentState = {}
        for component, params in global_state.items():
            new_state[component] = {}
            for key, old in params.items():
                delta = old - average[component][key]  # the pseudo-gradient
                velocity = self.velocity.setdefault(component, {}).get(key)
                velocity = delta if velocity is None else self.momentum * velocity + delta
                self.velocity[component][key] = velocity
                new_state[component][key] = old - self.server_lr * velocity
        return new_state

    def state_dict(self) -> dict[str, Any]:
        return {"velocity": self.velocity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.velocity = state["velocity"]
