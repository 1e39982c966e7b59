"""The values an algorithm and the engine exchange: what a federation is, what a visit is asked to do and
what it returns. Plain data, so that the same algorithm runs in one process,
with many clients at once, or across machines.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tapl.components import ComponentState, clone, select
from tapl.tasks import Task

#: What a visit belongs to: a federated round, the post-federation stage after the last round, or an
#: evaluation (e.g. Per-FedAvg adapting the global slice before its personalized model is scored).
Stage = Literal["federation", "post-federation", "evaluation"]


@dataclass(frozen=True)
class ClientInfo:
    """One client of the federation.

    Attributes:
        id: The client's id.
        tasks: The names of its tasks.
        components: Its slice: the components its tasks' forward passes use.
        num_train_samples: Its training rows over all its tasks (the default aggregation weight).
    """

    id: int
    tasks: tuple[str, ...]
    components: tuple[str, ...]
    num_train_samples: int


@dataclass(frozen=True)
class FederationInfo:
    """What an algorithm is told about the federation at :meth:`~tapl.algorithms.Algorithm.setup`.

    Attributes:
        tasks: Every task, by name.
        clients: Every client, by id.
        paths: Per task, the components its forward pass uses.
        initial_state: The global model before the first round (every component). Read only.
        rounds: The round the federation ends at.
        local_steps: Optimizer steps of a local fit (``federation.local_steps``).
        finetune_steps: Batches of the engine's post-federation fine-tuning (the "+FT" model); 0: none.
        finetune_lr: Its learning rate.
        warmup_rounds: Rounds of learning-rate warm-up (``federation.warmup_rounds``).
        precision: The precision a local fit really runs with (e.g. ``"32-true"``, ``"bf16-mixed"``).
        trainer: The ``--trainer`` settings local fits use (e.g. ``gradient_clip_val``).
        run_dir: The run directory (rank 0 writes there).
    """

    tasks: Mapping[str, Task]
    clients: Mapping[int, ClientInfo]
    paths: Mapping[str, tuple[str, ...]]
    initial_state: ComponentState
    rounds: int
    local_steps: int
    finetune_steps: int
    finetune_lr: float
    warmup_rounds: int
    precision: str
    trainer: Mapping[str, Any]
    run_dir: Path

    def slice_of(self, state: ComponentState, client: int) -> ComponentState:
        """A copy of ``client``'s slice of ``state`` (e.g. of the global model, to send it)."""
        return clone(select(state, self.clients[client].components))


@dataclass
class Instruction:
    """What the server sends one client for a round's visit.

    Attributes:
        client: The client's id.
        state: The tensors sent (usually the client's slice of the global model); only these count as
            download traffic. The visit sees them as ``ctx.received``.
        config: Anything else the visit should know (JSON-serialisable), seen as ``ctx.config``.
    """

    client: int
    state: ComponentState
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitResult:
    """The outcome of one local fit.

    Attributes:
        state: The trained tensors (same components as the state that was fitted).
        train_loss: Mean training loss per task over the fit, sample-weighted.
        steps: Optimizer steps taken.
    """

    state: ComponentState
    train_loss: dict[str, float]
    steps: int


@dataclass
class ClientUpdate:
    """What one client uploads after a visit.

    Attributes:
        client: The client's id.
        state: The tensors sent to the server; only these count as upload traffic.
        num_samples: The client's training samples (the default aggregation weight).
        metrics: Scalars to log for this visit (e.g. training loss per task, a proximal term).
        events: Things that happened during the visit, logged as they are in ``metrics.jsonl`` (e.g. TAP's
            replacements); each a JSON-serialisable dict.
    """

    client: int
    state: ComponentState
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Failure:
    """A visit of the round that failed: it raised, or uploaded something unusable (e.g. NaN).

    Attributes:
        client: The client's id.
        error: What went wrong, in one line.
    """

    client: int
    error: str
