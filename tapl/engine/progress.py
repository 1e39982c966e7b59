"""The progress display as an engine callback: one bar over rounds, one over the current round's clients."""

from __future__ import annotations

from typing import Any

from tapl.callbacks.progress import RoundProgress
from tapl.engine.callbacks import Engine, EngineCallback


class Progress(EngineCallback):
    """Shows the rounds and the client being worked on, with each round's global validation metrics."""

    def __init__(self) -> None:
        self.display: RoundProgress | None = None

    def on_fit_start(self, engine: Engine) -> None:
        self.display = RoundProgress(engine.config.rounds, engine.round, engine.config.progress).__enter__()

    def on_round_start(self, engine: Engine, round: int, clients: list[int]) -> None:
        if self.display:
            self.display.start_round(round, len(clients))

    def on_client_start(self, engine: Engine, client: int, what: str) -> None:
        if self.display:
            self.display.client_started(client, what)

    def on_client_end(self, engine: Engine, client: int) -> None:
        if self.display:
            self.display.client_done()

    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        if self.display:
            self.display.round_done(round_summary(engine, record))

    def on_post_federation_start(self, engine: Engine, clients: list[int]) -> None:
        if self.display:
            self.display.print(f"post-federation stage: {len(clients)} clients")
            self.display.start_round(engine.round, len(clients), "post-federation")

    def on_post_federation_client_end(self, engine: Engine, record: dict[str, Any]) -> None:
        if self.display:
            self.display.print(f"post-federation: client {record['client']} done in {record['seconds']:.1f} s")

    def on_message(self, engine: Engine, message: str) -> None:
        if self.display:
            self.display.print(message)

    def teardown(self, engine: Engine) -> None:
        if self.display:
            self.display.__exit__(None, None, None)
            self.display = None


def round_summary(engine: Engine, record: dict[str, Any]) -> str:
    """One line about a round: its seconds, the global model's primary metric per task, failures."""
    parts = [f"{record['seconds']:.1f}s"]
    for task, values in record.get("summary", {}).get("global", {}).items():
        metric = engine.tasks[task].task_type.primary_metric
        parts.append(f"{task} {metric} {values[metric]:.3f}")
    if record["failed_clients"]:
        parts.append(f"{len(record['failed_clients'])} failed")
    return " | ".join(parts)
