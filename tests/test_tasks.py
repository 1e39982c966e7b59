"""Task types: heads, losses, metrics and target collation, checked by hand; all three in one federation."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import tiny_config

from tapl.cli import main
from tapl.models import LoraSettings, PatchImageEncoder, TextEncoder
from tapl.models.foundation import FoundationModel
from tapl.tasks import HeadContext, Task, TaskType, token_f1

IGNORE = -100


@pytest.fixture(scope="module")
def model(assets: dict[str, Path]) -> FoundationModel:
    lora = LoraSettings(r=2, alpha=4, dropout=0.0)
    encoders = {
        "text": TextEncoder(str(assets["bert"]), max_length=16, lora=lora),
        "image": PatchImageEncoder(str(assets["bert"]), image_size=8, patch_size=4, channels=1, lora=lora),
    }
    tasks = [
        Task(name="recon", type="image_generation", modalities=("image",), head_hidden=16),
        Task(name="answer", type="text_generation", modalities=("text",), target_length=4),
        Task(name="vqa", type="classification", modalities=("image", "text"), num_classes=3),
    ]
    return FoundationModel(encoders, tasks).eval()


def test_every_registered_type_is_found_by_name() -> None:
    assert {"classification", "image_generation", "text_generation"} <= set(TaskType.registry)
    with pytest.raises(ValueError, match="Unknown task type 'nope'"):
        Task(name="x", type="nope", modalities=("text",))


def test_image_generation_reconstructs_pixels_scored_by_mse(model: FoundationModel) -> None:
    task = model.tasks["recon"]
    images = [torch.rand(64).tolist() for _ in range(3)]
    targets = task.task_type.collate_targets(images, task, model.head_context)
    assert targets.shape == (3, 1, 8, 8)
    assert torch.allclose(targets.flatten(1), torch.tensor(images))
    outputs = model("recon", {"image": model.preprocessors["image"](images)})
    assert outputs.shape == targets.shape and outputs.min() >= 0 and outputs.max() <= 1
    assert torch.isclose(task.task_type.loss(outputs, targets), ((outputs - targets) ** 2).mean())
    metrics = task.task_type.metrics(task)
    task.task_type.update_metrics(metrics, outputs[:1], targets[:1], model.head_context)
    task.task_type.update_metrics(metrics, outputs[1:], targets[1:], model.head_context)
    assert torch.isclose(metrics.compute()["mse"], ((outputs - targets) ** 2).mean())
    with pytest.raises(ValueError, match="needs an image input"):
        Task(name="r", type="image_generation", modalities=("text",))


def test_text_generation_targets_ignore_padding(model: FoundationModel) -> None:
    task = model.tasks["answer"]
    targets = task.task_type.collate_targets(["good day", "bad movie food the a"], task, model.head_context)
    tokenizer = model.preprocessors["text"].tokenizer
    assert targets.shape == (2, 4)
    assert targets[0, :3].tolist() == tokenizer.convert_tokens_to_ids(["good", "day", "[SEP]"])
    assert targets[0, 3:].tolist() == [IGNORE]
    # cut to target_length - 1 words, then the end token
    assert targets[1].tolist() == tokenizer.convert_tokens_to_ids(["bad", "movie", "food", "[SEP]"])


def test_text_generation_loss_and_metrics_by_hand(model: FoundationModel) -> None:
    task = model.tasks["answer"]
    kind = task.task_type
    batches = [["good day", "awful"], ["hate the movie a"]]
    metrics = kind.metrics(task)
    nll, tokens, correct = 0.0, 0, 0
    for texts in batches:
        targets = kind.collate_targets(texts, task, model.head_context)
        outputs = model("answer", {"text": model.preprocessors["text"](texts)})
        real = targets != IGNORE
        log_probs = F.log_softmax(outputs.float(), -1)
        token_nll = -log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)[real]
        assert torch.isclose(kind.loss(outputs, targets), token_nll.mean(), atol=1e-6)
        nll += float(token_nll.detach().sum())
        tokens += int(real.sum())
        correct += int((outputs.argmax(-1) == targets)[real].sum())
        kind.update_metrics(metrics, outputs, targets, model.head_context)
    values = metrics.compute()
    assert math.isclose(float(values["perplexity"]), math.exp(nll / tokens), rel_tol=1e-4)
    assert math.isclose(float(values["token_accuracy"]), correct / tokens, rel_tol=1e-6)
    decoded = kind.decode(outputs, model.head_context)
    assert len(decoded) == 1 and isinstance(decoded[0], str)
    shown = kind.examples(outputs, targets, model.head_context)
    assert shown == [{"prediction": decoded[0], "target": "hate the movie"}]


def test_token_f1_counts_overlap_with_multiplicity() -> None:
    # common tokens: 2 twice -> 2; precision 2/4, recall 2/3
    assert token_f1([1, 2, 2, 3], [2, 2, 4]) == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert token_f1([5, 6], [6, 5]) == 1.0
    assert token_f1([], []) == 1.0 and token_f1([1], []) == 0.0 and token_f1([1], [2]) == 0.0


def test_text_generation_scores_generated_text_by_token_f1_and_rouge_l(model: FoundationModel) -> None:
    task = model.tasks["answer"]
    kind = task.task_type
    tokenizer = model.preprocessors["text"].tokenizer
    targets = kind.collate_targets(["good day", "awful"], task, model.head_context)
    ids = [
        tokenizer.convert_tokens_to_ids(t) for t in (["day", "good", "[SEP]", "fine"], ["awful", "awful", "[SEP]", "a"])
    ]
    outputs = torch.zeros(2, 4, len(tokenizer))
    for row, tokens in enumerate(ids):
        outputs[row, torch.arange(4), torch.tensor(tokens)] = 10.0
    metrics = kind.metrics(task)
    kind.update_metrics(metrics, outputs, targets, model.head_context)
    values = metrics.compute()
    # Sample 1: generated "day good" vs "good day": bags equal (F1 1.0); longest common subsequence 1 of 2 (0.5).
    # Sample 2: generated "awful awful" vs "awful": F1 and ROUGE-L both 2 * 0.5 * 1 / 1.5.
    assert float(values["token_f1"]) == pytest.approx((1.0 + 2 / 3) / 2, rel=1e-5)
    assert float(values["rouge_l"]) == pytest.approx((0.5 + 2 / 3) / 2, rel=1e-5)
    assert kind.higher_is_better["token_f1"] and kind.higher_is_better["rouge_l"]


def test_text_decoder_is_tied_to_the_frozen_embeddings(model: FoundationModel) -> None:
    head_params = dict(model.heads["answer"].named_parameters())
    vocab = model.encoders["text"].input_embeddings().weight
    assert all(p.shape[0] != vocab.shape[0] for p in head_params.values())
    assert not vocab.requires_grad
    assert model.components_on_path("answer") == ["encoder[text]", "head[answer]"]


def test_text_generation_needs_a_text_encoder() -> None:
    task = Task(name="a", type="text_generation", modalities=("image",))
    with pytest.raises(ValueError, match=r"configure model\.encoders\.text"):
        task.task_type.build_head(8, task, HeadContext({}))


def test_image_and_text_task_pools_both_modalities(model: FoundationModel) -> None:
    assert model.components_on_path("vqa") == ["encoder[image]", "encoder[text]", "head[vqa]"]
    inputs = {
        "image": model.preprocessors["image"]([torch.rand(64).tolist()]),
        "text": model.preprocessors["text"](["good day"]),
    }
    other_text = dict(inputs, text=model.preprocessors["text"](["awful food"]))
    assert not torch.allclose(model("vqa", inputs), model("vqa", other_text))


def test_a_federation_trains_all_three_task_types(assets, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["tapl"])
    config = tiny_config(assets, tmp_path / "run")
    config["data"]["tasks"] += [
        {
            "name": "recon",
            "type": "image_generation",
            "inputs": {"image": "pixels"},
            "target": "pixels",
            "dataset": "parquet",
            "data_files": str(assets["image"]),
            "head_hidden": 16,
        },
        {
            "name": "answer",
            "type": "text_generation",
            "inputs": {"text": "sentence"},
            "target": "answer",
            "target_length": 4,
            "dataset": "parquet",
            "data_files": str(assets["text"]),
            "bertscore_model": str(assets["bert"]),
        },
    ]
    config["data"]["clients"] = [{"tasks": ["sentiment", "recon"], "count": 2}, {"tasks": ["shapes", "answer"]}]
    config["federation"]["clients_per_round"] = 3
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = records[-1]["summary"]["global"]
    assert {"mse", "loss"} <= set(summary["recon"])
    assert {"perplexity", "token_accuracy", "bertscore_f1"} <= set(summary["answer"])
    assert all(math.isfinite(v) for task in summary.values() for v in task.values())
    assert set(records[-1]["train"]["2"]) == {"train_loss/shapes", "train_loss/answer"}
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    shown = results["examples"]["global"]["2"]["answer"]
    assert 1 <= len(shown) <= 3 and all(isinstance(e["prediction"], str) for e in shown)
    assert "recon" not in results["examples"]["global"].get("0", {})
    table = (tmp_path / "run" / "results.md").read_text()
    assert "## Examples" in table
    assert "perplexity" in table and "mse" in table and "Lower is better: loss, mse, perplexity" in table
