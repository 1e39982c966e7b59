"""Engine callbacks: what happens around the round loop (logs, checkpoints, progress, early stop).

As Lightning's ``Callback``: the loop fires the hooks in order, each callback does one job and keeps its own
state (:meth:`EngineCallback.state_dict`), which checkpoints carry. Hooks receive the engine as
:class:`Engine`, the little of it they may read and ask for.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from tapl.engine.config import FederationConfig
from tapl.run_dir import RunDirectory
from tapl.tasks import Task


class Engine(Protocol):
    """What a callback sees of the engine."""

    config: FederationConfig
    run_dir: RunDirectory
    #: The last completed round.
    round: int
    #: The round after which federation stopped early, or ``None``.
    stopped_at: int | None

    @property
    def tasks(self) -> Mapping[str, Task]:
        """Every task, by name."""
        ...

    def stop(self, reason: str) -> None:
        """End federation after the current round (the post-federation stage still runs)."""
        ...

    def save_checkpoint(self, name: str) -> Path | None:
        """Write a checkpoint of the whole run (rank 0; ``None`` elsewhere)."""
        ...


class EngineCallback:
    """Base class of engine callbacks; every hook does nothing. Records are the dicts written to
    ``metrics.jsonl`` (a round) and ``post_federation.jsonl`` (a client's post-federation stage)."""

    def on_fit_start(self, engine: Engine) -> None:
        """Before the first round to run (fresh or resumed)."""

    def on_round_start(self, engine: Engine, round: int, clients: list[int]) -> None:
        """Before a round's visits."""

    def on_client_start(self, engine: Engine, client: int, what: str) -> None:
        """Before work on one client (a visit, its post-federation stage, an evaluation)."""

    def on_client_end(self, engine: Engine, client: int) -> None:
        """After a visit or a client's post-federation stage."""

    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        """After a round: aggregated, evaluated when due; ``record`` is its ``metrics.jsonl`` line."""

    def on_post_federation_start(self, engine: Engine, clients: list[int]) -> None:
        """Before the post-federation stage of ``clients`` (those not done yet)."""

    def on_post_federation_client_end(self, engine: Engine, record: dict[str, Any]) -> None:
        """After one client's post-federation stage; ``record`` is its ``post_federation.jsonl`` line."""

    def on_post_federation_end(self, engine: Engine) -> None:
        """After every client's post-federation stage."""

    def on_fit_end(self, engine: Engine, results: dict[str, Any]) -> None:
        """After the final test; ``results`` is ``results.json``."""

    def on_message(self, engine: Engine, message: str) -> None:
        """A line for the user (e.g. "federation stopped early")."""

    def teardown(self, engine: Engine) -> None:
        """Always, last, also after an error."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on as if never stopped."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
