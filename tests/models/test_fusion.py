"""Fusion with LoRA experts: one shared expert plus one per modality-task pair, routed by the architecture."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_config

from tapl.cli import main
from tapl.models import Fusion, LoraSettings, PatchImageEncoder, TextEncoder
from tapl.models.foundation import FoundationModel
from tapl.tasks import Task

LORA = LoraSettings(r=2, alpha=4, dropout=0.0)


@pytest.fixture
def model(assets: dict[str, Path]) -> FoundationModel:
    torch.manual_seed(0)
    bert = str(assets["bert"])
    encoders = {
        "text": TextEncoder(bert, max_length=16, lora=LORA),
        "image": PatchImageEncoder(bert, image_size=8, patch_size=4, channels=1, lora=LORA),
    }
    tasks = [
        Task(name="a", type="classification", modalities=("text",), num_classes=2),
        Task(name="b", type="classification", modalities=("text",), num_classes=3),
        Task(name="r", type="image_generation", modalities=("image",)),
        Task(name="v", type="classification", modalities=("image", "text"), num_classes=2),
    ]
    return FoundationModel(encoders, tasks, fusion=Fusion(bert, num_layers=1, lora=LORA)).eval()


def inputs(model: FoundationModel, texts: list[str]) -> dict:
    images = [torch.linspace(0, 1, 64).tolist() for _ in texts]
    return {"text": model.preprocessors["text"](texts), "image": model.preprocessors["image"](images)}


def test_one_expert_per_modality_task_pair(model: FoundationModel) -> None:
    fusion = {c for c in model.component_names() if c.startswith("fusion[")}
    assert fusion == {
        "fusion[shared]",
        "fusion[text,classification]",
        "fusion[image,image_generation]",
        "fusion[image+text,classification]",
    }
    assert model.components_on_path("a") == [
        "encoder[text]",
        "fusion[shared]",
        "fusion[text,classification]",
        "head[a]",
    ]
    assert set(model.components_for(["a", "b"])) == {
        "encoder[text]",
        "fusion[shared]",
        "fusion[text,classification]",
        "head[a]",
        "head[b]",
    }
    slice_ = set(model.components_for(["a", "r"]))
    assert "fusion[image+text,classification]" not in slice_ and "fusion[image,image_generation]" in slice_


def test_every_fusion_parameter_belongs_to_one_component(model: FoundationModel) -> None:
    owned = [id(p) for c in model.component_names() for p in model.parameters_of([c])]
    assert len(owned) == len(set(owned))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == set(owned)


def perturb(model: FoundationModel, component: str) -> None:
    with torch.no_grad():
        for p in model.parameters_of([component]):
            p.add_(torch.randn_like(p))


def test_a_task_runs_only_its_own_experts(model: FoundationModel) -> None:
    batch = inputs(model, ["good day", "awful food"])
    before = model("a", batch).detach()
    perturb(model, "fusion[image,image_generation]")
    perturb(model, "fusion[image+text,classification]")
    assert torch.allclose(model("a", batch), before)
    perturb(model, "fusion[text,classification]")
    assert not torch.allclose(model("a", batch), before)


def test_gradients_reach_only_the_path_and_the_slice_decides_what_trains(model: FoundationModel) -> None:
    slice_ = model.components_for(["a", "r"])
    model.set_trainable(slice_)
    perturb(model, "fusion[text,classification]")  # LoRA B starts at zero: make every path carry gradient
    model("a", inputs(model, ["good day"])).sum().backward()
    with_grad = {c for c in slice_ if any(p.grad is not None for p in model.parameters_of([c]))}
    assert with_grad == set(model.components_on_path("a"))
    # the fusion's adapter switch must not unfreeze experts outside the slice
    frozen = [c for c in model.component_names() if c not in slice_]
    assert not any(p.requires_grad for p in model.parameters_of(frozen))
    assert all(p.requires_grad for p in model.parameters_of(slice_))


def test_image_and_text_are_fused_and_padding_is_ignored(model: FoundationModel) -> None:
    perturb(model, "fusion[image+text,classification]")
    alone = model("v", inputs(model, ["good day"]))
    padded = model("v", inputs(model, ["good day", "awful food the movie a day"]))[:1]
    assert torch.allclose(alone, padded, atol=1e-5)
    other_text = model("v", inputs(model, ["hate"]))
    assert not torch.allclose(alone, other_text)


def test_a_federation_with_fusion_runs_from_the_cli(assets, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["tapl"])
    config = tiny_config(assets, tmp_path / "run")
    config["model"]["fusion"] = {
        "class_path": "tapl.models.Fusion",
        "init_args": {"name_or_path": str(assets["bert"]), "num_layers": 1, "lora": {"r": 2, "alpha": 4}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    sampled = record["sampled_clients"]
    assert record["bytes_up"] > 0 and len(record["train"]) == len(sampled)
    assert {"sentiment", "shapes"} == set(record["summary"]["global"])
