"""Seeded partitioners that split the rows of one dataset split across federated clients.

A partition happens in two steps so that a client's train, validation and test splits line up:

1. :meth:`Partitioner.proportions` draws a ``(num_clients, num_classes)`` matrix ``P`` once per task from
   the task's *training* labels; ``P[c, k]`` is the share of class ``k``'s rows that client ``c`` gets.
2. :meth:`Partitioner.split` applies that same matrix to any split (train, validation, test), cutting each
   class's shuffled rows among the clients with largest-remainder rounding, so every row goes to exactly
   one client and each client sees the same label mix in all of its splits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

__all__ = ["IID", "Dirichlet", "Partitioner"]

# Tolerance under which a quota ``n * p`` counts as a whole number, so a matrix built from integer counts
# (``counts / n``) reproduces those counts exactly despite floating-point error.
_INTEGER_TOLERANCE = 1e-9


class Partitioner(ABC):
    """Base class: maps a label array to per-client index arrays.

    Subclasses implement :meth:`proportions`; :meth:`split` and :meth:`partition` are shared. Labels are
    integer class ids ``0 .. num_classes - 1``. The engine passes ``num_classes`` explicitly so that a class
    missing from the training split still gets a column, and its validation or test rows still have an
    owner.
    """

    @abstractmethod
    def proportions(
        self,
        labels: np.ndarray,
        num_clients: int,
        num_classes: int | None,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Draw the class-share matrix for a task.

        Args:
            labels: 1-D integer class ids of the split the matrix is drawn from (the training split).
            num_clients: Number of clients, at least 1.
            num_classes: Number of classes ``K``; ``None`` means ``labels.max() + 1``. Must exceed every
                label.
            rng: Source of randomness; the same seed gives the same matrix.

        Returns:
            A float ``(num_clients, K)`` matrix ``P``; ``P[c, k]`` is the share of class ``k``'s rows that
            client ``c`` receives. Every column sums to 1.

        Raises:
            ValueError: If the labels, ``num_clients`` or ``num_classes`` are invalid, or the partitioner's
                constraints cannot be met.
        """

    def split(self, labels: np.ndarray, proportions: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """Cut each class's shuffled rows among clients according to ``proportions``.

        Class ``k``'s ``n_k`` rows are shuffled with ``rng`` and client ``c`` receives
        ``n_k * proportions[c, k]`` of them, rounded by the largest-remainder method; the union of the
        returned arrays is ``range(len(labels))`` and they are pairwise disjoint. Classes absent from
        ``labels`` simply contribute no rows.

        Args:
            labels: 1-D integer class ids of the split to cut (train, validation or test).
            proportions: A ``(num_clients, K)`` matrix from :meth:`proportions`, with ``K > labels.max()``.
            rng: Source of randomness for the within-class shuffle.

        Returns:
            One sorted ``int64`` array of row indices into ``labels`` per client.

        Raises:
            ValueError: If ``proportions`` is not a valid share matrix or does not cover every label.
        """
        proportions = _check_proportions(proportions)
        num_clients, num_classes = proportions.shape
        labels = _check_labels(labels, num_classes)
        counts = _allocate(np.bincount(labels, minlength=num_classes), proportions)
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for k in range(num_classes):
            rows = np.flatnonzero(labels == k)
            if rows.size == 0:
                continue
            rows = rng.permutation(rows)
            bounds = np.cumsum(counts[:, k])[:-1]
            for client, chunk in enumerate(np.split(rows, bounds)):
                parts[client].append(chunk)
        return [np.sort(np.concatenate(chunks)).astype(np.int64) if chunks else _empty() for chunks in parts]

    def partition(
        self,
        labels: np.ndarray,
        num_clients: int,
        num_classes: int | None,
        rng: np.random.Generator,
    ) -> list[np.ndarray]:
        """Draw proportions from ``labels`` and split the same labels with them.

        A shortcut for a single split; to keep several splits aligned call :meth:`proportions` once and
        :meth:`split` on each.

        Args:
            labels: 1-D integer class ids.
            num_clients: Number of clients, at least 1.
            num_classes: Number of classes, or ``None`` for ``labels.max() + 1``.
            rng: Source of randomness.

        Returns:
            One sorted ``int64`` array of row indices per client.
        """
        matrix = self.proportions(labels, num_clients, num_classes, rng)
        return self.split(labels, matrix, rng)

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={value!r}" for name, value in vars(self).items())
        return f"{type(self).__name__}({args})"


class IID(Partitioner):
    """Gives every client an equal share of every class.

    Rows are shuffled before they are cut, and leftover rows of each class go to different clients in turn,
    so client sizes differ by at most one row per class and, overall, by at most one row.
    """

    def proportions(
        self,
        labels: np.ndarray,
        num_clients: int,
        num_classes: int | None,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Return the uniform matrix ``1 / num_clients``; see :meth:`Partitioner.proportions`."""
        _check_num_clients(num_clients)
        num_classes = _resolve_num_classes(labels, num_classes)
        _check_labels(labels, num_classes)
        return np.full((num_clients, num_classes), 1.0 / num_clients)


class Dirichlet(Partitioner):
    """Label-skewed partition: each class's shares across clients follow ``Dirichlet(alpha, ..., alpha)``.

    Small ``alpha`` (e.g. 0.1) gives each client a few dominant classes; large ``alpha`` (e.g. 100)
    approaches :class:`IID`. If a draw leaves a client with fewer than ``min_samples_per_client`` training
    rows, the matrix is redrawn a bounded number of times; if that still fails, rows are moved from the
    largest clients to the short ones, deterministically, and the returned matrix reflects the move.

    Args:
        alpha: Concentration of the Dirichlet prior, greater than 0.
        min_samples_per_client: Fewest rows of the drawing split (the training split) that any client may
            receive, at least 0.

    Raises:
        ValueError: If ``alpha <= 0`` or ``min_samples_per_client < 0``.
    """

    #: Fresh draws tried before falling back to moving rows between clients.
    max_redraws: int = 10

    def __init__(self, alpha: float = 0.5, min_samples_per_client: int = 1) -> None:
        if not np.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"Dirichlet alpha must be a finite number > 0, got alpha={alpha!r}.")
        if min_samples_per_client < 0:
            raise ValueError(
                f"min_samples_per_client must be >= 0, got min_samples_per_client={min_samples_per_client!r}."
            )
        self.alpha = float(alpha)
        self.min_samples_per_client = int(min_samples_per_client)

    def proportions(
        self,
        labels: np.ndarray,
        num_clients: int,
        num_classes: int | None,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Draw one Dirichlet column per class; see :meth:`Partitioner.proportions`.

        Raises:
            ValueError: Also if ``labels`` has fewer than ``num_clients * min_samples_per_client`` rows.
        """
        _check_num_clients(num_clients)
        num_classes = _resolve_num_classes(labels, num_classes)
        labels = _check_labels(labels, num_classes)
        needed = num_clients * self.min_samples_per_client
        if labels.size < needed:
            raise ValueError(
                f"Cannot give each of {num_clients} clients min_samples_per_client="
                f"{self.min_samples_per_client} rows: the split has only {labels.size} rows "
                f"(needs {needed}). Lower min_samples_per_client or the number of clients."
            )
        class_sizes = np.bincount(labels, minlength=num_classes)
        matrix = self._draw(num_clients, num_classes, rng)
        for _ in range(self.max_redraws):
            if _allocate(class_sizes, matrix).sum(axis=1).min() >= self.min_samples_per_client:
                return matrix
            matrix = self._draw(num_clients, num_classes, rng)
        counts = _allocate(class_sizes, matrix)
        if counts.sum(axis=1).min() >= self.min_samples_per_client:
            return matrix
        counts = _top_up(counts, self.min_samples_per_client)
        present = class_sizes > 0
        # Classes absent from the drawing split keep their drawn column: only their val/test rows use it.
        matrix[:, present] = counts[:, present] / class_sizes[present]
        return matrix

    def _draw(self, num_clients: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
        matrix = rng.dirichlet(np.full(num_clients, self.alpha), size=num_classes).T
        # For tiny alpha every gamma variate can underflow to 0 and numpy returns NaN; the limit of
        # Dirichlet(alpha -> 0) is a one-hot vector, so give such a class wholly to one random client.
        bad = ~np.isfinite(matrix).all(axis=0) | (matrix.sum(axis=0) <= 0)
        for k in np.flatnonzero(bad):
            matrix[:, k] = 0.0
            matrix[rng.integers(num_clients), k] = 1.0
        return matrix / matrix.sum(axis=0, keepdims=True)


def _empty() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


def _check_num_clients(num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got num_clients={num_clients!r}.")


def _resolve_num_classes(labels: np.ndarray, num_classes: int | None) -> int:
    if num_classes is not None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got num_classes={num_classes!r}.")
        return int(num_classes)
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError("Cannot infer num_classes from an empty label array; pass num_classes explicitly.")
    return int(labels.max()) + 1


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class ids, got shape {labels.shape}.")
    if labels.size == 0:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] for num_classes={num_classes}, "
            f"got range [{labels.min()}, {labels.max()}]."
        )
    return labels.astype(np.int64)


def _check_proportions(proportions: np.ndarray) -> np.ndarray:
    matrix = np.asarray(proportions, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[1] < 1:
        raise ValueError(f"proportions must be a (num_clients, num_classes) matrix, got shape {matrix.shape}.")
    if not np.isfinite(matrix).all() or (matrix < 0).any():
        raise ValueError("proportions must be finite and non-negative.")
    if not np.allclose(matrix.sum(axis=0), 1.0, atol=1e-6):
        raise ValueError("Every column of proportions must sum to 1 (each class's rows are shared out fully).")
    return matrix


def _allocate(class_sizes: np.ndarray, proportions: np.ndarray) -> np.ndarray:
    """Round ``class_sizes[k] * proportions[:, k]`` to integers that sum to ``class_sizes[k]``.

    Largest-remainder rounding. Ties in the remainder go to clients in turn, starting after the client that
    last received a leftover row, so an even split (IID) does not always favour client 0. The result depends
    only on its inputs, which lets :class:`Dirichlet` predict exactly how :meth:`Partitioner.split` will cut
    the training split.

    Returns:
        An ``int64`` ``(num_clients, num_classes)`` matrix of row counts.
    """
    num_clients, num_classes = proportions.shape
    counts = np.zeros((num_clients, num_classes), dtype=np.int64)
    start = 0
    for k in range(num_classes):
        size = int(class_sizes[k])
        if size == 0:
            continue
        column = proportions[:, k] / proportions[:, k].sum()
        quotas = size * column
        nearest = np.rint(quotas)
        quotas = np.where(np.abs(quotas - nearest) < _INTEGER_TOLERANCE, nearest, quotas)
        floors = np.floor(quotas).astype(np.int64)
        leftover = size - int(floors.sum())
        if leftover > 0:
            turn = (np.arange(num_clients) - start) % num_clients
            # lexsort sorts by the last key first: remainder descending, then turn order.
            order = np.lexsort((turn, -(quotas - floors)))
            floors[order[:leftover]] += 1
            start = (int(order[leftover - 1]) + 1) % num_clients
        counts[:, k] = floors
    return counts


def _top_up(counts: np.ndarray, minimum: int) -> np.ndarray:
    """Move rows from the largest clients to those below ``minimum`` until every client has ``minimum``.

    Deterministic and bounded: each move lowers the total shortfall by at least one row. The caller
    guarantees ``counts.sum() >= counts.shape[0] * minimum``, so a donor above the minimum always exists.
    """
    counts = counts.copy()
    totals = counts.sum(axis=1)
    while (short := np.flatnonzero(totals < minimum)).size:
        receiver = int(short[0])
        donor = int(np.argmax(totals))
        k = int(np.argmax(counts[donor]))
        moved = int(min(minimum - totals[receiver], totals[donor] - minimum, counts[donor, k]))
        counts[donor, k] -= moved
        counts[receiver, k] += moved
        totals[donor] -= moved
        totals[receiver] += moved
    return counts
