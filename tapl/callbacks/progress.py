"""One progress display over the rounds and client visits of a federated run."""

from __future__ import annotations

from types import TracebackType

from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RoundProgress:
    """A rich display with one bar for rounds and one for the clients of the current round.

    Only global rank 0 draws; elsewhere, and when ``enabled`` is false, every method does nothing. Use it as
    a context manager around the rounds.

    Args:
        total_rounds: The round the run ends at.
        start_round: Rounds already done (when resuming).
        enabled: Whether to draw at all.
    """

    def __init__(self, total_rounds: int, start_round: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled and rank_zero_only.rank == 0
        self.console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.enabled,
        )
        self._rounds = self._progress.add_task("rounds", total=total_rounds, completed=start_round, status="")
        self._clients = self._progress.add_task("clients", total=1, status="", visible=False)

    def __enter__(self) -> RoundProgress:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()

    def start_round(self, round: int, clients: int, stage: str = "round") -> None:
        """Show a new round (or the post-federation ``stage`` after it) with ``clients`` visits to come."""
        self._progress.update(self._rounds, description=f"{stage} {round}" if stage == "round" else stage)
        self._progress.reset(self._clients, total=clients, visible=True, status="")

    def client_started(self, client: int, what: str = "training") -> None:
        """Name the client being visited."""
        self._progress.update(self._clients, status=f"client {client}: {what}")

    def client_done(self) -> None:
        """Count one finished visit."""
        self._progress.advance(self._clients)

    def round_done(self, summary: str) -> None:
        """Count one finished round and show its summary (e.g. the global validation metrics)."""
        self._progress.update(self._rounds, advance=1, status=summary)
        if self.enabled and not self.console.is_terminal:
            # No live bars in a log file or CI: one line per round instead.
            self.console.print(f"round {self._progress.tasks[self._rounds].completed:.0f}: {summary}")

    def print(self, message: str) -> None:
        """Print a line above the bars (rank 0 only; also when the bars are disabled)."""
        if rank_zero_only.rank == 0:
            self.console.print(message)
