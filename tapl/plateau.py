"""The optional early end of federation: stop once the global model's validation loss has stabilized."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Plateau:
    """Decides when the global model's validation loss has stabilized.

    At each evaluation, the change of every task's sample-weighted validation loss relative to the previous
    evaluation is ``|loss - previous| / max(|previous|, 1e-12)``. The loss is stable once, for ``window``
    consecutive evaluations, every task's change stayed below ``tolerance``; federation then stops and the
    post-federation stage runs. ``window = 0`` never stops early.

    Args:
        window: Consecutive stable evaluations needed; 0 disables the criterion.
        tolerance: Largest relative change that counts as stable.
    """

    def __init__(self, window: int = 0, tolerance: float = 0.01) -> None:
        if window < 0 or tolerance <= 0:
            raise ValueError("federation.plateau_window must be >= 0 and federation.plateau_tolerance > 0")
        self.window = window
        self.tolerance = tolerance
        self.previous: dict[str, float] = {}
        self.stable = 0
        self.stopped_at: int | None = None

    def update(self, round: int, losses: Mapping[str, float]) -> bool:
        """Record one evaluation's loss per task; return whether federation stops after ``round``."""
        if not self.window or self.stopped_at is not None:
            return self.stopped_at is not None
        changes = [
            abs(loss - self.previous[task]) / max(abs(self.previous[task]), 1e-12)
            for task, loss in losses.items()
            if task in self.previous
        ]
        calm = bool(changes) and set(losses) == set(self.previous) and max(changes) < self.tolerance
        self.stable = self.stable + 1 if calm else 0
        self.previous = dict(losses)
        if self.stable >= self.window:
            self.stopped_at = round
        return self.stopped_at is not None

    def state_dict(self) -> dict[str, Any]:
        """What resume needs to take the same decisions."""
        return {"previous": dict(self.previous), "stable": self.stable, "stopped_at": self.stopped_at}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.previous = {str(k): float(v) for k, v in state["previous"].items()}
        self.stable = int(state["stable"])
        self.stopped_at = None if state["stopped_at"] is None else int(state["stopped_at"])
