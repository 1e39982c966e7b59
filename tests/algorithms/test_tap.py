"""Tests for TAP's stage 1 on scripted visits: the replacement rule, what is copied, what is uploaded, state."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tapl.algorithms import TAP
from tapl.components import ComponentState
from tapl.context import FitResult
from tapl.datamodules.federated import ClientSpec
from tapl.tasks import Task

ENC_IMAGE, ENC_TEXT, SHARED, HEAD_A, HEAD_B = "encoder[image]", "encoder[text]", "fusion[shared]", "head[a]", "head[b]"
TASKS = {
    "a": Task(name="a", type="classification", modalities=("image",), num_classes=2),
    "b": Task(name="b", type="classification", modalities=("text",), num_classes=2),
}
PATHS = {"a": [ENC_IMAGE, SHARED, HEAD_A], "b": [ENC_TEXT, SHARED, HEAD_B]}
COMPONENTS = sorted({c for path in PATHS.values() for c in path})
INITIAL: ComponentState = {c: {"w": torch.full((2,), float(i))} for i, c in enumerate(COMPONENTS)}


class ScriptedVisit:
    """A visit whose two fits return scripted states and losses.

    The first fit (the global slice) returns the received state plus ``100 * round``; the second (the personal
    model) returns its input plus ``1000 * round``, so every tensor tells which fit of which visit made it.
    """

    def __init__(
        self,
        round: int,
        global_state: ComponentState,
        global_loss: dict[str, float],
        personal_loss: dict[str, float],
        client: int = 0,
        tasks: tuple[str, ...] = ("a", "b"),
    ) -> None:
        self.client = ClientSpec(client, tasks)
        self.round = round
        self.global_state = global_state
        self.components = sorted(global_state)
        self.stage = "federation"
        self.num_train_samples = 10
        self.losses = [global_loss, personal_loss]
        self.fitted: list[ComponentState] = []
        self.evaluated: list[ComponentState] = []

    def components_on_path(self, task: str) -> list[str]:
        return PATHS[task]

    def fit(self, state: ComponentState, **kwargs: Any) -> FitResult:
        offset = (100 if not self.fitted else 1000) * self.round
        self.fitted.append({c: {k: t.clone() for k, t in p.items()} for c, p in state.items()})
        trained = {c: {k: t + offset for k, t in p.items()} for c, p in state.items()}
        return FitResult(trained, self.losses[len(self.fitted) - 1], steps=1)

    def evaluate(self, state: ComponentState, split: str = "val") -> dict[str, dict[str, float]]:
        self.evaluated.append(state)
        # The validation loss of a state: its first value of head[a] / head[b], as a recognisable number.
        return {task: {"loss": float(state[f"head[{task}]"]["w"][0])} for task in ("a", "b")}


def make_tap(**kwargs: Any) -> TAP:
    tap = TAP(**kwargs)
    federation = SimpleNamespace(
        config=SimpleNamespace(finetune_steps=1), data=SimpleNamespace(tasks=TASKS), global_state=INITIAL
    )
    tap.setup(federation)  # type: ignore[arg-type]
    return tap


def global_slice(value: float = 0.0) -> ComponentState:
    return {c: {"w": torch.full((2,), value + i)} for i, c in enumerate(COMPONENTS)}


def visit(tap: TAP, round: int, global_loss: dict[str, float], personal_loss: dict[str, float]) -> ScriptedVisit:
    ctx = ScriptedVisit(round, global_slice(round / 10), global_loss, personal_loss)
    ctx.update = tap.client_update(ctx)  # type: ignore[arg-type, attr-defined]
    return ctx


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def replaced_tasks(ctx: ScriptedVisit) -> set[str]:
    return {e["task"] for e in ctx.update.events}  # type: ignore[attr-defined]


def test_the_first_visit_replaces_every_task_with_the_trained_global_slice() -> None:
    tap = make_tap()
    ctx = visit(tap, 1, {"a": 5.0, "b": 5.0}, {"a": 1.0, "b": 1.0})
    trained, personal_start = ctx.fitted[0], ctx.fitted[1]
    assert replaced_tasks(ctx) == {"a", "b"}
    trained = {c: {k: t + 100 for k, t in p.items()} for c, p in trained.items()}
    for component in COMPONENTS:
        assert equal(personal_start[component], trained[component]), component
    assert tap.personal_loss[0] == {"a": 1.0, "b": 1.0}


@pytest.mark.parametrize(
    ("global_loss", "replaced"),
    [(0.5, True), (0.75, False), (0.9, False), (2.0, False)],
    ids=["below-margin", "at-margin", "within-margin", "worse"],
)
def test_replacement_needs_the_global_loss_plus_margin_strictly_below_the_personal_loss(
    global_loss: float, replaced: bool
) -> None:
    tap = make_tap(margins={"default": 0.25})
    visit(tap, 1, {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0})  # hP = 1.0 for both tasks
    ctx = visit(tap, 2, {"a": global_loss, "b": 5.0}, {"a": 1.0, "b": 1.0})
    assert replaced_tasks(ctx) == ({"a"} if replaced else set())
    assert ctx.update.metrics["replaced/a"] == float(replaced)  # type: ignore[attr-defined]
    assert ctx.update.metrics["replaced/b"] == 0.0  # type: ignore[attr-defined]


def test_a_replacement_copies_exactly_that_tasks_path_and_leaves_the_other_task_alone() -> None:
    tap = make_tap(margins={"default": 0.25})
    visit(tap, 1, {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0})
    before = {c: {k: t.clone() for k, t in p.items()} for c, p in tap.personal[0].items()}
    ctx = visit(tap, 2, {"a": 0.1, "b": 5.0}, {"a": 1.0, "b": 1.0})
    trained = {c: {k: t + 200 for k, t in p.items()} for c, p in ctx.fitted[0].items()}
    personal_start = ctx.fitted[1]
    for component in PATHS["a"]:  # including the shared fusion expert on a's path
        assert equal(personal_start[component], trained[component]), component
    for component in set(COMPONENTS) - set(PATHS["a"]):  # b's own encoder and head
        assert equal(personal_start[component], before[component]), component
    (event,) = ctx.update.events  # type: ignore[attr-defined]
    assert event["task"] == "a" and event["pair"] == "image,classification" and event["round"] == 2
    assert event["components"] == PATHS["a"]
    assert (event["global_loss"], event["personal_loss"]) == (0.1, 1.0)


def test_the_upload_is_the_trained_global_slice_and_never_holds_personal_tensors() -> None:
    tap = make_tap()
    personal_values: list[torch.Tensor] = []
    for round in range(1, 5):
        ctx = visit(tap, round, {"a": 1.0 / round, "b": 1.0}, {"a": 1.0, "b": 1.0})
        expected = {c: {k: t + 100 * round for k, t in p.items()} for c, p in ctx.global_state.items()}
        upload = ctx.update.state  # type: ignore[attr-defined]
        assert upload.keys() == expected.keys()
        assert all(equal(upload[c], expected[c]) for c in expected)
        personal_values += [t for p in tap.personal[0].values() for t in p.values()]
        uploaded = [t for p in upload.values() for t in p.values()]
        assert not any(torch.equal(u, p) for u in uploaded for p in personal_values)
        assert not any(u.data_ptr() == p.data_ptr() for u in uploaded for p in personal_values)


def test_never_replace_keeps_the_initial_model_and_always_replace_ignores_the_losses() -> None:
    never = make_tap(replacement="never")
    ctx = visit(never, 1, {"a": 0.0, "b": 0.0}, {"a": 9.0, "b": 9.0})
    assert replaced_tasks(ctx) == set()
    assert all(equal(ctx.fitted[1][c], INITIAL[c]) for c in COMPONENTS)
    assert never.label == "TAP (never replace)" and never.margin(TASKS["a"]) == math.inf

    always = make_tap(replacement="always")
    visit(always, 1, {"a": 1.0, "b": 1.0}, {"a": 0.1, "b": 0.1})
    ctx = visit(always, 2, {"a": 50.0, "b": 50.0}, {"a": 0.1, "b": 0.1})
    assert replaced_tasks(ctx) == {"a", "b"}


def test_a_task_absent_from_the_fit_is_not_decided_and_keeps_its_history() -> None:
    tap = make_tap()
    visit(tap, 1, {"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 0.7})
    ctx = visit(tap, 2, {"a": 0.0}, {"a": 0.4})
    assert replaced_tasks(ctx) == {"a"}
    assert "replaced/b" not in ctx.update.metrics  # type: ignore[attr-defined]
    assert tap.personal_loss[0] == {"a": 0.4, "b": 0.7}


def test_the_validation_criterion_compares_validation_losses() -> None:
    tap = make_tap(criterion="val", margins={"default": 0.0})
    # Training losses would say "replace"; the validation losses (head values) decide instead.
    ctx = ScriptedVisit(1, global_slice(0.0), {"a": 0.0, "b": 0.0}, {"a": 0.0, "b": 0.0})
    tap.client_update(ctx)  # type: ignore[arg-type]
    # hP after visit 1 = the personal model's validation loss = its head values.
    assert tap.personal_loss[0] == {t: float(tap.personal[0][f"head[{t}]"]["w"][0]) for t in ("a", "b")}
    ctx = ScriptedVisit(2, global_slice(0.0), {"a": 0.0, "b": 0.0}, {"a": 0.0, "b": 0.0})
    update = tap.client_update(ctx)  # type: ignore[arg-type]
    # The trained global heads (value + 200) have a lower "validation loss" than the personal ones (+1100).
    assert {e["task"] for e in update.events} == {"a", "b"}
    assert len(ctx.evaluated) == 2


def test_margins_and_weights_take_the_most_specific_key() -> None:
    table = {"a": 0.3, "image,classification": 0.2, "classification": 0.1, "default": 0.05}
    assert TAP.lookup(table, TASKS["a"], "margins") == 0.3
    assert TAP.lookup({k: v for k, v in table.items() if k != "a"}, TASKS["a"], "margins") == 0.2
    assert TAP.lookup({"classification": 0.1, "default": 0.05}, TASKS["b"], "margins") == 0.1
    assert TAP.lookup({"default": 0.05}, TASKS["b"], "margins") == 0.05
    with pytest.raises(ValueError, match=r"no entry for task 'b'.*'text,classification'"):
        make_tap(margins={"image,classification": 0.1})
    # The paper's defaults.
    tap = make_tap()
    assert tap.margin(TASKS["a"]) == 0.01 and tap.margin(TASKS["b"]) == 0.005
    assert TAP.lookup(tap.distill_weights, TASKS["b"], "distill_weights") == 1.0
    assert TAP.lookup(tap.distill_weights, TASKS["a"], "distill_weights") == 2e-3


def test_state_dict_round_trip_takes_the_same_decisions() -> None:
    tap = make_tap(margins={"default": 0.25})
    visit(tap, 1, {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 0.6})
    restored = make_tap(margins={"default": 0.25})
    restored.load_state_dict(tap.state_dict())
    for algorithm in (tap, restored):
        ctx = visit(algorithm, 2, {"a": 0.5, "b": 0.5}, {"a": 1.0, "b": 1.0})
        assert replaced_tasks(ctx) == {"a"}
    assert all(equal(tap.personal[0][c], restored.personal[0][c]) for c in COMPONENTS)
    assert tap.replacements == restored.replacements


def test_replacement_counts_are_cumulative_per_modality_task_pair() -> None:
    tap = make_tap(margins={"default": 0.25})
    visit(tap, 1, {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0})  # both replace (first visit)
    visit(tap, 2, {"a": 5.0, "b": 5.0}, {"a": 1.0, "b": 1.0})  # none
    visit(tap, 3, {"a": 0.1, "b": 5.0}, {"a": 1.0, "b": 1.0})  # a
    assert tap.replacement_counts(3) == {"image,classification": [1, 1, 2], "text,classification": [1, 1, 1]}
    assert tap.on_round_end(3, {}) == {
        "replacements/image,classification": 2.0,
        "replacements/text,classification": 1.0,
    }


def test_a_failed_visit_leaves_the_personal_model_untouched() -> None:
    tap = make_tap()
    visit(tap, 1, {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0})
    before = {c: {k: t.clone() for k, t in p.items()} for c, p in tap.personal[0].items()}
    ctx = ScriptedVisit(2, global_slice(0.0), {"a": 0.0, "b": 0.0}, {"a": 0.0, "b": 0.0})
    original_fit = ctx.fit

    def nan_personal_fit(state: ComponentState, **kwargs: Any) -> FitResult:
        result = original_fit(state, **kwargs)
        if len(ctx.fitted) == 2:
            result.state[HEAD_B]["w"][0] = math.nan
        return result

    ctx.fit = nan_personal_fit  # type: ignore[method-assign]
    with pytest.raises(FloatingPointError, match="personal model"):
        tap.client_update(ctx)  # type: ignore[arg-type]
    assert all(equal(tap.personal[0][c], before[c]) for c in COMPONENTS)
    assert len(tap.replacements) == 2 and tap.personal_loss[0] == {"a": 1.0, "b": 1.0}


class ScriptedStage2(ScriptedVisit):
    """A post-federation visit that records the settings of each fit."""

    def __init__(self) -> None:
        super().__init__(3, global_slice(), {}, {})
        self.stage = "post-federation"
        self.finetuned = global_slice(0.5)
        self.calls: list[dict[str, Any]] = []

    def new_stream(self) -> int:
        return 7

    def fit(self, state: ComponentState, **kwargs: Any) -> FitResult:
        self.calls.append(kwargs)
        return FitResult(state, {}, steps=kwargs["steps"])


def stage2(**kwargs: Any) -> ScriptedStage2:
    tasks = {**TASKS, "g": Task(name="g", type="image_generation", modalities=("image",))}
    tap = TAP(**kwargs)
    federation = SimpleNamespace(
        config=SimpleNamespace(finetune_steps=5, finetune_lr=1e-4),
        data=SimpleNamespace(tasks=tasks),
        global_state=INITIAL,
    )
    tap.setup(federation)  # type: ignore[arg-type]
    ctx = ScriptedStage2()
    ctx.client = ClientSpec(0, ("a", "g"))
    ctx.record = tap.finalize_client(ctx)  # type: ignore[arg-type, attr-defined]
    return ctx


def test_stage_two_has_its_own_budget_and_forms_and_defaults_to_the_teachers() -> None:
    ctx = stage2(distill_steps=40, distill_lr=5e-4, distill_losses={"image_generation": "width_kl"})
    student, plain = ctx.calls
    for call in (student, plain):
        assert (call["steps"], call["lr"], call["stream"]) == (40, 5e-4, 7)  # the same budget and data order
    assert student["module_class"].keywords["forms"] == {"a": "kl", "g": "width_kl"}
    assert "module_class" not in plain
    assert ctx.record["distill_losses"] == {"a": "kl", "g": "width_kl"}  # type: ignore[attr-defined]

    defaults = stage2()
    assert all((call["steps"], call["lr"]) == (5, 1e-4) for call in defaults.calls)
    assert defaults.calls[0]["module_class"].keywords["forms"] == {"a": "kl", "g": "mse"}


def test_a_distillation_loss_the_task_type_lacks_fails_at_setup() -> None:
    with pytest.raises(ValueError, match=r"distill_losses, task 'a'.*'classification' has no distillation loss"):
        make_tap(distill_losses={"a": "width_kl"})
    for bad in ({"distill_steps": 0}, {"distill_lr": 0.0}):
        with pytest.raises(ValueError, match=r"algorithm\.distill"):
            TAP(**bad)
