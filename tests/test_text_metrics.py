"""Optional text-generation metrics: BERTScore F1 and METEOR by hand, and clear errors when unavailable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_text_image_model
from transformers import AutoModel, AutoTokenizer

from tapl import text_metrics
from tapl.tasks import Task
from tapl.text_metrics import bertscore_f1, meteor


def bertscore_by_hand(predicted: str, target: str, model_dir: Path) -> float:
    """Greedy cosine matching of the last layer's token embeddings, [CLS] and [SEP] left out."""
    model, tokenizer = AutoModel.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)

    def embed(text: str) -> torch.Tensor:
        with torch.no_grad():
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0, 1:-1]
        return hidden / hidden.norm(dim=-1, keepdim=True)

    similarity = embed(predicted) @ embed(target).T
    precision, recall = similarity.max(1).values.mean(), similarity.max(0).values.mean()
    return float(2 * precision * recall / (precision + recall))


def test_bertscore_f1_matches_greedy_cosine_matching(assets: dict[str, Path]) -> None:
    predicted, targets = ["good day", "awful movie", "", ""], ["good day today", "bad food", "good", ""]
    scores = bertscore_f1(predicted, targets, str(assets["bert"]))
    assert scores[0] == pytest.approx(bertscore_by_hand(predicted[0], targets[0], assets["bert"]), abs=1e-5)
    assert scores[1] == pytest.approx(bertscore_by_hand(predicted[1], targets[1], assets["bert"]), abs=1e-5)
    assert scores[2:].tolist() == [0.0, 1.0]  # nothing generated; nothing generated and nothing wanted
    assert bertscore_f1(["good day"], ["good day"], str(assets["bert"])).item() == pytest.approx(1.0, abs=1e-5)


def test_a_bertscore_model_that_cannot_load_fails_when_the_task_is_declared(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Task 'caption': BERTScore's model .* cannot be loaded .*package:"):
        Task(name="caption", type="text_generation", modalities=("image",), bertscore_model=str(tmp_path / "none"))


class Synonyms:
    """A WordNet stand-in: ``synsets(word)`` gives one synset whose lemmas are the word's listed synonyms."""

    def __init__(self, groups: list[set[str]]) -> None:
        self.groups = groups

    def synsets(self, word: str) -> list[Synonyms.Synset]:
        return [self.Synset(group) for group in self.groups if word in group]

    class Synset:
        def __init__(self, names: set[str]) -> None:
            self.names = names

        def lemmas(self) -> list[Synonyms.Lemma]:
            return [Synonyms.Lemma(name) for name in sorted(self.names)]

    class Lemma:
        def __init__(self, name: str) -> None:
            self._name = name

        def name(self) -> str:
            return self._name


def meteor_by_hand(matches: int, hypothesis: int, reference: int, chunks: int) -> float:
    """METEOR with NLTK's defaults: alpha 0.9, beta 3, gamma 0.5."""
    precision, recall = matches / hypothesis, matches / reference
    fmean = precision * recall / (0.9 * precision + 0.1 * recall)
    return fmean * (1 - 0.5 * (chunks / matches) ** 3)


def test_meteor_matches_exact_words_stems_and_synonyms_in_order() -> None:
    none = Synonyms([])
    # "the cat sat" vs itself: 3 matches in one chunk.
    assert meteor(["The cat sat"], ["the cat sat"], none).item() == pytest.approx(meteor_by_hand(3, 3, 3, 1))
    # "cats" matches "cat" by its stem; "sat" exactly; the order keeps one chunk.
    assert meteor(["cats sat"], ["cat sat down"], none).item() == pytest.approx(meteor_by_hand(2, 2, 3, 1))
    # "big car" vs "car huge": without synonyms only "car" matches; with big ~ huge both do, in two chunks.
    assert meteor(["big car"], ["car huge"], none).item() == pytest.approx(meteor_by_hand(1, 2, 2, 1))
    both = meteor(["big car"], ["car huge"], Synonyms([{"big", "huge"}])).item()
    assert both == pytest.approx(meteor_by_hand(2, 2, 2, 2))
    assert meteor(["", "word"], ["", ""], none).tolist() == [1.0, 0.0]


def test_meteor_without_wordnet_data_fails_when_the_task_is_declared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nltk = pytest.importorskip("nltk", reason="METEOR's error without WordNet needs nltk (the test extra has it)")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    text_metrics.wordnet.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"Task 'caption': METEOR needs NLTK's WordNet data.*nltk\.downloader"):
            Task(name="caption", type="text_generation", modalities=("image",), meteor=True)
    finally:
        text_metrics.wordnet.cache_clear()
    with pytest.raises(ValueError, match="they need type text_generation, not 'classification'"):
        Task(name="digits", type="classification", modalities=("image",), num_classes=2, meteor=True)


def test_text_generation_reports_the_optional_metrics_on_decoded_text(
    assets: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    synonyms = Synonyms([{"good", "fine"}])
    monkeypatch.setattr(text_metrics, "wordnet", lambda: synonyms)
    monkeypatch.setattr("tapl.tasks.wordnet", lambda: synonyms)
    task = Task(
        name="answer",
        type="text_generation",
        modalities=("text",),
        target_length=4,
        bertscore_model=str(assets["bert"]),
        meteor=True,
    )
    model = make_text_image_model(assets["bert"], [task]).eval()
    kind, tokenizer = task.task_type, model.preprocessors["text"].tokenizer
    targets = kind.collate_targets(["good day", "awful"], task, model.head_context)
    outputs = torch.zeros(2, 4, len(tokenizer))
    for row, tokens in enumerate((["fine", "day", "[SEP]", "a"], ["awful", "movie", "[SEP]", "a"])):
        outputs[row, torch.arange(4), torch.tensor(tokenizer.convert_tokens_to_ids(tokens))] = 10.0
    metrics = kind.metrics(task)
    kind.update_metrics(metrics, outputs, targets, model.head_context)
    values = metrics.compute()
    generated, wanted = ["fine day", "awful movie"], ["good day", "awful"]
    assert kind.decode(outputs, model.head_context) == generated
    assert float(values["bertscore_f1"]) == pytest.approx(bertscore_f1(generated, wanted, str(assets["bert"])).mean())
    # "fine day" ~ "good day" (synonym, exact): 2 of 2 in one chunk; "awful movie" vs "awful": 1 match.
    by_hand = (meteor_by_hand(2, 2, 2, 1) + meteor_by_hand(1, 2, 1, 1)) / 2
    assert float(values["meteor"]) == pytest.approx(by_hand, rel=1e-5)
    assert kind.higher_is_better["bertscore_f1"] and kind.higher_is_better["meteor"]
