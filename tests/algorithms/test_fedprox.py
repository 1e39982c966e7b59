"""Tests for tapl.algorithms.fedprox and its Proximal objective: the proximal gradient by hand on a tiny model,
under gradient accumulation and mixed precision, FedProx's visit through a real client context, the precision
check, and a run from the CLI."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import make_text_image_model, save_tiny_tokenizer, tiny_config
from lightning.pytorch.plugins import MixedPrecision
from scripted import context, federation, objective_value
from torch.amp import GradScaler
from torch.utils.data import DataLoader
from transformers import BertModel

from tapl.algorithms import FedProx
from tapl.algorithms.proximal import Proximal
from tapl.api import ClientInfo, FitResult
from tapl.cli import main
from tapl.client import ClientModule
from tapl.components import ComponentState, clone
from tapl.datamodules.collate import MultiTaskCollator, TaskBatch
from tapl.models import FoundationModel
from tapl.objective import Objective
from tapl.tasks import Task
from tapl.visit_trainer import VisitTrainers, quiet_lightning

pytestmark = [
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*AMP with fp16 is not supported on CPU"),
]

TASKS = [
    Task(name="sentiment", type="classification", modalities=("text",), num_classes=2, head_hidden=16, head_dropout=0),
    Task(name="shapes", type="classification", modalities=("image",), num_classes=2, head_hidden=16, head_dropout=0),
]
TEXTS = ["good movie", "the food a awful day", "hate", "a great great day", "poor food", "fine"]
LR, MU = 0.5, 0.8


# -- a tiny model whose training step is deterministic (no dropout anywhere) ------------------------------------


@pytest.fixture(scope="module")
def model(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> FoundationModel:
    bert = tmp_path_factory.mktemp("bert-without-dropout")
    save_tiny_tokenizer(bert)
    BertModel.from_pretrained(
        assets["bert"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    ).save_pretrained(bert)
    torch.manual_seed(0)
    return make_text_image_model(bert, TASKS)


@pytest.fixture(scope="module")
def reference(model: FoundationModel) -> ComponentState:
    """``w_global``: distinct non-zero values in every trainable tensor."""
    generator = torch.Generator().manual_seed(1)
    shapes = model.component_shapes()
    return {c: {k: 0.3 * torch.randn(s, generator=generator) for k, s in p.items()} for c, p in shapes.items()}


@pytest.fixture(scope="module")
def start(reference: ComponentState) -> ComponentState:
    """``w``: a state away from ``w_global`` in every tensor."""
    generator = torch.Generator().manual_seed(2)
    return {
        c: {k: t + 0.2 * torch.randn(t.shape, generator=generator) for k, t in p.items()} for c, p in reference.items()
    }


def _sample(task: str, index: int, label: int) -> dict[str, Any]:
    if task == "sentiment":
        return {"task": task, "inputs": {"text": TEXTS[index % len(TEXTS)]}, "target": label}
    pixels = torch.rand(64, generator=torch.Generator().manual_seed(index)).tolist()
    return {"task": task, "inputs": {"image": pixels}, "target": label}


@pytest.fixture(scope="module")
def batches(model: FoundationModel) -> list[TaskBatch]:
    """Two multi-task batches of different sizes (3 and 2 samples)."""
    collate = MultiTaskCollator({t.name: t for t in TASKS}, model.preprocessors)
    return [
        collate([_sample("sentiment", 0, 1), _sample("shapes", 1, 0), _sample("sentiment", 2, 0)]),
        collate([_sample("shapes", 3, 1), _sample("sentiment", 4, 0)]),
    ]


def train(
    model: FoundationModel, state: ComponentState, batches: list[TaskBatch], objective: Objective | None, **trainer: Any
) -> FitResult:
    """Plain SGD (lr ``LR``) from ``state``, one optimizer step per batch (per ``accumulate_grad_batches``
    batches), through a Lightning ``Trainer`` built like a client visit's."""
    components = sorted(state)
    model.load_state(state)
    model.set_trainable(components)
    module = ClientModule(model, TASKS, components, lambda params: torch.optim.SGD(params, lr=LR), objective=objective)
    steps = len(batches) // trainer.get("accumulate_grad_batches", 1)
    fit_trainer = VisitTrainers({"accelerator": "cpu", "devices": 1, **trainer}).fit_trainer(steps)
    with quiet_lightning():
        fit_trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert fit_trainer.global_step == steps
    return FitResult(model.get_state(components), module.train_loss(), fit_trainer.global_step)


def task_gradient(
    model: FoundationModel, state: ComponentState, batch: TaskBatch, autocast: torch.dtype | None = None
) -> ComponentState:
    """The gradient of the task loss alone at ``state``, by autograd outside any ``Trainer``."""
    components = sorted(state)
    model.load_state(state)
    model.set_trainable(components)
    model.train()
    module = ClientModule(model, TASKS, components, torch.optim.SGD)
    with torch.autocast("cpu", dtype=autocast) if autocast else nullcontext():
        loss = module.training_step(batch, 0)
    params = {(c, k): p for c in components for k, p in model.component_parameters(c).items()}
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    return {c: {k: grads[(c, k)] for k in state[c]} for c in components}


def combine(fn: Any, *states: ComponentState) -> ComponentState:
    """``fn`` applied tensor by tensor across states with the same keys."""
    first = states[0]
    return {c: {k: fn(*(s[c][k] for s in states)) for k in first[c]} for c in first}


def proximal_value(w: ComponentState, w_ref: ComponentState, mu: float, dtype: torch.dtype = torch.float64) -> float:
    """``mu/2 * ||w - w_ref||^2`` with the differences taken in ``dtype``."""
    squares = sum(float((w[c][k].to(dtype) - w_ref[c][k].to(dtype)).double().pow(2).sum()) for c in w for k in w[c])
    return 0.5 * mu * squares


def assert_states_close(actual: ComponentState, expected: ComponentState, **tolerance: float) -> None:
    assert actual.keys() == expected.keys()
    for c in expected:
        assert actual[c].keys() == expected[c].keys(), c
        for k in expected[c]:
            torch.testing.assert_close(
                actual[c][k], expected[c][k], msg=lambda m, c=c, k=k: f"{c}/{k}: {m}", **tolerance
            )


def max_difference(a: ComponentState, b: ComponentState) -> float:
    return max(float((a[c][k] - b[c][k]).abs().max()) for c in a for k in a[c])


def test_the_model_trains_deterministically(model: FoundationModel, start: ComponentState, batches: list) -> None:
    # The hand computations below recompute a training step outside the Trainer: no dropout may differ.
    first, second = task_gradient(model, start, batches[0]), task_gradient(model, start, batches[0])
    assert max_difference(first, second) == 0.0


# -- the math of the proximal term -------------------------------------------------------------------------------


def test_one_sgd_step_moves_by_lr_times_task_gradient_plus_mu_times_distance(
    model: FoundationModel, reference: ComponentState, start: ComponentState, batches: list
) -> None:
    term = Proximal(reference, MU)
    trained = train(model, start, batches[:1], term).state

    grad = task_gradient(model, start, batches[0])
    expected = combine(lambda w, g, r: w - LR * (g + MU * (w - r)), start, grad, reference)
    assert_states_close(trained, expected)
    # The proximal part of the step is large, so the comparison above tells a missing or wrong term apart.
    without_term = combine(lambda w, g: w - LR * g, start, grad)
    assert max_difference(trained, without_term) > 0.1
    assert term.mean == pytest.approx(proximal_value(start, reference, MU), rel=1e-6)


def test_mu_zero_is_plain_training(
    model: FoundationModel, reference: ComponentState, start: ComponentState, batches: list
) -> None:
    plain = train(model, start, batches, None).state
    term = Proximal(reference, 0.0)
    with_zero_term = train(model, start, batches, term).state
    assert max_difference(plain, with_zero_term) == 0.0
    assert term.mean == 0.0


def test_gradient_accumulation_counts_the_proximal_gradient_once_per_optimizer_step(
    model: FoundationModel, reference: ComponentState, start: ComponentState, batches: list
) -> None:
    term = Proximal(reference, MU)
    trained = train(model, start, batches, term, accumulate_grad_batches=2).state

    # Lightning divides each micro-batch's loss by 2: the mean task gradient, and the proximal one once.
    g1, g2 = (task_gradient(model, start, batch) for batch in batches)
    expected = combine(lambda w, a, b, r: w - LR * ((a + b) / 2 + MU * (w - r)), start, g1, g2, reference)
    assert_states_close(trained, expected)
    twice = combine(lambda w, a, b, r: w - LR * ((a + b) / 2 + 2 * MU * (w - r)), start, g1, g2, reference)
    assert max_difference(trained, twice) > 0.1
    # Both micro-batches saw the same weights, so the mean term is the term at ``start``.
    assert term.mean == pytest.approx(proximal_value(start, reference, MU), rel=1e-6)


@pytest.mark.parametrize(
    ("trainer", "low_precision"),
    [
        ({"precision": "32-true"}, None),
        ({"precision": "bf16-mixed"}, torch.bfloat16),
        # What --trainer.precision 16-mixed is on a GPU: float16 autocast and a gradient scaler (on a CPU,
        # Lightning turns the flag into bf16-mixed, so the plugin is passed directly). A small initial scale: at
        # the default 2**16 the scaled fp16 gradients overflow on some summation orders and the step is skipped.
        ({"plugins": [MixedPrecision("16-mixed", "cpu", GradScaler("cpu", init_scale=2.0**8))]}, torch.float16),
    ],
    ids=["32-true", "bf16-mixed", "16-mixed-with-grad-scaler"],
)
def test_the_proximal_gradient_and_term_are_float32_exact_under_every_accepted_precision(
    model: FoundationModel,
    reference: ComponentState,
    start: ComponentState,
    batches: list,
    trainer: dict[str, Any],
    low_precision: torch.dtype | None,
) -> None:
    term = Proximal(reference, MU)
    with_term = train(model, start, batches[:1], term, **trainer).state
    without_term = train(model, start, batches[:1], None, **trainer).state

    # Same data, same task gradient: the two steps differ by exactly lr * mu * (w - w_global).
    difference = combine(lambda a, b: a - b, with_term, without_term)
    assert_states_close(difference, combine(lambda w, r: -LR * MU * (w - r), start, reference), rtol=0, atol=1e-6)
    assert term.mean == pytest.approx(proximal_value(start, reference, MU, torch.float32), rel=1e-6)
    if low_precision is not None:
        # The same term taken in the autocast precision is off by far more than the tolerance above.
        coarse = proximal_value(start, reference, MU, low_precision)
        assert abs(coarse - term.mean) > 1e-5 * term.mean
        # And the whole step is the hand step with the task gradient taken under the same autocast.
        if low_precision == torch.bfloat16:
            grad = task_gradient(model, start, batches[0], autocast=low_precision)
            expected = combine(lambda w, g, r: w - LR * (g + MU * (w - r)), start, grad, reference)
            assert_states_close(with_term, expected)


def test_the_proximal_weight_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match=r"algorithm\.mu must be >= 0, got -0\.1"):
        FedProx(mu=-0.1)
    with pytest.raises(ValueError, match="mu must be >= 0"):
        Proximal({}, -1.0)


# -- FedProx's visit -----------------------------------------------------------------------------------------------


class BatchTraining:
    """A client's local training (what a ``ClientContext`` fits through) that takes one real SGD step per batch
    through a Lightning ``Trainer`` and records the arguments of every fit."""

    def __init__(self, model: FoundationModel, batches: list[TaskBatch]) -> None:
        self.model = model
        self.batches = batches
        self.fits: list[tuple[dict[str, Any], FitResult]] = []

    def fit(self, client: ClientInfo, state: ComponentState, **kwargs: Any) -> FitResult:
        result = train(self.model, state, self.batches, kwargs["objective"])
        self.fits.append((kwargs, result))
        return result

    def evaluate(self, client: ClientInfo, state: ComponentState, split: str) -> dict[str, dict[str, float]]:
        raise AssertionError("FedProx's visit evaluates nothing")


def test_fedprox_trains_the_global_slice_towards_itself_and_logs_the_mean_term(
    model: FoundationModel, reference: ComponentState, batches: list
) -> None:
    info = federation(reference, clients={7: ("sentiment", "shapes")}, tasks={t.name: t for t in TASKS})
    training = BatchTraining(model, batches)
    ctx = context(info, training, client=7, received=clone(reference))
    algorithm = FedProx(mu=MU)
    algorithm.setup(info)
    update = algorithm.client_update(ctx)

    # Step 1 starts at w_global (no proximal gradient); step 2 is pulled back towards w_global.
    w1 = combine(lambda w, g: w - LR * g, reference, task_gradient(model, reference, batches[0]))
    g2 = task_gradient(model, w1, batches[1])
    w2 = combine(lambda w, g, r: w - LR * (g + MU * (w - r)), w1, g2, reference)
    assert_states_close(update.state, w2)
    assert max_difference(update.state, combine(lambda w, g: w - LR * g, w1, g2)) > 1e-3

    assert (update.client, update.num_samples, update.events) == (7, ctx.num_train_samples, [])
    [(kwargs, fit)] = training.fits
    # One fit with the engine's defaults (steps, learning rate, optimizer, trainer) and the proximal objective.
    assert (kwargs["steps"], kwargs["lr"], kwargs["optimizer"], kwargs["trainable"]) == (None, None, None, None)
    assert (kwargs["trainer_overrides"], list(kwargs["callbacks"])) == (None, [])
    proximal = kwargs["objective"]
    assert isinstance(proximal, Proximal) and proximal.mu == MU
    assert update.metrics == {
        "train_loss/sentiment": fit.train_loss["sentiment"],
        "train_loss/shapes": fit.train_loss["shapes"],
        "proximal_term": pytest.approx((0.0 + proximal_value(w1, reference, MU)) / 2, rel=1e-5),
    }
    assert update.metrics["proximal_term"] == proximal.mean
    assert max_difference(ctx.received, reference) == 0.0, "the received slice must stay as it came"


def test_the_term_covers_the_trained_tensors_only() -> None:
    # A reference with more components than the fit trains (e.g. a fit of some components of a slice).
    reference = {"a": {"w": torch.tensor([1.0, -2.0])}, "b": {"w": torch.tensor([5.0])}}
    trained = {"a": {"w": torch.tensor([1.5, 0.0])}}
    proximal = Proximal(reference, 0.4)
    assert proximal.mean == 0.0, "no batch yet"
    value = objective_value(proximal, trained, task_loss=0.25)
    assert float(value) == pytest.approx(0.25 + 0.5 * 0.4 * (0.5**2 + 2.0**2))
    assert proximal.mean == pytest.approx(0.5 * 0.4 * (0.5**2 + 2.0**2))


# -- precision check ----------------------------------------------------------------------------------------------


def fedprox_setup(precision: str) -> None:
    """``FedProx().setup`` in a federation whose local fits run at ``precision``."""
    state = {"a": {"w": torch.zeros(2)}}
    FedProx().setup(federation(state, precision=precision))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_setup_accepts_precisions_that_keep_float32_weights(precision: str) -> None:
    fedprox_setup(precision)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "64-true"])
def test_setup_rejects_precisions_whose_weights_are_not_float32(precision: str) -> None:
    with pytest.raises(ValueError, match=rf"--trainer\.precision is '{precision}'.*32-true, bf16-mixed"):
        fedprox_setup(precision)


# -- from the command line ------------------------------------------------------------------------------------------

CLIENT_TASKS = {"0": ["sentiment"], "1": ["shapes"], "2": ["sentiment", "shapes"], "3": ["sentiment", "shapes"]}


def write_config(assets: dict[str, Path], run_dir: Path) -> Path:
    config = run_dir.parent / f"{run_dir.name}.yaml"
    config.write_text(yaml.safe_dump(tiny_config(assets, run_dir, rounds=2, finetune_steps=2)))
    return config


def test_fedprox_runs_from_the_cli_and_logs_the_proximal_term_of_every_sampled_client(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    # --trainer.precision 32 is the precision the engine describes to FedProx as "32-true".
    args = ["--algorithm", "FedProx", "--algorithm.mu", "0.1", "--trainer.precision", "32"]
    main(["fit", "--config", str(write_config(assets, run_dir)), *args])

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["algorithm"] == {
        "class_path": "tapl.algorithms.FedProx",
        "init_args": {"mu": 0.1, "weighting": "samples"},
    }
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert record["failed_clients"] == {}
        assert set(record["train"]) == {str(c) for c in record["sampled_clients"]}
        for client, metrics in record["train"].items():
            assert set(metrics) == {"proximal_term", *(f"train_loss/{t}" for t in CLIENT_TASKS[client])}
            # Two local steps: the second is away from the received slice, so the mean term is positive.
            assert 0 < metrics["proximal_term"] < math.inf

    results = json.loads((run_dir / "results.json").read_text())
    assert results["algorithm"] == "FedProx"
    labels = {key: model["label"] for key, model in results["models"].items()}
    assert labels == {"global": "FedProx", "global+FT": "FedProx+FT", "personalized": "FedProx (personalized)"}
    assert set(results["per_client"]) == set(labels)


def test_an_inexact_precision_fails_before_the_run_starts(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    args = ["--algorithm", "FedProx", "--trainer.precision", "bf16-true"]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(write_config(assets, run_dir)), *args])
    assert exit_info.value.code == 1
    assert "--trainer.precision is 'bf16-true'" in capsys.readouterr().err
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.yaml").exists()
