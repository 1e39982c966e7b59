"""Tests for tapl.client: the multi-task training loss, the fit's objective (what it sees of a batch, another
state's outputs, manual training steps), the running training loss, the optimizer and evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_text_image_model
from torch.utils.data import DataLoader

from tapl.client import ClientModule
from tapl.components import ComponentState
from tapl.datamodules.collate import MultiTaskCollator, TaskBatch
from tapl.models import FoundationModel
from tapl.objective import Objective, TrainingStep
from tapl.tasks import Task
from tapl.visit_trainer import VisitTrainers, quiet_lightning

TASKS = [
    Task(name="sentiment", type="classification", modalities=("text",), num_classes=2, head_hidden=16),
    Task(name="shapes", type="classification", modalities=("image",), num_classes=2, head_hidden=16),
]
TEXTS = ["good movie", "the food a awful day", "hate", "a great great day", "poor food", "fine"]


@pytest.fixture(scope="module")
def model(assets: dict[str, Path]) -> FoundationModel:
    torch.manual_seed(0)
    built = make_text_image_model(assets["bert"], TASKS)
    # Non-zero LoRA updates and heads, so every component shapes the outputs.
    generator = torch.Generator().manual_seed(1)
    built.load_state(
        {
            c: {k: 0.3 * torch.randn(s, generator=generator) for k, s in p.items()}
            for c, p in built.component_shapes().items()
        }
    )
    return built


@pytest.fixture(autouse=True)
def _eval_mode(model: FoundationModel) -> None:
    """Dropout off before every test, whatever a ``Trainer`` left behind."""
    model.eval()


@pytest.fixture(scope="module")
def collate(model: FoundationModel) -> MultiTaskCollator:
    return MultiTaskCollator({t.name: t for t in TASKS}, model.preprocessors)


def _sample(task: str, index: int, label: int) -> dict:
    if task == "sentiment":
        return {"task": task, "inputs": {"text": TEXTS[index % len(TEXTS)]}, "target": label}
    pixels = torch.Generator().manual_seed(index)
    return {"task": task, "inputs": {"image": torch.rand(64, generator=pixels).tolist()}, "target": label}


def _batch(collate: MultiTaskCollator, spec: list[tuple[str, int]]) -> TaskBatch:
    return collate([_sample(task, i, label) for i, (task, label) in enumerate(spec)])


def _per_sample_ce(model: FoundationModel, batch: TaskBatch, task: str) -> torch.Tensor:
    """Cross-entropy of each sample of ``task`` in ``batch``, computed from the logits by hand."""
    with torch.no_grad():
        logits = model(task, batch[task]["inputs"])
    targets = batch[task]["targets"]
    return -torch.log_softmax(logits, dim=-1)[torch.arange(len(targets)), targets]


def _module(model: FoundationModel, **kwargs) -> ClientModule:
    kwargs.setdefault("optimizer", lambda params: torch.optim.SGD(params, lr=0.5))
    return ClientModule(model, TASKS, model.component_names(), **kwargs)


def test_training_loss_weights_each_task_by_its_share_of_the_batch(
    model: FoundationModel, collate: MultiTaskCollator
) -> None:
    batch = _batch(collate, [("sentiment", 0), ("shapes", 1), ("shapes", 0), ("sentiment", 1), ("shapes", 1)])
    loss = _module(model).training_step(batch, 0)
    sentiment, shapes = _per_sample_ce(model, batch, "sentiment"), _per_sample_ce(model, batch, "shapes")
    expected = sentiment.mean() * 2 / 5 + shapes.mean() * 3 / 5
    assert loss.requires_grad
    torch.testing.assert_close(loss.detach(), expected)
    # Equal to the mean over samples: every sample counts the same whatever its task.
    torch.testing.assert_close(loss.detach(), torch.cat([sentiment, shapes]).mean())


class Doubled(Objective):
    """``2 * task loss + 1``; keeps every step it sees."""

    def __init__(self) -> None:
        self.steps: list[TrainingStep] = []

    def loss(self, step: TrainingStep) -> torch.Tensor:
        self.steps.append(step)
        return 2.0 * step.task_loss + 1.0


def test_the_objective_changes_the_loss_but_not_the_recorded_task_loss(
    model: FoundationModel, collate: MultiTaskCollator
) -> None:
    batch = _batch(collate, [("sentiment", 0), ("sentiment", 1), ("shapes", 1)])
    objective = Doubled()
    module = _module(model, objective=objective)
    loss = module.training_step(batch, 0)
    sentiment, shapes = _per_sample_ce(model, batch, "sentiment"), _per_sample_ce(model, batch, "shapes")
    task_loss = torch.cat([sentiment, shapes]).mean()
    torch.testing.assert_close(loss.detach(), 2.0 * task_loss + 1.0)
    assert loss.requires_grad
    assert module.train_loss() == pytest.approx({"sentiment": float(sentiment.mean()), "shapes": float(shapes.mean())})

    # What the objective saw: the module and one part per task, in the batch's order, with the task's share.
    [step] = objective.steps
    assert step.module is module and step.device == torch.device("cpu")
    assert [(p.task.name, p.share) for p in step.parts] == [("sentiment", 2 / 3), ("shapes", 1 / 3)]
    for part, per_sample in zip(step.parts, (sentiment, shapes), strict=True):
        assert part.task is module.tasks[part.task.name]
        assert torch.equal(part.targets, batch[part.task.name]["targets"])
        assert part.inputs is batch[part.task.name]["inputs"]
        assert part.outputs.shape == (len(per_sample), 2) and part.outputs.requires_grad
        torch.testing.assert_close(part.loss.detach(), per_sample.mean())
    torch.testing.assert_close(step.task_loss.detach(), task_loss)


def test_step_parameters_are_the_trained_tensors_in_the_modules_component_order(
    model: FoundationModel, collate: MultiTaskCollator
) -> None:
    components = ["head[sentiment]", "encoder[text]"]
    objective = Doubled()
    module = ClientModule(model, TASKS[:1], components, torch.optim.SGD, objective=objective)
    module.training_step(_batch(collate, [("sentiment", 1)]), 0)
    [step] = objective.steps
    listed = list(step.parameters())
    expected = [(c, k, p) for c in components for k, p in model.component_parameters(c).items()]
    assert [(c, k) for c, k, _ in listed] == [(c, k) for c, k, _ in expected]
    assert all(got is want for (_, _, got), (_, _, want) in zip(listed, expected, strict=True))
    assert {c for c, _, _ in listed} == set(components)


def _shifted(model: FoundationModel, components: list[str], shift: float) -> ComponentState:
    return {c: {k: t + shift for k, t in p.items()} for c, p in model.get_state(components).items()}


def _outputs_with(model: FoundationModel, state: ComponentState, task: str, inputs: dict) -> torch.Tensor:
    """``state``'s evaluation-mode outputs, by loading it into the model (and the model's own state back)."""
    saved, was_training = model.get_state(list(state)), model.training
    model.load_state(state)
    model.eval()
    with torch.no_grad():
        outputs = model(task, inputs)
    model.load_state(saved)
    model.train(was_training)
    return outputs


class Teaching(Objective):
    """The task loss plus the squared distance of the outputs to those of ``other`` (none: the task loss); keeps
    every step it sees and ``other``'s outputs."""

    def __init__(self, other: ComponentState | None) -> None:
        self.other = other
        self.steps: list[TrainingStep] = []
        self.outputs: list[torch.Tensor] = []

    def loss(self, step: TrainingStep) -> torch.Tensor:
        self.steps.append(step)
        loss = step.task_loss
        for part in step.parts if self.other is not None else []:
            theirs = step.outputs_of(self.other, part)
            self.outputs.append(theirs)
            loss = loss + (part.outputs - theirs).pow(2).mean()
        return loss


def test_outputs_of_another_state_are_its_evaluation_outputs_without_gradient(
    model: FoundationModel, collate: MultiTaskCollator
) -> None:
    components = model.component_names()
    # Other heads over the trained encoders: the encoders' tensors are in both states' forward passes.
    other = _shifted(model, ["head[sentiment]", "head[shapes]"], 0.05)
    batch = _batch(collate, [("sentiment", 0), ("shapes", 1), ("sentiment", 1)])
    before = model.get_state()
    objective = Teaching(other)
    module = _module(model, objective=objective)
    model.train()
    loss = module.training_step(batch, 0)

    assert model.training, "the objective must leave the model in training mode"
    after = model.get_state()
    assert all(torch.equal(after[c][k], before[c][k]) for c in before for k in before[c]), "the model's state moved"
    # The gradient flows into the trained tensors through the trained state's outputs.
    grads = torch.autograd.grad(loss, model.parameters_of(components), allow_unused=True)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    for task, theirs in zip(("sentiment", "shapes"), objective.outputs, strict=True):
        assert not theirs.requires_grad
        torch.testing.assert_close(theirs, _outputs_with(model, other, task, batch[task]["inputs"]))


def test_outputs_of_another_state_draw_no_randomness_from_the_fit(
    model: FoundationModel, collate: MultiTaskCollator
) -> None:
    # In training mode dropout is on: the trained state's outputs depend on every random draw before them.
    batches = [_batch(collate, [("sentiment", 0), ("shapes", 1)]), _batch(collate, [("sentiment", 1), ("shapes", 0)])]
    other = _shifted(model, model.component_names(), 0.05)

    def part_losses(objective: Teaching, seed: int = 3) -> list[float]:
        module = _module(model, objective=objective)
        model.train()
        torch.manual_seed(seed)
        for batch in batches:
            module.batch_loss(batch)
        return [float(part.loss.detach()) for step in objective.steps for part in step.parts]

    plain = part_losses(Teaching(None))
    assert part_losses(Teaching(None), seed=4) != plain, "dropout must be on for this test to tell anything"
    assert part_losses(Teaching(other)) == plain


def test_train_loss_is_the_sample_weighted_running_mean(model: FoundationModel, collate: MultiTaskCollator) -> None:
    batches = [
        _batch(collate, [("sentiment", 0), ("sentiment", 1), ("sentiment", 1), ("shapes", 0), ("shapes", 1)]),
        _batch(collate, [("shapes", 1), ("sentiment", 0), ("shapes", 0), ("shapes", 0), ("shapes", 1)]),
        _batch(collate, [("shapes", 1), ("shapes", 0)]),
    ]
    module = _module(model)
    assert module.train_loss() == {}
    for i, batch in enumerate(batches):
        module.training_step(batch, i)
    per_sample = {
        task: torch.cat([_per_sample_ce(model, b, task) for b in batches if task in b])
        for task in ("sentiment", "shapes")
    }
    assert [len(v) for v in per_sample.values()] == [4, 8]
    result = module.train_loss()
    assert result.keys() == per_sample.keys()
    for task, losses in per_sample.items():
        assert result[task] == pytest.approx(float(losses.mean()), rel=1e-5)
    batch_means = [float(_per_sample_ce(model, b, "shapes").mean()) for b in batches]
    assert result["shapes"] != pytest.approx(sum(batch_means) / 3, rel=1e-5), "the data must tell the two apart"


def test_batch_loss_without_record_leaves_the_training_loss_alone(
    model: FoundationModel, collate: MultiTaskCollator
) -> None:
    recorded, scratch = _batch(collate, [("sentiment", 0), ("shapes", 1)]), _batch(collate, [("shapes", 0)] * 3)
    module = _module(model)
    module.batch_loss(recorded)
    loss = module.batch_loss(scratch, record=False)
    torch.testing.assert_close(loss.detach(), _per_sample_ce(model, scratch, "shapes").mean())
    assert module.train_loss() == pytest.approx(
        {task: float(_per_sample_ce(model, recorded, task)[0]) for task in ("sentiment", "shapes")}
    )


class Ending(Objective):
    """The task loss; keeps the training loss the module reports when the fit ends."""

    def __init__(self) -> None:
        self.ended: list[dict[str, float]] = []

    def on_fit_end(self, module: ClientModule) -> None:
        self.ended.append(module.train_loss())


class ManualSGD(Ending):
    """Plain optimizer steps on the task loss, taken by the objective itself (Lightning's manual optimization)."""

    automatic_optimization = False

    def __init__(self) -> None:
        super().__init__()
        self.batch_indices: list[int] = []

    def training_step(self, module: ClientModule, batch: TaskBatch, batch_idx: int) -> None:
        self.batch_indices.append(batch_idx)
        optimizer = module.optimizers()
        loss = module.batch_loss(batch)
        optimizer.zero_grad()
        module.manual_backward(loss)
        optimizer.step()


def test_a_manual_objective_takes_the_training_step_and_every_objective_hears_the_end_of_the_fit(
    model: FoundationModel, collate: MultiTaskCollator
) -> None:
    batches = [
        _batch(collate, [("sentiment", 0), ("shapes", 1), ("sentiment", 1)]),
        _batch(collate, [("shapes", 0), ("sentiment", 0)]),
        _batch(collate, [("shapes", 1)]),
    ]
    start = model.get_state()

    def fit(objective: Ending) -> tuple[ClientModule, ComponentState, int]:
        model.load_state(start)
        module = _module(model, objective=objective)
        model.train()  # as a client's fit: dropout on, so both fits must make the same draws
        trainer = VisitTrainers({"accelerator": "cpu", "devices": 1}).fit_trainer(2)
        torch.manual_seed(0)
        with quiet_lightning():
            trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
        return module, model.get_state(), trainer.global_step

    try:
        manual = ManualSGD()
        module, by_hand, steps = fit(manual)
        assert not module.automatic_optimization
        assert steps == 2 and manual.batch_indices == [0, 1]
        assert manual.ended == [module.train_loss()] and set(module.train_loss()) == {"sentiment", "shapes"}

        automatic = Ending()
        module, by_lightning, _ = fit(automatic)
        assert module.automatic_optimization
        assert automatic.ended == [module.train_loss()]
    finally:
        model.load_state(start)
    # The manual steps are the automatic ones: SGD at lr 0.5 on the task loss of the same batches and draws.
    assert any(not torch.equal(by_hand[c][k], start[c][k]) for c in start for k in start[c])
    for c in start:
        for k in start[c]:
            torch.testing.assert_close(by_hand[c][k], by_lightning[c][k], msg=f"{c}/{k}")
    assert manual.ended[0] == pytest.approx(automatic.ended[0])


def test_optimizer_holds_exactly_the_slice_and_honours_the_lr_override(model: FoundationModel) -> None:
    components = ["encoder[text]", "head[sentiment]"]
    expected = {id(p) for p in model.parameters_of(components)}
    for lr, expected_lr in [(None, 0.5), (0.01, 0.01), (lambda configured: configured / 4, 0.125)]:
        module = ClientModule(
            model, TASKS[:1], components, lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9), lr=lr
        )
        optimizer = module.configure_optimizers()
        held = [id(p) for group in optimizer.param_groups for p in group["params"]]
        assert len(held) == len(set(held)) == len(expected)
        assert set(held) == expected
        assert all(group["lr"] == expected_lr for group in optimizer.param_groups)
        assert all(group["momentum"] == 0.9 for group in optimizer.param_groups)


def _macro_f1(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    scores = []
    for c in range(num_classes):
        tp = int(((predictions == c) & (targets == c)).sum())
        fp = int(((predictions == c) & (targets != c)).sum())
        fn = int(((predictions != c) & (targets == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / num_classes


def test_validation_reports_sample_weighted_metrics_per_task(
    model: FoundationModel, collate: MultiTaskCollator
) -> None:
    spec = [("sentiment", 0), ("shapes", 1), ("sentiment", 1), ("shapes", 0), ("sentiment", 1), ("shapes", 1)]
    spec += [("sentiment", 0)]
    samples = [_sample(task, i, label) for i, (task, label) in enumerate(spec)]
    loader = DataLoader(samples, batch_size=4, shuffle=False, collate_fn=collate)  # batches of 4 and 3
    module = _module(model)
    VisitTrainers({"accelerator": "cpu", "devices": 1}).eval_trainer().validate(module, loader, verbose=False)
    model.eval()  # for the hand computation below, like validation

    batches = list(loader)
    assert [sum(len(p["targets"]) for p in b.values()) for b in batches] == [4, 3]
    assert set(module.eval_results) == {"sentiment", "shapes"}
    for task in ("sentiment", "shapes"):
        losses = torch.cat([_per_sample_ce(model, b, task) for b in batches])
        with torch.no_grad():
            predictions = torch.cat([model(task, b[task]["inputs"]).argmax(-1) for b in batches])
        targets = torch.cat([b[task]["targets"] for b in batches])
        result = module.eval_results[task]
        assert set(result) == {"loss", "accuracy", "f1", "samples"}
        assert result["samples"] == len(targets)
        assert result["loss"] == pytest.approx(float(losses.mean()), rel=1e-5)
        assert result["accuracy"] == pytest.approx(float((predictions == targets).float().mean()))
        assert result["f1"] == pytest.approx(_macro_f1(predictions, targets, 2))
    shapes_batch_means = [float(_per_sample_ce(model, b, "shapes").mean()) for b in batches]
    assert module.eval_results["shapes"]["loss"] != pytest.approx(sum(shapes_batch_means) / 2, rel=1e-5)

    # A second pass starts afresh and reports only the tasks it saw.
    only_text = DataLoader(samples[:1], batch_size=4, collate_fn=collate)
    VisitTrainers({"accelerator": "cpu", "devices": 1}).eval_trainer().validate(module, only_text, verbose=False)
    assert set(module.eval_results) == {"sentiment"}
    assert module.eval_results["sentiment"]["samples"] == 1
    first = next(iter(only_text))
    assert module.eval_results["sentiment"]["loss"] == pytest.approx(
        float(_per_sample_ce(model, first, "sentiment")[0]), rel=1e-5
    )
