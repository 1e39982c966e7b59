"""FLAVA and ViLT backbones: encoders and fusion built from tiny random checkpoints of the real model classes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import VOCAB, save_tiny_tokenizer, tiny_config

from tapl.cli import main
from tapl.models import LoraSettings
from tapl.models.flava import FlavaFusion, FlavaImageEncoder, FlavaTextEncoder
from tapl.models.foundation import FoundationModel, masked_mean
from tapl.models.vilt import ViltFusion, ViltImageEncoder, ViltTextEncoder
from tapl.tasks import Task

LORA = LoraSettings(r=2, alpha=4, dropout=0.0)
IMAGE_SIZE = 8  # the data's grey 8x8 images; the towers take 3 x 16 x 16


@pytest.fixture(scope="module")
def flava_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import FlavaConfig, FlavaModel

    directory = tmp_path_factory.mktemp("tiny-flava")
    layer = {"num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 48}
    config = FlavaConfig(
        text_config={"vocab_size": len(VOCAB), "hidden_size": 32, "max_position_embeddings": 32, **layer},
        image_config={"hidden_size": 24, "image_size": 16, "patch_size": 8, "num_channels": 3, **layer},
        multimodal_config={"hidden_size": 32, **layer, "num_hidden_layers": 2},
        projection_dim=16,
    )
    torch.manual_seed(0)
    FlavaModel(config).save_pretrained(directory)
    save_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def vilt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import ViltConfig, ViltModel

    directory = tmp_path_factory.mktemp("tiny-vilt")
    config = ViltConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=16,
        image_size=16,
        patch_size=8,
        num_channels=3,
    )
    torch.manual_seed(0)
    ViltModel(config).save_pretrained(directory)
    save_tiny_tokenizer(directory)
    return directory


TASKS = [
    Task(name="a", type="classification", modalities=("text",), num_classes=2),
    Task(name="i", type="classification", modalities=("image",), num_classes=2),
    Task(name="v", type="classification", modalities=("image", "text"), num_classes=3),
]


def build(backbone: str, path: Path) -> FoundationModel:
    torch.manual_seed(0)
    name = str(path)
    if backbone == "flava":
        encoders = {
            "text": FlavaTextEncoder(name, max_length=12, layernorm=False, lora=LORA),
            "image": FlavaImageEncoder(name, image_size=IMAGE_SIZE, channels=1, layernorm=False, lora=LORA),
        }
        fusion = FlavaFusion(name, num_layers=1, lora=LORA)
    else:
        encoders = {
            "text": ViltTextEncoder(name, max_length=12, lora=LORA),
            "image": ViltImageEncoder(name, image_size=IMAGE_SIZE, channels=1, lora=LORA),
        }
        fusion = ViltFusion(name, num_layers=1, lora=LORA)
    return FoundationModel(encoders, TASKS, fusion=fusion).eval()


@pytest.fixture(params=["flava", "vilt"])
def model(request: pytest.FixtureRequest, flava_path: Path, vilt_path: Path) -> FoundationModel:
    return build(request.param, flava_path if request.param == "flava" else vilt_path)


def inputs(model: FoundationModel, texts: list[str]) -> dict:
    images = [torch.linspace(0, 1, IMAGE_SIZE * IMAGE_SIZE).roll(i).tolist() for i in range(len(texts))]
    return {"text": model.preprocessors["text"](texts), "image": model.preprocessors["image"](images)}


def perturb(model: FoundationModel, component: str) -> None:
    with torch.no_grad():
        for p in model.parameters_of([component]):
            p.add_(0.5 * torch.randn_like(p))


def test_flava_encoders_give_tower_tokens(flava_path: Path) -> None:
    text = FlavaTextEncoder(str(flava_path), max_length=12, lora=LORA)
    image = FlavaImageEncoder(str(flava_path), image_size=IMAGE_SIZE, channels=1, lora=LORA)
    tokens, mask = text(text.preprocessor(["good day", "the awful movie a day"]))
    assert tokens.shape == (2, mask.shape[1], 32) and mask.sum(1).tolist() == [4, 7]
    tokens, mask = image(image.preprocessor([[0.5] * IMAGE_SIZE**2]))
    assert tokens.shape == (1, 1 + 4, 24) and mask.tolist() == [[1] * 5]
    assert text.input_embeddings().weight.shape == (len(VOCAB), 32)
    trainable = {n for n, p in text.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_vilt_encoders_give_embedded_tokens(vilt_path: Path) -> None:
    text = ViltTextEncoder(str(vilt_path), max_length=12, lora=LORA)
    image = ViltImageEncoder(str(vilt_path), image_size=IMAGE_SIZE, channels=1, lora=LORA)
    tokens, mask = text(text.preprocessor(["good day", "the awful movie a day"]))
    assert tokens.shape == (2, mask.shape[1], 32) and mask.sum(1).tolist() == [4, 7]
    tokens, mask = image(image.preprocessor([[0.5] * IMAGE_SIZE**2]))
    assert tokens.shape == (1, 1 + 4, 32) and mask.tolist() == [[1] * 5]
    assert isinstance(text.input_embeddings(), torch.nn.Embedding)
    for encoder in (text, image):
        trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ValueError, match="max_length"):
        ViltTextEncoder(str(vilt_path), max_length=64)


def test_the_wrong_checkpoint_is_named(flava_path: Path, vilt_path: Path) -> None:
    with pytest.raises(ValueError, match="not a FlavaModel"):
        FlavaFusion(str(vilt_path))
    with pytest.raises(ValueError, match="not a ViltModel"):
        ViltTextEncoder(str(flava_path))


def test_components_are_those_of_the_bert_path(model: FoundationModel) -> None:
    assert model.components_on_path("a") == [
        "encoder[text]",
        "fusion[shared]",
        "fusion[text,classification]",
        "head[a]",
    ]
    assert model.components_on_path("v") == [
        "encoder[image]",
        "encoder[text]",
        "fusion[image+text,classification]",
        "fusion[shared]",
        "head[v]",
    ]
    owned = [id(p) for c in model.component_names() for p in model.parameters_of([c])]
    assert len(owned) == len(set(owned))
    assert {id(p) for p in model.parameters() if p.requires_grad} == set(owned)


def test_padding_is_ignored(model: FoundationModel) -> None:
    perturb(model, "fusion[image+text,classification]")
    perturb(model, "encoder[text]")
    alone = model("v", inputs(model, ["good day"]))
    padded = model("v", inputs(model, ["good day", "awful food the movie a day"]))[:1]
    assert alone.shape == (1, 3)
    assert torch.allclose(alone, padded, atol=1e-5)
    assert not torch.allclose(alone, model("v", inputs(model, ["hate"])))


def test_a_task_runs_only_its_own_experts(model: FoundationModel) -> None:
    batch = inputs(model, ["good day", "awful food"])
    before = model("a", batch).detach()
    perturb(model, "fusion[image,classification]")
    perturb(model, "fusion[image+text,classification]")
    perturb(model, "encoder[image]")
    assert torch.allclose(model("a", batch), before)
    perturb(model, "fusion[text,classification]")
    assert not torch.allclose(model("a", batch), before)


def test_a_training_step_changes_only_the_slice(model: FoundationModel) -> None:
    perturb(model, "fusion[image+text,classification]")  # LoRA B starts at zero: make every path carry gradient
    perturb(model, "fusion[shared]")
    slice_ = model.components_for(["v"])
    model.set_trainable(slice_)
    before = model.get_state()
    optimizer = torch.optim.SGD(model.parameters_of(slice_), lr=0.1)
    model.train()
    loss = torch.nn.functional.cross_entropy(model("v", inputs(model, ["good day", "bad"])), torch.tensor([0, 2]))
    loss.backward()
    optimizer.step()
    after = model.get_state()
    changed = {c for c in model.component_names() if any(not torch.equal(before[c][k], after[c][k]) for k in before[c])}
    assert changed == set(slice_)


@pytest.mark.parametrize("backbone", ["flava", "vilt"])
def test_a_federation_runs_from_the_cli(backbone, assets, flava_path, vilt_path, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["tapl"])
    path = str(flava_path if backbone == "flava" else vilt_path)
    prefix = f"tapl.models.{backbone}.{backbone.capitalize()}"
    lora = {"r": 2, "alpha": 4}
    config = tiny_config(assets, tmp_path / "run")
    config["model"] = {
        "encoders": {
            "text": {"class_path": f"{prefix}TextEncoder", "init_args": {"name_or_path": path, "max_length": 12}},
            "image": {
                "class_path": f"{prefix}ImageEncoder",
                "init_args": {"name_or_path": path, "image_size": 8, "channels": 1, "lora": lora},
            },
        },
        "fusion": {"class_path": f"{prefix}Fusion", "init_args": {"name_or_path": path, "num_layers": 1, "lora": lora}},
    }
    file = tmp_path / "config.yaml"
    file.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(file)])
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["bytes_up"] > 0 and {"sentiment", "shapes"} == set(record["summary"]["global"])


def fused(model: FoundationModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = {m: model.encoders[m](batch[m]) for m in ("image", "text")}
    return model.fusion(tokens, "image+text,classification")


@torch.no_grad()
def test_untrained_flava_path_reproduces_flava(flava_path: Path) -> None:
    from transformers import FlavaModel

    name = str(flava_path)
    encoders = {
        "text": FlavaTextEncoder(name, max_length=12, layernorm=False, lora=LORA),
        "image": FlavaImageEncoder(name, image_size=16, channels=3, layernorm=False, mean=(0,) * 3, std=(1,) * 3),
    }
    model = FoundationModel(encoders, TASKS, fusion=FlavaFusion(name, lora=LORA)).eval()
    batch = {
        "text": model.preprocessors["text"](["good day", "the awful movie a day"]),
        "image": {"pixel_values": torch.rand(2, 3, 16, 16)},
    }
    tokens, mask = fused(model, batch)
    reference = FlavaModel.from_pretrained(name).eval()(**batch["text"], **batch["image"]).multimodal_embeddings
    assert mask.shape == reference.shape[:2]
    assert torch.allclose(tokens, reference, atol=1e-5)


@torch.no_grad()
def test_untrained_vilt_path_reproduces_vilt(vilt_path: Path) -> None:
    from transformers import ViltModel

    name = str(vilt_path)
    encoders = {
        "text": ViltTextEncoder(name, max_length=12, lora=LORA),
        "image": ViltImageEncoder(name, image_size=16, channels=3, mean=(0,) * 3, std=(1,) * 3, lora=LORA),
    }
    model = FoundationModel(encoders, TASKS, fusion=ViltFusion(name, lora=LORA)).eval()
    text = model.preprocessors["text"](["good day", "the awful movie a day"])
    pixels = torch.rand(2, 3, 16, 16)
    tokens, mask = fused(model, {"text": text, "image": {"pixel_values": pixels}})
    out = ViltModel.from_pretrained(name).eval()(**text, pixel_values=pixels)
    # ViLT shuffles its image patches (with their positions); pooled features do not depend on token order.
    reference_mask = torch.cat([text["attention_mask"], torch.ones(2, 5, dtype=torch.long)], dim=1)
    assert torch.allclose(masked_mean(tokens, mask), masked_mean(out.last_hidden_state, reference_mask), atol=1e-5)
