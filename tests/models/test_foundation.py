"""Tests for tapl.models: the foundation model's components, strict state transfer, pooling and loading."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config

from tapl.algorithms import ClientContext, ClientUpdate, FedAvg
from tapl.cli import TaplCLI
from tapl.components import ComponentMismatchError, ComponentState, clone, num_bytes
from tapl.federation import FederatedOrchestrator
from tapl.models import FoundationModel, LoraSettings, PatchImageEncoder, TextEncoder, resolve_pretrained
from tapl.models.foundation import masked_mean
from tapl.tasks import Task

TEXT, IMAGE = "encoder[text]", "encoder[image]"
TASKS = [
    Task(name="sentiment", type="classification", modalities=("text",), num_classes=2, head_hidden=16),
    Task(name="shapes", type="classification", modalities=("image",), num_classes=2, head_hidden=16),
    Task(name="vqa", type="classification", modalities=("image", "text"), num_classes=3, head_hidden=16),
]


def _build_model(bert: Path) -> FoundationModel:
    lora = LoraSettings(r=2, alpha=4, dropout=0.0)
    encoders = {
        "text": TextEncoder(str(bert), max_length=16, lora=lora),
        "image": PatchImageEncoder(str(bert), image_size=8, patch_size=4, channels=1, lora=lora),
    }
    return FoundationModel(encoders, TASKS)


@pytest.fixture(scope="module")
def shared_model(assets: dict[str, Path]) -> FoundationModel:
    torch.manual_seed(0)
    return _build_model(assets["bert"])


@pytest.fixture
def model(shared_model: FoundationModel) -> Iterator[FoundationModel]:
    """The module's model in eval mode, with its trainable tensors and flags restored after each test."""
    state = shared_model.get_state()
    shared_model.eval()
    yield shared_model
    shared_model.load_state(state)
    shared_model.set_trainable(shared_model.component_names())


def _random_like(state: ComponentState, seed: int) -> ComponentState:
    generator = torch.Generator().manual_seed(seed)
    return {c: {k: torch.randn(t.shape, generator=generator) for k, t in p.items()} for c, p in state.items()}


def _assert_states_equal(a: ComponentState, b: ComponentState) -> None:
    assert a.keys() == b.keys()
    for component in a:
        assert a[component].keys() == b[component].keys()
        for key in a[component]:
            assert torch.equal(a[component][key], b[component][key]), f"{component}/{key} differs"


# -- components from the architecture -------------------------------------------------------------------------


def test_paths_and_slices_come_from_the_architecture(model: FoundationModel) -> None:
    # Asked before any forward pass: the answer cannot come from one.
    assert model.component_names() == sorted([TEXT, IMAGE, "head[sentiment]", "head[shapes]", "head[vqa]"])
    assert model.components_on_path("sentiment") == sorted([TEXT, "head[sentiment]"])
    assert model.components_on_path("shapes") == sorted([IMAGE, "head[shapes]"])
    assert model.components_on_path("vqa") == sorted([IMAGE, TEXT, "head[vqa]"])
    two_tasks = model.components_for(["sentiment", "shapes"])
    assert two_tasks == sorted({*model.components_on_path("sentiment"), *model.components_on_path("shapes")})
    assert "head[vqa]" not in two_tasks
    assert model.components_for(["sentiment"]) == model.components_on_path("sentiment")


def test_paths_do_not_depend_on_the_last_forward_pass(model: FoundationModel) -> None:
    before = {t.name: model.components_on_path(t.name) for t in TASKS}
    with torch.no_grad():
        model("shapes", {"image": model.preprocessors["image"]([[0.5] * 64])})
    assert {t.name: model.components_on_path(t.name) for t in TASKS} == before


def test_unknown_task_is_rejected(model: FoundationModel) -> None:
    with pytest.raises(KeyError, match="ghost"):
        model.components_on_path("ghost")


def test_every_trainable_parameter_belongs_to_exactly_one_component(model: FoundationModel) -> None:
    owners: dict[int, list[str]] = {}
    for component in model.component_names():
        for parameter in model.parameters_of([component]):
            owners.setdefault(id(parameter), []).append(component)
    assert all(len(names) == 1 for names in owners.values()), "a parameter is in two components"
    named = dict(model.named_parameters())
    trainable = {id(p) for p in named.values() if p.requires_grad}
    assert set(owners) == trainable
    frozen = {name for name, p in named.items() if id(p) not in owners}
    assert frozen, "the pretrained backbone is part of the model"
    assert all(".backbone." in name and "lora_" not in name for name in frozen)
    assert not any(named[name].requires_grad for name in frozen)
    assert any("patch_embedding" in n for n in {name for name, p in named.items() if id(p) in owners})
    assert model.num_trainable_bytes() == sum(p.numel() * p.element_size() for p in named.values() if p.requires_grad)


# -- state transfer --------------------------------------------------------------------------------------------


def test_get_state_load_state_round_trip(model: FoundationModel) -> None:
    original = model.get_state()
    other = _random_like(original, seed=1)
    model.load_state(other)
    _assert_states_equal(model.get_state(), other)
    model.load_state(original)
    _assert_states_equal(model.get_state(), original)


def test_get_state_is_a_copy(model: FoundationModel) -> None:
    head = "head[sentiment]"
    state = model.get_state([head])
    assert list(state) == [head]
    assert not any(t.requires_grad for t in state[head].values())
    for tensor in state[head].values():
        tensor.add_(1.0)
    assert not torch.equal(model.get_state([head])[head]["0.weight"], state[head]["0.weight"])


def test_load_state_of_a_slice_leaves_other_components_alone(model: FoundationModel) -> None:
    before = model.get_state()
    update = _random_like(model.get_state(["head[shapes]"]), seed=2)
    model.load_state(update)
    after = model.get_state()
    _assert_states_equal({"head[shapes]": after["head[shapes]"]}, update)
    others = [c for c in before if c != "head[shapes]"]
    _assert_states_equal({c: after[c] for c in others}, {c: before[c] for c in others})


def _missing_tensor(state: ComponentState) -> tuple[ComponentState, str]:
    key = next(iter(state[TEXT]))
    del state[TEXT][key]
    return state, key


def _extra_tensor(state: ComponentState) -> tuple[ComponentState, str]:
    state["head[sentiment]"]["stray.weight"] = torch.zeros(2)
    return state, "stray.weight"


def _unknown_component(state: ComponentState) -> tuple[ComponentState, str]:
    state["head[ghost]"] = {"0.weight": torch.zeros(2)}
    return state, "head[ghost]"


def _wrong_shape(state: ComponentState) -> tuple[ComponentState, str]:
    state["head[shapes]"]["3.weight"] = torch.zeros(5, 16)
    return state, "3.weight"


@pytest.mark.parametrize("corrupt", [_missing_tensor, _extra_tensor, _unknown_component, _wrong_shape])
def test_load_state_rejects_a_mismatch_and_changes_nothing(model: FoundationModel, corrupt) -> None:
    before = model.get_state()
    # Valid new values everywhere else, so a partial load before the check would show.
    state, key = corrupt(_random_like(before, seed=3))
    with pytest.raises(ComponentMismatchError, match=key.replace("[", r"\[").replace("]", r"\]")):
        model.load_state(state, "client 7 state")
    _assert_states_equal(model.get_state(), before)


def test_set_trainable_freezes_everything_else(model: FoundationModel) -> None:
    model.set_trainable(["head[shapes]", TEXT])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.parameters_of(["head[shapes]", TEXT])}
    model.set_trainable([IMAGE])
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.parameters_of([IMAGE])}
    with pytest.raises(KeyError, match="ghost"):
        model.set_trainable(["encoder[ghost]"])


# -- pooling ---------------------------------------------------------------------------------------------------


def test_masked_mean_ignores_padding() -> None:
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [-7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    expected = torch.tensor([[2.0, 3.0], [7.0 / 3.0, 8.0]])
    torch.testing.assert_close(masked_mean(tokens, mask), expected)
    # A sample of padding only pools to zeros, not NaN.
    torch.testing.assert_close(masked_mean(tokens[:1], torch.zeros(1, 3)), torch.zeros(1, 2))


def test_text_padding_does_not_change_the_output(model: FoundationModel) -> None:
    model.load_state(_random_like(model.get_state([TEXT]), seed=4))  # non-zero LoRA updates too
    preprocess = model.preprocessors["text"]
    short, long = "good day", "the movie a great day food fine"
    alone = preprocess([short])
    batched = preprocess([short, long])  # the tokenizer pads the short text to the long one
    length = alone["input_ids"].shape[1]
    assert batched["input_ids"].shape[1] > length
    assert torch.equal(batched["attention_mask"][0, length:], torch.zeros_like(batched["attention_mask"][0, length:]))
    extra = 5
    padded = {
        "input_ids": torch.cat([alone["input_ids"], torch.zeros(1, extra, dtype=torch.long)], dim=1),  # [PAD] is 0
        "attention_mask": torch.cat([alone["attention_mask"], torch.zeros(1, extra, dtype=torch.long)], dim=1),
    }
    with torch.no_grad():
        reference = model("sentiment", {"text": alone})
        torch.testing.assert_close(model("sentiment", {"text": padded}), reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model("sentiment", {"text": batched})[:1], reference, rtol=1e-5, atol=1e-5)
        # The padded positions do carry features, so pooling them would have changed the output.
        tokens, mask = model.encoders["text"](padded)
        assert not torch.allclose(tokens.mean(1), masked_mean(tokens, mask), atol=1e-3)


# -- loading ---------------------------------------------------------------------------------------------------


def test_resolve_pretrained_finds_model_files_in_an_installed_package(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site" / "tapl_test_model_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copytree(assets["bert"], package / "tiny")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_pretrained("package:tapl_test_model_pkg/tiny") == str(package / "tiny")
    assert resolve_pretrained("package:tapl_test_model_pkg") == str(package / "")
    encoder = TextEncoder("package:tapl_test_model_pkg/tiny", max_length=16, lora=LoraSettings(r=2))
    assert encoder.hidden_size == 32
    with pytest.raises(ValueError, match="max_length 128 exceeds the text model's 64 positions"):
        TextEncoder("package:tapl_test_model_pkg/tiny", lora=LoraSettings(r=2))
    assert resolve_pretrained(str(assets["bert"])) == str(assets["bert"])
    assert resolve_pretrained("bert-base-uncased") == "bert-base-uncased"


def test_resolve_pretrained_reports_a_missing_package_or_directory() -> None:
    with pytest.raises(FileNotFoundError, match=r"'tapl_no_such_package_xyz' is not installed"):
        resolve_pretrained("package:tapl_no_such_package_xyz/model")
    with pytest.raises(FileNotFoundError, match="no directory"):
        resolve_pretrained("package:tapl/no_such_model_dir")


# -- the shared backbone in a federation -----------------------------------------------------------------------


class _RecordingFedAvg(FedAvg):
    """FedAvg that keeps what every visit received and uploaded."""

    def __init__(self) -> None:
        super().__init__()
        self.received: dict[int, ComponentState] = {}
        self.uploads: list[ClientUpdate] = []

    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        self.received[ctx.client.id] = clone(ctx.received)
        update = super().client_update(ctx)
        self.uploads.append(update)
        return update


def test_frozen_backbone_is_shared_across_client_visits(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["tapl"])
    config = tiny_config(assets, tmp_path / "run", rounds=1, clients_per_round=4)
    built = TaplCLI(args=config, run=False).orchestrator
    assert built is not None
    algorithm = _RecordingFedAvg()
    orchestrator = FederatedOrchestrator(
        built.model, built.data, algorithm, built.config, str(tmp_path / "run"), trainer=config["trainer"]
    )
    model = orchestrator.model
    trainable = {id(p) for c in model.component_names() for p in model.parameters_of([c])}
    frozen = {name: p for name, p in model.named_parameters() if id(p) not in trainable}
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    frozen_values = {name: p.detach().clone() for name, p in frozen.items()}
    trainable_names = {c: set(model.get_state([c])[c]) for c in model.component_names()}

    orchestrator.fit()

    assert sorted(algorithm.received) == [0, 1, 2, 3]
    # One model serves every visit: no parameter was added, reallocated or copied for a client.
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
    for name, parameter in frozen.items():
        assert torch.equal(parameter.detach(), frozen_values[name]), f"frozen {name} changed"
    for update in algorithm.uploads:
        slice_ = list(orchestrator.info.clients[update.client].components)
        assert sorted(update.state) == slice_
        for component, tensors in update.state.items():
            assert set(tensors) == trainable_names[component], "only the component's trainable tensors travel"
        assert num_bytes(update.state) == model.num_trainable_bytes(slice_)
        assert num_bytes(algorithm.received[update.client]) == model.num_trainable_bytes(slice_)
    backbone_bytes = sum(p.numel() * p.element_size() for p in frozen.values())
    assert model.num_trainable_bytes() < backbone_bytes


def test_rgb_pil_images_keep_their_channels_apart() -> None:
    from PIL import Image

    from tapl.models.encoders import ImagePreprocessor

    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    pixels[..., 0] = 255  # pure red
    tensor = ImagePreprocessor(image_size=4, channels=3)([Image.fromarray(pixels)])["pixel_values"]
    assert tensor.shape == (1, 3, 4, 4)
    assert torch.all(tensor[0, 0] == 1) and torch.all(tensor[0, 1:] == 0)
