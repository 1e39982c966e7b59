"""The federation's settings (``--federation.*``) and which of them a resumed run may change."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

from tapl.plateau import Plateau
from tapl.sampling import SAMPLINGS, Sampling

#: How a round's client visits run in one process (see ``FederationConfig.execution``).
Execution = Literal["sequential", "batched"]
EXECUTIONS: tuple[str, ...] = get_args(Execution)

#: Where the clients' own states live between visits (see ``FederationConfig.client_store``).
ClientStoreKind = Literal["memory", "disk"]
CLIENT_STORES: tuple[str, ...] = get_args(ClientStoreKind)

#: Settings (dotted keys of the resolved configuration) that may differ when a run resumes: they change when the
#: run stops, how it shows progress, or where it is, never what a round computes. Any other difference from the
#: checkpoint's configuration refuses the resume.
RESUMABLE_SETTINGS = (
    "federation.rounds",
    "federation.eval_every",
    "federation.checkpoint_every",
    "federation.progress",
    "data.num_workers",
    "run_dir",
    "run_root",
    "ckpt_path",
    "runtime",
)


@dataclass
class FederationConfig:
    """Settings of the federated loop (``--federation.*``).

    Args:
        rounds: Total number of rounds; resuming with a larger value continues to it.
        clients_per_round: Clients sampled per round: an int is a count, a float in (0, 1] a fraction.
        sampling: How each round's clients are chosen, always as a function of ``(seed, round)``:
            ``"random"``, uniformly and independently per round; ``"cyclic"``, without replacement across
            rounds: every participant once per pass of ``participants / clients_per_round`` rounds, in an
            order shuffled per pass (see :mod:`tapl.sampling`).
        local_steps: Optimizer steps of one local fit.
        seed: Seed of model initialisation, client sampling and every local fit.
        warmup_rounds: Warm the learning rate up linearly over this many rounds, from ``warmup_start_lr`` in
            round 1 to the optimizer's configured (peak) rate from round ``warmup_rounds + 1`` on; 0: no warm-up.
        warmup_start_lr: The learning rate of round 1 when warming up.
        eval_every: Evaluate on every client's validation split every this many rounds (and after the last).
        checkpoint_every: Write a checkpoint every this many rounds (and after the last).
        progress: Show the progress display.
        finetune_steps: Post-federation fine-tuning: each client's final global slice trains on this many
            batches of its own training data, one optimizer step per batch (``--trainer.accumulate_grad_batches``
            does not apply after the rounds, so the budget counts batches, as the TAP paper's 50 do), reported
            as the "+FT" model (e.g. FedAvg+FT) and used by algorithms as a teacher (TAP); 0 disables it.
        finetune_lr: Learning rate of that fine-tuning.
        plateau_window: Stop federation early once the global model's validation loss has stabilized: for
            this many consecutive evaluations, every task's loss changed by less than ``plateau_tolerance``
            (relative to the previous evaluation); the post-federation stage then runs. 0: run every round.
        plateau_tolerance: The relative change below which a task's validation loss counts as stable.
        holdout_clients: Ids of clients that never take part in the rounds: they are evaluated like every
            client (and fine-tuned after the rounds) to measure generalization to clients the federation never
            trained on; summaries cover the participating clients and, separately, the held-out ones.
        execution: How a round's visits (and the post-federation stages) run in this process: ``"sequential"``,
            one ``Trainer.fit`` per client fit; ``"batched"``, the fits of many clients as one ``Trainer.fit`` over
            their stacked tensors (the frozen backbone computed once for all their rows), equal to sequential fits up
            to float rounding and dropout draws (see :mod:`tapl.engine.batched`). Batched runs on one device; fits
            with their own training step (Per-FedAvg) or whose slices sit in layers it cannot stack run one after
            another, with a notice.
        batched_rows: With ``execution: batched``, the most training rows one batched step holds (clients times
            ``data.batch_size``): the memory budget that splits a round's clients into cohorts run one after
            another. Lower it when a batched step runs out of memory.
        client_store: Where every client's own state (personal models, heads, loss histories) lives between its
            visits: ``"memory"``; or ``"disk"``, one safetensors file per client under the run directory's
            ``client_stores/``, read only for the clients a round works on (memory then holds an index), so that
            the personal states of 100,000 clients fit on a laptop. A disk run resumes from its last checkpoint.
    """

    rounds: int = 10
    clients_per_round: int | float = 0.5
    sampling: Sampling = "random"
    local_steps: int = 10
    seed: int = 0
    warmup_rounds: int = 0
    warmup_start_lr: float = 1e-4
    eval_every: int = 1
    checkpoint_every: int = 1
    progress: bool = True
    finetune_steps: int = 50
    finetune_lr: float = 1e-4
    plateau_window: int = 0
    plateau_tolerance: float = 0.01
    holdout_clients: list[int] = field(default_factory=list)
    execution: Execution = "sequential"
    batched_rows: int = 4096
    client_store: ClientStoreKind = "memory"

    def __post_init__(self) -> None:
        for name in ("rounds", "local_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"federation.{name} must be >= 1, got {getattr(self, name)}")
        k = self.clients_per_round
        if isinstance(k, float) and not 0 < k <= 1:
            raise ValueError(f"federation.clients_per_round as a fraction must lie in (0, 1], got {k}")
        if isinstance(k, int) and k < 1:
            raise ValueError(f"federation.clients_per_round must be >= 1, got {k}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"federation.sampling must be one of {list(SAMPLINGS)}, got {self.sampling!r}")
        if self.warmup_rounds < 0 or self.warmup_start_lr <= 0:
            raise ValueError("federation.warmup_rounds must be >= 0 and federation.warmup_start_lr > 0")
        if self.finetune_steps < 0 or self.finetune_lr <= 0:
            raise ValueError("federation.finetune_steps must be >= 0 and federation.finetune_lr > 0")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"federation.execution must be one of {list(EXECUTIONS)}, got {self.execution!r}")
        if self.client_store not in CLIENT_STORES:
            raise ValueError(f"federation.client_store must be one of {list(CLIENT_STORES)}, got {self.client_store!r}")
        if self.batched_rows < 1:
            raise ValueError(f"federation.batched_rows must be >= 1, got {self.batched_rows}")
        Plateau(self.plateau_window, self.plateau_tolerance)  # validates both

    def lr_for_round(self, round: int) -> Callable[[float], float] | None:
        """The warm-up of ``round`` as a function of the peak learning rate, or ``None`` once warmed up."""
        if not self.warmup_rounds or round > self.warmup_rounds:
            return None
        progress = (round - 1) / self.warmup_rounds
        start = self.warmup_start_lr
        return lambda peak: start + (peak - start) * progress

    def num_sampled(self, num_clients: int) -> int:
        """How many of ``num_clients`` clients one round samples."""
        k = self.clients_per_round
        if isinstance(k, float):
            return max(1, round(k * num_clients))
        if k > num_clients:
            raise ValueError(f"federation.clients_per_round is {k} but the federation has {num_clients} clients")
        return k
