"""The federated data module: task datasets, their split into train/val/test, and their partition over clients.

Each task's rows come from Hugging Face ``datasets`` (a hub name, a local file through a builder such as
``parquet``, or a file that a ``prepare`` callable writes from data an installed package ships). The task's
pool is shuffled once (seeded) and cut into train/val/test. The clients that hold a task share its rows: a
partitioner draws one client-by-class proportion matrix from the training labels and applies it to all
three splits, so a client's train, val and test splits have the same label mix and never share a row.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from tapl.datamodules.collate import MultiTaskCollator
from tapl.datamodules.partitioners import IID, Partitioner, _allocate
from tapl.datamodules.validation import ROW_COLUMN, check_rows, drop_missing
from tapl.errors import DataError
from tapl.models.encoders import Preprocessor
from tapl.tasks import Task

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class _RowFormatter(string.Formatter):
    """``str.format`` over a row, with list values joined by ``", "`` (an indexed element stays as it is).

    An index that names a column is looked up in the row first: ``{choices[answer]}`` is the element of
    ``choices`` at the row's ``answer``.
    """

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> Any:
        found = re.fullmatch(r"(\w+)\[(\w+)\]", field_name)
        if found and found.group(2) in kwargs and found.group(1) in kwargs:
            return kwargs[found.group(1)][kwargs[found.group(2)]], found.group(1)
        return super().get_field(field_name, args, kwargs)

    def format_field(self, value: Any, format_spec: str) -> Any:
        if isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        return super().format_field(value, format_spec)


_FORMATTER = _RowFormatter()


def is_template(source: str) -> bool:
    """Whether an input or target ``source`` is a format template over the row rather than a column name."""
    return "{" in source


def template_fields(template: str) -> list[str]:
    """The row columns a format template names (``"{q} {choices[answer]}"`` -> ``["q", "choices", "answer"]``).

    Raises:
        ValueError: if the template is malformed or has a positional field (``{}`` or ``{0}``).
    """
    names: list[str] = []
    for _, name, _, _ in _FORMATTER.parse(template):
        if name is None:
            continue
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not root or root.isdigit():
            raise ValueError(f"template {template!r} has a positional field; name a column, e.g. {{question}}")
        # An index that is a name (``{choices[answer]}``) is a column too.
        for column in [root, *re.findall(r"\[([A-Za-z_]\w*)\]", name)]:
            if column not in names:
                names.append(column)
    return names


def render(source: str, row: Mapping[str, Any]) -> Any:
    """The value ``source`` gives for ``row``: the column's value, or the formatted template."""
    if is_template(source):
        return _FORMATTER.vformat(source, (), row)
    return row[source]


@dataclass
class TaskData:
    """A task of the federation and where its data comes from.

    Args:
        name: Unique task name.
        type: Task type, e.g. ``classification``.
        inputs: Column holding each input modality, e.g. ``{"text": "sentence"}`` or ``{"image": "img"}``. A
            value containing ``{`` is instead a Python format template over the row, e.g.
            ``{"text": "{question} Choices: {choices}"}``: each ``{column}`` is replaced by that column's
            value, a list value joined with ``", "`` (``{choices[0]}`` picks one element instead). Every
            column a template names must exist (checked at setup).
        target: Column holding the target (the class index for classification). May be left out when
            ``target_template`` is given.
        target_template: A format template over the row (as for ``inputs``) that builds a text-generation
            target from several columns, e.g. ``"{concepts}: {target}"``; only for ``text_generation``
            tasks. When given, it replaces ``target``.
        num_classes: Number of classes (classification); targets must lie in ``[0, num_classes)``.
        target_length: Target tokens decoded (text generation); longer targets are cut.
        dataset: What ``datasets.load_dataset`` loads: a hub name, a builder (``parquet``, ``csv``, ``json``,
            ``imagefolder``) or a local path.
        data_files: Files for a builder.
        prepare: A callable (by dotted path in YAML) that writes the data file and returns its path; its
            result becomes ``data_files``. Used for data that installed packages ship.
        split: Split of the loaded dataset that forms the task's pool.
        max_rows: Keep a seeded random subset of this many rows of the pool (``None``: all).
        val_fraction: Share of the pool held out for validation.
        test_fraction: Share of the pool held out for testing.
        head_hidden: Hidden width of the task head (``None``: the encoder width).
        head_dropout: Dropout inside the task head while training.
        bertscore_model: Text generation: also score the generated text with BERTScore F1 (``bertscore_f1``),
            embedding with this model (hub name, local directory or ``package:MODULE/SUBDIR``; its last
            layer, no idf weighting). ``None``: no BERTScore.
        meteor: Text generation: also score the generated text with METEOR (``meteor``, NLTK's, with
            WordNet synonyms). Needs ``pip install 'tapl[metrics]'`` and NLTK's WordNet data.
        drop_missing: Drop the rows that miss a value the task reads (a null, or a text that is empty or only
            white space) before the split, counting them in a warning. ``False``: such a row stops the run
            before training, named by task, client, split, row and column.
        domain_column: Column naming each row's natural domain (e.g. VADER's ``domain``: tweets, movie reviews,
            ...). The task's clients are then spread over the domains in proportion to their training rows (at
            least one client each, in the domains' sorted order), every client holds rows of one domain only, and
            the partitioner splits each domain's rows among that domain's clients. ``None``: one pool.
    """

    name: str
    inputs: dict[str, str]
    target: str = field(default="", kw_only=True)
    dataset: str
    type: str = "classification"
    num_classes: int = 0
    target_length: int = 16
    data_files: str | list[str] | dict[str, str] | None = None
    prepare: Callable[[], str | Path] | None = None
    split: str = "train"
    max_rows: int | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    head_hidden: int | None = None
    head_dropout: float = 0.1
    target_template: str | None = None
    bertscore_model: str | None = None
    meteor: bool = False
    drop_missing: bool = False
    domain_column: str | None = None

    def __post_init__(self) -> None:
        if self.target_template is not None:
            if self.type != "text_generation":
                raise ValueError(
                    f"Task {self.name!r}: target_template builds text targets; it needs type text_generation, "
                    f"not {self.type!r}."
                )
            self.target = self.target_template
        if not self.target:
            raise ValueError(f"Task {self.name!r}: give a target column (or a target_template).")
        for source in [*self.inputs.values(), self.target]:
            if is_template(source):
                try:
                    template_fields(source)
                except ValueError as error:
                    raise ValueError(f"Task {self.name!r}: {error}") from error
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ValueError(f"Task {self.name!r}: val_fraction and test_fraction must lie in [0, 1).")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"Task {self.name!r}: val_fraction + test_fraction must be < 1.")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"Task {self.name!r}: max_rows must be >= 1.")

    def columns(self) -> list[str]:
        """The dataset columns the task reads: those its inputs and target name, or their templates use."""
        names: list[str] = []
        for source in [*self.inputs.values(), self.target]:
            for column in template_fields(source) if is_template(source) else [source]:
                if column not in names:
                    names.append(column)
        return names

    def to_task(self) -> Task:
        """The model-facing declaration of this task."""
        return Task(
            name=self.name,
            type=self.type,
            modalities=tuple(self.inputs),
            num_classes=self.num_classes,
            target_length=self.target_length,
            head_hidden=self.head_hidden,
            head_dropout=self.head_dropout,
            bertscore_model=self.bertscore_model,
            meteor=self.meteor,
        )


@dataclass
class ClientGroup:
    """``count`` clients that hold the same tasks.

    Args:
        tasks: Names of the tasks these clients hold.
        count: How many such clients.
        group: Group id of these clients, for the ``Grouped`` partitioner (the paper's pattern groups: each
            group shares a task's rows among its own clients only).
    """

    tasks: list[str]
    count: int = 1
    group: int = 0

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("A client group needs at least one task.")
        if self.count < 1:
            raise ValueError(f"Client group {self.tasks}: count must be >= 1, got {self.count}.")


@dataclass(frozen=True)
class ClientSpec:
    """One client: its index, the tasks it holds and its group."""

    id: int
    tasks: tuple[str, ...]
    group: int = 0


class ClientDataset(Dataset):
    """One split of one client: the rows of each of its tasks, tagged with the task."""

    def __init__(self, parts: list[tuple[TaskData, Any]]) -> None:
        self._parts = parts
        self._offsets = np.cumsum([0] + [len(rows) for _, rows in parts])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def parts(self) -> list[tuple[TaskData, Any]]:
        """``(task, rows)`` pairs making up this split."""
        return list(self._parts)

    def num_samples(self, task: str) -> int:
        """Rows of ``task`` in this split."""
        return sum(len(rows) for spec, rows in self._parts if spec.name == task)

    def __getitem__(self, index: int) -> dict[str, Any]:
        part = int(np.searchsorted(self._offsets, index, side="right")) - 1
        spec, rows = self._parts[part]
        row = rows[int(index - self._offsets[part])]
        return {
            "task": spec.name,
            "inputs": {m: render(source, row) for m, source in spec.inputs.items()},
            "target": render(spec.target, row),
        }


class FederatedDataModule:
    """Tasks, clients, and each client's train/val/test data.

    Args:
        tasks: The federation's tasks and their data.
        clients: Client groups; clients are numbered in the order listed.
        partitioner: How each task's rows are shared among the clients that hold it.
        batch_size: Samples per batch, for training and evaluation.
        num_workers: Data loader worker processes.
        seed: Seed of the pool shuffles and the partition (independent of the training seed, so the data
            stays fixed while training seeds vary).
    """

    def __init__(
        self,
        tasks: list[TaskData],
        clients: list[ClientGroup],
        partitioner: Partitioner | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        names = [t.name for t in tasks]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"data.tasks: task names {duplicated} are declared more than once.")
        unknown = sorted({t for g in clients for t in g.tasks} - set(names))
        if unknown:
            raise ValueError(f"data.clients refer to unknown tasks {unknown}; declared tasks: {names}.")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}.")
        self.task_data = {t.name: t for t in tasks}
        self.tasks: dict[str, Task] = {t.name: t.to_task() for t in tasks}
        specs, next_id = [], 0
        for group in clients:
            for _ in range(group.count):
                specs.append(ClientSpec(next_id, tuple(group.tasks), group.group))
                next_id += 1
        self.clients: list[ClientSpec] = specs
        self.partitioner = partitioner or IID()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._datasets: dict[int, dict[str, ClientDataset]] | None = None

    @property
    def task_list(self) -> list[Task]:
        """The tasks, in declaration order (what the model builds heads for)."""
        return list(self.tasks.values())

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.clients)

    def setup(self) -> None:
        """Load, validate, split and partition every task's data (once)."""
        if self._datasets is not None:
            return
        per_client: dict[int, dict[str, list[tuple[TaskData, Any]]]] = {
            c.id: {s: [] for s in SPLITS} for c in self.clients
        }
        for index, spec in enumerate(self.task_data.values()):
            holders = [c.id for c in self.clients if spec.name in c.tasks]
            if not holders:
                log.warning("Task %r is held by no client; its data is not loaded.", spec.name)
                continue
            splits = self._load_splits(spec, np.random.default_rng([self.seed, index]))
            rng = np.random.default_rng([self.seed, index, 1])
            labels = {s: self._labels(spec, rows, s) for s, rows in splits.items()}
            for members, selected in _domain_parts(spec, holders, splits):
                proportions = self.partitioner.proportions(
                    labels["train"][selected["train"]],
                    len(members),
                    self._num_label_classes(spec),
                    rng,
                    groups=[self.clients[c].group for c in members],
                )
                for split, rows in splits.items():
                    cuts = self.partitioner.split(labels[split][selected[split]], proportions, rng)
                    for client, indices in zip(members, cuts, strict=True):
                        per_client[client][split].append((spec, rows.select(selected[split][indices])))
        for client, parts in per_client.items():
            for split, task_parts in parts.items():
                for spec, rows in task_parts:
                    if len(rows) == 0 and split != "val":
                        raise ValueError(
                            f"Client {client} has no {split} rows of task {spec.name!r}: use fewer clients for "
                            "this task, more data (max_rows), or a less skewed partitioner."
                        )
        self._datasets = {c: {s: ClientDataset(p) for s, p in parts.items()} for c, parts in per_client.items()}

    def check_values(self, preprocessors: Mapping[str, Preprocessor]) -> None:
        """Check every value the tasks read, once, before any training (see :mod:`tapl.datamodules.validation`).

        A missing value (null or empty text), an unreadable input (an image that fails to decode, has the wrong
        size or non-finite pixels) or a target that cannot be collated stops the run here with a message naming
        the task, client, split, row and column; texts longer than the text encoder's limit are counted and
        reported (they are truncated).

        Raises:
            DataError: naming the first bad value.
        """
        truncated: dict[tuple[str, str], int] = {}
        for client in self.clients:
            for split in SPLITS:
                for spec, rows in self.dataset(client.id, split).parts:
                    locate = _locator(spec, f"client {client.id}, {split} split", rows)
                    task = self.tasks[spec.name]
                    altered = check_rows(
                        task, spec.inputs, spec.target, spec.columns(), rows, preprocessors, render, locate
                    )
                    for column, count in altered.items():
                        truncated[(spec.name, column)] = truncated.get((spec.name, column), 0) + count
        for (task, column), count in truncated.items():
            if count:
                log.warning(
                    "Task %r: %d value(s) of column %r exceed the encoder's length and are truncated.",
                    task,
                    count,
                    column,
                )

    def _load_splits(self, spec: TaskData, rng: np.random.Generator) -> dict[str, Any]:
        from datasets import load_dataset
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()

        data_files = spec.data_files
        if spec.prepare is not None:
            data_files = str(spec.prepare())
        if isinstance(data_files, str):
            files = [data_files]
        elif isinstance(data_files, dict):
            files = list(data_files.values())
        else:
            files = list(data_files or [])
        missing = [f for f in files if "://" not in f and not any(c in f for c in "*?[") and not Path(f).exists()]
        if missing:
            raise FileNotFoundError(f"Task {spec.name!r}: data file(s) not found: {missing}")
        if spec.dataset == "parquet" and files and sum(_parquet_rows(f) for f in files) == 0:
            raise DataError(f"Task {spec.name!r}: {files!r} hold no rows.")
        try:
            with _quiet_datasets():
                pool = load_dataset(spec.dataset, data_files=data_files, split=spec.split)
        except Exception as error:
            source = files or spec.dataset
            raise DataError(
                f"Task {spec.name!r}: could not load {source!r} as {spec.dataset!r}: {_root_cause(error)}"
            ) from None
        if len(pool) == 0:
            raise DataError(f"Task {spec.name!r}: {files or spec.dataset!r} split {spec.split!r} holds no rows.")
        columns = spec.columns()
        for source in [*spec.inputs.values(), spec.target]:
            if is_template(source):
                missing_fields = [c for c in template_fields(source) if c not in pool.column_names]
                if missing_fields:
                    raise ValueError(
                        f"Task {spec.name!r}: template {source!r} names column(s) {missing_fields} that the dataset "
                        f"lacks; it has {pool.column_names}."
                    )
        absent = [c for c in columns if c not in pool.column_names]
        if absent:
            raise ValueError(f"Task {spec.name!r}: dataset has no column(s) {absent}; it has {pool.column_names}.")
        if spec.domain_column is not None and spec.domain_column not in pool.column_names:
            raise ValueError(
                f"Task {spec.name!r}: domain_column {spec.domain_column!r} is not a column of the dataset; it has "
                f"{pool.column_names}."
            )
        pool = pool.select_columns(sorted({*columns, *filter(None, [spec.domain_column])}))
        # The row's position in the loaded split, so errors can point at it after shuffles and partitions.
        pool = pool.add_column(ROW_COLUMN, np.arange(len(pool)))
        if spec.drop_missing:
            pool = drop_missing(pool, columns, spec.name)
            if len(pool) == 0:
                raise DataError(f"Task {spec.name!r}: every row misses a value; none is left.")
        order = rng.permutation(len(pool))
        if spec.max_rows is not None:
            order = order[: spec.max_rows]
        n_test = round(len(order) * spec.test_fraction)
        n_val = round(len(order) * spec.val_fraction)
        cuts = {
            "test": order[:n_test],
            "val": order[n_test : n_test + n_val],
            "train": order[n_test + n_val :],
        }
        return {s: pool.select(np.sort(cuts[s])) for s in SPLITS}

    def _labels(self, spec: TaskData, rows: Any, split: str) -> np.ndarray:
        task = self.tasks[spec.name]
        if task.type != "classification":
            return np.zeros(len(rows), dtype=np.int64)
        values = rows[spec.target]
        # The client is not known yet: the partition needs every label.
        locate = _locator(spec, f"{split} split, before the partition", rows)
        missing = next((i for i, v in enumerate(values) if v is None), None)
        if missing is not None:
            raise DataError(
                f"{locate(missing, spec.target)} is null: fill it, or drop such rows with the task's "
                "`drop_missing: true`"
            )
        labels = np.asarray(values)
        if labels.size and (not np.issubdtype(labels.dtype, np.integer)):
            raise DataError(f"Task {spec.name!r}: target column {spec.target!r} must hold integer class indices.")
        bad = np.flatnonzero((labels < 0) | (labels >= task.num_classes))
        if bad.size:
            raise DataError(
                f"{locate(int(bad[0]), spec.target)} holds label {labels[bad[0]]} outside [0, {task.num_classes}); "
                f"{bad.size} such rows in this split."
            )
        return labels.astype(np.int64)

    def _num_label_classes(self, spec: TaskData) -> int:
        task = self.tasks[spec.name]
        return task.num_classes if task.type == "classification" else 1

    # -- per-client access --------------------------------------------------------------------------------

    def dataset(self, client: int, split: str) -> ClientDataset:
        """The ``split`` rows of ``client`` (``split`` is ``train``, ``val`` or ``test``)."""
        if self._datasets is None:
            self.setup()
        assert self._datasets is not None
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self._datasets[client][split]

    def num_samples(self, client: int, split: str = "train") -> int:
        """Rows of ``client``'s ``split``, over all its tasks."""
        return len(self.dataset(client, split))

    def train_dataloader(self, client: int, collate: MultiTaskCollator, seed: int) -> DataLoader:
        """A shuffled loader over ``client``'s training rows; ``seed`` fixes the order."""
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            self.dataset(client, "train"),
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=collate,
            num_workers=self.num_workers,
        )

    def eval_dataloader(self, client: int, split: str, collate: MultiTaskCollator) -> DataLoader:
        """An ordered loader over ``client``'s ``split`` rows."""
        return DataLoader(
            self.dataset(client, split),
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=collate,
            num_workers=self.num_workers,
        )

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this federation's layout, stored in checkpoints to refuse a mismatched resume."""
        return {
            "tasks": sorted(self.tasks),
            "clients": [list(c.tasks) for c in self.clients],
            "groups": [c.group for c in self.clients],
        }


def _domain_parts(
    spec: TaskData, holders: list[int], splits: Mapping[str, Any]
) -> list[tuple[list[int], dict[str, np.ndarray]]]:
    """The task's clients and, per split, the row indices they share, one pair per natural domain.

    Without a ``domain_column`` that is one pair: every holder and every row. With one, each domain (in sorted
    order) gets a contiguous block of the holders, one client plus a share of the rest proportional to its training
    rows (the partitioners' largest-remainder rounding, ties to the earlier domain).

    Raises:
        DataError: if a row has no domain, a domain has no training rows, or there are fewer clients than domains.
    """
    if spec.domain_column is None:
        return [(holders, {s: np.arange(len(rows)) for s, rows in splits.items()})]
    values = {s: np.asarray(rows[spec.domain_column], dtype=object) for s, rows in splits.items()}
    for split, column in values.items():
        missing = next((i for i, v in enumerate(column) if v is None), None)
        if missing is not None:
            locate = _locator(spec, f"{split} split, before the partition", splits[split])
            raise DataError(f"{locate(missing, spec.domain_column)} is null: every row needs a domain")
    domains = sorted({v for column in values.values() for v in column})
    sizes = np.array([int((values["train"] == d).sum()) for d in domains])
    if (sizes == 0).any():
        raise DataError(
            f"Task {spec.name!r}: domain(s) {[d for d, n in zip(domains, sizes, strict=True) if n == 0]} of column "
            f"{spec.domain_column!r} have no training rows, so no client can hold them; use more data (max_rows)."
        )
    if len(holders) < len(domains):
        raise DataError(
            f"Task {spec.name!r}: {len(holders)} client(s) cannot cover the {len(domains)} domains of column "
            f"{spec.domain_column!r} ({domains}); give the task at least {len(domains)} clients."
        )
    counts = 1 + _allocate(np.array([len(holders) - len(domains)]), (sizes / sizes.sum())[:, None])[:, 0]
    ends = np.cumsum(counts)
    return [
        (holders[end - count : end], {s: np.flatnonzero(column == domain) for s, column in values.items()})
        for domain, count, end in zip(domains, counts, ends, strict=True)
    ]


def _locator(spec: TaskData, where: str, rows: Any) -> Callable[[int, str], str]:
    """Describes row ``index`` of ``rows`` (a part of ``spec``'s data, ``where`` it lies) and a column, for errors."""

    def locate(index: int, column: str) -> str:
        # Only the row-number column is read: the row's other values may be what cannot be decoded.
        return (
            f"Task {spec.name!r} ({where}): row {rows[ROW_COLUMN][index]} of {spec.dataset!r} split {spec.split!r}, "
            f"column {column!r},"
        )

    return locate


def _parquet_rows(path: str) -> int:
    """Rows of a local parquet file; -1 when it cannot be read here (a pattern, a remote or damaged file), which
    loading then reports."""
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, ValueError, pa.ArrowException):
        return -1


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence ``datasets``' own error logs while loading: a failure is reported once, in tapl's error."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _root_cause(error: BaseException) -> str:
    """The innermost cause of ``error``, in one line (``datasets`` wraps a reader's error in two others)."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
