"""The optional early end of federation as an engine callback: stop once the validation loss is stable."""

from __future__ import annotations

from typing import Any

from tapl.engine.callbacks import Engine, EngineCallback
from tapl.plateau import Plateau

#: Why federation stopped, in ``metrics.jsonl`` (``"stopped"``) and on screen.
REASON = "the global validation loss is stable"


class PlateauStop(EngineCallback):
    """Ends federation once the global model's validation loss has stabilized (``federation.plateau_window``,
    ``federation.plateau_tolerance``; see :class:`~tapl.plateau.Plateau`). Without a global model, the
    personalized one's loss counts. Must run before the callbacks that write the round's record."""

    def __init__(self, window: int, tolerance: float) -> None:
        self.plateau = Plateau(window, tolerance)

    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        if "summary" not in record:  # not an evaluation round
            return
        reference = record["summary"].get("global", record["summary"].get("personalized", {}))
        losses = {task: values["loss"] for task, values in reference.items()}
        if self.plateau.update(record["round"], losses):
            record["stopped"] = REASON
            engine.stop(REASON)

    def state_dict(self) -> dict[str, Any]:
        return self.plateau.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau.load_state_dict(state)
