"""TAP: two-stage adaptive personalization (arXiv 2509.26524).

Stage 1, every round: a sampled client trains the received global slice, then, task by task, hard-copies
every component on the task's path into its personal model when the trained global slice's loss beats the
personal model's by the task's margin; the personal model then trains on the plain task loss. Only the
global slice is uploaded, and the server averages like FedAvg. Stage 2, after the last round: the personal
model is distilled from the engine's fine-tuned global slice (the FedAvg+FT model) for its own budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_only

from tapl.algorithms.fedavg import FedAvg
from tapl.api import ClientUpdate, Failure, FederationInfo
from tapl.components import ComponentState, check_finite
from tapl.context import ClientContext
from tapl.distillation import Distillation
from tapl.plots import plot_series
from tapl.reported import ReportedModel, global_model, initial, stored
from tapl.tasks import Task

#: The paper's replacement margins for FLAVA, by modality-task pair or task type (see :meth:`TAP.lookup`).
FLAVA_MARGINS: dict[str, float] = {
    "image,classification": 0.01,
    "text,classification": 0.005,
    "image_generation": 0.005,
    "text_generation": 0.01,
    "default": 0.01,
}
#: The paper's distillation weights: 1.0 for text classification, 2e-3 for everything else.
DISTILL_WEIGHTS: dict[str, float] = {"text,classification": 1.0, "default": 2e-3}
#: The TAP reference code's distillation losses where a task type offers several (see ``distill_losses``).
REFERENCE_DISTILL_LOSSES: dict[str, str] = {"image_generation": "width_kl", "text_generation": "sequence_sum"}
#: The replacement plot written to the run directory.
REPLACEMENT_PLOT = "replacements.png"


class TAP(FedAvg):
    """Two-stage adaptive personalization.

    Per-task settings (``margins``, ``distill_weights``, ``distill_losses``) are tables whose keys are, from
    most to least specific, a task name (``digits``), a modality-task pair (``image,classification``,
    ``image+text,classification``), a task type (``image_generation``) or ``default``; a task takes the
    value of its most specific key. A table given in the config replaces the default table.

    Args:
        margins: Replacement margin ``eps`` per task: the personal model takes the trained global slice's
            components on a task's path when ``hG + eps < hP``. Defaults: the paper's FLAVA margins (0.01
            image classification and text generation, 0.005 image generation and text classification).
        replacement: ``"adaptive"`` (the margins), or the ablations ``"never"`` (``eps = +inf``: the
            personal model never takes the global one) and ``"always"`` (``eps = -inf``: it takes it on every
            visit).
        criterion: Which losses are compared: ``"train"``, each model's running mean training loss of its
            fit in the visit (``hG``) and in the previous visit (``hP``), as the paper; or ``"val"``, each
            model's loss on the client's validation split after its fit.
        distill_weights: Stage-2 distillation weight ``lambda`` per task. Defaults: 1.0 for text
            classification, 2e-3 otherwise. ``lambda = 0`` for every task is "TAP without distillation".
        distill_losses: Stage-2 distillation loss per task, among its task type's forms (see
            :meth:`~tapl.tasks.TaskType.distillation_loss`): classification ``kl``; image generation ``mse``
            (tapl's default: pixels are not a distribution) or ``width_kl`` (the reference code's softmax KL
            over the width axis); text generation ``token_mean`` (tapl's default: the KL averaged over target
            tokens) or ``sequence_sum`` (the reference code's ``kl_div(reduction="batchmean")`` on (batch,
            length, vocabulary) logits: summed over positions, padding included, so ``target_length`` times
            the weight of the per-token mean). A task without an entry uses its type's default.
            ``REFERENCE_DISTILL_LOSSES`` holds the reference's choices; the paper configs use them.
        distill_steps: Batches of stage-2 training, each one optimizer step (no gradient accumulation), for
            the distilled student and the undistilled ablation alike; ``None``: ``federation.finetune_steps``
            (the teacher's budget, as the paper).
        distill_lr: Learning rate of stage 2; ``None``: ``federation.finetune_lr``.
        temperature: Stage-2 softmax temperature ``T``.
        weighting: Server aggregation weights, as :class:`FedAvg`.
    """

    def __init__(
        self,
        margins: dict[str, float] | None = None,
        replacement: Literal["adaptive", "never", "always"] = "adaptive",
        criterion: Literal["train", "val"] = "train",
        distill_weights: dict[str, float] | None = None,
        distill_losses: dict[str, str] | None = None,
        distill_steps: int | None = None,
        distill_lr: float | None = None,
        temperature: float = 1.0,
        weighting: Literal["samples", "uniform"] = "samples",
    ) -> None:
        super().__init__(weighting=weighting)
        if replacement not in ("adaptive", "never", "always"):
            raise ValueError(f"algorithm.replacement must be 'adaptive', 'never' or 'always', got {replacement!r}")
        if criterion not in ("train", "val"):
            raise ValueError(f"algorithm.criterion must be 'train' or 'val', got {criterion!r}")
        if temperature <= 0:
            raise ValueError(f"algorithm.temperature must be > 0, got {temperature}")
        if distill_steps is not None and distill_steps < 1:
            raise ValueError(f"algorithm.distill_steps must be >= 1 or null, got {distill_steps}")
        if distill_lr is not None and distill_lr <= 0:
            raise ValueError(f"algorithm.distill_lr must be > 0 or null, got {distill_lr}")
        self.margins = dict(FLAVA_MARGINS if margins is None else margins)
        self.replacement = replacement
        self.criterion = criterion
        self.distill_weights = dict(DISTILL_WEIGHTS if distill_weights is None else distill_weights)
        self.distill_losses = dict(distill_losses or {})
        self.distill_steps = distill_steps
        self.distill_lr = distill_lr
        self.temperature = temperature
        #: Every replacement the clients reported: round, client, task, pair and the components copied.
        self.replacements: list[dict[str, Any]] = []

    # -- names --------------------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        return {"adaptive": "TAP", "never": "TAP (never replace)", "always": "TAP (always replace)"}[self.replacement]

    def models(self) -> list[ReportedModel]:
        personal = (
            f"{self.label}'s personal model of each client: during the rounds the stage-1 model (global components "
            "copied in on improvement, then trained locally); after the post-federation stage that model "
            "distilled from the fine-tuned global slice (stage 2). A client never visited holds the initial model."
        )
        undistilled = (
            "the stage-1 personal model trained for the same post-federation batches, data order and learning rate "
            "as the distilled one, on the task loss alone (lambda = 0)"
        )
        return [
            # The uploads are the trained global slices and the server averages them: FedAvg's global model.
            global_model("FedAvg"),
            ReportedModel("personalized", self.label, personal, stored("personal", initial)),
            ReportedModel("no_distillation", f"{self.label} w/o distillation", undistilled, stored("undistilled")),
        ]

    # -- per-task settings --------------------------------------------------------------------------------

    @staticmethod
    def lookup(table: Mapping[str, float], task: Task, what: str) -> float:
        """The value of ``task`` in a per-task table (task name, pair, type, then ``default``)."""
        value = TAP.find(table, task)
        if value is not None:
            return float(value)
        raise ValueError(
            f"algorithm.{what} has no entry for task {task.name!r}: add one of {task.name!r}, {task.pair!r}, "
            f"{task.type!r} or 'default'."
        )

    @staticmethod
    def find(table: Mapping[str, Any], task: Task) -> Any:
        """The entry of ``task``'s most specific key in ``table`` (task name, pair, type, ``default``), or
        ``None``."""
        for key in (task.name, task.pair, task.type, "default"):
            if key in table:
                return table[key]
        return None

    def distill_loss(self, task: Task) -> str:
        """The stage-2 distillation loss form of ``task`` (its type's default without an entry)."""
        return task.task_type.check_distillation_form(self.find(self.distill_losses, task))

    def margin(self, task: Task) -> float:
        """The replacement margin ``eps`` of ``task`` under the ``replacement`` setting."""
        if self.replacement == "never":
            return math.inf
        if self.replacement == "always":
            return -math.inf
        return self.lookup(self.margins, task, "margins")

    @staticmethod
    def should_replace(global_loss: float, personal_loss: float, margin: float) -> bool:
        """The replacement rule: ``hG + eps < hP`` (``hP = +inf`` before the first visit)."""
        return global_loss + margin < personal_loss

    # -- stage 1: the rounds -----------------------------------------------------------------------------

    def setup(self, info: FederationInfo) -> None:
        super().setup(info)
        if info.finetune_steps < 1:
            raise ValueError(
                "TAP's stage 2 distils from the fine-tuned global slice: set federation.finetune_steps >= 1."
            )
        for task in info.tasks.values():
            self.margin(task)
            self.lookup(self.distill_weights, task, "distill_weights")
            try:
                self.distill_loss(task)
            except ValueError as error:
                raise ValueError(f"algorithm.distill_losses, task {task.name!r}: {error}") from None

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        trained = ctx.fit(ctx.received)
        check_finite(trained.state, "the trained global slice")
        global_loss = self._losses(ctx, trained.state, trained.train_loss)

        personal = ctx.store.get("personal", ctx.initial)
        history = ctx.store.get("losses", {})  # hP per task, from the personal model's last fit
        metrics: dict[str, float] = {f"train_loss/{t}": v for t, v in trained.train_loss.items()}
        events: list[dict[str, Any]] = []
        for name, task in ctx.tasks.items():
            if name not in global_loss:  # the fit saw no batch of this task: nothing to compare
                continue
            before = history.get(name, math.inf)
            replace = self.should_replace(global_loss[name], before, self.margin(task))
            metrics[f"replaced/{name}"] = float(replace)
            if replace:
                components = ctx.components_on_path(name)
                for component in components:
                    personal[component] = {k: t.clone() for k, t in trained.state[component].items()}
                events.append(
                    {
                        "event": "replacement",
                        "round": ctx.round,
                        "task": name,
                        "pair": task.pair,
                        "components": components,
                        "global_loss": global_loss[name],
                        "personal_loss": before,
                    }
                )

        fitted = ctx.fit(personal)
        personal_loss = self._losses(ctx, fitted.state, fitted.train_loss)
        metrics.update({f"personal_loss/{t}": v for t, v in personal_loss.items()})
        ctx.store["personal"] = fitted.state
        ctx.store["losses"] = {**history, **personal_loss}
        return ClientUpdate(ctx.client.id, trained.state, ctx.num_train_samples, metrics, events)

    def _losses(self, ctx: ClientContext, state: ComponentState, train_loss: dict[str, float]) -> dict[str, float]:
        """The losses the criterion compares: the fit's running training loss, or the validation loss."""
        if self.criterion == "train":
            return dict(train_loss)
        return {task: values["loss"] for task, values in ctx.evaluate(state, "val").items()}

    def aggregate(
        self, round: int, global_state: ComponentState, results: list[ClientUpdate], failures: list[Failure]
    ) -> ComponentState:
        self.replacements.extend({"client": r.client, **e} for r in results for e in r.events)
        for pair, counts in self.replacement_counts(round).items():
            self.log(f"replacements/{pair}", counts[-1])
        return super().aggregate(round, global_state, results, failures)

    def replacement_counts(self, last_round: int) -> dict[str, list[int]]:
        """Cumulative replacements per modality-task pair after each round ``1..last_round``."""
        pairs = sorted({t.pair for t in self.federation.tasks.values()})
        per_round = {pair: [0] * last_round for pair in pairs}
        for event in self.replacements:
            if event["round"] <= last_round:
                per_round[event["pair"]][event["round"] - 1] += 1
        cumulative = {}
        for pair, counts in per_round.items():
            total, running = 0, []
            for count in counts:
                total += count
                running.append(total)
            cumulative[pair] = running
        return cumulative

    # -- stage 2: after the rounds -----------------------------------------------------------------------

    def post_federation(self, ctx: ClientContext) -> dict[str, Any]:
        assert ctx.finetuned is not None  # setup() requires federation.finetune_steps >= 1
        weights = {t.name: self.lookup(self.distill_weights, t, "distill_weights") for t in ctx.tasks.values()}
        forms = {t.name: self.distill_loss(t) for t in ctx.tasks.values()}
        personal = ctx.store.get("personal", ctx.initial)
        budget = {
            "steps": self.distill_steps or self.federation.finetune_steps,
            "lr": self.distill_lr or self.federation.finetune_lr,
            "stream": ctx.new_stream(),
        }
        distillation = Distillation(ctx.finetuned, weights, self.temperature, forms)
        student = ctx.fit(personal, objective=distillation, **budget)
        plain = ctx.fit(personal, **budget)
        ctx.store["personal"] = student.state
        ctx.store["undistilled"] = plain.state
        return {
            "distill_weights": weights,
            "distill_losses": forms,
            "val": {
                "teacher": ctx.evaluate(ctx.finetuned, "val"),
                "student": ctx.evaluate(student.state, "val"),
                "no_distillation": ctx.evaluate(plain.state, "val"),
            },
        }

    def on_federation_end(self, round: int, global_state: ComponentState) -> None:
        self.write_replacement_plot(round)

    @rank_zero_only
    def write_replacement_plot(self, last_round: int) -> None:
        """Plot cumulative replacement counts per modality-task pair over rounds into the run directory."""
        plot_series(
            list(range(1, last_round + 1)),
            self.replacement_counts(last_round),
            self.federation.run_dir / REPLACEMENT_PLOT,
            title=f"{self.label}: replacements of personal components",
            xlabel="round",
            ylabel="cumulative replacements",
            step=True,
        )

    # -- server state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"replacements": list(self.replacements)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.replacements = list(state["replacements"])
