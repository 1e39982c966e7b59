"""The ``Algorithm`` plugin interface: the few hooks a federated (personalization) method overrides.

An algorithm never sees the engine. Its server side chooses what each round's clients receive and aggregates
what they upload; its client side runs one client's visit through a :class:`~tapl.context.ClientContext`,
which fits and evaluates states on the client's data and holds the client's own store. So the same class runs
in one process or across machines. A new method is one subclass in one file, selectable with
``--algorithm my_pkg.MyMethod``.
"""

from __future__ import annotations

from typing import Any

from tapl.api import ClientUpdate, Failure, FederationInfo, Instruction
from tapl.components import ComponentState
from tapl.context import ClientContext
from tapl.reported import ReportedModel, global_model, received


class Algorithm:
    """Base class of federated algorithms; by itself it trains the global slice and keeps no state.

    Hooks, in the order the engine calls them:

    - :meth:`setup` once, with a frozen description of the federation (before a checkpoint is loaded);
    - per round, on the server :meth:`configure_round` (what each sampled client receives); on each client
      :meth:`client_update`; on the server :meth:`aggregate` with the round's results and failures;
    - after the last round, on each client the engine fine-tunes the global slice (the "+FT" model,
      ``federation.finetune_steps``) and calls :meth:`post_federation`; then :meth:`on_federation_end` once;
    - :meth:`models` declares the models reported per client; the engine evaluates them at every evaluation;
    - :meth:`state_dict` / :meth:`load_state_dict` for the server side's own state in checkpoints. A client's
      own state lives in ``ctx.store``, which the engine checkpoints.

    A fit's local objective is changed by passing an :class:`~tapl.objective.Objective` to
    :meth:`ClientContext.fit`, its optimizer by passing ``optimizer``.
    """

    #: Short name shown in logs and results; defaults to the class name.
    name: str = ""

    def __init__(self) -> None:
        #: The federation, from :meth:`setup` on.
        self.info: FederationInfo | None = None
        self._logged: dict[str, float] = {}

    @property
    def label(self) -> str:
        """The name this algorithm is reported under."""
        return self.name or type(self).__name__

    @property
    def federation(self) -> FederationInfo:
        """The federation :meth:`setup` was given."""
        if self.info is None:
            raise RuntimeError(f"{self.label} is not set up: the engine calls setup() before the first round")
        return self.info

    def setup(self, info: FederationInfo) -> None:
        """Called once before the first round (and on resume) with the federation's description; validate the
        algorithm's settings against it here."""
        self.info = info

    # -- server side --------------------------------------------------------------------------------------

    def configure_round(self, round: int, clients: list[int], global_state: ComponentState) -> list[Instruction]:
        """What each client of the round receives; by default every sampled client gets its global slice.

        Args:
            round: The round number.
            clients: The clients the engine sampled (``federation.sampling``); return instructions for those to
                visit, in visiting order (a subset is allowed).
            global_state: The current global model (every component).
        """
        return [Instruction(client, self.federation.slice_of(global_state, client)) for client in clients]

    def aggregate(
        self, round: int, global_state: ComponentState, results: list[ClientUpdate], failures: list[Failure]
    ) -> ComponentState:
        """Combine the round's uploads into the next global state.

        Args:
            round: The round number.
            global_state: The current global state (every component).
            results: The uploads of the visits that succeeded, in visiting order.
            failures: The visits that failed (raised, or uploaded non-finite or misshapen tensors); at least
                one visit succeeded.

        Returns:
            The new global state with every component of ``global_state``.
        """
        raise NotImplementedError(f"{self.label} does not implement aggregate()")

    def log(self, name: str, value: float) -> None:
        """Log a scalar of the round (in :meth:`aggregate`): ``metrics.jsonl``'s ``algorithm`` and TensorBoard's
        ``algorithm/<name>``."""
        self._logged[name] = float(value)

    def pop_logged(self) -> dict[str, float]:
        """The scalars logged since the last call (the engine calls it once per round)."""
        logged, self._logged = self._logged, {}
        return logged

    def on_federation_end(self, round: int, global_state: ComponentState) -> None:
        """Called once when the run is over: after the last round and every client's post-federation stage."""

    # -- client side --------------------------------------------------------------------------------------

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        """Run one client visit and return what it uploads.

        The default trains the received global slice for ``local_steps`` and uploads it.

        Args:
            ctx: The visit: client, round, what it received, its store and ``fit``/``evaluate``.
        """
        result = ctx.fit(ctx.received)
        metrics = {f"train_loss/{task}": loss for task, loss in result.train_loss.items()}
        return ClientUpdate(ctx.client.id, result.state, ctx.num_train_samples, metrics)

    def post_federation(self, ctx: ClientContext) -> dict[str, Any]:
        """Per-client work after the last round (e.g. distillation), after the engine's fine-tuning.

        ``ctx.stage`` is ``"post-federation"``; ``ctx.finetuned`` is the client's fine-tuned global slice (or
        ``None`` when ``federation.finetune_steps`` is 0 or there is no global model). The engine checkpoints
        after every client, so a killed post-federation stage resumes at the next client.

        Returns:
            What to log for this client in ``post_federation.jsonl`` (JSON-serialisable; numbers also go to
            TensorBoard), e.g. teacher and student metrics.
        """
        return {}

    # -- reporting ----------------------------------------------------------------------------------------

    def models(self) -> list[ReportedModel]:
        """The models reported per client, in order. One with key ``"global"`` makes the engine also fine-tune
        and report ``"global+FT"``; one with key ``"personalized"`` is the method's own model.

        The default reports the global model and, as ``personalized``, the same model (no personal model).
        """
        description = "no personal model: each client's slice of the global model"
        return [
            global_model(self.label),
            ReportedModel("personalized", f"{self.label} (personalized)", description, received),
        ]

    # -- server state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The server side's own state (tensors, numbers, strings, lists and dicts of them)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
