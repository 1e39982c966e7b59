"""The ``Algorithm`` plugin interface: the few hooks a federated (personalization) method overrides.

The engine (:class:`~tapl.federation.FederatedOrchestrator`) owns the loop; each round it samples
clients, calls :meth:`Algorithm.client_update` for each, :meth:`Algorithm.aggregate` once, evaluates and
checkpoints. An algorithm overrides only the hooks it needs and never touches the CLI. A new method is one
subclass in one file, selectable with ``--algorithm my_pkg.MyMethod``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from tapl.components import ComponentState
from tapl.context import ClientContext, ClientUpdate

if TYPE_CHECKING:
    from tapl.federation import FederatedOrchestrator


class Algorithm:
    """Base class of federated algorithms; by itself it trains the global slice and keeps no state.

    Hooks, in the order the engine calls them:

    - :meth:`setup` once, before the first round (and before a checkpoint is loaded into it);
    - per round, :meth:`client_update` for every sampled client, then :meth:`aggregate`, then
      :meth:`on_round_end`;
    - after the last round, the post-federation stage: for every client, the engine fine-tunes its global
      slice (the "+FT" model, ``federation.finetune_steps``) and calls :meth:`finalize_client`; then
      :meth:`finalize` once;
    - :meth:`personalized_state` and :meth:`variant_states` whenever a client's models are evaluated;
    - :meth:`state_dict` / :meth:`load_state_dict` for checkpoints and resume.

    Results name each evaluated model by a key (``global``, ``global+FT``, ``personalized`` and the keys of
    :attr:`variants`) with the label and description given by :attr:`global_label`,
    :attr:`personalized_label`, :attr:`personalized_description` and :attr:`variants`.

    Local objectives are changed per fit: :meth:`ClientContext.fit` takes a ``loss_fn`` (e.g. a proximal
    term), Lightning ``callbacks`` (optimizer-step hooks) and a ``module_class`` (a different training step).
    """

    #: Short name shown in logs and results; defaults to the class name.
    name: str = ""
    #: Whether the algorithm trains a global model (then the engine reports it and its "+FT" variant).
    has_global_model: ClassVar[bool] = True
    #: Whether a visit receives the client's slice of the global model (counted in ``bytes_down``).
    downloads_global: ClassVar[bool] = True

    def __init__(self) -> None:
        self.federation: FederatedOrchestrator | None = None

    @property
    def label(self) -> str:
        """The name this algorithm is reported under."""
        return self.name or type(self).__name__

    @property
    def global_label(self) -> str:
        """What the global model is called in results, e.g. ``"FedAvg"`` (its "+FT" variant adds ``+FT``)."""
        return self.label

    @property
    def personalized_label(self) -> str:
        """What the personalized model is called in results: the algorithm's label when it overrides
        :meth:`personalized_state`, else ``"<label> (personalized)"`` (its personalized model is the global
        slice)."""
        if type(self).personalized_state is not Algorithm.personalized_state:
            return self.label
        return f"{self.label} (personalized)"

    @property
    def personalized_description(self) -> str:
        """Which model :meth:`personalized_state` returns, in a sentence for the results files."""
        return "no personal model: each client's slice of the global model"

    @property
    def variants(self) -> dict[str, dict[str, str]]:
        """Further models reported per client (see :meth:`variant_states`): key -> ``label`` and ``description``."""
        return {}

    def setup(self, federation: FederatedOrchestrator) -> None:
        """Called once before the first round with the engine (model, data, clients, settings)."""
        self.federation = federation

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        """Run one client visit and return what it uploads.

        The default trains the received global slice for ``local_steps`` and uploads it.

        Args:
            ctx: The visit: client, round, the client's global slice and ``fit``/``evaluate`` helpers.
        """
        result = ctx.fit(ctx.global_state)
        metrics = {f"train_loss/{task}": loss for task, loss in result.train_loss.items()}
        return ClientUpdate(ctx.client.id, result.state, ctx.num_train_samples, metrics)

    def aggregate(self, round: int, global_state: ComponentState, updates: list[ClientUpdate]) -> ComponentState:
        """Combine the round's uploads into the next global state.

        Args:
            round: The round number.
            global_state: The current global state (every component).
            updates: The uploads of the clients whose visit succeeded (failed or non-finite ones are removed).

        Returns:
            The new global state with every component of ``global_state``.
        """
        raise NotImplementedError(f"{self.label} does not implement aggregate()")

    def on_round_end(self, round: int, global_state: ComponentState) -> dict[str, float]:
        """Called after aggregation; returns extra scalars to log for the round."""
        return {}

    def finalize_client(self, ctx: ClientContext) -> dict[str, Any]:
        """Post-federation work on one client (e.g. distillation), after the engine's fine-tuning.

        ``ctx.stage`` is ``"post-federation"``; ``ctx.finetuned`` is the client's fine-tuned global slice (or
        ``None`` when ``federation.finetune_steps`` is 0). The engine checkpoints after every client, so a
        killed post-federation stage resumes at the next client.

        Returns:
            What to log for this client in ``metrics.jsonl`` (JSON-serialisable; numbers also go to
            TensorBoard), e.g. teacher and student metrics.
        """
        return {}

    def finalize(self, global_state: ComponentState) -> None:
        """Called once after the post-federation stage of every client (e.g. to write a summary plot)."""

    def personalized_state(self, client: int, global_state: ComponentState) -> ComponentState | None:
        """The client's personalized model to evaluate, or ``None`` if it is the global slice.

        Args:
            client: Client id.
            global_state: The client's slice of the current global model.
        """
        return None

    def variant_states(self, client: int, global_state: ComponentState) -> dict[str, ComponentState]:
        """Further models of the client to evaluate, by the keys of :attr:`variants` (e.g. ablations).

        Args:
            client: Client id.
            global_state: The client's slice of the current global model.
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The algorithm's own state (tensors, numbers, strings, lists and dicts of them)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
