"""Tests for Per-FedAvg and tapl.meta_learning: the meta-steps against closed-form gradients and Hessians, the
MetaLearning objective that runs them in a fit, a visit's and the adapted model's fits (with the optimizer each asks
for), the adapted personalized model by hand, and whole runs through the CLI (both variants, resume)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from helpers import BatchCounter, make_text_image_model, tiny_config, write_tiny_config
from helpers import read_records as records
from helpers import read_results as results
from lightning.pytorch import Callback, LightningModule, Trainer
from safetensors.torch import load_file
from scripted import ScriptedTraining, context, federation
from torch import Tensor, nn
from torch.utils.data import DataLoader

from tapl.algorithms import PerFedAvg
from tapl.algorithms.perfedavg import NO_CLIPPING, OUTER_OPTIMIZERS
from tapl.api import FederationInfo
from tapl.cli import TaplCLI, main
from tapl.client import ClientModule
from tapl.components import ComponentState, clone, select
from tapl.context import ClientContext
from tapl.datamodules.collate import MultiTaskCollator, TaskBatch
from tapl.federation import FederatedOrchestrator
from tapl.meta_learning import BATCHES_PER_STEP, MetaLearning, gradient, hessian_vector_product, meta_gradient
from tapl.models import FoundationModel
from tapl.objective import Objective
from tapl.tasks import Task
from tapl.visit_trainer import VisitTrainers, quiet_lightning

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

# -- the math, by hand: a linear least-squares model with two parameter tensors --------------------------------
#
# L(W, b; X, Y) = 1/(2n) * sum_i ||W x_i + b - y_i||^2, so with R = X W^T + b - Y:
#   dL/dW = R^T X / n,  dL/db = mean_i R_i,
# and the Hessian applied to a direction (V_W, v_b) is the same map of dR = X V_W^T + v_b.

RNG = np.random.default_rng(7)
W0, B0 = RNG.normal(size=(2, 3)), RNG.normal(size=2)
DATA = [(RNG.normal(size=(n, 3)), RNG.normal(size=(n, 2))) for n in (4, 5, 6)]  # D1, D2, D3


def lsq_grad(w: np.ndarray, b: np.ndarray, data: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    x, y = data
    residual = x @ w.T + b - y
    return residual.T @ x / len(x), residual.mean(0)


def lsq_hvp(data: tuple[np.ndarray, np.ndarray], vw: np.ndarray, vb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, _ = data
    change = x @ vw.T + vb
    return change.T @ x / len(x), change.mean(0)


def lsq_params() -> list[Tensor]:
    return [torch.tensor(W0, requires_grad=True), torch.tensor(B0, requires_grad=True)]


def lsq_loss(params: list[Tensor], data: tuple[np.ndarray, np.ndarray]) -> Tensor:
    x, y = (torch.tensor(a) for a in data)
    w, b = params
    return 0.5 * ((x @ w.T + b - y) ** 2).sum(1).mean()


def closures(params: list[Tensor]) -> list[Any]:
    return [lambda data=data: lsq_loss(params, data) for data in DATA]


ALPHA = 0.3


def test_first_order_meta_gradient_is_the_gradient_at_the_adapted_point() -> None:
    params = lsq_params()
    inner, outer, _ = closures(params)
    result = meta_gradient(params, inner, outer, ALPHA)

    gw, gb = lsq_grad(W0, B0, DATA[0])
    adapted_w, adapted_b = W0 - ALPHA * gw, B0 - ALPHA * gb
    want_w, want_b = lsq_grad(adapted_w, adapted_b, DATA[1])
    np.testing.assert_allclose(result.gradient[0].numpy(), want_w, rtol=1e-12)
    np.testing.assert_allclose(result.gradient[1].numpy(), want_b, rtol=1e-12)
    # The losses before and after the inner step, and the parameters are back at w.
    assert float(result.inner_loss) == pytest.approx(0.5 * ((DATA[0][0] @ W0.T + B0 - DATA[0][1]) ** 2).sum(1).mean())
    x, y = DATA[1]
    assert float(result.outer_loss) == pytest.approx(0.5 * ((x @ adapted_w.T + adapted_b - y) ** 2).sum(1).mean())
    assert np.array_equal(params[0].detach().numpy(), W0) and np.array_equal(params[1].detach().numpy(), B0)
    # Taken at w', not at w: the plain gradient on D2 is a different vector.
    assert not np.allclose(result.gradient[0].numpy(), lsq_grad(W0, B0, DATA[1])[0])


def test_hessian_free_meta_gradient_subtracts_alpha_times_the_hessian_at_w() -> None:
    params = lsq_params()
    inner, outer, hessian = closures(params)
    result = meta_gradient(params, inner, outer, ALPHA, hessian=hessian)

    gw, gb = lsq_grad(W0, B0, DATA[0])
    ow, ob = lsq_grad(W0 - ALPHA * gw, B0 - ALPHA * gb, DATA[1])
    hw, hb = lsq_hvp(DATA[2], ow, ob)  # H(w; D3) at w, applied to the outer gradient
    np.testing.assert_allclose(result.gradient[0].numpy(), ow - ALPHA * hw, rtol=1e-12)
    np.testing.assert_allclose(result.gradient[1].numpy(), ob - ALPHA * hb, rtol=1e-12)
    assert np.array_equal(params[0].detach().numpy(), W0)


def test_every_gradient_goes_through_the_average_hook() -> None:
    # Doubling stands in for the mean over ranks: the inner step, the outer gradient and H v all see it.
    params = lsq_params()
    inner, outer, hessian = closures(params)
    result = meta_gradient(params, inner, outer, ALPHA, hessian=hessian, average=lambda gs: [2 * g for g in gs])

    gw, gb = lsq_grad(W0, B0, DATA[0])
    ow, ob = lsq_grad(W0 - 2 * ALPHA * gw, B0 - 2 * ALPHA * gb, DATA[1])
    hw, hb = lsq_hvp(DATA[2], 2 * ow, 2 * ob)
    np.testing.assert_allclose(result.gradient[0].numpy(), 2 * ow - 2 * ALPHA * hw, rtol=1e-12)
    np.testing.assert_allclose(result.gradient[1].numpy(), 2 * ob - 2 * ALPHA * hb, rtol=1e-12)


def test_hessian_vector_product_is_exact_on_a_non_quadratic_loss() -> None:
    # Logistic loss L(w) = mean log(1 + exp(-y x.w)): H = X^T diag(s (1 - s)) X / n with s = sigmoid(x.w).
    x, y = RNG.normal(size=(8, 4)), RNG.choice([-1.0, 1.0], size=8)
    w, v = RNG.normal(size=4), RNG.normal(size=4)

    def loss_at(point: np.ndarray) -> float:
        return float(np.mean(np.log1p(np.exp(-y * (x @ point)))))

    s = 1 / (1 + np.exp(-(x @ w)))
    exact = x.T @ (s * (1 - s) * (x @ v)) / len(x)

    param = torch.tensor(w, requires_grad=True)
    loss = torch.nn.functional.softplus(-torch.tensor(y) * (torch.tensor(x) @ param)).mean()
    product = hessian_vector_product(loss, [param], [torch.tensor(v)])
    np.testing.assert_allclose(product[0].detach().numpy(), exact, rtol=1e-10)

    # A finite difference of gradients (the paper's other option) misses this tolerance by far.
    def grad_at(point: np.ndarray) -> np.ndarray:
        sig = 1 / (1 + np.exp(y * (x @ point)))
        return -(x.T @ (y * sig)) / len(x)

    delta = 1e-3
    finite = (grad_at(w + delta * v) - grad_at(w - delta * v)) / (2 * delta)
    assert not np.allclose(finite, exact, rtol=1e-10, atol=0)
    assert loss_at(w) == pytest.approx(float(loss.detach()))


def test_gradients_are_zero_where_the_loss_does_not_reach_and_linear_losses_have_no_curvature() -> None:
    used, unused = torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([3.0], requires_grad=True)
    loss = (torch.tensor([4.0, -1.0]) * used).sum()
    assert [g.tolist() for g in gradient(loss, [used, unused])] == [[4.0, -1.0], [0.0]]
    loss = (torch.tensor([4.0, -1.0]) * used).sum()
    assert [h.tolist() for h in hessian_vector_product(loss, [used, unused], [torch.ones(2), torch.ones(1)])] == [
        [0.0, 0.0],
        [0.0],
    ]


# -- the MetaLearning objective through a real Lightning Trainer ------------------------------------------------

TASKS = [
    Task(name="sentiment", type="classification", modalities=("text",), num_classes=3, head_hidden=16, head_dropout=0),
    Task(name="shapes", type="classification", modalities=("image",), num_classes=2, head_hidden=16, head_dropout=0),
]


def without_dropout(model: nn.Module) -> None:
    """Turn every dropout off, so training-mode outputs can be recomputed by hand."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


@pytest.fixture(scope="module")
def model(assets: dict[str, Path]) -> FoundationModel:
    torch.manual_seed(0)
    model = make_text_image_model(assets["bert"], TASKS)
    without_dropout(model)
    return model


def random_state(model: FoundationModel, seed: int) -> ComponentState:
    generator = torch.Generator().manual_seed(seed)
    return {
        c: {k: 0.3 * torch.randn(s, generator=generator) for k, s in p.items()}
        for c, p in model.component_shapes().items()
    }


def make_batches(model: FoundationModel) -> list[TaskBatch]:
    """Five distinct batches; the third holds text only, so the image path gets no gradient there."""
    collate = MultiTaskCollator({t.name: t for t in TASKS}, model.preprocessors)
    words = ["good movie", "awful day", "fine", "a great day", "poor food", "hate the food", "love", "bad"]
    pixels = torch.Generator().manual_seed(5)
    batches = []
    for b in range(5):
        samples = [
            {"task": "sentiment", "inputs": {"text": words[(b + i) % len(words)]}, "target": (b + i) % 3}
            for i in range(3)
        ]
        if b != 2:
            samples += [
                {"task": "shapes", "inputs": {"image": torch.rand(64, generator=pixels).tolist()}, "target": i % 2}
                for i in range(2)
            ]
        batches.append(collate(samples))
    return batches


@pytest.mark.parametrize(("hessian_free", "steps"), [(False, 3), (True, 2)])
def test_a_meta_learning_fit_runs_its_steps_as_meta_steps_on_consecutive_batches(
    model: FoundationModel, hessian_free: bool, steps: int
) -> None:
    alpha, beta = 0.2, 0.1
    per_step = 3 if hessian_free else 2
    components = model.component_names()
    start = random_state(model, 1)
    batches = make_batches(model)  # fewer than a fit needs: the meta-steps run on into the next epoch

    # By hand: the pure functions on the loader's batches, in order, each meta-step on the next per_step batches.
    model.train()
    model.load_state(start)
    recorded = ClientModule(model, TASKS, components, torch.optim.SGD)  # records the loss before adaptation
    scratch = ClientModule(model, TASKS, components, torch.optim.SGD)
    params = model.parameters_of(components)
    order = [batches[i % len(batches)] for i in range(per_step * steps)]
    before, after = [], []
    for s in range(steps):
        group = order[per_step * s : per_step * (s + 1)]
        result = meta_gradient(
            params,
            lambda group=group: recorded.training_step(group[0], 0),
            lambda group=group: scratch.training_step(group[1], 0),
            alpha,
            hessian=(lambda group=group: scratch.training_step(group[2], 0)) if hessian_free else None,
        )
        with torch.no_grad():
            for p, g in zip(params, result.gradient, strict=True):
                p.sub_(beta * g)
        before.append(float(result.inner_loss))
        after.append(float(result.outer_loss))
    expected = model.get_state()

    # Through Lightning: a visit's Trainer with max_steps = steps, the outer step plain SGD at beta.
    model.load_state(start)
    meta = MetaLearning(alpha, hessian_free=hessian_free)
    assert meta.batches_per_step == per_step
    assert np.isnan(meta.loss_before) and np.isnan(meta.loss_after), "no meta-step yet"
    module = ClientModule(model, TASKS, components, torch.optim.SGD, beta, objective=meta)
    assert not module.automatic_optimization
    counter = BatchCounter()
    trainer = VisitTrainers({"accelerator": "cpu", "devices": 1}).fit_trainer(steps, [counter])
    with quiet_lightning():
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    trained = model.get_state()

    assert trainer.global_step == steps
    assert counter.batches == per_step * steps
    for c in components:
        for k in expected[c]:
            torch.testing.assert_close(trained[c][k], expected[c][k], msg=f"{c} {k}")
    assert any(not torch.equal(trained[c][k], start[c][k]) for c in components for k in start[c])
    assert meta.loss_before == pytest.approx(np.mean(before), rel=1e-5)
    assert meta.loss_after == pytest.approx(np.mean(after), rel=1e-5)
    assert module.train_loss() == pytest.approx(recorded.train_loss(), rel=1e-5)


# -- the algorithm -----------------------------------------------------------------------------------------------


def test_names_and_validation() -> None:
    first, hessian_free = PerFedAvg(), PerFedAvg(variant="hessian_free", adapt_steps=2)
    assert (first.alpha, first.beta, first.adapt_steps, first.outer_optimizer) == (0.01, 0.001, 1, "adam")
    assert first.label == "Per-FedAvg (FO)" and hessian_free.label == "Per-FedAvg (HF)"
    assert [(m.key, m.label) for m in first.models()] == [
        ("global", "Per-FedAvg (FO) meta-model"),
        ("personalized", "Per-FedAvg (FO) adapted"),
    ]
    assert [m.label for m in hessian_free.models()] == ["Per-FedAvg (HF) meta-model", "Per-FedAvg (HF) adapted"]
    assert "1 SGD step at lr alpha=0.01" in first.models()[1].description
    assert "2 SGD steps" in hessian_free.models()[1].description
    for bad in ({"alpha": 0.0}, {"beta": -1.0}, {"variant": "second_order"}, {"adapt_steps": 0}):
        with pytest.raises(ValueError, match=r"algorithm\."):
            PerFedAvg(**bad)


STATE = {"encoder": {"w": torch.zeros(2)}, "head": {"w": torch.zeros(1)}}


def equal(a: ComponentState, b: ComponentState) -> bool:
    """Whether two states hold the same tensors."""
    return (
        a.keys() == b.keys()
        and all(a[c].keys() == b[c].keys() for c in a)
        and all(torch.equal(a[c][k], b[c][k]) for c in a for k in a[c])
    )


def shifted(state: ComponentState, offset: float) -> ComponentState:
    return {c: {k: t + offset for k, t in p.items()} for c, p in state.items()}


def described(warmup_rounds: int = 0, **trainer: Any) -> FederationInfo:
    """A federation whose local fits run with the ``--trainer`` settings ``trainer``."""
    precision = str(trainer.get("precision", "32-true"))
    return federation(STATE, trainer=trainer, precision=precision, warmup_rounds=warmup_rounds)


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ({"accumulate_grad_batches": 4}, "accumulate_grad_batches"),
        ({"precision": "16-mixed"}, "16-mixed"),
    ],
)
def test_settings_lightning_cannot_apply_to_a_meta_step_fail_fast(setting: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        PerFedAvg().setup(described(**setting))


def test_supported_settings_pass_without_a_warning(recwarn: pytest.WarningsRecorder) -> None:
    settings = {"gradient_clip_val": None, "accumulate_grad_batches": 1, "precision": "bf16-mixed"}
    PerFedAvg().setup(described(**settings))
    assert [str(w.message) for w in recwarn] == []


def write_config(assets: dict[str, Path], run_dir: Path, **federation: Any) -> Path:
    return write_tiny_config(assets, run_dir, **federation)


def test_cli_refuses_gradient_accumulation_before_training(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(assets, tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--algorithm", "PerFedAvg", "--trainer.accumulate_grad_batches", "2"])
    assert exit_info.value.code == 1
    assert "accumulate_grad_batches" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def first_order_meta_gradient(
    model: FoundationModel, alpha: float
) -> tuple[ComponentState, list[TaskBatch], list[Tensor], list[Tensor]]:
    """A random start, two batches, the parameters at the start and the first-order meta-gradient there."""
    components = model.component_names()
    start = random_state(model, 1)
    batches = make_batches(model)[:2]
    model.train()
    model.load_state(start)
    params = model.parameters_of(components)
    scratch = ClientModule(model, TASKS, components, torch.optim.SGD)
    result = meta_gradient(
        params, lambda: scratch.training_step(batches[0], 0), lambda: scratch.training_step(batches[1], 0), alpha
    )
    return start, batches, [p.detach().clone() for p in params], result.gradient


def test_a_meta_step_clips_its_meta_gradient_norm_with_its_own_setting_not_the_trainers(
    model: FoundationModel,
) -> None:
    alpha, beta, clip = 0.2, 0.1, 1e-3
    components = model.component_names()
    start, batches, params, meta = first_order_meta_gradient(model, alpha)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in meta))
    assert norm > clip  # the clipping bites
    gradients = [g * (clip / (float(norm) + 1e-6)) for g in meta]
    expected = [p - beta * g for p, g in zip(params, gradients, strict=True)]

    model.load_state(start)
    objective = MetaLearning(alpha, gradient_clip=clip)
    module = ClientModule(model, TASKS, components, torch.optim.SGD, beta, objective=objective)
    # The trainer's own clip (which would clip the meta-gradient to 5.0 by value) is lifted for the fit.
    trainers = VisitTrainers({"accelerator": "cpu", "devices": 1, "gradient_clip_val": 5.0})
    trainer = trainers.fit_trainer(1, overrides=NO_CLIPPING)
    with quiet_lightning():
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    for p, want in zip(model.parameters_of(components), expected, strict=True):
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-7)


def test_an_adam_outer_step_is_one_adam_step_of_the_meta_gradient(model: FoundationModel) -> None:
    alpha, beta = 0.2, 0.01
    components = model.component_names()
    start, batches, params, meta = first_order_meta_gradient(model, alpha)
    # Adam's first step from zero moments: m = (1-b1) g, v = (1-b2) g^2, bias-corrected to g and g^2, so the
    # update is beta * g / (|g| + eps): a step of size ~beta on every coordinate with a gradient.
    expected = [p - beta * g / (g.abs() + 1e-8) for p, g in zip(params, meta, strict=True)]

    model.load_state(start)
    module = ClientModule(model, TASKS, components, OUTER_OPTIMIZERS["adam"], beta, objective=MetaLearning(alpha))
    trainer = VisitTrainers({"accelerator": "cpu", "devices": 1}).fit_trainer(1)
    with quiet_lightning():
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert isinstance(module.optimizers().optimizer, torch.optim.Adam)
    for p, want in zip(model.parameters_of(components), expected, strict=True):
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)


def test_the_trainer_clip_only_warns_and_the_algorithm_clip_is_validated() -> None:
    with pytest.warns(UserWarning, match="--algorithm.gradient_clip"):
        PerFedAvg().setup(described(gradient_clip_val=1.0))
    for bad in ({"gradient_clip": 0.0}, {"outer_optimizer": "rmsprop"}):
        with pytest.raises(ValueError, match=r"algorithm\."):
            PerFedAvg(**bad)


def test_a_learning_rate_warm_up_only_warns(recwarn: pytest.WarningsRecorder) -> None:
    PerFedAvg().setup(described())
    assert not [w for w in recwarn if "warmup_rounds" in str(w.message)]
    with pytest.warns(UserWarning, match=r"ignores federation\.warmup_rounds.*alpha=0\.01 and beta=0\.001"):
        PerFedAvg().setup(described(warmup_rounds=2))


# -- a visit and the adapted model: the fits they ask for -------------------------------------------------------


def finish_meta_fit(n: int, call: dict[str, Any]) -> dict[str, float]:
    """The training losses of a scripted fit, and the adaptation losses its MetaLearning holds at its end."""
    objective = call["objective"]
    objective.loss_before, objective.loss_after = 0.75, 0.5
    return {"a": 0.7, "b": 0.9}


@pytest.mark.parametrize(
    ("variant", "outer_optimizer", "optimizer"),
    [("first_order", "adam", torch.optim.Adam), ("hessian_free", "sgd", torch.optim.SGD)],
)
def test_a_visit_meta_trains_the_received_slice_with_the_outer_optimizer_at_beta(
    variant: str, outer_optimizer: str, optimizer: type
) -> None:
    info = described()
    training = ScriptedTraining(losses=finish_meta_fit)
    algorithm = PerFedAvg(alpha=0.02, beta=0.003, variant=variant, outer_optimizer=outer_optimizer, gradient_clip=2.0)
    algorithm.setup(info)
    received = {"encoder": {"w": torch.tensor([1.0, 2.0])}, "head": {"w": torch.tensor([3.0])}}
    update = algorithm.client_update(context(info, training, client=1, round=3, received=clone(received)))

    [fit] = training.fits
    assert fit["client"] == 1 and equal(fit["state"], received)
    assert (fit["steps"], fit["lr"], fit["optimizer"], fit["trainer_overrides"]) == (
        None,
        0.003,
        optimizer,
        NO_CLIPPING,
    )
    assert fit["trainable"] is None, "the whole slice is meta-trained"
    meta = fit["objective"]
    assert isinstance(meta, MetaLearning)
    assert (meta.alpha, meta.hessian_free, meta.gradient_clip) == (0.02, variant == "hessian_free", 2.0)
    assert meta.batches_per_step == BATCHES_PER_STEP[variant]

    assert (update.client, update.num_samples, update.events) == (1, 10, [])
    assert equal(update.state, shifted(received, 100))
    assert update.metrics == {
        "train_loss/a": 0.7,
        "train_loss/b": 0.9,
        "loss_before_adaptation": 0.75,
        "loss_after_adaptation": 0.5,
    }


def test_the_personalized_model_asks_for_adapt_steps_sgd_steps_at_alpha_from_the_received_slice() -> None:
    info = described()
    training = ScriptedTraining()
    algorithm = PerFedAvg(alpha=0.02, adapt_steps=3)
    algorithm.setup(info)
    received = {"encoder": {"w": torch.tensor([1.0, 2.0])}, "head": {"w": torch.tensor([3.0])}}
    ctx = context(info, training, client=0, received=clone(received), stage="evaluation")
    [meta_model, adapted] = algorithm.models()
    assert meta_model.state(ctx) is ctx.received, "the global row is the meta-model before adaptation"
    state = adapted.state(ctx)

    [fit] = training.fits
    assert equal(fit["state"], received) and fit["objective"] is None, "plain task-loss steps from the received slice"
    assert (fit["steps"], fit["lr"], fit["optimizer"], fit["trainer_overrides"]) == (
        3,
        0.02,
        torch.optim.SGD,
        NO_CLIPPING,
    )
    assert state is not None and equal(state, shifted(received, 100))
    assert equal(ctx.received, received), "the received slice stays as it came"


@pytest.fixture
def orchestrator(assets: dict[str, Path], tmp_path: Path) -> FederatedOrchestrator:
    config = write_config(assets, tmp_path / "run")
    args = ["--config", str(config), "--algorithm", "PerFedAvg", "--algorithm.alpha", "0.5"]
    # A trainer clip that would stop every step: Per-FedAvg's adaptation must not be clipped by it.
    args += ["--algorithm.adapt_steps", "2", "--trainer.gradient_clip_val", "1e-9"]
    orchestrator = TaplCLI(args=args, run=False).orchestrator
    assert orchestrator is not None
    without_dropout(orchestrator.model)
    with pytest.warns(UserWarning, match="does not clip its meta-steps or adaptation steps"):
        orchestrator.setup(check_values=False)
    return orchestrator


def evaluation_context(orchestrator: FederatedOrchestrator, client: int) -> ClientContext:
    """``client``'s evaluation context over the orchestrator's local training, as the engine builds one: the
    client's slice of the current global model received."""
    info = orchestrator.info
    received = info.slice_of(orchestrator.global_state, client)
    return ClientContext(orchestrator.training, info, info.clients[client], 1, received, stage="evaluation")


def test_personalized_model_is_the_global_slice_after_adapt_steps_sgd_steps_at_alpha(
    orchestrator: FederatedOrchestrator, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[TaskBatch] = []
    optimizers: list[tuple[type, list[float]]] = []
    plain_step = Objective.training_step

    def recording(self: Objective, module: ClientModule, batch: TaskBatch, batch_idx: int) -> Tensor | None:
        seen.append(batch)
        optimizer = module.optimizers().optimizer
        optimizers.append((type(optimizer), [group["lr"] for group in optimizer.param_groups]))
        return plain_step(self, module, batch, batch_idx)

    monkeypatch.setattr(Objective, "training_step", recording)
    ctx = evaluation_context(orchestrator, 2)
    global_slice = clone(ctx.received)
    [_, adapted] = orchestrator.algorithm.models()
    personalized = adapted.state(ctx)
    monkeypatch.undo()
    assert personalized is not None and len(seen) == 2
    assert {task for batch in seen for task in batch} == {"sentiment", "shapes"}
    # Plain SGD at alpha, whatever --optimizer (AdamW) says.
    assert optimizers == [(torch.optim.SGD, [0.5])] * 2

    # By hand: two plain gradient steps of lr 0.5 from the global slice on the batches the adaptation saw.
    components = ctx.components
    model = orchestrator.model
    model.load_state(global_slice)
    model.set_trainable(components)
    reference = ClientModule(model, list(ctx.tasks.values()), components, torch.optim.SGD)
    params = model.parameters_of(components)
    for batch in seen:
        grads = torch.autograd.grad(reference.training_step(batch, 0), params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.sub_(0.5 * g)
    expected = model.get_state(components)
    changed = False
    for c in components:
        for k in expected[c]:
            torch.testing.assert_close(personalized[c][k], expected[c][k], msg=f"{c} {k}")
            changed |= not torch.equal(personalized[c][k], global_slice[c][k])
    assert changed

    # A fresh evaluation context adapts to the same model (what results report), and the global model and the
    # received slice are untouched.
    again = adapted.state(evaluation_context(orchestrator, 2))
    assert again is not None and equal(again, personalized)
    assert equal(ctx.received, global_slice)
    assert equal(select(orchestrator.global_state, components), global_slice)


class OptimizerSpy(Callback):
    """Keeps the class, learning rates and weight decays of a fit's optimizer."""

    def __init__(self) -> None:
        self.seen: list[tuple[type, float, float]] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                self.seen.append((type(optimizer), group["lr"], group["weight_decay"]))


def test_a_fit_trains_with_the_optimizer_it_asks_for_and_otherwise_with_the_configured_one(
    orchestrator: FederatedOrchestrator,
) -> None:
    ctx = evaluation_context(orchestrator, 0)
    asked: list[dict[str, Any]] = [
        {},
        {"optimizer": torch.optim.SGD, "lr": 0.5},
        {"optimizer": torch.optim.Adam},
        {"lr": 0.01},
        {},
    ]
    seen = []
    for kwargs in asked:
        spy = OptimizerSpy()
        ctx.fit(ctx.received, steps=1, callbacks=[spy], **kwargs)
        assert len({entry for entry in spy.seen}) == 1, "one optimizer, one setting for every group"
        seen.append(spy.seen[0])
    # --optimizer is the demo's AdamW (lr 3e-4, weight decay 0.01); a fit's own optimizer keeps none of its
    # arguments, and lr replaces the learning rate of either.
    assert seen == [
        (torch.optim.AdamW, 3e-4, 0.01),
        (torch.optim.SGD, 0.5, 0.0),
        (torch.optim.Adam, 1e-3, 0.0),
        (torch.optim.AdamW, 0.01, 0.01),
        (torch.optim.AdamW, 3e-4, 0.01),
    ]


# -- whole runs through the CLI ----------------------------------------------------------------------------------

CLIENT_TASKS = {"0": {"sentiment"}, "1": {"shapes"}, "2": {"sentiment", "shapes"}, "3": {"sentiment", "shapes"}}


def run(run_dir: Path, assets: dict[str, Path], *args: str, **federation: Any) -> Path:
    config = write_config(assets, run_dir, **{"rounds": 2, "finetune_steps": 2, **federation})
    main(["fit", "--config", str(config), "--algorithm", "PerFedAvg", *args])
    return run_dir


HESSIAN_FREE = ("--algorithm.variant", "hessian_free")


@pytest.fixture(scope="module")
def hf_run(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tmp_path_factory.mktemp("perfedavg-hf") / "run", assets, *HESSIAN_FREE)


def check_run(run_dir: Path, label: str) -> None:
    final = results(run_dir)
    assert final["algorithm"] == label
    assert {key: info["label"] for key, info in final["models"].items()} == {
        "global": f"{label} meta-model",
        "global+FT": f"{label} meta-model+FT",
        "personalized": f"{label} adapted",
    }
    for model in ("global", "global+FT", "personalized"):
        assert {c: set(tasks) for c, tasks in final["per_client"][model].items()} == CLIENT_TASKS
    assert final["per_client"]["personalized"] != final["per_client"]["global"]

    logged = records(run_dir)
    assert [r["round"] for r in logged] == [1, 2]
    for record in logged:
        assert set(record["train"]) == {str(c) for c in record["sampled_clients"]}
        for client, metrics in record["train"].items():
            assert {k for k in metrics if k.startswith("train_loss/")} == {
                f"train_loss/{t}" for t in CLIENT_TASKS[client]
            }
            assert np.isfinite(metrics["loss_before_adaptation"]) and np.isfinite(metrics["loss_after_adaptation"])
            assert metrics["loss_before_adaptation"] > 0 and metrics["loss_after_adaptation"] > 0


def test_first_order_run_reports_meta_model_fine_tuned_and_adapted_models(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    check_run(run(tmp_path / "run", assets), "Per-FedAvg (FO)")


def test_hessian_free_run_reports_meta_model_fine_tuned_and_adapted_models(hf_run: Path) -> None:
    check_run(hf_run, "Per-FedAvg (HF)")


def test_resumed_run_equals_the_uninterrupted_one(assets: dict[str, Path], tmp_path: Path, hf_run: Path) -> None:
    straight = run(tmp_path / "straight", assets, *HESSIAN_FREE, rounds=3)
    resumed = tmp_path / "resumed"
    shutil.copytree(hf_run, resumed)
    run(resumed, assets, *HESSIAN_FREE, "--ckpt_path", "last", rounds=3)

    for name in ("round-000003", "final"):
        want = load_file(straight / "checkpoints" / name / "server.safetensors")
        got = load_file(resumed / "checkpoints" / name / "server.safetensors")
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    assert records(resumed) == records(straight)
    assert records(resumed, "post_federation.jsonl") == records(straight, "post_federation.jsonl")
    assert results(resumed) == results(straight)


RANK_ECHO = textwrap.dedent(
    """
    import json
    from pathlib import Path

    import torch.distributed as dist

    from tapl.algorithms import PerFedAvg


    class RankEcho(PerFedAvg):
        def __init__(self, out: str = ".", variant: str = "first_order") -> None:
            super().__init__(alpha=0.1, beta=0.05, variant=variant)
            self.out = Path(out)

        def aggregate(self, round, global_state, results, failures):
            new_state = super().aggregate(round, global_state, results, failures)
            rank = dist.get_rank() if dist.is_initialized() else 0
            checksum = sum(float(t.double().sum()) for p in new_state.values() for t in p.values())
            (self.out / f"rank{rank}_round{round}.json").write_text(json.dumps(checksum))
            return new_state
    """
)


@pytest.mark.slow
def test_data_parallel_meta_steps_average_gradients_over_ranks(assets: dict[str, Path], tmp_path: Path) -> None:
    # Each rank draws its own batches; only gradients averaged over ranks keep the ranks' models equal.
    (tmp_path / "rank_echo.py").write_text(RANK_ECHO)
    out = tmp_path / "records"
    out.mkdir()
    config = tiny_config(assets, tmp_path / "run", rounds=2)
    config["trainer"] = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}
    config["algorithm"] = {
        "class_path": "rank_echo.RankEcho",
        "init_args": {"out": str(out), "variant": "hessian_free"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "tapl.cli", "fit", "--config", str(path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for round in (1, 2):
        assert (out / f"rank0_round{round}.json").read_text() == (out / f"rank1_round{round}.json").read_text()
    logged = records(tmp_path / "run")
    assert all(np.isfinite(m["loss_after_adaptation"]) for r in logged for m in r["train"].values())
