"""The paper's FLAVA and ViLT configs: they parse, their data paths run on local stand-ins, their models build."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from models.test_flava_vilt import LORA, flava_path, vilt_path  # noqa: F401  (fixtures)

from tapl.algorithms.tap import REFERENCE_DISTILL_LOSSES
from tapl.cli import main
from tapl.datamodules import ClientGroup, FederatedDataModule, Grouped, TaskData
from tapl.models.flava import FlavaFusion, FlavaImageEncoder, FlavaTextEncoder
from tapl.models.foundation import FoundationModel
from tapl.models.vilt import ViltFusion, ViltImageEncoder, ViltTextEncoder

CONFIGS = {b: Path(__file__).parents[1] / "experiments" / f"paper_{b}.yaml" for b in ("flava", "vilt")}
ROWS = 90


def load(backbone: str) -> dict:
    return yaml.safe_load(CONFIGS[backbone].read_text())


@pytest.mark.parametrize("backbone", sorted(CONFIGS))
def test_the_config_parses_with_30_clients_in_3_groups(
    backbone: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["tapl"])
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(CONFIGS[backbone]), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    clients = printed["data"]["clients"]
    assert sum(c["count"] for c in clients) == 30
    groups = [c["group"] for c in clients for _ in range(c["count"])]
    assert sorted(set(groups)) == [0, 1, 2] and all(groups.count(g) == 10 for g in range(3))
    # The same 10 patterns in each group.
    patterns = [[c["tasks"] for c in clients if c["group"] == g] for g in range(3)]
    assert patterns[0] == patterns[1] == patterns[2]
    assert printed["data"]["partitioner"]["class_path"].endswith("Grouped")
    assert printed["data"]["partitioner"]["init_args"]["num_groups"] == 3
    trainer = printed["trainer"]
    assert trainer["precision"] == "bf16-mixed" and trainer["gradient_clip_val"] == 1.0
    assert trainer["accumulate_grad_batches"] == 4 and printed["data"]["batch_size"] == 32
    assert printed["optimizer"]["init_args"]["lr"] == {"flava": 3e-4, "vilt": 4e-4}[backbone]
    assert printed["federation"]["local_steps"] == {"flava": 20, "vilt": 30}[backbone]
    assert printed["federation"]["rounds"] == 200 and printed["federation"]["clients_per_round"] == 2
    assert printed["federation"]["finetune_steps"] == 50 and printed["federation"]["finetune_lr"] == 1e-4
    # TAP with the paper's margins of the backbone: (image classification, text generation) / (image
    # generation, text classification).
    algorithm = printed["algorithm"]
    assert algorithm["class_path"] == "tapl.algorithms.TAP"
    high, low = {"flava": (0.01, 0.005), "vilt": (0.02, 0.01)}[backbone]
    margins = algorithm["init_args"]["margins"]
    assert (margins["image,classification"], margins["text_generation"]) == (high, high)
    assert (margins["image_generation"], margins["text,classification"]) == (low, low)
    assert algorithm["init_args"]["distill_weights"] == {"text,classification": 1.0, "default": 2e-3}
    # The reference code's distillation losses (a width-axis KL for images, a per-sequence sum for text).
    assert algorithm["init_args"]["distill_losses"] == REFERENCE_DISTILL_LOSSES


def _image(rng: np.random.Generator, mode: str) -> object:
    from PIL import Image

    shape = (8, 8) if mode == "L" else (8, 8, 3)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode)


def stand_in(dataset: str, rng: np.random.Generator) -> tuple[dict[str, list], dict[str, object]]:
    """Columns (same names as the hub dataset's) and the image columns' features."""
    from datasets import Image

    labels = [i % 4 for i in range(ROWS)]
    words = [f"w{i}" for i in range(ROWS)]
    rgb = [_image(rng, "RGB") for _ in range(ROWS)]
    if dataset == "zh-plus/tiny-imagenet":
        return {"image": rgb, "label": labels}, {"image": Image()}
    if dataset == "fancyzhx/ag_news":
        return {"text": words, "label": labels}, {}
    if dataset == "ilee0022/Caltech-256":
        return {"image": rgb, "label": labels, "text": words}, {"image": Image()}
    if dataset == "merve/vqav2-small":
        return {"multiple_choice_answer": words, "question": words, "image": rgb}, {"image": Image()}
    if dataset == "cais/mmlu":
        choices = [[f"{w}{k}" for k in "abcd"] for w in words]
        return {"question": words, "subject": ["law"] * ROWS, "choices": choices, "answer": labels}, {}
    if dataset == "uoft-cs/cifar100":
        return {"img": rgb, "fine_label": labels, "coarse_label": labels}, {"img": Image()}
    if dataset == "allenai/common_gen":
        return {"concept_set_idx": list(range(ROWS)), "concepts": [["dog", w] for w in words], "target": words}, {}
    if dataset == "zalando-datasets/fashion_mnist":
        return {"image": [_image(rng, "L") for _ in range(ROWS)], "label": labels}, {"image": Image()}
    raise AssertionError(f"no stand-in for {dataset!r}: add one with the hub dataset's columns")


def write_stand_in(dataset: str, directory: Path) -> Path:
    from datasets import Dataset, Features, Value, features

    path = directory / (dataset.replace("/", "__") + ".parquet")
    if not path.exists():
        columns, images = stand_in(dataset, np.random.default_rng(0))
        inferred = Dataset.from_dict({k: v for k, v in columns.items() if k not in images}).features
        feats = Features({k: images.get(k) or inferred[k] for k in columns})
        assert all(isinstance(f, (Value, features.Sequence, list, features.Image)) for f in feats.values())
        Dataset.from_dict(columns, features=feats).to_parquet(str(path))
    return path


@pytest.mark.parametrize("backbone", sorted(CONFIGS))
def test_the_data_paths_run_on_local_stand_ins(backbone: str, tmp_path: Path) -> None:
    section = load(backbone)["data"]
    tasks = []
    for spec in section["tasks"]:
        local = {**spec, "dataset": "parquet", "data_files": str(write_stand_in(spec["dataset"], tmp_path))}
        tasks.append(TaskData(**{**local, "split": "train"}))
    assert section["partitioner"]["init_args"] == {"num_groups": 3}
    data = FederatedDataModule(
        tasks, [ClientGroup(**c) for c in section["clients"]], partitioner=Grouped(num_groups=3), seed=0
    )
    data.setup()
    assert data.num_clients == 30
    for client in data.clients:
        for split in ("train", "test"):
            dataset = data.dataset(client.id, split)
            assert {p.name for p, rows in dataset.parts if len(rows)} == set(client.tasks), (client, split)
        sample = data.dataset(client.id, "train")[0]
        assert all(v is not None for v in sample["inputs"].values())
    # Templates render: MMLU's lettered choices and answer text, CommonGen's joined concepts.
    rendered = {s["task"]: s for c in data.clients for s in [data.dataset(c.id, "train")[0]]}
    assert " A) " in rendered["mmlu_law"]["inputs"]["text"]
    # MMLU's target is the text of the right choice: choices[answer] (stand-in answer = row % 4).
    question = rendered["mmlu_law"]["inputs"]["text"].split(" ")[0]
    assert rendered["mmlu_law"]["target"] == question + "abcd"[int(question[1:]) % 4]
    assert rendered["common_gen"]["inputs"]["text"].startswith("Write a sentence with: dog, w")


def build(backbone: str, path: Path, config: dict) -> FoundationModel:
    torch.manual_seed(0)
    name = str(path)
    encoders = config["model"]["encoders"]
    text_class = encoders["text"]["class_path"].rsplit(".", 1)[1]
    image_class = encoders["image"]["class_path"].rsplit(".", 1)[1]
    fusion_class = config["model"]["fusion"]["class_path"].rsplit(".", 1)[1]
    classes = {
        c.__name__: c
        for c in (FlavaTextEncoder, FlavaImageEncoder, FlavaFusion, ViltTextEncoder, ViltImageEncoder, ViltFusion)
    }
    extra = {"layernorm": False} if backbone == "flava" else {}
    assert encoders["text"]["init_args"].get("layernorm", False) is False
    tasks = [TaskData(**t).to_task() for t in config["data"]["tasks"]]
    return FoundationModel(
        {
            "text": classes[text_class](name, max_length=12, lora=LORA, **extra),
            "image": classes[image_class](name, image_size=8, channels=3, lora=LORA, **extra),
        },
        tasks,
        fusion=classes[fusion_class](name, num_layers=1, lora=LORA),
    )


@pytest.mark.parametrize("backbone", sorted(CONFIGS))
def test_the_models_build_and_pattern_7_holds_its_pairs_experts(
    backbone: str,
    flava_path: Path,  # noqa: F811
    vilt_path: Path,  # noqa: F811
) -> None:
    config = load(backbone)
    model = build(backbone, flava_path if backbone == "flava" else vilt_path, config)
    tasks = {t["name"]: t for t in config["data"]["tasks"]}
    pattern_7 = [c for c in config["data"]["clients"] if c["tasks"] == config["data"]["clients"][7]["tasks"]]
    assert len(pattern_7) == 3 and {c["group"] for c in pattern_7} == {0, 1, 2}
    held = pattern_7[0]["tasks"]
    expected_pairs = {"+".join(sorted(tasks[t]["inputs"])) + "," + tasks[t].get("type", "classification") for t in held}
    assert expected_pairs == (
        {"image,classification", "text,classification"}
        if backbone == "flava"
        else {"image,image_generation", "text,classification"}
    )
    slice_ = model.components_for(held)
    experts = {c[len("fusion[") : -1] for c in slice_ if c.startswith("fusion[")}
    assert experts == {"shared"} | expected_pairs
    modalities = {m for t in held for m in tasks[t]["inputs"]}
    assert {c for c in slice_ if c.startswith("encoder[")} == {f"encoder[{m}]" for m in modalities}
    assert {c for c in slice_ if c.startswith("head[")} == {f"head[{t}]" for t in held}
