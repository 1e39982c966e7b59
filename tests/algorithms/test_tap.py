"""Tests for TAP on scripted visits: the replacement rule, what is copied, what is uploaded and kept, stage 2,
the reported models and state."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from scripted import ScriptedTraining, context, federation, task

from tapl.algorithms import TAP, FedAvg
from tapl.api import ClientUpdate, Failure, FederationInfo
from tapl.components import ComponentState, clone
from tapl.context import ClientContext
from tapl.distillation import Distillation
from tapl.engine.client_store import ClientStateError, ClientStore

ENC_IMAGE, ENC_TEXT, SHARED, HEAD_A, HEAD_B = "encoder[image]", "encoder[text]", "fusion[shared]", "head[a]", "head[b]"
TASKS = {"a": task("a", modalities=("image",)), "b": task("b", modalities=("text",))}
PATHS = {"a": [ENC_IMAGE, SHARED, HEAD_A], "b": [ENC_TEXT, SHARED, HEAD_B]}
COMPONENTS = sorted({c for path in PATHS.values() for c in path})
INITIAL: ComponentState = {c: {"w": torch.full((2,), float(i))} for i, c in enumerate(COMPONENTS)}


def info(**settings: Any) -> FederationInfo:
    """Two clients holding tasks ``a`` (image) and ``b`` (text) over a shared fusion expert."""
    return federation(INITIAL, tasks=TASKS, paths=PATHS, **settings)


def make_tap(**kwargs: Any) -> TAP:
    tap = TAP(**kwargs)
    tap.setup(info())
    return tap


def global_slice(value: float = 0.0) -> ComponentState:
    return {c: {"w": torch.full((2,), value + i)} for i, c in enumerate(COMPONENTS)}


def shifted(state: ComponentState, offset: float) -> ComponentState:
    return {c: {k: t + offset for k, t in p.items()} for c, p in state.items()}


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_state(a: ComponentState, b: ComponentState) -> bool:
    return a.keys() == b.keys() and all(equal(a[c], b[c]) for c in a)


@dataclass
class Visit:
    """One scripted visit: what was fitted, the visit's context and its upload."""

    training: ScriptedTraining
    ctx: ClientContext
    update: ClientUpdate

    @property
    def fitted(self) -> list[ComponentState]:
        """The state each fit started from, in call order."""
        return [fit["state"] for fit in self.training.fits]

    @property
    def replaced(self) -> set[str]:
        return {event["task"] for event in self.update.events}


def scripted(round: int, global_loss: dict[str, float], personal_loss: dict[str, float]) -> ScriptedTraining:
    """Fits of a visit: the first (the global slice) adds ``100 * round`` and reports ``global_loss``; the
    second (the personal model) adds ``1000 * round`` and reports ``personal_loss``."""
    losses = (global_loss, personal_loss)
    return ScriptedTraining(
        shift=lambda n, call: (100 if n == 1 else 1000) * round,
        losses=lambda n, call: dict(losses[n - 1]),
    )


def visit(
    tap: TAP,
    store: ClientStore,
    round: int,
    global_loss: dict[str, float],
    personal_loss: dict[str, float],
    training: ScriptedTraining | None = None,
) -> Visit:
    """Client 0's visit of ``round`` as the engine runs it: a private copy of its store, kept on success."""
    training = training or scripted(round, global_loss, personal_loss)
    ctx = context(tap.federation, training, 0, round, received=global_slice(round / 10), store=store.checkout(0))
    update = tap.client_update(ctx)
    store.commit(0, ctx.store)
    return Visit(training, ctx, update)


def test_the_first_visit_replaces_every_task_with_the_trained_global_slice() -> None:
    tap, store = make_tap(), ClientStore()
    v = visit(tap, store, 1, {"a": 5.0, "b": 5.0}, {"a": 1.0, "b": 1.0})
    received, personal_start = v.fitted
    assert same_state(received, global_slice(0.1))
    assert v.replaced == {"a", "b"}
    assert same_state(personal_start, shifted(received, 100))
    kept = store.checkout(0)
    assert same_state(kept["personal"], shifted(received, 1100))  # the trained personal model
    assert kept["losses"] == {"a": 1.0, "b": 1.0}  # hP: the personal model's running training loss


@pytest.mark.parametrize(
    ("global_loss", "replaced"),
    [(0.5, True), (0.75, False), (0.9, False), (2.0, False)],
    ids=["below-margin", "at-margin", "within-margin", "worse"],
)
def test_replacement_needs_the_global_loss_plus_margin_strictly_below_the_personal_loss(
    global_loss: float, replaced: bool
) -> None:
    tap, store = make_tap(margins={"default": 0.25}), ClientStore()
    visit(tap, store, 1, {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0})  # hP = 1.0 for both tasks
    v = visit(tap, store, 2, {"a": global_loss, "b": 5.0}, {"a": 1.0, "b": 1.0})
    assert v.replaced == ({"a"} if replaced else set())
    assert v.update.metrics["replaced/a"] == float(replaced)
    assert v.update.metrics["replaced/b"] == 0.0


def test_a_replacement_copies_exactly_that_tasks_path_and_leaves_the_other_task_alone() -> None:
    tap, store = make_tap(margins={"default": 0.25}), ClientStore()
    visit(tap, store, 1, {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0})
    before = store.checkout(0)["personal"]
    v = visit(tap, store, 2, {"a": 0.1, "b": 5.0}, {"a": 1.0, "b": 1.0})
    trained = shifted(v.fitted[0], 200)
    personal_start = v.fitted[1]
    for component in PATHS["a"]:  # including the shared fusion expert on a's path
        assert equal(personal_start[component], trained[component]), component
    for component in set(COMPONENTS) - set(PATHS["a"]):  # b's own encoder and head
        assert equal(personal_start[component], before[component]), component
    (event,) = v.update.events
    assert event["event"] == "replacement"
    assert event["task"] == "a" and event["pair"] == "image,classification" and event["round"] == 2
    assert event["components"] == PATHS["a"]
    assert (event["global_loss"], event["personal_loss"]) == (0.1, 1.0)


def test_the_upload_is_the_trained_global_slice_and_never_holds_personal_tensors() -> None:
    tap, store = make_tap(), ClientStore()
    personal_values: list[torch.Tensor] = []
    for round in range(1, 5):
        v = visit(tap, store, round, {"a": 1.0 / round, "b": 1.0}, {"a": 1.0, "b": 1.0})
        assert v.update.client == 0 and v.update.num_samples == 10
        assert same_state(v.update.state, shifted(global_slice(round / 10), 100 * round))
        personal_values += [t for p in v.ctx.store["personal"].values() for t in p.values()]
        uploaded = [t for p in v.update.state.values() for t in p.values()]
        assert not any(torch.equal(u, p) for u in uploaded for p in personal_values)
        assert not any(u.data_ptr() == p.data_ptr() for u in uploaded for p in personal_values)


def test_never_replace_keeps_the_initial_model_and_always_replace_ignores_the_losses() -> None:
    never = make_tap(replacement="never")
    v = visit(never, ClientStore(), 1, {"a": 0.0, "b": 0.0}, {"a": 9.0, "b": 9.0})
    assert v.replaced == set()
    assert same_state(v.fitted[1], INITIAL)
    assert never.label == "TAP (never replace)" and never.margin(TASKS["a"]) == math.inf

    always, store = make_tap(replacement="always"), ClientStore()
    visit(always, store, 1, {"a": 1.0, "b": 1.0}, {"a": 0.1, "b": 0.1})
    v = visit(always, store, 2, {"a": 50.0, "b": 50.0}, {"a": 0.1, "b": 0.1})
    assert v.replaced == {"a", "b"}
    assert always.label == "TAP (always replace)" and always.margin(TASKS["a"]) == -math.inf


def test_a_task_absent_from_the_fit_is_not_decided_and_keeps_its_history() -> None:
    tap, store = make_tap(), ClientStore()
    visit(tap, store, 1, {"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 0.7})
    v = visit(tap, store, 2, {"a": 0.0}, {"a": 0.4})
    assert v.replaced == {"a"}
    assert "replaced/b" not in v.update.metrics
    assert store.checkout(0)["losses"] == {"a": 0.4, "b": 0.7}


def head_values(state: ComponentState, split: str) -> dict[str, dict[str, float]]:
    """A state's "validation loss": the first value of its head, a recognisable number."""
    return {t: {"loss": float(state[f"head[{t}]"]["w"][0])} for t in ("a", "b")}


def test_the_validation_criterion_compares_validation_losses() -> None:
    tap, store = make_tap(criterion="val", margins={"default": 0.0}), ClientStore()
    # The training losses would say "keep" (0 + 0 < 0 is false); the validation losses decide instead.
    losses = {"a": 0.0, "b": 0.0}
    first = ScriptedTraining(shift=lambda n, call: 100.0 if n == 1 else 1000.0, metrics=head_values)
    v = visit(tap, store, 1, losses, losses, training=first)
    # hP after visit 1: the trained personal model's validation loss (its head values: 3.1 + 100 + 1000, ...).
    assert store.checkout(0)["losses"] == pytest.approx({"a": 1103.1, "b": 1104.1})
    assert [e["split"] for e in first.evaluations] == ["val", "val"]
    second = ScriptedTraining(shift=lambda n, call: 200.0 if n == 1 else 2000.0, metrics=head_values)
    v = visit(tap, store, 2, losses, losses, training=second)
    # The trained global heads (3.2 + 200) have a lower validation loss than the personal ones (1103.1).
    assert v.replaced == {"a", "b"}
    event = next(e for e in v.update.events if e["task"] == "a")
    assert (event["global_loss"], event["personal_loss"]) == pytest.approx((203.2, 1103.1))
    assert v.update.metrics["personal_loss/a"] == pytest.approx(2203.2)
    assert len(second.evaluations) == 2


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


def test_setup_needs_the_fine_tuned_teacher_of_stage_two() -> None:
    with pytest.raises(ValueError, match=r"federation\.finetune_steps >= 1"):
        TAP().setup(info(finetune_steps=0))


def checkpointed(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` after a trip through ``torch.save`` and a weights-only ``torch.load``, as in a checkpoint."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_a_checkpoint_round_trip_takes_the_same_decisions() -> None:
    tap, store = make_tap(margins={"default": 0.25}), ClientStore()
    first = visit(tap, store, 1, {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 0.6})
    tap.aggregate(1, INITIAL, [first.update], [])
    # The server side keeps the replacements; the client's personal model and hP live in its store.
    restored, restored_store = make_tap(margins={"default": 0.25}), ClientStore()
    restored.load_state_dict(checkpointed(tap.state_dict()))
    restored_store.load_state_dict(checkpointed(store.state_dict()))
    for algorithm, kept in ((tap, store), (restored, restored_store)):
        v = visit(algorithm, kept, 2, {"a": 0.5, "b": 0.5}, {"a": 1.0, "b": 1.0})
        assert v.replaced == {"a"}  # b: 0.5 + 0.25 < 0.6 is false
        algorithm.aggregate(2, INITIAL, [v.update], [])
    assert same_state(store.checkout(0)["personal"], restored_store.checkout(0)["personal"])
    assert store.checkout(0)["losses"] == restored_store.checkout(0)["losses"]
    assert tap.replacements == restored.replacements and len(tap.replacements) == 3


def test_replacement_counts_are_cumulative_per_modality_task_pair_and_logged_each_round() -> None:
    tap, store = make_tap(margins={"default": 0.25}), ClientStore()
    script = [
        ({"a": 1.0, "b": 1.0}, {"image,classification": 1.0, "text,classification": 1.0}),  # both (first visit)
        ({"a": 5.0, "b": 5.0}, {"image,classification": 1.0, "text,classification": 1.0}),  # none
        ({"a": 0.1, "b": 5.0}, {"image,classification": 2.0, "text,classification": 1.0}),  # a
    ]
    for round, (global_loss, logged) in enumerate(script, start=1):
        v = visit(tap, store, round, global_loss, {"a": 1.0, "b": 1.0})
        tap.aggregate(round, INITIAL, [v.update], [])
        assert tap.pop_logged() == {f"replacements/{pair}": count for pair, count in logged.items()}
    assert tap.replacement_counts(3) == {"image,classification": [1, 1, 2], "text,classification": [1, 1, 1]}
    assert tap.replacement_counts(2) == {"image,classification": [1, 1], "text,classification": [1, 1]}


def test_aggregation_is_fedavgs_and_records_every_uploads_replacements_under_its_client() -> None:
    for weighting in ("samples", "uniform"):
        tap, store = make_tap(weighting=weighting), ClientStore()
        v = visit(tap, store, 1, {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0})
        event = {"event": "replacement", "round": 1, "task": "b", "pair": "text,classification"}
        other = ClientUpdate(1, shifted(INITIAL, 7.0), 30, events=[event])
        new_state = tap.aggregate(1, INITIAL, [v.update, other], [Failure(2, "FloatingPointError: upload")])
        expected = FedAvg(weighting=weighting).aggregate(1, INITIAL, [v.update, other], [])
        assert same_state(new_state, expected)
        assert [(r["client"], r["task"]) for r in tap.replacements] == [(0, "a"), (0, "b"), (1, "b")]


def test_a_failed_visit_leaves_the_clients_personal_model_untouched() -> None:
    tap, store = make_tap(), ClientStore()
    visit(tap, store, 1, {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0})
    before = store.checkout(0)
    # The personal model's fit diverges: the engine refuses to keep the visit's store.
    diverging = ScriptedTraining(shift=lambda n, call: 200.0 if n == 1 else math.nan)
    with pytest.raises(ClientStateError, match="personal"):
        visit(tap, store, 2, {"a": 0.0, "b": 0.0}, {"a": 0.0, "b": 0.0}, training=diverging)
    after = store.checkout(0)
    assert same_state(after["personal"], before["personal"])
    assert after["losses"] == before["losses"] == {"a": 1.0, "b": 1.0}


def test_a_diverged_global_fit_fails_the_visit_before_the_personal_model_trains() -> None:
    tap = make_tap()
    training = ScriptedTraining(shift=lambda n, call: math.inf)
    ctx = context(tap.federation, training, 0, 1, received=global_slice())
    with pytest.raises(FloatingPointError, match="trained global slice"):
        tap.client_update(ctx)
    assert len(training.fits) == 1 and ctx.store == {}


# -- reported models ------------------------------------------------------------------------------------------


def test_tap_reports_fedavgs_global_model_its_personal_model_and_the_undistilled_ablation() -> None:
    tap = make_tap()
    models = {m.key: m for m in tap.models()}
    assert list(models) == ["global", "personalized", "no_distillation"]
    assert [m.label for m in models.values()] == ["FedAvg", "TAP", "TAP w/o distillation"]
    assert make_tap(replacement="never").models()[1].label == "TAP (never replace)"

    received = global_slice(7.0)
    never_visited = context(tap.federation, ScriptedTraining(), 1, 3, received=received, stage="evaluation")
    assert models["global"].state(never_visited) is received
    personal = models["personalized"].state(never_visited)
    assert personal is not None and same_state(personal, INITIAL)  # a client never visited: the initial model
    assert models["no_distillation"].state(never_visited) is None  # none before stage 2

    kept = {"personal": shifted(INITIAL, 1.0), "undistilled": shifted(INITIAL, 2.0)}
    ctx = context(tap.federation, ScriptedTraining(), 1, 3, received=received, store=kept, stage="evaluation")
    assert models["personalized"].state(ctx) is kept["personal"]
    assert models["no_distillation"].state(ctx) is kept["undistilled"]


# -- stage 2 --------------------------------------------------------------------------------------------------

STAGE2_TASKS = {**TASKS, "g": task("g", "image_generation", ("image",))}
TEACHER = global_slice(0.5)


@dataclass
class StageTwo:
    """Client 0's post-federation stage as the engine runs it: the engine's fine-tuning, then TAP's."""

    training: ScriptedTraining
    ctx: ClientContext
    record: dict[str, Any]
    personal: ComponentState

    @property
    def teacher_fit(self) -> dict[str, Any]:
        return self.training.fits[0]

    @property
    def student_fit(self) -> dict[str, Any]:
        return self.training.fits[1]

    @property
    def plain_fit(self) -> dict[str, Any]:
        return self.training.fits[2]


def stage_two(store: dict[str, Any] | None = None, **kwargs: Any) -> StageTwo:
    federation_info = federation(
        INITIAL, clients={0: ("a", "g")}, tasks=STAGE2_TASKS, paths=PATHS, finetune_steps=5, finetune_lr=1e-4
    )
    tap = TAP(**kwargs)
    tap.setup(federation_info)
    training = ScriptedTraining(metrics=lambda state, split: {"a": {"loss": float(state[HEAD_A]["w"][0])}})
    received = global_slice()
    store = {} if store is None else store
    personal = clone(store.get("personal", INITIAL))
    ctx = context(federation_info, training, 0, 3, received=received, store=store, stage="post-federation")
    ctx.fit(received, steps=5, lr=1e-4)  # the engine's fine-tuning of the global slice (the teacher)
    ctx.finetuned = TEACHER
    return StageTwo(training, ctx, tap.post_federation(ctx), personal)


def test_stage_two_distils_the_personal_model_and_trains_the_ablation_on_the_same_budget() -> None:
    s = stage_two(
        {"personal": shifted(INITIAL, 10.0)},
        distill_steps=40,
        distill_lr=5e-4,
        distill_losses={"image_generation": "width_kl"},
        temperature=2.0,
    )
    student, plain = s.student_fit, s.plain_fit
    for call in (student, plain):
        assert (call["steps"], call["lr"]) == (40, 5e-4)
        assert same_state(call["state"], s.personal)  # both start from the stage-1 personal model
        assert call["trainer_overrides"]["accumulate_grad_batches"] == 1  # a step counts one batch
    # The same data order and draws for both, and not the teacher's.
    assert student["seed_key"] == plain["seed_key"] != s.teacher_fit["seed_key"]
    objective = student["objective"]
    assert isinstance(objective, Distillation) and plain["objective"] is None
    assert objective.forms == {"a": "kl", "g": "width_kl"}
    assert objective.weights == {"a": 2e-3, "g": 2e-3} and objective.temperature == 2.0
    assert same_state(objective.teacher, TEACHER)
    assert s.record["distill_losses"] == {"a": "kl", "g": "width_kl"}
    assert s.record["distill_weights"] == {"a": 2e-3, "g": 2e-3}


def test_stage_two_keeps_the_student_as_the_personal_model_and_the_ablation_beside_it() -> None:
    s = stage_two({"personal": shifted(INITIAL, 10.0), "losses": {"a": 0.5}})
    assert same_state(s.ctx.store["personal"], shifted(s.personal, 200))  # the student (fit 2: +200)
    assert same_state(s.ctx.store["undistilled"], shifted(s.personal, 300))  # the ablation (fit 3: +300)
    assert s.ctx.store["losses"] == {"a": 0.5}
    # Teacher, student and ablation are each scored on the client's validation split.
    assert [e["split"] for e in s.training.evaluations] == ["val"] * 3
    assert s.record["val"] == {
        "teacher": {"a": {"loss": 3.5}},
        "student": {"a": {"loss": 213.0}},
        "no_distillation": {"a": {"loss": 313.0}},
    }


def test_stage_two_of_a_client_never_visited_starts_from_the_initial_model_and_the_teachers_budget() -> None:
    s = stage_two()
    assert same_state(s.student_fit["state"], INITIAL) and same_state(s.plain_fit["state"], INITIAL)
    assert all((call["steps"], call["lr"]) == (5, 1e-4) for call in (s.student_fit, s.plain_fit))
    assert s.student_fit["objective"].forms == {"a": "kl", "g": "mse"}


def test_a_distillation_loss_the_task_type_lacks_fails_at_setup() -> None:
    with pytest.raises(ValueError, match=r"distill_losses, task 'a'.*'classification' has no distillation loss"):
        make_tap(distill_losses={"a": "width_kl"})
    for bad in ({"distill_steps": 0}, {"distill_lr": 0.0}):
        with pytest.raises(ValueError, match=r"algorithm\.distill"):
            TAP(**bad)
    for bad in ({"replacement": "sometimes"}, {"criterion": "test"}, {"temperature": 0.0}):
        with pytest.raises(ValueError, match=rf"algorithm\.{next(iter(bad))}"):
            TAP(**bad)
