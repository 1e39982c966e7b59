"""Tasks and task types: the one place that declares what a task consumes, predicts and is scored by.

A :class:`Task` is a named objective of the federation (``digits``, ``ag_news``); its :class:`TaskType` says
how a head is built, which loss trains it and which metrics score it. Every other module reads these
declarations instead of inferring meaning from names.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, MeanSquaredError, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.text import Perplexity, ROUGEScore

from tapl.heads import ImageDecoder, ParallelTextDecoder, mlp
from tapl.text_metrics import BERTScoreF1, Meteor, bertscore_model, wordnet


def softened_kl(outputs: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(outputs/T))`` over the last dimension, one value per row."""
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    log_p_student = F.log_softmax(outputs.float() / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return kl * temperature**2


@dataclass(frozen=True)
class HeadContext:
    """What the model offers a task type when it builds a head or collates targets.

    Attributes:
        preprocessors: Raw-value-to-tensor preprocessor per modality (tokenizer, image size, ...).
        text_embeddings: The text encoder's frozen input embeddings (for tied text decoders), if any.
    """

    preprocessors: Mapping[str, Any]
    text_embeddings: nn.Embedding | None = None


class TaskType(ABC):
    """How one kind of task is trained and scored.

    Subclasses register themselves under :attr:`name`; adding a task type is one subclass.
    """

    name: ClassVar[str]
    #: The metric shown first in progress lines and summaries.
    primary_metric: ClassVar[str]
    #: Whether a higher value of each metric is better, by metric name; losses are always lower-is-better.
    higher_is_better: ClassVar[dict[str, bool]] = {}
    registry: ClassVar[dict[str, TaskType]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            TaskType.registry[cls.name] = cls()

    @classmethod
    def get(cls, name: str) -> TaskType:
        """The registered task type called ``name``.

        Raises:
            ValueError: if no task type has that name.
        """
        try:
            return cls.registry[name]
        except KeyError:
            raise ValueError(f"Unknown task type {name!r}; known task types: {sorted(cls.registry)}.") from None

    @abstractmethod
    def validate(self, task: Task) -> None:
        """Raise ``ValueError`` if ``task`` lacks a setting this type needs."""

    @abstractmethod
    def build_head(self, in_features: int, task: Task, context: HeadContext) -> nn.Module:
        """The task head mapping one pooled feature per sample to this type's outputs."""

    @abstractmethod
    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean loss over the samples (or target tokens) of one batch."""

    @abstractmethod
    def metrics(self, task: Task) -> MetricCollection:
        """Fresh metric objects scoring this task on a held-out split."""

    def update_metrics(self, metrics: MetricCollection, outputs: Tensor, targets: Tensor, context: HeadContext) -> None:
        """Feed one batch to ``metrics`` (override when metrics need differently shaped inputs or decoding)."""
        metrics.update(outputs, targets)

    @abstractmethod
    def collate_targets(self, targets: list[Any], task: Task, context: HeadContext) -> Tensor:
        """Stack the raw targets of a batch into the tensor :meth:`loss` expects."""

    def examples(self, outputs: Tensor, targets: Tensor, context: HeadContext) -> list[dict[str, str]]:
        """Human-readable predictions next to their targets, for inspection (none by default)."""
        return []

    #: The distillation losses this type offers (see :meth:`distillation_loss`); the first is the default.
    distillation_forms: ClassVar[tuple[str, ...]] = ("kl",)

    def distillation_loss(
        self, outputs: Tensor, teacher: Tensor, targets: Tensor, temperature: float, form: str | None = None
    ) -> Tensor:
        """How far ``outputs`` are from a teacher's ``teacher`` outputs on the same batch.

        The default form ``"kl"`` treats the last dimension as logits:
        ``T^2 * KL(softmax(teacher/T) || softmax(outputs/T))`` averaged over samples. Types whose outputs are not
        one distribution per sample (images, token sequences) override it and offer other forms.

        Args:
            outputs: The student's outputs.
            teacher: The teacher's outputs on the same batch.
            targets: The batch's targets (e.g. to leave padding out).
            temperature: Softmax temperature ``T``.
            form: One of :attr:`distillation_forms`; ``None``: the first.
        """
        self.check_distillation_form(form)
        return softened_kl(outputs, teacher, temperature).mean()

    def check_distillation_form(self, form: str | None) -> str:
        """``form`` (or the default form when ``None``) if this type offers it.

        Raises:
            ValueError: naming the forms this type offers.
        """
        if form is None:
            return self.distillation_forms[0]
        if form not in self.distillation_forms:
            raise ValueError(
                f"Task type {self.name!r} has no distillation loss {form!r}; it offers {list(self.distillation_forms)}."
            )
        return form


class Classification(TaskType):
    """Single-label classification over ``task.num_classes`` classes: cross-entropy, accuracy, macro-F1."""

    name = "classification"
    primary_metric = "accuracy"
    higher_is_better = {"accuracy": True, "f1": True}

    def validate(self, task: Task) -> None:
        if task.num_classes < 2:
            raise ValueError(f"Task {task.name!r}: classification needs num_classes >= 2, got {task.num_classes}.")

    def build_head(self, in_features: int, task: Task, context: HeadContext) -> nn.Module:
        return mlp(in_features, task.head_hidden or in_features, task.num_classes, task.head_dropout)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs.float(), targets)

    def metrics(self, task: Task) -> MetricCollection:
        return MetricCollection(
            {
                "accuracy": MulticlassAccuracy(task.num_classes, average="micro"),
                "f1": MulticlassF1Score(task.num_classes, average="macro"),
            }
        )

    def collate_targets(self, targets: list[Any], task: Task, context: HeadContext) -> Tensor:
        return torch.as_tensor(targets, dtype=torch.long)


class ImageGeneration(TaskType):
    """Reconstruction of an image (the paper's image generation): an image decoder head scored by MSE.

    The target column holds an image in the same form as the image input (usually the input column itself);
    it is preprocessed by the image encoder's preprocessor, so targets are pixels in [0, 1].
    """

    name = "image_generation"
    primary_metric = "mse"
    higher_is_better = {"mse": False}

    def validate(self, task: Task) -> None:
        if "image" not in task.modalities:
            raise ValueError(f"Task {task.name!r}: image_generation reconstructs images; it needs an image input.")

    def build_head(self, in_features: int, task: Task, context: HeadContext) -> nn.Module:
        image = context.preprocessors["image"]
        return ImageDecoder(
            in_features, task.head_hidden or in_features, image.channels, image.image_size, task.head_dropout
        )

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.mse_loss(outputs.float(), targets.float())

    def metrics(self, task: Task) -> MetricCollection:
        return MetricCollection({"mse": MeanSquaredError()})

    distillation_forms = ("mse", "width_kl")

    def distillation_loss(
        self, outputs: Tensor, teacher: Tensor, targets: Tensor, temperature: float, form: str | None = None
    ) -> Tensor:
        """``"mse"`` (default): pixels are not a distribution, so the mean squared difference to the teacher's
        image. ``"width_kl"``: the TAP reference code's loss, each row of pixels (the image's last, width axis)
        read as logits, ``T^2 * KL`` per row, summed over channels and rows and averaged over images (PyTorch's
        ``kl_div(..., reduction="batchmean")`` on (batch, channels, height, width))."""
        if self.check_distillation_form(form) == "mse":
            return F.mse_loss(outputs.float(), teacher.float())
        return softened_kl(outputs, teacher, temperature).flatten(1).sum(1).mean()

    def collate_targets(self, targets: list[Any], task: Task, context: HeadContext) -> Tensor:
        return context.preprocessors["image"](targets)["pixel_values"]


class TextGeneration(TaskType):
    """Generation of a target text (an answer, a description) from the inputs: token cross-entropy.

    The head is a :class:`~tapl.heads.ParallelTextDecoder` (non-autoregressive, documented choice): it
    predicts ``task.target_length`` token positions at once, with its output projection tied to the text
    encoder's frozen embeddings. A target is the text's tokens (by the text encoder's tokenizer, cut to
    ``target_length - 1``) followed by an end token (the tokenizer's separator or end-of-sequence token);
    positions after it are ignored by the loss and the metrics, and decoding stops at the first end token.
    Metrics: perplexity and token accuracy over the target tokens, the end token included; and, on the
    generated text (greedy tokens up to the first end token) against the target text (its tokens without the
    end token), per sample and averaged: ``token_f1``, the F1 of the two bags of tokens (SQuAD-style), and
    ``rouge_l``, the ROUGE-L F-measure (longest common token subsequence, torchmetrics). Optional, on the
    decoded texts: ``bertscore_f1`` (torchmetrics' BERTScore with ``task.bertscore_model``) and ``meteor``
    (NLTK, with WordNet), see :mod:`tapl.text_metrics`. :meth:`decode` turns outputs back into text for
    inspection.
    """

    name = "text_generation"
    primary_metric = "perplexity"
    higher_is_better = {
        "perplexity": False,
        "token_accuracy": True,
        "token_f1": True,
        "rouge_l": True,
        "bertscore_f1": True,
        "meteor": True,
    }
    ignore_index = -100

    def validate(self, task: Task) -> None:
        if task.target_length < 1:
            raise ValueError(f"Task {task.name!r}: text_generation needs target_length >= 1.")
        try:  # load what the optional metrics need now, so that a missing model or corpus fails before training
            if task.bertscore_model is not None:
                bertscore_model(task.bertscore_model)
            if task.meteor:
                wordnet()
        except ValueError as error:
            raise ValueError(f"Task {task.name!r}: {error}") from error

    def build_head(self, in_features: int, task: Task, context: HeadContext) -> nn.Module:
        if context.text_embeddings is None or "text" not in context.preprocessors:
            raise ValueError(
                f"Task {task.name!r}: text_generation decodes with the text encoder's tokenizer and embeddings; "
                "configure model.encoders.text."
            )
        return ParallelTextDecoder(in_features, task.target_length, context.text_embeddings, task.head_dropout)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs.float().flatten(0, 1), targets.flatten(), ignore_index=self.ignore_index)

    distillation_forms = ("token_mean", "sequence_sum")

    def distillation_loss(
        self, outputs: Tensor, teacher: Tensor, targets: Tensor, temperature: float, form: str | None = None
    ) -> Tensor:
        """The softened KL of every position's token distribution (``T^2 * KL``), reduced by ``form``:

        - ``"token_mean"`` (default): averaged over target tokens, padding left out; its scale does not depend
          on ``target_length``, like the task loss;
        - ``"sequence_sum"``: the TAP reference code's ``kl_div(..., reduction="batchmean")`` on (batch, length,
          vocabulary) logits, i.e. summed over every position, padding included, and averaged over sequences;
          its weight is about ``target_length`` times the per-token mean's.
        """
        kl = softened_kl(outputs, teacher, temperature)
        if self.check_distillation_form(form) == "sequence_sum":
            return kl.sum(-1).mean()
        real = targets != self.ignore_index
        return kl[real].sum() / real.sum().clamp_min(1)

    def metrics(self, task: Task) -> MetricCollection:
        metrics = {
            "perplexity": Perplexity(ignore_index=self.ignore_index),
            "token_accuracy": MeanMetric(),
            "token_f1": MeanMetric(),
            "rouge_l": RougeL(),
        }
        if task.bertscore_model is not None:
            metrics["bertscore_f1"] = BERTScoreF1(task.bertscore_model)
        if task.meteor:
            metrics["meteor"] = Meteor()
        return MetricCollection(metrics, compute_groups=False)

    def update_metrics(self, metrics: MetricCollection, outputs: Tensor, targets: Tensor, context: HeadContext) -> None:
        metrics["perplexity"].update(outputs.float(), targets)
        real = targets != self.ignore_index
        if real.any():
            correct = (outputs.argmax(-1) == targets)[real].float()
            metrics["token_accuracy"].update(correct.mean(), weight=int(real.sum()))
        predicted = self._token_ids(outputs.argmax(-1), context)
        wanted = self._token_ids(targets, context)
        metrics["token_f1"].update(torch.tensor([token_f1(p, w) for p, w in zip(predicted, wanted, strict=True)]))
        # ROUGE-L over token ids: each id is one "word", so no text normalisation changes the tokens.
        metrics["rouge_l"].update([" ".join(map(str, p)) for p in predicted], [" ".join(map(str, w)) for w in wanted])
        on_text = [name for name in ("bertscore_f1", "meteor") if name in metrics]
        if on_text:
            texts = self._texts(outputs.argmax(-1), context), self._texts(targets, context)
            for name in on_text:
                metrics[name].update(*texts)

    def collate_targets(self, targets: list[Any], task: Task, context: HeadContext) -> Tensor:
        tokenizer = context.preprocessors["text"].tokenizer
        end = _end_token(tokenizer)
        keep = task.target_length - (end is not None)
        encoded = tokenizer([str(t) for t in targets], add_special_tokens=False, truncation=True, max_length=keep)
        rows = torch.full((len(targets), task.target_length), self.ignore_index, dtype=torch.long)
        for row, ids in zip(rows, encoded["input_ids"], strict=True):
            ids = [*ids[:keep], *([end] if end is not None else [])]
            row[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return rows

    def _token_ids(self, ids: Tensor, context: HeadContext) -> list[list[int]]:
        """Each row's tokens up to its first end token, without padding."""
        end = _end_token(context.preprocessors["text"].tokenizer)
        cut = []
        for row in ids.tolist():
            row = [i for i in row if i != self.ignore_index]
            cut.append(row[: row.index(end)] if end in row else row)
        return cut

    def _texts(self, ids: Tensor, context: HeadContext) -> list[str]:
        tokenizer = context.preprocessors["text"].tokenizer
        return tokenizer.batch_decode(self._token_ids(ids, context), skip_special_tokens=True)

    def decode(self, outputs: Tensor, context: HeadContext) -> list[str]:
        """The texts a batch of outputs predicts: greedy per position, up to the first end token."""
        return self._texts(outputs.argmax(-1), context)

    def examples(self, outputs: Tensor, targets: Tensor, context: HeadContext) -> list[dict[str, str]]:
        wanted = self._texts(targets, context)
        return [{"prediction": p, "target": t} for p, t in zip(self.decode(outputs, context), wanted, strict=True)]


class RougeL(ROUGEScore):
    """The ROUGE-L F-measure alone, averaged over samples (torchmetrics' ``ROUGEScore`` with ``rougeL``)."""

    def __init__(self) -> None:
        super().__init__(rouge_keys="rougeL", accumulate="avg")

    def compute(self) -> Tensor:
        return super().compute()["rougeL_fmeasure"]


def token_f1(predicted: list[int], target: list[int]) -> float:
    """F1 of two bags of tokens: overlap counted with multiplicity; 1.0 when both are empty, 0.0 when one is."""
    if not predicted or not target:
        return float(predicted == target)
    common = sum((Counter(predicted) & Counter(target)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(target)
    return 2 * precision * recall / (precision + recall)


def _end_token(tokenizer: Any) -> int | None:
    """The token that ends a generated text: the separator (BERT-like) or end-of-sequence token."""
    for token_id in (tokenizer.sep_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return None


@dataclass(frozen=True)
class Task:
    """One objective of the federation.

    Args:
        name: Unique task name; heads and metrics are keyed by it.
        type: Registered task type name, e.g. ``"classification"``.
        modalities: Input modalities the task consumes, e.g. ``("image",)`` or ``("image", "text")``.
        num_classes: Number of classes (classification).
        target_length: Target tokens decoded (text generation).
        head_hidden: Hidden width of the head's MLP; ``None`` uses the encoder width.
        head_dropout: Dropout inside the head.
        bertscore_model: Adds the ``bertscore_f1`` metric (text generation), with this model's embeddings.
        meteor: Adds the ``meteor`` metric (text generation; needs NLTK and its WordNet data).
    """

    name: str
    type: str
    modalities: tuple[str, ...]
    num_classes: int = 0
    target_length: int = 16
    head_hidden: int | None = None
    head_dropout: float = 0.1
    bertscore_model: str | None = None
    meteor: bool = False
    _type: TaskType = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_\-]+", self.name):
            raise ValueError(f"Task name {self.name!r} is invalid: use letters, digits, '_' and '-' only.")
        if not self.modalities:
            raise ValueError(f"Task {self.name!r}: declare at least one modality.")
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "_type", TaskType.get(self.type))
        if (self.bertscore_model is not None or self.meteor) and self.type != TextGeneration.name:
            raise ValueError(
                f"Task {self.name!r}: bertscore_model and meteor score generated text; they need "
                f"type text_generation, not {self.type!r}."
            )
        self._type.validate(self)

    @property
    def task_type(self) -> TaskType:
        """The :class:`TaskType` this task is declared with."""
        return self._type

    @property
    def pair(self) -> str:
        """The task's modality-task pair, e.g. ``"image+text,classification"``: it names the task's fusion
        expert and groups tasks in summaries and TAP's settings."""
        return f"{'+'.join(sorted(self.modalities))},{self.type}"
