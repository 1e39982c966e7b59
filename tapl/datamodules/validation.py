"""Checks of a federation's data values before any training.

Every value a task reads is checked once, after the split and the partition, so that an error names the task,
client, split, row and column: a missing value (null, or a text that is empty or only white space), a value
that cannot be read (an image that does not decode, has the wrong size or non-finite pixels), and a target
that cannot be collated. Rows with missing values can instead be dropped before the split with a task's
``drop_missing`` option; they are counted in a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tapl.errors import DataError
from tapl.models.encoders import Preprocessor, UnreadableValue
from tapl.tasks import HeadContext, Task

log = logging.getLogger(__name__)

#: Position of a row in its task's loaded split, added as a column so that errors can point at it.
ROW_COLUMN = "__row__"


def is_missing(value: Any) -> bool:
    """Whether ``value`` is absent: ``None`` (a null cell) or a string that is empty or only white space."""
    return value is None or (isinstance(value, str) and not value.strip())


def drop_missing(pool: Any, columns: Sequence[str], task: str) -> Any:
    """``pool`` without the rows that miss a value in one of ``columns``, the count per column logged."""
    missing = {c: np.array([is_missing(v) for v in pool[c]], dtype=bool) for c in columns}
    drop = np.logical_or.reduce(list(missing.values())) if missing else np.zeros(len(pool), dtype=bool)
    if drop.any():
        counts = ", ".join(f"{c!r}: {int(m.sum())}" for c, m in missing.items() if m.any())
        log.warning("Task %r: dropped %d of %d rows with a missing value (%s).", task, drop.sum(), len(pool), counts)
    return pool.select(np.flatnonzero(~drop))


def decoded_rows(rows: Any, columns: Sequence[str], locate: Callable[[int, str], str], offset: int = 0) -> list[Any]:
    """Every row of ``rows`` as a dict; a value that cannot be decoded (a truncated image file) raises
    :class:`DataError` with ``locate(offset + index, column)``."""
    try:
        return list(rows)
    except Exception:
        for column in columns:
            single = rows.select_columns([column])
            for index in range(len(single)):
                try:
                    single[index]
                except Exception as error:
                    raise DataError(f"{locate(offset + index, column)} cannot be read: {_reason(error)}") from None
        raise


def check_rows(
    task: Task,
    inputs: Mapping[str, str],
    target: str,
    columns: Sequence[str],
    rows: Any,
    preprocessors: Mapping[str, Preprocessor],
    render: Callable[[str, Mapping[str, Any]], Any],
    locate: Callable[[int, str], str],
    chunk: int = 512,
) -> dict[str, int]:
    """Check every value ``task`` reads from ``rows``; return how many values of each input column are altered
    (texts truncated).

    Args:
        task: The task the rows belong to.
        inputs: The column (or template) of each input modality.
        target: The target column (or template).
        columns: The raw columns the inputs and target read.
        rows: The rows (a ``datasets.Dataset``).
        preprocessors: The preprocessor of each modality.
        render: Turns a column name or template and a row into the value the model sees.
        locate: Describes a row index and column for an error message.
        chunk: Rows checked at once.

    Raises:
        DataError: naming the first missing or unreadable value.
    """
    altered = {column: 0 for column in inputs.values()}
    context = HeadContext(preprocessors)
    for start in range(0, len(rows), chunk):
        records = decoded_rows(rows.select(range(start, min(start + chunk, len(rows)))), columns, locate, start)
        for column in columns:
            missing = next((i for i, r in enumerate(records) if is_missing(r[column])), None)
            if missing is not None:
                what = "null" if records[missing][column] is None else "an empty text"
                raise DataError(
                    f"{locate(start + missing, column)} is {what}: fill it, or drop such rows with the task's "
                    "`drop_missing: true`"
                )
        for modality, source in inputs.items():
            try:
                altered[source] += preprocessors[modality].check([render(source, r) for r in records])
            except UnreadableValue as error:
                where = locate(start + error.index, source)
                raise DataError(f"{where} is not a readable {modality}: {error}") from None
        targets = [render(target, r) for r in records]
        try:
            task.task_type.collate_targets(targets, task, context)
        except Exception:
            for index, value in enumerate(targets):
                try:
                    task.task_type.collate_targets([value], task, context)
                except Exception as error:
                    raise DataError(
                        f"{locate(start + index, target)} is not a valid {task.type} target: {_reason(error)}"
                    ) from None
            raise
    return altered


def _reason(error: BaseException) -> str:
    """A one-line description of ``error`` (its type and first line)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
