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
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from lightning.pytorch.utilities import rank_zero_only

from tapl.algorithms.fedavg import FedAvg
from tapl.algorithms.personal import PersonalModels
from tapl.components import ComponentState, check_finite
from tapl.context import ClientContext, ClientUpdate
from tapl.distillation import DistillationModule
from tapl.plots import plot_series
from tapl.tasks import Task

if TYPE_CHECKING:
    from tapl.federation import FederatedOrchestrator

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
        self.personal = PersonalModels()
        #: Per client and task, the personal model's loss from its last fit (``hP``; +inf before the first).
        self.personal_loss: dict[int, dict[str, float]] = {}
        #: Every replacement: round, client, task, pair and the components copied.
        self.replacements: list[dict[str, Any]] = []
        #: Stage-2 models: the personal model trained for the same steps without distillation.
        self.undistilled: dict[int, ComponentState] = {}

    # -- names --------------------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        return {"adaptive": "TAP", "never": "TAP (never replace)", "always": "TAP (always replace)"}[self.replacement]

    @property
    def global_label(self) -> str:
        # The uploads are the trained global slices and the server averages them: FedAvg's global model.
        return "FedAvg"

    @property
    def personalized_description(self) -> str:
        return (
            f"{self.label}'s personal model of each client: during the rounds the stage-1 model (global components "
            "copied in on improvement, then trained locally); after the post-federation stage that model "
            "distilled from the fine-tuned global slice (stage 2). A client never visited holds the initial model."
        )

    @property
    def variants(self) -> dict[str, dict[str, str]]:
        return {
            "no_distillation": {
                "label": f"{self.label} w/o distillation",
                "description": "the stage-1 personal model trained for the same post-federation batches, data "
                "order and learning rate as the distilled one, on the task loss alone (lambda = 0)",
            }
        }

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

    # -- engine hooks -------------------------------------------------------------------------------------

    def setup(self, federation: FederatedOrchestrator) -> None:
        super().setup(federation)
        if federation.config.finetune_steps < 1:
            raise ValueError(
                "TAP's stage 2 distils from the fine-tuned global slice: set federation.finetune_steps >= 1."
            )
        tasks = federation.data.tasks.values()
        for task in tasks:
            self.margin(task)
            self.lookup(self.distill_weights, task, "distill_weights")
            try:
                self.distill_loss(task)
            except ValueError as error:
                raise ValueError(f"algorithm.distill_losses, task {task.name!r}: {error}") from None
        # The personal model of a client not visited yet: its slice of the initial model.
        self.personal.start_from(federation.global_state)

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        assert self.federation is not None
        cid = ctx.client.id
        tasks = {name: self.federation.data.tasks[name] for name in ctx.client.tasks}
        trained = ctx.fit(ctx.global_state)
        check_finite(trained.state, "the trained global slice")
        global_loss = self._losses(ctx, trained.state, trained.train_loss)

        personal = self.personal.model(cid, ctx.components)
        history = self.personal_loss.get(cid, {})
        metrics: dict[str, float] = {f"train_loss/{t}": v for t, v in trained.train_loss.items()}
        events: list[dict[str, Any]] = []
        for name, task in tasks.items():
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
        check_finite(fitted.state, "the trained personal model")
        personal_loss = self._losses(ctx, fitted.state, fitted.train_loss)
        metrics.update({f"personal_loss/{t}": v for t, v in personal_loss.items()})
        # The visit succeeded: only now does the client's own state change.
        self.personal[cid] = fitted.state
        self.personal_loss[cid] = {**history, **personal_loss}
        self.replacements.extend({"client": cid, **e} for e in events)
        return ClientUpdate(cid, trained.state, ctx.num_train_samples, metrics, events)

    def _losses(self, ctx: ClientContext, state: ComponentState, train_loss: dict[str, float]) -> dict[str, float]:
        """The losses the criterion compares: the fit's running training loss, or the validation loss."""
        if self.criterion == "train":
            return dict(train_loss)
        return {task: values["loss"] for task, values in ctx.evaluate(state, "val").items()}

    def on_round_end(self, round: int, global_state: ComponentState) -> dict[str, float]:
        counts = self.replacement_counts(round)
        return {f"replacements/{pair}": float(values[-1]) for pair, values in counts.items()}

    def replacement_counts(self, last_round: int) -> dict[str, list[int]]:
        """Cumulative replacements per modality-task pair after each round ``1..last_round``."""
        assert self.federation is not None
        pairs = sorted({t.pair for t in self.federation.data.tasks.values()})
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

    def finalize_client(self, ctx: ClientContext) -> dict[str, Any]:
        assert self.federation is not None and ctx.finetuned is not None
        config = self.federation.config
        cid = ctx.client.id
        tasks = [self.federation.data.tasks[name] for name in ctx.client.tasks]
        weights = {t.name: self.lookup(self.distill_weights, t, "distill_weights") for t in tasks}
        forms = {t.name: self.distill_loss(t) for t in tasks}
        personal = self.personal.model(cid, ctx.components)
        budget = {
            "steps": self.distill_steps or config.finetune_steps,
            "lr": self.distill_lr or config.finetune_lr,
            "stream": ctx.new_stream(),
        }
        student_module = partial(
            DistillationModule, teacher=ctx.finetuned, weights=weights, temperature=self.temperature, forms=forms
        )
        student = ctx.fit(personal, module_class=student_module, **budget)
        check_finite(student.state, "the distilled personal model")
        plain = ctx.fit(personal, **budget)
        check_finite(plain.state, "the personal model trained without distillation")
        self.personal[cid] = student.state
        self.undistilled[cid] = plain.state
        return {
            "distill_weights": weights,
            "distill_losses": forms,
            "val": {
                "teacher": ctx.evaluate(ctx.finetuned, "val"),
                "student": ctx.evaluate(student.state, "val"),
                "no_distillation": ctx.evaluate(plain.state, "val"),
            },
        }

    def finalize(self, global_state: ComponentState) -> None:
        self.write_replacement_plot()

    @rank_zero_only
    def write_replacement_plot(self) -> None:
        """Plot cumulative replacement counts per modality-task pair over rounds into the run directory."""
        assert self.federation is not None
        last = self.federation.round
        plot_series(
            list(range(1, last + 1)),
            self.replacement_counts(last),
            self.federation.run_dir.root / REPLACEMENT_PLOT,
            title=f"{self.label}: replacements of personal components",
            xlabel="round",
            ylabel="cumulative replacements",
            step=True,
        )

    def personalized_state(self, client: int, global_state: ComponentState) -> ComponentState | None:
        return self.personal.model(client, global_state)

    def variant_states(self, client: int, global_state: ComponentState) -> dict[str, ComponentState]:
        return {"no_distillation": self.undistilled[client]} if client in self.undistilled else {}

    # -- state --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "personal": self.personal.to_state(),
            "personal_loss": {str(c): dict(h) for c, h in self.personal_loss.items()},
            "replacements": list(self.replacements),
            "undistilled": {str(c): s for c, s in self.undistilled.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.personal.load(state["personal"])
        self.personal_loss = {int(c): dict(h) for c, h in state["personal_loss"].items()}
        self.replacements = list(state["replacements"])
        self.undistilled = {int(c): s for c, s in state["undistilled"].items()}
