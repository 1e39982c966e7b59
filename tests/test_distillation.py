"""Tests for knowledge distillation: each task type's distillation loss and the ``Distillation`` objective of a fit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import make_text_image_model

from tapl.client import ClientModule
from tapl.components import ComponentState
from tapl.datamodules.collate import MultiTaskCollator
from tapl.distillation import Distillation
from tapl.models import FoundationModel
from tapl.tasks import Task, TaskType

TASKS = [
    Task(name="sentiment", type="classification", modalities=("text",), num_classes=3, head_hidden=16),
    Task(name="shapes", type="classification", modalities=("image",), num_classes=2, head_hidden=16),
]


def _softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def _kl_by_hand(student: list[float], teacher: list[float], temperature: float) -> float:
    """T^2 * sum_i p_teacher_i * log(p_teacher_i / p_student_i), with explicit sums."""
    p_t, p_s = _softmax(teacher, temperature), _softmax(student, temperature)
    return temperature**2 * sum(t * math.log(t / s) for t, s in zip(p_t, p_s, strict=True))


STUDENT = [[1.0, -0.5, 2.0], [0.3, 0.1, -1.2]]
TEACHER = [[0.5, 0.5, 1.0], [2.0, -1.0, 0.0]]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_classification_distillation_is_the_softened_kl_by_hand(temperature: float) -> None:
    loss = TaskType.get("classification").distillation_loss(
        torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor([0, 1]), temperature
    )
    expected = sum(_kl_by_hand(s, t, temperature) for s, t in zip(STUDENT, TEACHER, strict=True)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_distillation_loss_is_zero_for_the_teacher_itself() -> None:
    logits = torch.tensor(STUDENT)
    assert float(TaskType.get("classification").distillation_loss(logits, logits, torch.tensor([0, 1]), 2.0)) == (
        pytest.approx(0.0, abs=1e-7)
    )


def test_text_generation_distillation_averages_over_target_tokens_only() -> None:
    text = TaskType.get("text_generation")
    # Two samples, three positions, a vocabulary of three; the second sample's last two positions are padding.
    student = torch.tensor([STUDENT[0], STUDENT[1], [9.0, 0.0, 0.0], STUDENT[1], [5.0, 5.0, 0.0], [0.0, 7.0, 1.0]])
    teacher = torch.tensor([TEACHER[0], TEACHER[1], [0.0, 0.0, 9.0], TEACHER[0], [0.0, 0.0, 3.0], [4.0, 0.0, 0.0]])
    targets = torch.tensor([[2, 0, 1], [1, text.ignore_index, text.ignore_index]])
    loss = text.distillation_loss(student.view(2, 3, 3), teacher.view(2, 3, 3), targets, 1.5)
    real = [
        (STUDENT[0], TEACHER[0]),
        (STUDENT[1], TEACHER[1]),
        ([9.0, 0.0, 0.0], [0.0, 0.0, 9.0]),
        (STUDENT[1], TEACHER[0]),
    ]
    expected = sum(_kl_by_hand(s, t, 1.5) for s, t in real) / len(real)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_text_generation_sequence_sum_is_the_reference_batchmean_kl_over_every_position() -> None:
    text = TaskType.get("text_generation")
    student = torch.tensor([STUDENT[0], STUDENT[1], [9.0, 0.0, 0.0], STUDENT[1], [5.0, 5.0, 0.0], [0.0, 7.0, 1.0]])
    teacher = torch.tensor([TEACHER[0], TEACHER[1], [0.0, 0.0, 9.0], TEACHER[0], [0.0, 0.0, 3.0], [4.0, 0.0, 0.0]])
    targets = torch.tensor([[2, 0, 1], [1, text.ignore_index, text.ignore_index]])
    loss = text.distillation_loss(student.view(2, 3, 3), teacher.view(2, 3, 3), targets, 1.5, "sequence_sum")
    # Every position counts, padding included, summed per sequence and averaged over the 2 sequences.
    every = sum(_kl_by_hand(s, t, 1.5) for s, t in zip(student.tolist(), teacher.tolist(), strict=True))
    assert float(loss) == pytest.approx(every / 2, rel=1e-5)
    # PyTorch's kl_div with reduction="batchmean" on (batch, length, vocab), as the reference code calls it.
    reference = (
        torch.nn.functional.kl_div(
            torch.log_softmax(student.view(2, 3, 3) / 1.5, -1),
            torch.softmax(teacher.view(2, 3, 3) / 1.5, -1),
            reduction="batchmean",
        )
        * 1.5**2
    )
    assert float(loss) == pytest.approx(float(reference), rel=1e-5)
    token_mean = text.distillation_loss(student.view(2, 3, 3), teacher.view(2, 3, 3), targets, 1.5)
    assert float(loss) != pytest.approx(float(token_mean), rel=1e-2)


def test_image_generation_width_kl_is_a_softmax_kl_over_each_row_of_pixels() -> None:
    student = torch.tensor([[[[0.1, 0.5], [0.9, 0.0]]], [[[1.0, 0.0], [0.2, 0.2]]]])  # (2, 1, 2, 2)
    teacher = torch.tensor([[[[0.3, 0.5], [0.4, 1.0]]], [[[0.0, 1.0], [0.7, 0.1]]]])
    loss = TaskType.get("image_generation").distillation_loss(student, teacher, torch.zeros(2), 2.0, "width_kl")
    rows = [
        (s, t)
        for si, ti in zip(student.tolist(), teacher.tolist(), strict=True)
        for s, t in zip(si[0], ti[0], strict=True)
    ]
    expected = sum(_kl_by_hand(s, t, 2.0) for s, t in rows) / 2  # summed over rows, averaged over images
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_an_unknown_distillation_form_names_the_forms_of_the_type() -> None:
    with pytest.raises(ValueError, match=r"'image_generation' has no distillation loss 'kl'.*\['mse', 'width_kl'\]"):
        TaskType.get("image_generation").distillation_loss(
            torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), 1.0, "kl"
        )


def test_image_generation_distillation_is_the_mse_to_the_teacher_image() -> None:
    student = torch.tensor([[[0.1, 0.5], [0.9, 0.0]]])
    teacher = torch.tensor([[[0.3, 0.5], [0.4, 1.0]]])
    targets = torch.zeros_like(student)  # the targets play no part: only the teacher's image does
    loss = TaskType.get("image_generation").distillation_loss(student, teacher, targets, 3.0)
    expected = (0.2**2 + 0.0 + 0.5**2 + 1.0**2) / 4
    assert float(loss) == pytest.approx(expected, rel=1e-6)


# -- the objective ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(assets: dict[str, Path]) -> FoundationModel:
    torch.manual_seed(0)
    return make_text_image_model(assets["bert"], TASKS)


def _random_state(model: FoundationModel, seed: int) -> ComponentState:
    generator = torch.Generator().manual_seed(seed)
    return {
        c: {k: 0.3 * torch.randn(s, generator=generator) for k, s in p.items()}
        for c, p in model.component_shapes().items()
    }


def _batch(model: FoundationModel) -> dict:
    collate = MultiTaskCollator({t.name: t for t in TASKS}, model.preprocessors)
    texts = ["good movie", "awful day", "fine", "a great great day", "poor food"]
    samples = [{"task": "sentiment", "inputs": {"text": t}, "target": i % 3} for i, t in enumerate(texts)]
    pixels = torch.Generator().manual_seed(3)
    samples += [
        {"task": "shapes", "inputs": {"image": torch.rand(64, generator=pixels).tolist()}, "target": i % 2}
        for i in range(3)
    ]
    return collate(samples)


def _module(model: FoundationModel, objective: Distillation | None = None) -> ClientModule:
    """The module of a fit of the whole slice (the student is the state loaded into ``model``)."""
    return ClientModule(model, TASKS, model.component_names(), torch.optim.SGD, objective=objective)


def test_the_objective_is_task_loss_plus_weighted_distillation_per_task(model: FoundationModel) -> None:
    model.eval()  # no dropout, so outputs are reproducible by hand
    student, teacher = _random_state(model, 1), _random_state(model, 2)
    batch = _batch(model)
    weights = {"sentiment": 1.0, "shapes": 2e-3}
    temperature = 2.0

    expected = torch.zeros(())
    logits: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for state, which in ((teacher, 0), (student, 1)):
            model.load_state(state)
            for task, part in batch.items():
                logits.setdefault(task, [torch.zeros(()), torch.zeros(())])[which] = model(task, part["inputs"])
    for task, part in batch.items():
        teacher_logits, student_logits = logits[task]
        targets = part["targets"]
        ce = -torch.log_softmax(student_logits, -1)[torch.arange(len(targets)), targets].mean()
        kl = sum(
            _kl_by_hand(s.tolist(), t.tolist(), temperature)
            for s, t in zip(student_logits, teacher_logits, strict=True)
        ) / len(targets)
        expected = expected + (ce + weights[task] * kl) * len(targets) / 8

    # The student is loaded; the teacher only enters through its outputs on the same inputs.
    module = _module(model, Distillation(teacher, weights, temperature))
    loss = module.training_step(batch, 0)
    assert loss is not None
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-4)
    # The recorded training loss is the plain task loss, and the student's tensors were not touched.
    for task, part in batch.items():
        targets = part["targets"]
        ce = -torch.log_softmax(logits[task][1], -1)[torch.arange(len(targets)), targets].mean()
        assert module.train_loss()[task] == pytest.approx(float(ce), rel=1e-5)
    current = model.get_state()
    assert all(torch.equal(current[c][k], student[c][k]) for c in student for k in student[c])


def test_the_teacher_is_a_constant_of_the_objective(model: FoundationModel) -> None:
    model.eval()
    student, teacher = _random_state(model, 1), _random_state(model, 2)
    batch = _batch(model)
    weights = {"sentiment": 1.0, "shapes": 0.5}
    classification = TaskType.get("classification")
    with torch.no_grad():
        model.load_state(teacher)
        teacher_logits = {task: model(task, part["inputs"]) for task, part in batch.items()}
    model.load_state(student)
    model.set_trainable(model.component_names())
    params = [p for c in model.component_names() for p in model.component_parameters(c).values()]
    # By hand: the student's task loss plus the KL to the teacher's logits, which are plain numbers.
    expected = torch.zeros(())
    for task, part in batch.items():
        logits, targets = model(task, part["inputs"]), part["targets"]
        kl = classification.distillation_loss(logits, teacher_logits[task], targets, 1.0)
        expected = expected + (classification.loss(logits, targets) + weights[task] * kl) * len(targets) / 8
    loss = _module(model, Distillation(teacher, weights)).training_step(batch, 0)
    assert loss is not None
    want = torch.autograd.grad(expected, params, allow_unused=True)
    got = torch.autograd.grad(loss, params, allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in got)
    for w, g in zip(want, got, strict=True):
        assert (w is None) == (g is None)
        if w is not None and g is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def test_the_teacher_leaves_the_students_randomness_as_a_plain_fits(model: FoundationModel) -> None:
    # In training mode dropout draws random masks: a teacher run in training mode would draw too and change the
    # masks of the student's next batches.
    model.load_state(_random_state(model, 1))
    model.train()
    batch = _batch(model)
    teacher = _random_state(model, 2)
    losses = []
    for objective in (None, Distillation(teacher, {"sentiment": 1.0, "shapes": 1.0})):
        torch.manual_seed(5)
        module = _module(model, objective)
        for step in range(3):
            module.training_step(batch, step)
        losses.append(module.train_loss())
        assert model.training  # the teacher's evaluation mode does not outlive its forward pass
    assert losses[0] == losses[1]
    # ... and the masks do differ between batches, so a teacher drawing masks would have shown.
    torch.manual_seed(5)
    module = _module(model)
    first = float(module.batch_loss(batch).detach())
    assert float(module.batch_loss(batch).detach()) != first
    model.eval()


def test_zero_weight_skips_the_teacher(model: FoundationModel, monkeypatch: pytest.MonkeyPatch) -> None:
    model.eval()
    model.load_state(_random_state(model, 1))
    calls: list[str] = []
    original = FoundationModel.forward_with

    def counting(self: FoundationModel, state: ComponentState, task: str, inputs: dict) -> torch.Tensor:
        calls.append(task)
        return original(self, state, task, inputs)

    monkeypatch.setattr(FoundationModel, "forward_with", counting)
    module = _module(model, Distillation(_random_state(model, 2), {"sentiment": 0.0, "shapes": 0.5}))
    module.training_step(_batch(model), 0)
    assert calls == ["shapes"]


def test_teacher_must_cover_the_student_slice(model: FoundationModel) -> None:
    model.eval()
    model.load_state(_random_state(model, 1))
    teacher = _random_state(model, 2)
    teacher.pop("head[shapes]")
    # Checked when the fit starts, even when no weight would ever run the teacher.
    module = _module(model, Distillation(teacher, {"sentiment": 0.0}))
    with pytest.raises(ValueError, match=r"teacher's components differ from the student's: \['head\[shapes\]'\]"):
        module.on_fit_start()


def test_a_distillation_form_foreign_to_the_tasks_type_fails_when_the_fit_starts(model: FoundationModel) -> None:
    model.load_state(_random_state(model, 1))
    module = _module(model, Distillation(_random_state(model, 2), {"sentiment": 1.0}, forms={"sentiment": "mse"}))
    with pytest.raises(ValueError, match="mse"):
        module.on_fit_start()


def test_the_temperature_must_be_positive() -> None:
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        Distillation({}, {}, temperature=0.0)
