"""Per-client models that never leave their client: personal models (TAP, Ditto) and local models (Local)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tapl.components import ComponentState, clone, select


class PersonalModels(dict[int, ComponentState]):
    """Client id -> that client's own state of its slice; a client without an entry holds the initial model.

    Call :meth:`start_from` in ``Algorithm.setup`` with the initial global state (``setup`` runs again on
    resume before the algorithm's state is loaded, so the initial model need not be checkpointed).
    """

    def __init__(self) -> None:
        super().__init__()
        self.initial: ComponentState = {}

    def start_from(self, initial: ComponentState) -> None:
        """Keep a copy of the initial model: what a client holds before its first entry."""
        self.initial = clone(initial)

    def model(self, client: int, components: Iterable[str]) -> ComponentState:
        """A copy of the client's model (its slice of the initial model if it has none yet)."""
        return clone(self[client]) if client in self else clone(select(self.initial, components))

    def to_state(self) -> dict[str, ComponentState]:
        """The entries for a checkpoint (string keys)."""
        return {str(c): s for c, s in self.items()}

    def load(self, saved: Mapping[str, ComponentState]) -> None:
        """Replace the entries by those :meth:`to_state` returned."""
        self.clear()
        self.update({int(c): s for c, s in saved.items()})
