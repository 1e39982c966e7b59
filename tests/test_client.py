"""Tests for tapl.client: the multi-task training loss, running training loss, optimizer and evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_text_image_model
from torch.utils.data import DataLoader

from tapl.client import ClientModule
from tapl.datamodules.collate import MultiTaskCollator, TaskBatch
from tapl.models import FoundationModel
from tapl.tasks import Task
from tapl.visit_trainer import VisitTrainers

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


def test_loss_fn_changes_the_objective_but_not_the_recorded_task_loss(
    model: FoundationModel, collate: MultiTaskCollator
) -> None:
    batch = _batch(collate, [("sentiment", 0), ("sentiment", 1), ("shapes", 1)])
    seen: list[ClientModule] = []

    def loss_fn(module: ClientModule, task_loss: torch.Tensor) -> torch.Tensor:
        seen.append(module)
        return 2.0 * task_loss + 1.0

    module = _module(model, loss_fn=loss_fn)
    loss = module.training_step(batch, 0)
    task_loss = torch.cat([_per_sample_ce(model, batch, "sentiment"), _per_sample_ce(model, batch, "shapes")]).mean()
    torch.testing.assert_close(loss.detach(), 2.0 * task_loss + 1.0)
    assert seen == [module]
    assert module.train_loss()["sentiment"] == pytest.approx(float(_per_sample_ce(model, batch, "sentiment").mean()))


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


def test_optimizer_holds_exactly_the_slice_and_honours_the_lr_override(model: FoundationModel) -> None:
    components = ["encoder[text]", "head[sentiment]"]
    expected = {id(p) for p in model.parameters_of(components)}
    for lr, expected_lr in [(None, 0.5), (0.01, 0.01)]:
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
